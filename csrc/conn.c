/*
 * conn.c - one connection's life: its state, cutting frames and delivering them, backpressure,
 * timeouts, closing. Its reads and writes are in conn_io.c; the loop that drives connections
 * is in server.c.
 *
 * Rules this file keeps:
 * - A MESSAGE event points into the server's read arena or its connection's own input buffer.
 *   Neither is moved nor freed until the next uds_poll(): the arena only grows within a turn;
 *   a connection that handed out a pointer in this turn is not read again in this turn
 *   (level-triggered epoll reports it again); a finished connection goes to the graveyard,
 *   freed (and its descriptor closed) at the start of the next turn.
 * - An idle connection holds no buffer: reads of a connection with nothing buffered go to the
 *   arena, and only what outlives the turn (a partial frame, frames held back) is copied to
 *   its own buffer; output buffers are given back once drained.
 * - Memory per connection is bounded: it reads a chunk at a time and no more while complete
 *   frames wait; while its unsent output is at the high-water mark it is neither read nor
 *   served (its client waits, the kernel holds what it sends), and output that would pass
 *   max_output closes it.
 * - A connection is finished only when nothing more is owed to it: every complete frame it sent
 *   was delivered, the turn that delivered the last one is over (its replies are queued), and
 *   its output is drained or its flush deadline has passed.
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

/* ---- lists ----------------------------------------------------------------------------------- */

void uds_conn_attn_push(uds_server *s, uds_conn *c)
{
    if (c->flags & UDS_CF_ATTN)
        return;
    c->flags |= UDS_CF_ATTN;
    c->attn_next = NULL;
    if (s->attn_tail)
        s->attn_tail->attn_next = c;
    else
        s->attn_head = c;
    s->attn_tail = c;
}

void uds_conn_dirty_push(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_DIRTY | UDS_CF_WANT_OUT))
        return; /* already due to flush, or waiting for EPOLLOUT */
    c->flags |= UDS_CF_DIRTY;
    c->dirty_next = s->dirty_head;
    s->dirty_head = c;
}

/* ---- state ----------------------------------------------------------------------------------- */

/* Registers with epoll what the connection waits for. A connection that waits for nothing is
 * taken out of epoll altogether: a hang-up would otherwise be reported at every turn. */
static void update_interest(uds_server *s, uds_conn *c)
{
    unsigned ev = ((c->flags & (UDS_CF_NO_READ | UDS_CF_PAUSED)) ? 0u : UDS_POLL_IN) |
                  ((c->flags & UDS_CF_WANT_OUT) ? UDS_POLL_OUT : 0u);
    int rc = 0;
    if (ev == 0) {
        if (c->flags & UDS_CF_POLLED) {
            rc = uds_poller_del(s->ep, c->fd);
            c->flags &= ~UDS_CF_POLLED;
        }
    } else if (c->flags & UDS_CF_POLLED) {
        rc = uds_poller_mod(s->ep, c->fd, ev);
    } else {
        rc = uds_poller_add(s->ep, c->fd, ev);
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

static void untime(uds_server *s, uds_conn *c)
{
    uds_tlist_remove(&s->idle, &c->idle);
    uds_tlist_remove(&s->frames, &c->frame);
}

/* The frame deadline runs while an incomplete frame waits for bytes the client owes; it
 * restarts with each new frame and stops while the server is the one not reading. */
static void time_frame(uds_server *s, uds_conn *c, int delivered)
{
    int waiting = s->cfg.frame_timeout_ms > 0 && uds_buf_len(&c->in) > 0 &&
                  !(c->flags & (UDS_CF_FRAMES | UDS_CF_PAUSED | UDS_CF_NO_READ));
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
    uds_conn_attn_push(s, c); /* frames it sent meanwhile may wait in its buffer */
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
    c->flags &= ~(UDS_CF_WANT_OUT | UDS_CF_DRAIN);
    untime(s, c);
    update_interest(s, c);
    uds_conn_attn_push(s, c);
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
    untime(s, c);
    if (c->flags & UDS_CF_CLOSING) {
        if (!keep_input && (c->flags & UDS_CF_DRAIN))
            uds_conn_stop_reading(s, c, 0);
        return;
    }
    /* Requests a client sent before a shutdown are owed replies even if they still wait in the
     * socket: read on until the queue is empty once (the flush deadline bounds it). */
    c->flags |= UDS_CF_CLOSING |
                ((keep_input && !(c->flags & UDS_CF_NO_READ)) ? UDS_CF_DRAIN : UDS_CF_NO_READ);
    c->reason = reason;
    c->err = err;
    uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
    update_interest(s, c);
    uds_conn_attn_push(s, c);
}

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
    if (uds_poller_add(s->ep, fd, UDS_POLL_IN) < 0) {
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

void uds_conn_free_buffers(uds_server *s, uds_conn *c)
{
    uds_buf_release(&c->in, &s->pool);
    uds_buf_release(&c->out, &s->pool);
    uds_fdq_clear(&c->in_fds);
    uds_fdq_clear(&c->out_fds);
}

void uds_conn_bury(uds_server *s)
{
    if (s->graveyard == NULL)
        return;
    /* A connection may be finished while it is (again) on the attention list: drop it there
     * first, so that nothing points at it once it is freed. */
    uds_conn *c = s->attn_head;
    s->attn_head = s->attn_tail = NULL;
    while (c) {
        uds_conn *next = c->attn_next;
        c->flags &= ~UDS_CF_ATTN;
        if (!(c->flags & UDS_CF_FINAL))
            uds_conn_attn_push(s, c);
        c = next;
    }
    while (s->graveyard) {
        c = s->graveyard;
        s->graveyard = c->grave_next;
        s->conns[c->fd] = NULL;
        if (!(c->flags & (UDS_CF_EOF | UDS_CF_DEAD)))
            uds_sock_discard_unread(c->fd);
        close(c->fd);
        uds_conn_free_buffers(s, c);
        free(c);
    }
    s->accept_retry_ms = 0; /* descriptors were freed: if accepting paused, try now */
}

/* ---- attention: delivering frames and finishing connections ---------------------------------- */

/* Hands out c's complete frames as MESSAGE events while the batch has room, c has not used up
 * its share of this turn, and its output is below the high-water mark. */
static int parse(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    uds_buf *b = &c->in;
    int delivered = 0;
    if (c->msg_turn != s->turn)
        c->turn_msgs = 0;
    c->flags &= ~UDS_CF_FRAMES;
    /* The bytes: this turn's read in the arena, or what the connection keeps (never both). */
    const char *base = c->view;
    size_t len = c->view_len, pos = 0;
    if (base == NULL) {
        base = b->data != NULL ? b->data + b->start : ""; /* (NULL + 0 is undefined in C) */
        len = uds_buf_len(b);
    }
    while (pos < len) {
        if (n >= cap || c->turn_msgs >= UDS_CONN_MSGS_PER_TURN || (c->flags & UDS_CF_PAUSED)) {
            c->flags |= UDS_CF_FRAMES;
            break;
        }
        size_t off = 0, plen = 0;
        ssize_t r = uds_frame_next(s->cfg.framing, base + pos, len - pos, s->cfg.max_message,
                                   &c->scan, &off, &plen);
        if (r == 0)
            break;
        if (r < 0) {
            /* Replies owed for the frames before this one still go out. */
            uds_conn_close(s, c, UDS_CLOSE_TOO_LARGE, 0, 0);
            return n; /* input dropped (view and buffer) */
        }
        int nfds = 0;
        if (uds_fdq_len(&c->in_fds) > 0 || c->bad_fds_at) {
            uint64_t frame_end = c->rx_total - len + pos + (size_t)r;
            nfds = uds_fdq_count_before(&c->in_fds, frame_end);
            if (nfds > s->cfg.max_fds || (c->bad_fds_at && frame_end >= c->bad_fds_at)) {
                uds_conn_close(s, c, UDS_CLOSE_TOO_MANY_FDS, 0, 0);
                return n;
            }
            if (nfds > UDS_FD_OUT_MAX - s->fd_out_n) {
                c->flags |= UDS_CF_FRAMES; /* no room to hand them out: next turn */
                break;
            }
        }
        uds_event *e = &ev[n++];
        e->type = UDS_EV_MESSAGE;
        e->slot = c->fd;
        e->id = c->id;
        e->data = base + pos + off;
        e->len = plen;
        int *fds = uds_fd_out(s, e, nfds);
        for (int i = 0; i < nfds; i++)
            fds[i] = uds_fdq_pop(&c->in_fds);
        pos += (size_t)r;
        c->scan = 0;
        c->msg_turn = s->turn;
        c->turn_msgs++;
        delivered = 1;
        UDS_COUNT(c->stats->msgs_in, 1);
        UDS_COUNT(c->stats->bytes_in, plen);
        UDS_COUNT(s->stats.msgs_in, 1);
        UDS_COUNT(s->stats.bytes_in, plen);
    }
    if (c->view) {
        /* What outlives the turn moves to the connection's own buffer. */
        c->view += pos;
        c->view_len -= pos;
        if (c->view_len == 0)
            c->view = NULL;
        uds_conn_settle(s, c);
    } else {
        b->start += pos;
        if (b->start == b->end)
            b->start = b->end = 0; /* indexes only: the bytes stay where they are */
    }
    if (c->bad_fds_at && !(c->flags & UDS_CF_FRAMES))
        uds_conn_close(s, c, UDS_CLOSE_TOO_MANY_FDS, 0, 0); /* nothing good is left */
    else
        time_frame(s, c, delivered);
    return n;
}

static int finish(uds_server *s, uds_conn *c, uds_event *ev, int n)
{
    uds_event *e = &ev[n++];
    e->type = UDS_EV_CLOSED;
    e->slot = c->fd;
    e->id = c->id;
    e->data = NULL;
    e->len = uds_buf_len(&c->out);
    e->reason = c->reason;
    e->err = c->err;
    e->pid = 0;
    e->uid = e->gid = 0;
    e->nfds = 0;
    e->fds = NULL;
    c->flags |= UDS_CF_FINAL | UDS_CF_NO_READ;
    c->flags &= ~UDS_CF_WANT_OUT;
    update_interest(s, c);
    untime(s, c);
    uds_tlist_remove(&s->linger, &c->linger);
    c->grave_next = s->graveyard;
    s->graveyard = c;
    s->live--;
    UDS_COUNT(s->stats.current, (uint64_t)-1);
    if (c->reason > 0 && c->reason < UDS_CLOSE_REASONS)
        UDS_COUNT(s->stats.closed[c->reason], 1);
    return n;
}

int uds_conn_attend(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    if (!(c->flags & UDS_CF_DEAD)) {
        n = parse(s, c, ev, n, cap);
        if (c->flags & UDS_CF_FRAMES) {
            /* More frames wait. Batch full: serve_attention() queues it again. Its share of
             * the turn spent: next turn. Paused: when its output drains. */
            if (n < cap && !(c->flags & UDS_CF_PAUSED))
                uds_conn_attn_push(s, c);
            return n;
        }
        if ((c->flags & UDS_CF_EOF) && !(c->flags & UDS_CF_CLOSING))
            uds_conn_close(s, c, UDS_CLOSE_PEER, 0, 1); /* a trailing partial frame is dropped */
        if (!(c->flags & UDS_CF_CLOSING))
            return n;
        if (c->flags & UDS_CF_DRAIN) {
            /* Shutting down: read what still waits (no readiness may ever come for it). The
             * read ends the drain on EAGAIN; bytes it finds come back here by attention. */
            uds_conn_read(s, c);
            if (c->flags & UDS_CF_DRAIN) {
                uds_conn_attn_push(s, c);
                return n;
            }
        }
        if (c->msg_turn == s->turn) {
            uds_conn_attn_push(s, c); /* the replies to this turn's messages are not queued yet */
            return n;
        }
        if (uds_buf_len(&c->out) > 0)
            return n; /* EPOLLOUT or the flush deadline comes back to it */
    }
    if (n >= cap) {
        uds_conn_attn_push(s, c); /* no room for its CLOSED event in this batch */
        return n;
    }
    return finish(s, c, ev, n);
}
