/*
 * buf.c - a growable byte buffer: allocated on first use, grown geometrically, compacted in
 * place, given back whole.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int uds_buf_reserve(uds_buf *b, size_t n)
{
    size_t live = b->end - b->start;
    if (b->cap - b->end >= n)
        return 0;
    if (b->start > 0) {
        /* Sliding the live bytes to the front is cheaper than growing when it is enough. */
        if (live > 0)
            memmove(b->data, b->data + b->start, live);
        b->start = 0;
        b->end = live;
        if (b->cap - b->end >= n)
            return 0;
    }
    if (n > SIZE_MAX / 2 - live)
        return -ENOMEM;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - live < n)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int uds_buf_append(uds_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    int rc = uds_buf_reserve(b, n);
    if (rc < 0)
        return rc;
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

void uds_buf_release(uds_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->start = b->end = b->cap = 0;
}
