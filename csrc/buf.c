/*
 * buf.c - a growable byte buffer: allocated on first use, grown geometrically, compacted in
 * place, given back whole; and the pool that keeps large ones warm.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int uds_buf_reserve(uds_buf *b, size_t n, uds_pool *pool)
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
    size_t cap = b->cap ? b->cap : UDS_BUF_FIRST;
    while (cap - live < n)
        cap *= 2;
    if (b->data == NULL && pool != NULL && cap == UDS_BUF_FIRST && pool->nsmall > 0) {
        b->data = pool->small[--pool->nsmall];
        b->cap = cap;
        return 0;
    }
    if (b->data == NULL && pool != NULL && cap >= UDS_POOL_MIN) {
        int best = -1; /* the smallest pooled buffer that fits */
        for (int i = 0; i < pool->n; i++)
            if (pool->cap[i] >= cap && (best < 0 || pool->cap[i] < pool->cap[best]))
                best = i;
        if (best >= 0) {
            b->data = pool->data[best];
            b->cap = pool->cap[best];
            pool->bytes -= pool->cap[best];
            pool->n--;
            pool->data[best] = pool->data[pool->n];
            pool->cap[best] = pool->cap[pool->n];
            return 0;
        }
    }
    char *p = realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int uds_buf_append(uds_buf *b, const void *p, size_t n, uds_pool *pool)
{
    if (n == 0)
        return 0;
    int rc = uds_buf_reserve(b, n, pool);
    if (rc < 0)
        return rc;
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

void uds_buf_release(uds_buf *b, uds_pool *pool)
{
    if (b->data != NULL && pool != NULL && b->cap == UDS_BUF_FIRST && pool->nsmall < UDS_POOL_SMALL) {
        pool->small[pool->nsmall++] = b->data;
    } else if (b->data != NULL && pool != NULL && b->cap >= UDS_POOL_MIN && pool->n < UDS_POOL_SLOTS &&
               pool->bytes + b->cap <= UDS_POOL_BYTES) {
        pool->data[pool->n] = b->data;
        pool->cap[pool->n++] = b->cap;
        pool->bytes += b->cap;
    } else {
        free(b->data);
    }
    b->data = NULL;
    b->start = b->end = b->cap = 0;
}

void uds_pool_free(uds_pool *pool)
{
    for (int i = 0; i < pool->n; i++)
        free(pool->data[i]);
    for (int i = 0; i < pool->nsmall; i++)
        free(pool->small[i]);
    pool->n = pool->nsmall = 0;
    pool->bytes = 0;
}
