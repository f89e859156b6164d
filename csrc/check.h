/*
 * check.h - the C tests' assertion, which reports the failed condition and counts it, going
 * on; and the few steps a test cannot go on without (a directory, a connection).
 */
#ifndef UDS_CHECK_H
#define UDS_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>

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

/* A new socket of this family and type connected to sa, with a 10 s receive timeout (so that a
 * test waiting for a reply that never comes fails instead of hanging), or ends the test
 * program. */
static inline int check_connect(int family, int type, const void *sa, socklen_t len)
{
    int fd = socket(family, type, 0);
    if (fd < 0 || connect(fd, (const struct sockaddr *)sa, len) < 0) {
        perror("connect");
        exit(2);
    }
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
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
