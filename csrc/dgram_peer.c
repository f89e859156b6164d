/*
 * dgram_peer.c - a DATAGRAM peer's life: made for a new sender address, its replies (sent at
 * once, or queued while its socket's queue is full and retried), closed and forgotten. The
 * turn that receives datagrams and drives peers is in dgram_server.c.
 *
 * - A reply goes straight out with sendto(). A peer whose queue is full (EAGAIN) gets its
 *   replies queued, in order, up to max_output; they are retried on a timer with a back-off
 *   (1 ms doubling to 64 ms), since epoll cannot say when another socket's queue has room:
 *   the loop never spins on a full peer. A peer gone (its socket closed) ends its peer.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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

uds_peer *uds_peer_new(uds_server *s, const uds_addr_key *key, const struct ucred *creds)
{
    uds_peer *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->key = *key;
    if (uds_addr_table_add(&s->peers, &p->key) < 0) {
        free(p);
        return NULL;
    }
    p->id = s->next_id++;
    p->creds = *creds;
    p->stats = &p->own_stats;
    s->live++;
    UDS_COUNT(s->stats.current, 1);
    UDS_COUNT(s->stats.accepted, 1);
    return p;
}

void uds_peer_give_up_replies(uds_peer *p)
{
    while (p->out_head) {
        struct uds_dgram *d = p->out_head;
        p->out_head = d->next;
        uds_fds_close(d->fds, d->nfds);
        free(d);
    }
    p->out_tail = NULL;
    p->out_bytes = 0;
}

void uds_peer_free(uds_server *s, uds_peer *p)
{
    if (p->flags & UDS_PF_RETRY) {
        uds_peer **link = &s->retry;
        while (*link != p)
            link = &(*link)->retry_next;
        *link = p->retry_next;
    }
    uds_addr_table_remove(&s->peers, &p->key);
    uds_tlist_remove(&s->idle, &p->lru);
    uds_tlist_remove(&s->linger, &p->linger);
    uds_peer_give_up_replies(p);
    free(p);
}

uds_peer *uds_peer_find(const uds_server *s, int slot, uint64_t id)
{
    uds_peer *p = (uds_peer *)uds_addr_table_at(&s->peers, slot);
    return p != NULL && p->id == id && !(p->flags & UDS_PF_FINAL) ? p : NULL;
}

void uds_peer_touch(uds_server *s, uds_peer *p)
{
    uds_tlist_append(&s->idle, &p->lru, s->now_ms + (uint64_t)s->cfg.idle_timeout_ms);
}

int uds_peer_report_closed(uds_server *s, uds_peer *p, uds_event *ev, int n)
{
    uds_event *e = uds_event_next(ev, &n, UDS_EV_CLOSED, p->key.slot, p->id);
    e->len = p->out_bytes;
    e->reason = p->reason;
    e->err = p->err;
    s->live--;
    UDS_COUNT(s->stats.current, (uint64_t)-1);
    UDS_COUNT(s->stats.closed[p->reason], 1);
    if (p->reason == UDS_CLOSE_UNAUTHORIZED) {
        p->flags = (p->flags & ~UDS_PF_CLOSING) | UDS_PF_FINAL | UDS_PF_REFUSED;
        uds_peer_give_up_replies(p);
        uds_tlist_remove(&s->linger, &p->linger);
    } else {
        uds_peer_free(s, p);
    }
    return n;
}

void uds_peer_close(uds_server *s, uds_peer *p, int reason, int err)
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
    uds_peer_give_up_replies(p);
    uds_peer_close(s, p, reason, err);
}

int uds_peer_forget(uds_server *s, uds_peer *p, int reason, uds_event *ev, int n)
{
    if (p->flags & UDS_PF_FINAL) {
        uds_peer_free(s, p); /* a refused one: nothing more to report */
        return n;
    }
    if (p->flags & UDS_PF_CLOSING) {
        uds_peer **link = &s->closing;
        while (*link != p)
            link = &(*link)->close_next;
        *link = p->close_next;
    }
    uds_peer_give_up_replies(p);
    p->reason = reason;
    p->err = 0;
    return uds_peer_report_closed(s, p, ev, n);
}

/* ---- sending ------------------------------------------------------------------------------ */

/* One datagram to p. Returns 0 if sent, -EAGAIN if its queue is full, else -errno (the peer is
 * then failing, except for -EMSGSIZE: that datagram alone cannot be sent). */
static int send_one(uds_server *s, uds_peer *p, const char *data, size_t len, const int *fds,
                    int nfds)
{
    ssize_t w = uds_send_msg(s->listen_fd, data, len, fds, nfds, &p->key.addr, p->key.addr_len);
    if (w >= 0) {
        if (nfds > 0)
            UDS_COUNT(s->stats.fds_out, (uint64_t)nfds);
        uds_peer_touch(s, p);
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
        uds_fds_close(d->fds, d->nfds);
        free(d);
        sent = 1;
    }
    return sent;
}

/* Keeps a reply to a full peer, in order behind any others. Returns 0 or -errno. */
static int queue_reply(uds_server *s, uds_peer *p, const char *data, size_t len, const int *fds,
                       int nfds)
{
    struct uds_dgram *d = malloc(sizeof *d + (size_t)nfds * sizeof(int) + len);
    if (d == NULL)
        return -ENOMEM;
    d->next = NULL;
    d->len = len;
    d->nfds = nfds;
    int rc = uds_fds_dup(fds, nfds, d->fds);
    if (rc < 0) {
        free(d);
        return rc;
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

int uds_peer_send(uds_server *s, uds_peer *p, const char *data, size_t len, const int *fds,
                  int nfds)
{
    UDS_COUNT(p->stats->msgs_out, 1);
    UDS_COUNT(p->stats->bytes_out, len);
    UDS_COUNT(s->stats.msgs_out, 1);
    UDS_COUNT(s->stats.bytes_out, len);
    if (p->out_head == NULL) {
        int rc = send_one(s, p, data, len, fds, nfds);
        if (rc != -EAGAIN)
            return rc == 0 ? 0 : rc == -EMSGSIZE ? rc : -ENOTCONN;
    }
    /* Its queue is full: keep the reply, within max_output. */
    if (s->cfg.max_output > 0 && p->out_bytes + len > s->cfg.max_output) {
        peer_fail(s, p, UDS_CLOSE_SLOW_CONSUMER, 0);
        return -ENOBUFS;
    }
    return queue_reply(s, p, data, len, fds, nfds);
}

void uds_peer_retry_full(uds_server *s)
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

void uds_peer_free_all(uds_server *s)
{
    for (int i = 0; i < s->peers.cap; i++) {
        uds_peer *p = (uds_peer *)s->peers.slots[i];
        if (p != NULL) {
            uds_peer_give_up_replies(p);
            free(p);
        }
    }
    uds_addr_table_free(&s->peers);
    s->closing = s->retry = NULL;
}
