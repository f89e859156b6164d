/*
 * timers.c - the clock and deadline lists. Each list holds nodes that all got the same
 * timeout, so appending keeps them ordered by deadline: no heap, no sorting, expiry reads the
 * head. Timeouts for a wait are in ms, -1 for none.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <limits.h>
#include <time.h>

void uds_clock_update(uint64_t *now_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    if (now > *now_ms)
        *now_ms = now;
}

void uds_tlist_append(uds_tlist *l, uds_tnode *n, uint64_t deadline_ms)
{
    uds_tlist_remove(l, n);
    n->deadline_ms = deadline_ms;
    n->next = NULL;
    n->prev = l->tail;
    if (l->tail)
        l->tail->next = n;
    else
        l->head = n;
    l->tail = n;
    n->linked = 1;
}

void uds_tlist_remove(uds_tlist *l, uds_tnode *n)
{
    if (!n->linked)
        return;
    if (n->prev)
        n->prev->next = n->next;
    else
        l->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        l->tail = n->prev;
    n->prev = n->next = NULL;
    n->linked = 0;
}

uds_tnode *uds_tlist_due(const uds_tlist *l, uint64_t now_ms)
{
    return l->head != NULL && l->head->deadline_ms <= now_ms ? l->head : NULL;
}

int64_t uds_timeout_at(int64_t timeout, uint64_t at_ms, uint64_t now_ms)
{
    int64_t t = at_ms > now_ms ? (int64_t)(at_ms - now_ms) : 0;
    return timeout < 0 || t < timeout ? t : timeout;
}

int64_t uds_timeout_list(int64_t timeout, const uds_tlist *l, uint64_t now_ms)
{
    return l->head == NULL ? timeout : uds_timeout_at(timeout, l->head->deadline_ms, now_ms);
}

int uds_timeout_int(int64_t timeout) { return timeout > INT_MAX ? INT_MAX : (int)timeout; }
