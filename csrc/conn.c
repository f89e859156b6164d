/*
 * conn.c - one connection's state: the lists it is on, what epoll watches for it,
 * backpressure, its deadlines, closing and being freed. Reading and delivering frames are in
 * conn_read.c, queueing and writing output in conn_write.c; the turn that drives connections
 * is in conn_server.c.
 *
 * A connection lives from its accept until the turn after its CLOSED event: it is then on the
 * finished list, freed (and its descriptor closed) at the start of the next turn, so that the
 * pointers that event's batch handed out stay valid until then. While it lives it is on at
 * most one of each list: pending (work before the next wait), flush (output queued since the
 * last flush), and the deadline lists (idle, frame, linger). A connection that waits for
 * nothing is out of epoll altogether.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- lists ----------------------------------------------------------------------------------- */

void uds_conn_mark_pending(uds_server *s, uds_conn *c)
{
    if (c->flags & UDS_CF_PENDING)
        return;
    c->flags |= UDS_CF_PENDING;
    c->pending_next = NULL;
    if (s->pending_tail)
        s->pending_tail->pending_next = c;
    else
        s->pending_head = c;
    s->pending_tail = c;
}

void uds_conn_schedule_flush(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_FLUSH | UDS_CF_WANT_OUT))
        return; /* already due to flush, or waiting for EPOLLOUT */
    c->flags |= UDS_CF_FLUSH;
    c->flush_next = s->flush_head;
    s->flush_head = c;
}

/* ---- state ----------------------------------------------------------------------------------- */

int uds_conn_holds_input(const uds_conn *c)
{
    return c->view != NULL || uds_buf_len(&c->in) > 0;
}

/* Registers with epoll what the connection waits for. A connection that waits for nothing is
 * taken out of epoll altogether: a hang-up would otherwise be reported at every turn. One being
 * handed back reads only to finish a frame it has begun: with none, what its client sends
 * stays in the socket (and level-triggered epoll would report it at every turn). */
static void update_interest(uds_server *s, uds_conn *c)
{
    int reading = !(c->flags & (UDS_CF_NO_READ | UDS_CF_PAUSED | UDS_CF_HELD)) &&
                  !((c->flags & UDS_CF_MOVE) && !uds_conn_holds_input(c));
    unsigned ev = (reading ? UDS_POLL_IN : 0u) | ((c->flags & UDS_CF_WANT_OUT) ? UDS_POLL_OUT : 0u);
    int rc = 0;
    if (ev == 0) {
        if (c->flags & UDS_CF_POLLED) {
            rc = uds_poller_del(&s->poller, c->fd);
            c->flags &= ~UDS_CF_POLLED;
        }
    } else if (c->flags & UDS_CF_POLLED) {
        rc = uds_poller_mod(&s->poller, c->fd, ev);
    } else {
        rc = uds_poller_add(&s->poller, c->fd, ev);
        c->flags |= UDS_CF_POLLED;
    }
    if (rc < 0 && !(c->flags & UDS_CF_DEAD))
        uds_conn_fail(s, c, UDS_CLOSE_ERROR, -rc);
}

void uds_conn_set_want_out(uds_server *s, uds_conn *c, int on)
{
    if (!!(c->flags & UDS_CF_WANT_OUT) == on)
        return;
    c->flags ^= UDS_CF_WANT_OUT;
    update_interest(s, c);
}

/* Traffic in either direction renews the idle deadline. */
void uds_conn_touch(uds_server *s, uds_conn *c)
{
    if (s->cfg.idle_timeout_ms > 0 && !(c->flags & UDS_CF_CLOSING))
        uds_tlist_append(&s->idle, &c->idle, s->now_ms + (uint64_t)s->cfg.idle_timeout_ms);
}

/* Stops the idle and frame deadlines. */
static void stop_timers(uds_server *s, uds_conn *c)
{
    uds_tlist_remove(&s->idle, &c->idle);
    uds_tlist_remove(&s->frames, &c->frame);
}

/* The frame deadline stops while the server is the one not reading. */
void uds_conn_time_frame(uds_server *s, uds_conn *c, int delivered)
{
    int waiting = s->cfg.frame_timeout_ms > 0 && uds_buf_len(&c->in) > 0 &&
                  !(c->flags & (UDS_CF_FRAMES | UDS_CF_PAUSED | UDS_CF_HELD | UDS_CF_NO_READ));
    if (!waiting)
        uds_tlist_remove(&s->frames, &c->frame);
    else if (!c->frame.linked || delivered)
        uds_tlist_append(&s->frames, &c->frame, s->now_ms + (uint64_t)s->cfg.frame_timeout_ms);
}

/* Reading ends for good (a shutdown drain ends with it); also_flags says why, e.g. EOF. */
void uds_conn_stop_reading(uds_server *s, uds_conn *c, unsigned also_flags)
{
    c->flags = (c->flags & ~UDS_CF_DRAIN) | UDS_CF_NO_READ | also_flags;
    update_interest(s, c);
}

void uds_conn_pause_reading(uds_server *s, uds_conn *c)
{
    c->flags |= UDS_CF_PAUSED;
    update_interest(s, c);
    uds_tlist_remove(&s->frames, &c->frame);
}

void uds_conn_resume_if_drained(uds_server *s, uds_conn *c)
{
    if (!(c->flags & UDS_CF_PAUSED) || uds_buf_len(&c->out) > s->high_water / 2)
        return;
    c->flags &= ~UDS_CF_PAUSED;
    update_interest(s, c);
    uds_conn_mark_pending(s, c); /* frames it sent meanwhile may wait in its buffer */
}

void uds_conn_hold(uds_server *s, uds_conn *c, int hold)
{
    unsigned was = c->flags;
    c->flags &= ~(UDS_CF_HELD | UDS_CF_OWED);
    c->flags |= ((hold & UDS_HOLD_READ) ? UDS_CF_HELD : 0u) | ((hold & UDS_HOLD_OPEN) ? UDS_CF_OWED : 0u);
    if ((was ^ c->flags) & UDS_CF_HELD) {
        update_interest(s, c);
        uds_conn_time_frame(s, c, 0); /* the server is the one not reading while held */
    }
    /* Released: frames it holds come without new bytes, and it may be finished now. */
    if (was & ~c->flags & (UDS_CF_HELD | UDS_CF_OWED))
        uds_conn_mark_pending(s, c);
}

void uds_conn_fail(uds_server *s, uds_conn *c, int reason, int err)
{
    if (c->flags & UDS_CF_DEAD)
        return;
    if (!(c->flags & UDS_CF_CLOSING)) {
        c->reason = reason;
        c->err = err;
    }
    c->flags |= UDS_CF_DEAD | UDS_CF_NO_READ;
    c->flags &= ~(UDS_CF_WANT_OUT | UDS_CF_DRAIN | UDS_CF_MOVE);
    stop_timers(s, c);
    update_interest(s, c);
    uds_conn_mark_pending(s, c);
}

void uds_conn_close(uds_server *s, uds_conn *c, int reason, int err, int keep_input)
{
    if (!keep_input) {
        /* Pointers already handed out stay valid: the bytes are not moved, only skipped. */
        c->in.start = c->in.end;
        c->view = NULL;
        c->scan = 0;
        c->flags &= ~UDS_CF_FRAMES;
        uds_fdq_clear(&c->in_fds); /* they belonged to input nobody will see */
    }
    stop_timers(s, c);
    if (c->flags & UDS_CF_CLOSING) {
        if (!keep_input && (c->flags & UDS_CF_DRAIN))
            uds_conn_stop_reading(s, c, 0);
        return;
    }
    /* Requests a client sent before a shutdown are owed replies even if they still wait in the
     * socket: read on until the queue is empty once (the flush deadline bounds it). Closing
     * ends a hand-back. */
    c->flags &= ~UDS_CF_MOVE;
    c->flags |= UDS_CF_CLOSING |
                ((keep_input && !(c->flags & UDS_CF_NO_READ)) ? UDS_CF_DRAIN : UDS_CF_NO_READ);
    c->reason = reason;
    c->err = err;
    uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
    update_interest(s, c);
    uds_conn_mark_pending(s, c);
}

void uds_conn_keep_unparsed(uds_server *s, uds_conn *c)
{
    if (c->view == NULL)
        return;
    int rc = uds_buf_append(&c->in, c->view, c->view_len, &s->pool);
    c->view = NULL;
    if (rc < 0)
        uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
}

/* ---- birth and end --------------------------------------------------------------------------- */

uds_conn *uds_conn_new(uds_server *s, int fd)
{
    if (fd >= s->nconns) {
        int n = s->nconns ? s->nconns : 64;
        while (n <= fd)
            n *= 2;
        uds_conn **t = realloc(s->conns, (size_t)n * sizeof *t);
        if (t == NULL)
            return NULL;
        memset(t + s->nconns, 0, (size_t)(n - s->nconns) * sizeof *t);
        s->conns = t;
        s->nconns = n;
    }
    uds_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->fd = fd;
    c->id = s->next_id++;
    c->stats = &c->own_stats;
    if (uds_poller_add(&s->poller, fd, UDS_POLL_IN) < 0) {
        free(c);
        return NULL;
    }
    c->flags = UDS_CF_POLLED;
    s->conns[fd] = c;
    s->live++;
    UDS_COUNT(s->stats.current, 1);
    uds_conn_touch(s, c);
    return c;
}

uds_conn *uds_conn_find(const uds_server *s, int slot, uint64_t id)
{
    if (slot < 0 || slot >= s->nconns)
        return NULL;
    uds_conn *c = s->conns[slot];
    if (c == NULL || c->id != id || (c->flags & UDS_CF_FINAL))
        return NULL;
    return c;
}

/* c is finished: out of epoll and every list but the finished one (freed at the next turn, so
 * that the pointers its batch handed out stay valid), counted closed for reason. */
static void finish(uds_server *s, uds_conn *c, int reason)
{
    c->flags |= UDS_CF_FINAL | UDS_CF_NO_READ;
    c->flags &= ~(UDS_CF_WANT_OUT | UDS_CF_MOVE);
    update_interest(s, c);
    stop_timers(s, c);
    uds_tlist_remove(&s->linger, &c->linger);
    c->finished_next = s->finished;
    s->finished = c;
    s->live--;
    UDS_COUNT(s->stats.current, (uint64_t)-1);
    if (reason > 0 && reason < UDS_CLOSE_REASONS)
        UDS_COUNT(s->stats.closed[reason], 1);
}

int uds_conn_report_closed(uds_server *s, uds_conn *c, uds_event *ev, int n)
{
    uds_event *e;
    if (c->flags & UDS_CF_HIDDEN) {
        /* Never reported: whatever ended it, it came with no valid PROXY header in time. */
        c->reason = UDS_CLOSE_PROXY_HEADER;
        e = uds_event_next(ev, &n, UDS_EV_REFUSED, -1, 0);
        e->pid = -1;
        e->uid = e->gid = (uint32_t)-1;
    } else {
        e = uds_event_next(ev, &n, UDS_EV_CLOSED, c->fd, c->id);
        e->len = uds_buf_len(&c->out);
    }
    e->reason = c->reason;
    e->err = c->err;
    finish(s, c, c->reason);
    return n;
}

/* ---- handing back (uds_retire(), uds_conn_detach()) ------------------------------------------ */

void uds_conn_move(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_CLOSING | UDS_CF_DEAD | UDS_CF_FINAL | UDS_CF_MOVE))
        return;
    c->flags |= UDS_CF_MOVE;
    /* The hand-back's deadline (replacing one for replies past max_output: either way, the
     * connection must be done within flush_timeout). */
    uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
    update_interest(s, c);
    uds_conn_mark_pending(s, c); /* it may be idle already */
}

int uds_conn_move_settle(uds_server *s, uds_conn *c)
{
    if ((c->flags & UDS_CF_POLLED) && !uds_conn_holds_input(c))
        update_interest(s, c);
    return uds_conn_idle(s, c);
}

int uds_conn_idle(const uds_server *s, const uds_conn *c)
{
    const unsigned busy = UDS_CF_NO_READ | UDS_CF_CLOSING | UDS_CF_DEAD | UDS_CF_FINAL |
                          UDS_CF_OWED | UDS_CF_FLUSH | UDS_CF_WANT_OUT | UDS_CF_HIDDEN;
    return !(c->flags & busy) && !uds_conn_holds_input(c) && uds_fdq_len(&c->in_fds) == 0 &&
           c->bad_fds_at == 0 && c->msg_turn != s->turn && uds_buf_len(&c->out) == 0 &&
           uds_fdq_len(&c->out_fds) == 0;
}

int uds_conn_hand_back(uds_server *s, uds_conn *c)
{
    /* Out of epoll first: the socket lives on in another process, and with it this epoll's
     * interest in it, which would report its readiness here under a number reused. */
    c->flags |= UDS_CF_MOVED;
    finish(s, c, UDS_CLOSE_MOVED);
    return c->fd;
}

int uds_conn_report_moved(uds_server *s, uds_conn *c, uds_event *ev, int n)
{
    uds_event *e = uds_event_next(ev, &n, UDS_EV_CLOSED, c->fd, c->id);
    e->reason = UDS_CLOSE_MOVED;
    *uds_fd_out(s, e, 1) = uds_conn_hand_back(s, c);
    return n;
}

/* Closes c's socket and frees it; discard: drop what it sent unread first, so that the peer
 * sees end-of-file rather than a reset. */
static void free_conn(uds_server *s, uds_conn *c, int discard)
{
    s->conns[c->fd] = NULL;
    if (!(c->flags & UDS_CF_MOVED)) { /* (else the socket is the caller's) */
        if (discard)
            uds_sock_discard_unread(c->fd);
        close(c->fd);
    }
    uds_buf_release(&c->in, &s->pool);
    uds_buf_release(&c->out, &s->pool);
    uds_fdq_clear(&c->in_fds);
    uds_fdq_clear(&c->out_fds);
    free(c->origin);
    free(c);
}

void uds_conn_free_finished(uds_server *s)
{
    if (s->finished == NULL)
        return;
    /* A connection may be finished while it is (again) on the pending list: unlink it there
     * first, so that nothing points at it once it is freed. */
    uds_conn **link = &s->pending_head, *c;
    s->pending_tail = NULL;
    while ((c = *link) != NULL) {
        if (c->flags & UDS_CF_FINAL) {
            *link = c->pending_next;
        } else {
            s->pending_tail = c;
            link = &c->pending_next;
        }
    }
    while ((c = s->finished) != NULL) {
        s->finished = c->finished_next;
        free_conn(s, c, !(c->flags & (UDS_CF_EOF | UDS_CF_DEAD)));
    }
    s->accept_retry_ms = 0; /* descriptors were freed: if accepting paused, try now */
}

void uds_conn_free_all(uds_server *s)
{
    for (int i = 0; i < s->nconns; i++)
        if (s->conns[i] != NULL)
            free_conn(s, s->conns[i], 0);
    free(s->conns);
    s->conns = NULL;
    s->nconns = 0;
    s->finished = s->pending_head = s->pending_tail = s->flush_head = NULL;
}
