/*
 * dgram_server.c - the DATAGRAM kind: one socket, no connections. Each datagram is one message;
 * its sender's address is its peer, known to the caller as a slot and id like a connection, with
 * the credentials the kernel attaches to every datagram (SO_PASSCRED). Its side of each API call
 * is the table uds_dgram_kind.
 *
 * - Peers live in a table keyed by address, bounded in number (max_connections: the least
 *   recently active one is forgotten to make room) and forgotten once idle for idle_timeout.
 *   A sender with no address of its own (never bound) can be heard but not answered: its
 *   messages come with slot -1, and replies to it cannot exist.
 * - A peer's life and its replies are in dgram_peer.c.
 * - Received datagrams land in the read arena (one that spills past the arena's room goes to
 *   a buffer of its own for the turn), so events point at them until the next poll.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* ---- receiving ---------------------------------------------------------------------------- */

static int same_creds(const struct ucred *a, const struct ucred *b)
{
    return a->pid == b->pid && a->uid == b->uid && a->gid == b->gid;
}

/* The peer for a datagram from info's sender: found, or made (with its CONNECTED event, after
 * the CLOSED event of the peer forgotten to make room for it). NULL if it cannot be made. */
static uds_peer *peer_of_sender(uds_server *s, const uds_recv_info *info, uds_event *ev, int *n)
{
    uds_addr_key key;
    memcpy(&key.addr, &info->addr, info->addr_len);
    key.addr_len = info->addr_len;
    uds_addr_key_hash(&key);
    uds_peer *p = (uds_peer *)uds_addr_table_find(&s->peers, &key);
    if (p != NULL && same_creds(&p->creds, &info->creds))
        return p;
    if (p != NULL) {
        /* Another process behind the same address (the last one's socket closed, this one
         * bound the name): another peer, to be admitted (and authorized) afresh. */
        *n = uds_peer_forget(s, p, UDS_CLOSE_PEER, ev, *n);
    } else if (s->cfg.max_connections > 0 && s->peers.n >= s->cfg.max_connections) {
        /* Full: forget the least recently active peer (the head of the idle list). */
        if (s->idle.head == NULL)
            return NULL; /* every one is closing: this datagram is not heard */
        *n = uds_peer_forget(s, UDS_PEER_OF(s->idle.head, lru), UDS_CLOSE_EVICTED, ev, *n);
    }
    if ((p = uds_peer_new(s, &key, &info->creds)) == NULL)
        return NULL;
    uds_event *e = uds_event_next(ev, n, UDS_EV_CONNECTED, p->key.slot, p->id);
    e->pid = info->creds.pid;
    e->uid = info->creds.uid;
    e->gid = info->creds.gid;
    return p;
}

/* Whether a datagram of len bytes that passed the policy is heard: from a sender with no
 * address (*p NULL), or from a peer that is not refused or closing (*p). */
static int heard(uds_server *s, uds_recv_info *info, size_t len, uds_peer **p, uds_event *ev,
                 int *n)
{
    *p = NULL;
    if (info->addr_len <= offsetof(struct sockaddr_un, sun_path))
        return 1; /* no address: heard, not answerable */
    *p = peer_of_sender(s, info, ev, n);
    if (*p == NULL || ((*p)->flags & UDS_PF_REFUSED)) {
        UDS_COUNT(s->stats.dgrams_refused, *p != NULL);
        return 0;
    }
    if ((*p)->flags & UDS_PF_CLOSING)
        return 0; /* closed by the application: not heard */
    uds_peer_touch(s, *p);
    UDS_COUNT((*p)->stats->msgs_in, 1);
    UDS_COUNT((*p)->stats->bytes_in, len);
    return 1;
}

/* A datagram of len bytes received at `at` (room bytes there, the rest in the scratch area):
 * its events, if it is heard. Returns n. */
static int take_dgram(uds_server *s, char *at, size_t room, size_t len, uds_recv_info *info,
                      uds_event *ev, int n)
{
    if (info->nfds > 0)
        UDS_COUNT(s->stats.fds_in, (uint64_t)info->nfds);
    if ((info->flags & (MSG_TRUNC | MSG_CTRUNC)) || len > s->cfg.max_message) {
        uds_recv_info_close_fds(info); /* too long, or more descriptors than max_fds */
        UDS_COUNT(s->stats.dgrams_truncated, 1);
        return n;
    }
    if (!info->has_creds)
        info->creds.pid = -1, info->creds.uid = info->creds.gid = (uint32_t)-1;
    uds_event *e;
    uds_peer *p;
    /* (A datagram brings its sender's primary group only.) */
    if (!uds_policy_allows(&s->policy, info->creds.uid, info->creds.gid)) {
        uds_recv_info_close_fds(info);
        UDS_COUNT(s->stats.dgrams_refused, 1);
        e = uds_event_next(ev, &n, UDS_EV_REFUSED, -1, 0);
    } else if (!heard(s, info, len, &p, ev, &n)) {
        uds_recv_info_close_fds(info);
        return n;
    } else {
        /* It keeps its place in the arena, or, if it spilled past it, goes whole into a buffer
         * of its own for this turn. */
        const char *data = at;
        if (len > room) {
            if (uds_buf_append(&s->big, at, room, &s->pool) < 0 ||
                uds_buf_append(&s->big, s->scratch.data, len - room, &s->pool) < 0) {
                uds_buf_release(&s->big, &s->pool);
                uds_recv_info_close_fds(info);
                return n;
            }
            data = s->big.data;
            uds_scratch_used(&s->scratch, len - room);
        } else {
            s->arena_used += len;
        }
        UDS_COUNT(s->stats.msgs_in, 1);
        UDS_COUNT(s->stats.bytes_in, len);
        e = uds_event_next(ev, &n, UDS_EV_MESSAGE, p ? p->key.slot : -1, p ? p->id : 0);
        e->data = data;
        e->len = len;
        if (info->nfds > 0) /* (there is room: see read_dgrams()) */
            memcpy(uds_fd_out(s, e, info->nfds), info->fds, (size_t)info->nfds * sizeof(int));
    }
    e->pid = info->creds.pid;
    e->uid = info->creds.uid;
    e->gid = info->creds.gid;
    return n;
}

/* Reads datagrams while there are some and the batch and the arena have room (within a
 * bound), turning each into events. *empty: the last read found the socket's queue empty.
 * Returns n. */
static int read_dgrams(uds_server *s, uds_event *ev, int n, int cap, int *empty)
{
    size_t limit = s->cfg.max_message + 1;
    *empty = 0;
    /* Room in the batch for three events (CLOSED, CONNECTED, MESSAGE) and for the descriptors
     * a datagram may bring; else the rest waits for the next turn. */
    for (int i = 0; i < UDS_DGRAMS_PER_READ && n + 3 <= cap &&
                    UDS_FD_OUT_MAX - s->fd_out_n >= s->cfg.max_fds; i++) {
        size_t room = UDS_ARENA_SIZE - s->arena_used;
        if (room < (limit < UDS_ARENA_MIN_READ ? limit : UDS_ARENA_MIN_READ) || s->big.data != NULL)
            break; /* the rest next turn, when the arena is empty again */
        char *at = s->arena + s->arena_used;
        struct iovec iov[2];
        int iovcnt = uds_scratch_iov(&s->scratch, limit, iov, at, room);
        if (iovcnt < 0)
            break;
        uds_recv_info info;
        info.want_addr = info.want_creds = info.real_len = 1;
        ssize_t r = uds_recv_msg(s->listen_fd, iov, iovcnt, s->cfg.max_fds, &info);
        if (r < 0) {
            *empty = 1; /* EAGAIN: no more; anything else the next readiness retells */
            break;
        }
        n = take_dgram(s, at, iov[0].iov_len, (size_t)r, &info, ev, n);
    }
    return n;
}

/* ---- the turn ----------------------------------------------------------------------------- */

/* Finishes the peers that are closing and owe nothing more, and those idle too long. */
static int retire_peers(uds_server *s, uds_event *ev, int n, int cap)
{
    uds_tnode *t;
    while ((t = uds_tlist_due(&s->linger, s->now_ms)) != NULL) {
        uds_peer *p = UDS_PEER_OF(t, linger);
        uds_tlist_remove(&s->linger, t);
        uds_peer_give_up_replies(p); /* not taken within flush_timeout: given up */
    }
    uds_peer **link = &s->closing;
    while (*link != NULL && n < cap) {
        uds_peer *p = *link;
        if (p->out_head != NULL) {
            link = &p->close_next;
            continue;
        }
        *link = p->close_next;
        n = uds_peer_report_closed(s, p, ev, n);
    }
    while (n < cap && (t = uds_tlist_due(&s->idle, s->now_ms)) != NULL) {
        uds_peer *p = UDS_PEER_OF(t, lru);
        if (p->flags & UDS_PF_FINAL) {
            uds_peer_free(s, p);
        } else if (p->flags & UDS_PF_CLOSING) {
            uds_tlist_remove(&s->idle, t); /* on its way out already */
        } else {
            uds_tlist_remove(&s->idle, t);
            uds_peer_close(s, p, UDS_CLOSE_IDLE_TIMEOUT, 0);
            if (p->out_head == NULL) {
                s->closing = p->close_next; /* it was just put first */
                n = uds_peer_report_closed(s, p, ev, n);
            }
        }
    }
    return n;
}

/* Shutting down: reads what is still queued; once a turn finds nothing more, and the replies
 * to what came before are out (they were queued when this turn began), closes every peer. */
static int drain_for_shutdown(uds_server *s, uds_event *ev, int n, int cap)
{
    int before = n, empty;
    n = read_dgrams(s, ev, n, cap, &empty);
    if (n > before && s->now_ms < s->drain_until)
        return n;
    if (!empty && n >= cap && s->now_ms < s->drain_until)
        return n;
    s->drain_until = 0;
    s->live--; /* (counted while draining: see shutdown_dgram()) */
    for (int i = 0; i < s->peers.cap; i++) {
        uds_peer *p = (uds_peer *)s->peers.slots[i];
        if (p != NULL && !(p->flags & UDS_PF_FINAL))
            uds_peer_close(s, p, UDS_CLOSE_SHUTDOWN, 0);
    }
    return n;
}

/* The sooner of timeout and the next deadline of the peers. */
static int64_t dgram_deadlines(const uds_server *s, int64_t timeout)
{
    timeout = uds_timeout_list(timeout, &s->idle, s->now_ms);
    timeout = uds_timeout_list(timeout, &s->linger, s->now_ms);
    if (s->retry != NULL)
        timeout = uds_timeout_at(timeout, s->retry_at, s->now_ms);
    return timeout;
}

static int poll_dgram(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    uds_clock_update(&s->now_ms); /* peers always have an idle deadline */
    s->arena_used = 0;
    uds_buf_release(&s->big, &s->pool);
    uds_peer_retry_full(s);
    int n = retire_peers(s, ev, 0, cap);
    if (n >= cap)
        return n;
    if (s->drain_until > 0)
        return drain_for_shutdown(s, ev, n, cap);
    /* (Peers still closing now wait for their queued replies: the retry or linger timer.) */
    int64_t t = dgram_deadlines(s, n > 0 ? 0 : timeout_ms < 0 ? -1 : timeout_ms);
    /* (2: the wakeup pipe may take one, and the socket is the only other descriptor) */
    int k = uds_poller_wait(&s->poller, s->ready, 2, uds_timeout_int(t), s->cfg.busy_poll_us);
    if (k < 0)
        return n > 0 ? n : k;
    uds_clock_update(&s->now_ms);
    if (k > 0 && !s->shutting_down) {
        int empty;
        n = read_dgrams(s, ev, n, cap, &empty);
    }
    return n;
}

/* ---- the caller's requests ---------------------------------------------------------------- */

/* A reply, or a push: the same for a datagram. */
static int send_dgram(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                      const int *fds, int nfds, int how)
{
    (void)how;
    if (slot < 0) {
        UDS_COUNT(s->stats.replies_unroutable, 1); /* its sender has no address */
        return -ENOTCONN;
    }
    uds_peer *p = uds_peer_find(s, slot, id);
    if (p == NULL || (p->flags & UDS_PF_CLOSING))
        return -ENOTCONN;
    return uds_peer_send(s, p, data, len, fds, nfds);
}

static int reply_run_dgram(uds_server *s, int slot, uint64_t id, const char *data,
                           const int16_t *lens, int n, int *rcs)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        rcs[i] = lens[i] < 0 ? 0 : send_dgram(s, slot, id, data, (size_t)lens[i], NULL, 0, UDS_SEND_REPLY);
        failed += rcs[i] < 0;
        data += lens[i] < 0 ? 0 : lens[i];
    }
    return failed;
}

static int peer_address_dgram(uds_server *s, int slot, uint64_t id, char *name, size_t *len)
{
    uds_peer *p = uds_peer_find(s, slot, id);
    if (p == NULL)
        return -ENOTCONN;
    return uds_sock_format_name(&p->key.addr, p->key.addr_len, name, len);
}

static int close_dgram(uds_server *s, int slot, uint64_t id, int reason)
{
    uds_peer *p = uds_peer_find(s, slot, id);
    if (p == NULL)
        return -ENOTCONN;
    uds_peer_close(s, p, reason, 0);
    return 0;
}

/* One socket serves every peer: reading cannot stop for one of them. */
static int hold_dgram(uds_server *s, int slot, uint64_t id, int hold)
{
    (void)s, (void)slot, (void)id, (void)hold;
    return -EOPNOTSUPP;
}

/* One socket for every peer: there is no connection to hand back. */
static int retire_dgram(uds_server *s)
{
    (void)s;
    return -EOPNOTSUPP;
}

static int detach_dgram(uds_server *s, int slot, uint64_t id)
{
    (void)s, (void)slot, (void)id;
    return -EOPNOTSUPP;
}

/* 0 while a turn has work without readiness: a shutdown's drain, or a peer closing that owes
 * nothing (the turn reports it). */
static int timeout_dgram(const uds_server *s)
{
    if (s->drain_until > 0)
        return 0;
    for (const uds_peer *p = s->closing; p != NULL; p = p->close_next)
        if (p->out_head == NULL)
            return 0;
    return uds_timeout_int(dgram_deadlines(s, -1));
}

static uds_stats **stats_dgram(uds_server *s, int slot, uint64_t id)
{
    uds_peer *p = uds_peer_find(s, slot, id);
    return p == NULL ? NULL : &p->stats;
}

/* Datagrams sent before the shutdown are still heard and answered (within flush_timeout);
 * then every peer closes. The drain counts as live until then. Replies still go out from the
 * socket. */
static int shutdown_dgram(uds_server *s)
{
    s->drain_until = s->now_ms + (uint64_t)s->cfg.flush_timeout_ms + 1;
    s->live++;
    return 1;
}

static void free_dgram(uds_server *s)
{
    uds_peer_free_all(s);
    uds_buf_release(&s->big, NULL);
}

const uds_kind_ops uds_dgram_kind = {
    .poll = poll_dgram, .send = send_dgram, .reply_run = reply_run_dgram, .close = close_dgram,
    .peer_address = peer_address_dgram, .stats = stats_dgram, .hold = hold_dgram,
    .timeout = timeout_dgram, .retire = retire_dgram, .detach = detach_dgram,
    .shutdown = shutdown_dgram, .free = free_dgram,
};
