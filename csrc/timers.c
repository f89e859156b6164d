/*
 * timers.c - deadline lists. Each list holds nodes that all got the same timeout, so appending
 * keeps them ordered by deadline: no heap, no sorting, expiry reads the head.
 */
#define _GNU_SOURCE
#include "internal.h"

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

int64_t uds_tlist_due_in(const uds_tlist *l, uint64_t now_ms)
{
    if (l->head == NULL)
        return -1;
    return l->head->deadline_ms > now_ms ? (int64_t)(l->head->deadline_ms - now_ms) : 0;
}
