/*
 * check.h - the C tests' assertion: reports the failed condition and counts it, going on.
 */
#ifndef UDS_CHECK_H
#define UDS_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond);                         \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

#endif /* UDS_CHECK_H */
