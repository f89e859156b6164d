/*
 * dgram.c - the DATAGRAM kind: one socket, no connections. Each datagram is one message; its
 * sender's address is its peer, known to the caller as a slot and id like a connection, with
 * the credentials the kernel attaches to every datagram (SO_PASSCRED).
 *
 * - Peers live in a table keyed by address, bounded in number (max_connections: the least
 *   recently active one is forgotten to make room) and forgotten once idle for idle_timeout.
 *   A sender with no address of its own (never bound) can be heard but not answered: its
 *   messages come with slot -1, and replies to it cannot exist.
 * - A reply goes straight out with sendto(). A peer whose queue is full (EAGAIN) gets its
 *   replies queued, in order, up to max_output; they are retried on a timer with a back-off
 *   (1 ms doubling to 64 ms), since epoll cannot say when another socket's queue has room:
 *   the loop never spins on a full peer. A peer gone (its socket closed) ends its peer.
 * - Received datagrams land in the read arena (one that spills past the arena's room goes to
 *   a buffer of its own for the turn), so events point at them until the next poll.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PEER_OF(node, field) ((uds_peer *)((char *)(node) - offsetof(uds_peer, field)))

/* A reply waiting for room in its peer's queue: the descriptors (our duplicates), then the
 * bytes. */
struct uds_dgram {
    struct uds_dgram *next;
    size_t len;
    int nfds;
    int fds[]; /* nfds descriptors, then len bytes */
};

static char *dgram_bytes(struct uds_dgram *d) { return (char *)(d->fds + d->nfds); }

/* ---- peers -------------------------------------------------------------------------------- */

static void drop_queue(uds_peer *p)
{
    while (p->out_head) {
        struct uds_dgram *d = p->out_head;
        p->out_head = d->next;
        for (int i = 0; i < d->nfds; i++)
            close(d->fds[i]);
        free(d);
    }
    p->out_tail = NULL;
    p->out_bytes = 0;
}

static void peer_free(uds_server *s, uds_peer *p)
{
    if (p->flags & UDS_PF_RETRY) {
        uds_peer **link = &s->retry;
        while (*link != p)
            link = &(*link)->retry_next;
        *link = p->retry_next;
    }
    uds_peers_del(s, p);
    uds_tlist_remove(&s->idle, &p->lru);
    uds_tlist_remove(&s->linger, &p->linger);
    drop_queue(p);
    s->peers[p->slot] = NULL;
    s->npeers--;
    free(p);
}

static uds_peer *peer_get(const uds_server *s, int slot, uint64_t id)
{
    if (slot < 0 || slot >= s->peers_cap)
        return NULL;
    uds_peer *p = s->peers[slot];
    return p != NULL && p->id == id && !(p->flags & UDS_PF_FINAL) ? p : NULL;
}

static void touch_peer(uds_server *s, uds_peer *p)
{
    uds_tlist_append(&s->idle, &p->lru, s->now_ms + (uint64_t)s->cfg.idle_timeout_ms);
}

/* ---- events ------------------------------------------------------------------------------- */

static uds_event *next_event(uds_event *ev, int *n, int type, int slot, uint64_t id)
{
    uds_event *e = &ev[(*n)++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->slot = slot;
    e->id = id;
    return e;
}

/* Reports p closed (its CLOSED event) and forgets it; a refused peer is kept, silent, until it
 * expires, so that its datagrams cost nothing more. */
static int peer_finish(uds_server *s, uds_peer *p, uds_event *ev, int n)
{
    uds_event *e = next_event(ev, &n, UDS_EV_CLOSED, p->slot, p->id);
    e->len = p->out_bytes;
    e->reason = p->reason;
    e->err = p->err;
    s->live--;
    UDS_COUNT(s->stats.current, (uint64_t)-1);
    UDS_COUNT(s->stats.closed[p->reason], 1);
    if (p->reason == UDS_CLOSE_UNAUTHORIZED) {
        p->flags = (p->flags & ~UDS_PF_CLOSING) | UDS_PF_FINAL | UDS_PF_REFUSED;
        drop_queue(p);
        uds_tlist_remove(&s->linger, &p->linger);
    } else {
        peer_free(s, p);
    }
    return n;
}

/* Starts closing p: it finishes once its queued replies are out or its flush deadline passes
 * (at once if nothing is queued). */
static void peer_close(uds_server *s, uds_peer *p, int reason, int err)
{
    if (p->flags & (UDS_PF_CLOSING | UDS_PF_FINAL))
        return;
    p->flags |= UDS_PF_CLOSING;
    p->reason = reason;
    p->err = err;
    p->close_next = s->closing;
    s->closing = p;
    if (p->out_head != NULL)
        uds_tlist_append(&s->linger, &p->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
}

/* The peer is gone (or must go now): whatever is queued for it is given up. */
static void peer_fail(uds_server *s, uds_peer *p, int reason, int err)
{
    drop_queue(p);
    peer_close(s, p, reason, err);
}

/* ---- sending ------------------------------------------------------------------------------ */

/* One datagram to p. Returns 0 if sent, -EAGAIN if its queue is full, else -errno (the peer is
 * then failing, except for -EMSGSIZE: that datagram alone cannot be sent). */
static int send_one(uds_server *s, uds_peer *p, const char *data, size_t len, const int *fds,
                    int nfds)
{
    ssize_t w = uds_send_msg(s->listen_fd, data, len, fds, nfds, &p->addr, p->addr_len);
    if (w >= 0) {
        if (nfds > 0)
            UDS_COUNT(s->stats.fds_out, (uint64_t)nfds);
        touch_peer(s, p);
        return 0;
    }
    if (w == -EAGAIN || w == -ENOBUFS)
        return -EAGAIN;
    if (w == -EMSGSIZE)
        return (int)w;
    /* ECONNREFUSED: its socket is closed; ENOENT: its file is gone. */
    int gone = w == -ECONNREFUSED || w == -ENOENT || w == -ENOTDIR;
    peer_fail(s, p, gone ? UDS_CLOSE_PEER : UDS_CLOSE_ERROR, gone ? 0 : (int)-w);
    return (int)w;
}

static void retry_push(uds_server *s, uds_peer *p)
{
    if (p->flags & UDS_PF_RETRY)
        return;
    p->flags |= UDS_PF_RETRY;
    p->retry_next = s->retry;
    s->retry = p;
    if (s->retry_at == 0)
        s->retry_at = s->now_ms + UDS_RETRY_MIN_MS;
}

/* Sends what is queued for p while its queue has room. Returns 1 if anything went out. */
static int flush_queue(uds_server *s, uds_peer *p)
{
    int sent = 0;
    while (p->out_head != NULL) {
        struct uds_dgram *d = p->out_head;
        int rc = send_one(s, p, dgram_bytes(d), d->len, d->fds, d->nfds);
        if (rc == -EAGAIN || p->out_head != d)
            break; /* full; or failed, and the queue is dropped */
        /* Sent, or refused alone (EMSGSIZE): either way done with it. */
        p->out_head = d->next;
        if (p->out_head == NULL)
            p->out_tail = NULL;
        p->out_bytes -= d->len;
        for (int i = 0; i < d->nfds; i++)
            close(d->fds[i]);
        free(d);
        sent = 1;
    }
    return sent;
}

int uds_dgram_send(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                   const int *fds, int nfds)
{
    if (nfds < 0 || nfds > UDS_MAX_FDS)
        return -EINVAL;
    if (slot < 0) {
        UDS_COUNT(s->stats.replies_unroutable, 1); /* its sender has no address */
        return -ENOTCONN;
    }
    uds_peer *p = peer_get(s, slot, id);
    if (p == NULL || (p->flags & UDS_PF_CLOSING))
        return -ENOTCONN;
    UDS_COUNT(p->stats->msgs_out, 1);
    UDS_COUNT(p->stats->bytes_out, len);
    UDS_COUNT(s->stats.msgs_out, 1);
    UDS_COUNT(s->stats.bytes_out, len);
    if (p->out_head == NULL) {
        int rc = send_one(s, p, data, len, fds, nfds);
        if (rc != -EAGAIN)
            return rc == 0 ? 0 : rc == -EMSGSIZE ? rc : -ENOTCONN;
    }
    /* Its queue is full: keep the reply, in order behind any others, within max_output. */
    if (s->cfg.max_output > 0 && p->out_bytes + len > s->cfg.max_output) {
        peer_fail(s, p, UDS_CLOSE_SLOW_CONSUMER, 0);
        return -ENOBUFS;
    }
    struct uds_dgram *d = malloc(sizeof *d + (size_t)nfds * sizeof(int) + len);
    if (d == NULL)
        return -ENOMEM;
    d->next = NULL;
    d->len = len;
    d->nfds = 0;
    for (; d->nfds < nfds; d->nfds++) {
        if ((d->fds[d->nfds] = fcntl(fds[d->nfds], F_DUPFD_CLOEXEC, 3)) < 0) {
            int err = errno;
            for (int i = 0; i < d->nfds; i++)
                close(d->fds[i]);
            free(d);
            return -err;
        }
    }
    if (len > 0)
        memcpy(dgram_bytes(d), data, len);
    if (p->out_tail)
        p->out_tail->next = d;
    else
        p->out_head = d;
    p->out_tail = d;
    p->out_bytes += len;
    retry_push(s, p);
    return 0;
}

/* Retries the queued replies of full peers, when the back-off says so. */
static void retry_full_peers(uds_server *s)
{
    if (s->retry == NULL || s->now_ms < s->retry_at)
        return;
    uds_peer *p = s->retry, *still = NULL;
    int progress = 0;
    s->retry = NULL;
    while (p) {
        uds_peer *next = p->retry_next;
        p->flags &= ~UDS_PF_RETRY;
        progress |= flush_queue(s, p);
        if (p->out_head != NULL) {
            p->flags |= UDS_PF_RETRY;
            p->retry_next = still;
            still = p;
        }
        p = next;
    }
    s->retry = still;
    s->retry_backoff_ms = progress ? UDS_RETRY_MIN_MS : s->retry_backoff_ms * 2;
    if (s->retry_backoff_ms > UDS_RETRY_MAX_MS)
        s->retry_backoff_ms = UDS_RETRY_MAX_MS;
    if (s->retry_backoff_ms < UDS_RETRY_MIN_MS)
        s->retry_backoff_ms = UDS_RETRY_MIN_MS;
    s->retry_at = still ? s->now_ms + (uint64_t)s->retry_backoff_ms : 0;
}

/* ---- receiving ---------------------------------------------------------------------------- */

/* The peer for a datagram from addr: found, or made (with its CONNECTED event, after the
 * CLOSED event of the peer forgotten to make room for it). NULL if it cannot be made. */
/* Forgets p at once, whatever it was doing: reports it closed for reason (unless it was
 * already reported), gives up what was queued for it. */
static int forget(uds_server *s, uds_peer *p, int reason, uds_event *ev, int n)
{
    if (p->flags & UDS_PF_FINAL) {
        peer_free(s, p); /* a refused one: nothing more to report */
        return n;
    }
    if (p->flags & UDS_PF_CLOSING) {
        uds_peer **link = &s->closing;
        while (*link != p)
            link = &(*link)->close_next;
        *link = p->close_next;
    }
    drop_queue(p);
    p->reason = reason;
    p->err = 0;
    return peer_finish(s, p, ev, n);
}

static int same_creds(const struct ucred *a, const struct ucred *b)
{
    return a->pid == b->pid && a->uid == b->uid && a->gid == b->gid;
}

static uds_peer *peer_for(uds_server *s, const uds_recv_info *info, uds_event *ev, int *n)
{
    uint64_t h = uds_peers_hash(&info->addr, info->addr_len);
    uds_peer *p = uds_peers_find(s, &info->addr, info->addr_len, h);
    if (p != NULL && same_creds(&p->creds, &info->creds))
        return p;
    if (p != NULL) {
        /* Another process behind the same address (the last one's socket closed, this one
         * bound the name): another peer, to be admitted (and authorized) afresh. */
        *n = forget(s, p, UDS_CLOSE_PEER, ev, *n);
    } else if (s->cfg.max_connections > 0 && s->npeers >= s->cfg.max_connections) {
        /* Full: forget the least recently active peer (the head of the idle list). */
        if (s->idle.head == NULL)
            return NULL; /* every one is closing: this datagram is not heard */
        *n = forget(s, PEER_OF(s->idle.head, lru), UDS_CLOSE_EVICTED, ev, *n);
    }
    if (uds_peers_room(s) < 0 || (p = calloc(1, sizeof *p)) == NULL)
        return NULL;
    int slot = 0;
    while (s->peers[slot] != NULL)
        slot = (slot + 1 == s->peers_cap) ? 0 : slot + 1;
    p->slot = slot;
    p->id = s->next_id++;
    p->hash = h;
    memcpy(&p->addr, &info->addr, info->addr_len);
    p->addr_len = info->addr_len;
    p->creds = info->creds;
    p->stats = &p->own_stats;
    s->peers[slot] = p;
    s->npeers++;
    uds_peers_put(s, p);
    s->live++;
    UDS_COUNT(s->stats.current, 1);
    UDS_COUNT(s->stats.accepted, 1);
    uds_event *e = next_event(ev, n, UDS_EV_CONNECTED, slot, p->id);
    e->pid = info->creds.pid;
    e->uid = info->creds.uid;
    e->gid = info->creds.gid;
    return p;
}

/* Reads datagrams while there are some and the batch and the arena have room (within a
 * bound), turning each into events. Returns n. */
static int read_dgrams(uds_server *s, uds_event *ev, int n, int cap)
{
    size_t limit = s->cfg.max_message + 1;
    s->dgram_empty = 0;
    /* Room in the batch for three events (CLOSED, CONNECTED, MESSAGE) and for the descriptors
     * a datagram may bring; else the rest waits for the next turn. */
    for (int i = 0; i < UDS_DGRAMS_PER_READ && n + 3 <= cap &&
                    UDS_FD_OUT_MAX - s->fd_out_n >= s->cfg.max_fds; i++) {
        size_t room = UDS_ARENA_SIZE - s->arena_used;
        if (room < (limit < UDS_ARENA_MIN_READ ? limit : UDS_ARENA_MIN_READ) || s->big.data != NULL)
            break; /* the rest next turn, when the arena is empty again */
        char *at = s->arena + s->arena_used;
        struct iovec iov[2];
        int iovcnt = uds_scratch_iov(s, iov, at, room);
        if (iovcnt < 0)
            break;
        room = iov[0].iov_len;
        uds_recv_info info;
        info.want_addr = info.want_creds = info.real_len = 1;
        ssize_t r = uds_recv_msg(s->listen_fd, iov, iovcnt, s->cfg.max_fds, &info);
        if (r < 0) {
            s->dgram_empty = 1; /* EAGAIN: no more; anything else the next readiness retells */
            break;
        }
        size_t len = (size_t)r;
        if (info.nfds > 0)
            UDS_COUNT(s->stats.fds_in, (uint64_t)info.nfds);
        if ((info.flags & (MSG_TRUNC | MSG_CTRUNC)) || len > s->cfg.max_message) {
            uds_recv_info_close_fds(&info); /* too long, or more descriptors than max_fds */
            UDS_COUNT(s->stats.dgrams_truncated, 1);
            continue;
        }
        if (!info.has_creds)
            info.creds.pid = -1, info.creds.uid = info.creds.gid = (uint32_t)-1;
        /* (A datagram brings its sender's primary group only.) */
        if (!uds_policy_allows(s, info.creds.uid, info.creds.gid)) {
            uds_recv_info_close_fds(&info);
            UDS_COUNT(s->stats.dgrams_refused, 1);
            uds_event *e = next_event(ev, &n, UDS_EV_REFUSED, -1, 0);
            e->pid = info.creds.pid;
            e->uid = info.creds.uid;
            e->gid = info.creds.gid;
            continue;
        }
        uds_peer *p = NULL;
        int slot = -1;
        uint64_t id = 0;
        if (info.addr_len > offsetof(struct sockaddr_un, sun_path)) {
            p = peer_for(s, &info, ev, &n);
            if (p == NULL || (p->flags & UDS_PF_REFUSED)) {
                uds_recv_info_close_fds(&info);
                UDS_COUNT(s->stats.dgrams_refused, p != NULL);
                continue;
            }
            if (p->flags & UDS_PF_CLOSING) {
                uds_recv_info_close_fds(&info); /* closed by the application: not heard */
                continue;
            }
            touch_peer(s, p);
            slot = p->slot;
            id = p->id;
            UDS_COUNT(p->stats->msgs_in, 1);
            UDS_COUNT(p->stats->bytes_in, len);
        }
        /* Heard: it keeps its place in the arena, or, if it spilled past it, goes whole into a
         * buffer of its own for this turn. */
        const char *data = at;
        if (len > room) {
            if (uds_buf_append(&s->big, at, room, &s->pool) < 0 ||
                uds_buf_append(&s->big, s->scratch, len - room, &s->pool) < 0) {
                uds_buf_release(&s->big, &s->pool);
                uds_recv_info_close_fds(&info);
                break;
            }
            data = s->big.data;
            uds_scratch_used(s, len - room);
        } else {
            s->arena_used += len;
        }
        UDS_COUNT(s->stats.msgs_in, 1);
        UDS_COUNT(s->stats.bytes_in, len);
        uds_event *e = next_event(ev, &n, UDS_EV_MESSAGE, slot, id);
        e->data = data;
        e->len = len;
        e->pid = info.creds.pid;
        e->uid = info.creds.uid;
        e->gid = info.creds.gid;
        if (info.nfds > 0) /* (there is room: see the loop's condition) */
            memcpy(uds_fd_out(s, e, info.nfds), info.fds, (size_t)info.nfds * sizeof(int));
    }
    return n;
}

/* ---- the turn ----------------------------------------------------------------------------- */

/* Finishes the peers that are closing and owe nothing more, and those idle too long. */
static int settle_peers(uds_server *s, uds_event *ev, int n, int cap)
{
    uds_tnode *t;
    while ((t = s->linger.head) != NULL && t->deadline_ms <= s->now_ms) {
        uds_peer *p = PEER_OF(t, linger);
        uds_tlist_remove(&s->linger, t);
        drop_queue(p); /* not taken within flush_timeout: given up */
    }
    uds_peer **link = &s->closing;
    while (*link != NULL && n < cap) {
        uds_peer *p = *link;
        if (p->out_head != NULL) {
            link = &p->close_next;
            continue;
        }
        *link = p->close_next;
        n = peer_finish(s, p, ev, n);
    }
    while (n < cap && (t = s->idle.head) != NULL && t->deadline_ms <= s->now_ms) {
        uds_peer *p = PEER_OF(t, lru);
        if (p->flags & UDS_PF_FINAL) {
            peer_free(s, p);
        } else if (p->flags & UDS_PF_CLOSING) {
            uds_tlist_remove(&s->idle, t); /* on its way out already */
        } else {
            uds_tlist_remove(&s->idle, t);
            peer_close(s, p, UDS_CLOSE_IDLE_TIMEOUT, 0);
            if (p->out_head == NULL) {
                s->closing = p->close_next; /* it was just put first */
                n = peer_finish(s, p, ev, n);
            }
        }
    }
    return n;
}

/* Shutting down: reads what is still queued; once a turn finds nothing more, and the replies
 * to what came before are out (they were queued when this turn began), closes every peer. */
static int drain(uds_server *s, uds_event *ev, int n, int cap)
{
    int before = n;
    n = read_dgrams(s, ev, n, cap);
    if (n > before && s->now_ms < s->dgram_drain_until)
        return n;
    if (!s->dgram_empty && n >= cap && s->now_ms < s->dgram_drain_until)
        return n;
    s->dgram_drain_until = 0;
    for (int i = 0; i < s->peers_cap; i++) {
        uds_peer *p = s->peers[i];
        if (p != NULL && !(p->flags & UDS_PF_FINAL))
            peer_close(s, p, UDS_CLOSE_SHUTDOWN, 0);
    }
    return n;
}

int uds_dgram_poll(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    uds_buf_release(&s->big, &s->pool);
    retry_full_peers(s);
    int n = settle_peers(s, ev, 0, cap);
    if (n >= cap)
        return n;
    if (s->dgram_drain_until > 0)
        return drain(s, ev, n, cap);
    /* (Peers still closing now wait for their queued replies: the retry or linger timer.) */
    int64_t t = n > 0 ? 0 : timeout_ms < 0 ? -1 : timeout_ms;
    int64_t due = uds_tlist_due_in(&s->idle, s->now_ms);
    if (due >= 0 && (t < 0 || due < t))
        t = due;
    due = uds_tlist_due_in(&s->linger, s->now_ms);
    if (due >= 0 && (t < 0 || due < t))
        t = due;
    if (s->retry != NULL) {
        due = s->retry_at > s->now_ms ? (int64_t)(s->retry_at - s->now_ms) : 0;
        if (t < 0 || due < t)
            t = due;
    }
    int k = uds_poller_wait(s->ep, s->ready, 2, t > 1 << 30 ? 1 << 30 : (int)t);
    if (k < 0)
        return n > 0 ? n : k;
    uds_server_clock(s);
    for (int i = 0; i < k; i++) {
        if (s->ready[i].fd == s->wake_rd)
            uds_server_drain_wakeups(s);
        else if (s->ready[i].fd == s->listen_fd && !s->shutting_down)
            n = read_dgrams(s, ev, n, cap);
    }
    return n;
}

/* ---- the caller's requests ---------------------------------------------------------------- */

int uds_dgram_peer_address(uds_server *s, int slot, uint64_t id, char *name, size_t *len)
{
    uds_peer *p = peer_get(s, slot, id);
    if (p == NULL)
        return -ENOTCONN;
    return uds_sock_format_name(&p->addr, p->addr_len, name, len);
}

int uds_dgram_close(uds_server *s, int slot, uint64_t id, int reason)
{
    uds_peer *p = peer_get(s, slot, id);
    if (p == NULL)
        return -ENOTCONN;
    peer_close(s, p, reason, 0);
    return 0;
}

int uds_dgram_set_stats(uds_server *s, int slot, uint64_t id, uds_stats *stats)
{
    uds_peer *p = peer_get(s, slot, id);
    if (p == NULL)
        return -ENOTCONN;
    *stats = *p->stats;
    p->stats = stats;
    return 0;
}

void uds_dgram_shutdown(uds_server *s)
{
    /* Datagrams sent before the shutdown are still heard and answered (within flush_timeout);
     * then every peer closes. */
    s->dgram_drain_until = s->now_ms + (uint64_t)s->cfg.flush_timeout_ms + 1;
}

void uds_dgram_free(uds_server *s)
{
    for (int i = 0; i < s->peers_cap; i++) {
        uds_peer *p = s->peers[i];
        if (p != NULL) {
            drop_queue(p);
            free(p);
        }
    }
    free(s->peers);
    free(s->htab);
    uds_buf_release(&s->big, NULL);
}
