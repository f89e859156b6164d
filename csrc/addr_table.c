/*
 * addr_table.c - a table of entries known by socket address: slots, and an index from address
 * to slot (open addressing, linear probing, no tombstones). The DATAGRAM kind keeps its peers
 * here.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void uds_addr_key_hash(uds_addr_key *k)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    const unsigned char *p = (const unsigned char *)&k->addr;
    for (socklen_t i = 0; i < k->addr_len; i++)
        h = (h ^ p[i]) * 1099511628211u;
    k->hash = h;
}

static int same_addr(const uds_addr_key *a, const uds_addr_key *b)
{
    return a->hash == b->hash && a->addr_len == b->addr_len &&
           memcmp(&a->addr, &b->addr, a->addr_len) == 0;
}

uds_addr_key *uds_addr_table_find(const uds_addr_table *t, const uds_addr_key *k)
{
    if (t->index_size == 0)
        return NULL;
    size_t mask = t->index_size - 1;
    for (size_t i = k->hash & mask;; i = (i + 1) & mask) {
        int32_t e = t->index[i];
        if (e == 0)
            return NULL;
        if (same_addr(t->slots[e - 1], k))
            return t->slots[e - 1];
    }
}

static void index_put(uds_addr_table *t, const uds_addr_key *k)
{
    size_t mask = t->index_size - 1, i = k->hash & mask;
    while (t->index[i] != 0)
        i = (i + 1) & mask;
    t->index[i] = k->slot + 1;
}

/* Room for one more peer: the slot array and an index at most half full. */
static int make_room(uds_addr_table *t)
{
    if (t->n + 1 > t->cap) {
        int cap = t->cap ? t->cap * 2 : 64;
        uds_addr_key **slots = realloc(t->slots, (size_t)cap * sizeof *slots);
        if (slots == NULL)
            return -ENOMEM;
        memset(slots + t->cap, 0, (size_t)(cap - t->cap) * sizeof *slots);
        t->slots = slots;
        t->cap = cap;
    }
    if ((size_t)(t->n + 1) * 2 > t->index_size) {
        size_t size = t->index_size ? t->index_size * 2 : 128;
        int32_t *index = calloc(size, sizeof *index);
        if (index == NULL)
            return -ENOMEM;
        free(t->index);
        t->index = index;
        t->index_size = size;
        for (int i = 0; i < t->cap; i++)
            if (t->slots[i] != NULL)
                index_put(t, t->slots[i]);
    }
    return 0;
}

int uds_addr_table_add(uds_addr_table *t, uds_addr_key *k)
{
    if (make_room(t) < 0)
        return -ENOMEM;
    int slot = 0;
    while (t->slots[slot] != NULL)
        slot++;
    k->slot = slot;
    t->slots[slot] = k;
    t->n++;
    index_put(t, k);
    return 0;
}

/* Removes k's entry, shifting back the entries after it that would otherwise be cut off from
 * their home position (no tombstones). */
void uds_addr_table_remove(uds_addr_table *t, const uds_addr_key *k)
{
    size_t mask = t->index_size - 1, i = k->hash & mask;
    while (t->index[i] != k->slot + 1)
        i = (i + 1) & mask;
    for (size_t j = (i + 1) & mask; t->index[j] != 0; j = (j + 1) & mask) {
        size_t home = t->slots[t->index[j] - 1]->hash & mask;
        /* Move j into the hole at i unless its home lies cyclically in (i, j]. */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            t->index[i] = t->index[j];
            i = j;
        }
    }
    t->index[i] = 0;
    t->slots[k->slot] = NULL;
    t->n--;
}

void uds_addr_table_free(uds_addr_table *t)
{
    free(t->slots);
    free(t->index);
    memset(t, 0, sizeof *t);
}
