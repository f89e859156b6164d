/*
 * peers.c - the DATAGRAM kind's table of peers: slots, and an index from address to slot
 * (open addressing, linear probing, no tombstones). Used by dgram.c.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- the table ---------------------------------------------------------------------------- */

uint64_t uds_peers_hash(const struct sockaddr_un *a, socklen_t len)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    const unsigned char *p = (const unsigned char *)a;
    for (socklen_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211u;
    return h;
}

static int same_addr(const uds_peer *p, const struct sockaddr_un *a, socklen_t len)
{
    return p->addr_len == len && memcmp(&p->addr, a, len) == 0;
}

/* Open addressing, linear probing; entries are slot + 1 (0: empty). */
uds_peer *uds_peers_find(const uds_server *s, const struct sockaddr_un *a, socklen_t len,
                           uint64_t h)
{
    if (s->htab_size == 0)
        return NULL;
    size_t mask = s->htab_size - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        int32_t e = s->htab[i];
        if (e == 0)
            return NULL;
        uds_peer *p = s->peers[e - 1];
        if (p->hash == h && same_addr(p, a, len))
            return p;
    }
}

void uds_peers_put(uds_server *s, uds_peer *p)
{
    size_t mask = s->htab_size - 1, i = p->hash & mask;
    while (s->htab[i] != 0)
        i = (i + 1) & mask;
    s->htab[i] = p->slot + 1;
}

/* Removes p's entry, shifting back the entries after it that would otherwise be cut off from
 * their home position (no tombstones). */
void uds_peers_del(uds_server *s, const uds_peer *p)
{
    size_t mask = s->htab_size - 1, i = p->hash & mask;
    while (s->htab[i] != p->slot + 1)
        i = (i + 1) & mask;
    for (size_t j = (i + 1) & mask; s->htab[j] != 0; j = (j + 1) & mask) {
        size_t home = s->peers[s->htab[j] - 1]->hash & mask;
        /* Move j into the hole at i unless its home lies cyclically in (i, j]. */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            s->htab[i] = s->htab[j];
            i = j;
        }
    }
    s->htab[i] = 0;
}

/* Room for one more peer: the slot array and a table at most half full. */
int uds_peers_room(uds_server *s)
{
    if (s->npeers + 1 > s->peers_cap) {
        int cap = s->peers_cap ? s->peers_cap * 2 : 64;
        uds_peer **t = realloc(s->peers, (size_t)cap * sizeof *t);
        if (t == NULL)
            return -ENOMEM;
        memset(t + s->peers_cap, 0, (size_t)(cap - s->peers_cap) * sizeof *t);
        s->peers = t;
        s->peers_cap = cap;
    }
    if ((size_t)(s->npeers + 1) * 2 > s->htab_size) {
        size_t size = s->htab_size ? s->htab_size * 2 : 128;
        int32_t *t = calloc(size, sizeof *t);
        if (t == NULL)
            return -ENOMEM;
        free(s->htab);
        s->htab = t;
        s->htab_size = size;
        for (int i = 0; i < s->peers_cap; i++)
            if (s->peers[i] != NULL)
                uds_peers_put(s, s->peers[i]);
    }
    return 0;
}
