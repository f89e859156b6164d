/*
 * check.h - the C tests' assertion: reports the failed condition and counts it, going on.
 */
#ifndef UDS_CHECK_H
#define UDS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #cond);                         \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

/* Makes a fresh directory from template (ending in XXXXXX), or ends the test program. */
static inline void check_mkdtemp(char *template)
{
    if (mkdtemp(template) == NULL) {
        perror("mkdtemp");
        exit(2);
    }
}

/* The test program's verdict: prints it, returns its exit status. */
static inline int check_done(const char *name)
{
    if (failures) {
        fprintf(stderr, "%s: %d failed\n", name, failures);
        return 1;
    }
    printf("%s: all passed\n", name);
    return 0;
}

#endif /* UDS_CHECK_H */
