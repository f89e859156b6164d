/*
 * conn_server.c - the connection kinds (STREAM and SEQPACKET): accepting clients, the turn
 * over their connections, and their side of each API call (the table uds_conn_kind).
 *
 * A turn: free the connections the last batch finished with; move reads not parsed yet out
 * of the arena; flush the replies queued since the last turn (one send per connection);
 * expire deadlines; serve the pending connections; wait for readiness (not at all if events
 * are ready); accept, write, read; serve the pending connections again.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CONN_OF(node, field) ((uds_conn *)((char *)(node) - offsetof(uds_conn, field)))

/* ---- accepting ------------------------------------------------------------------------------- */

/* Out of descriptors (or memory), accept() fails while the master socket stays readable, so a
 * level-triggered loop would spin. libuv's answer is a spare descriptor, freed to accept and
 * at once close the waiting clients; here accepting pauses instead: the master socket leaves
 * epoll, waiting clients stay queued in the kernel's backlog rather than being turned away,
 * and accepting resumes when a connection closes or after a back-off (50 ms doubling to
 * 500 ms), whichever comes first. */
static void pause_accepting(uds_server *s)
{
    if (s->accept_paused)
        return;
    uds_poller_del(&s->poller, s->listen_fd);
    s->accept_paused = 1;
    s->accept_retry_ms = s->now_ms + (uint64_t)s->accept_backoff_ms;
    s->accept_backoff_ms *= 2;
    if (s->accept_backoff_ms > UDS_ACCEPT_BACKOFF_MAX)
        s->accept_backoff_ms = UDS_ACCEPT_BACKOFF_MAX;
    UDS_COUNT(s->stats.accept_pauses, 1);
}

static void resume_accepting(uds_server *s)
{
    if (!s->accept_paused || s->listen_fd < 0 || s->now_ms < s->accept_retry_ms)
        return;
    if (uds_poller_add(&s->poller, s->listen_fd, UDS_POLL_IN) == 0)
        s->accept_paused = 0;
}

/* A TCP connection: its options set, and with proxy_protocol, hidden until its PROXY header is
 * whole (conn_read.c reports it then), within the header's deadline. Returns 0, or -1 if it
 * could not be made (fd closed). */
static int admit_tcp(uds_server *s, int fd, uds_conn **out)
{
    uds_conn *c = NULL;
    if (uds_sock_tcp_options(fd, s->cfg.tcp_nodelay, s->cfg.tcp_keepalive_s) < 0 ||
        (c = uds_conn_new(s, fd)) == NULL) {
        close(fd);
        return -1;
    }
    *out = c;
    if (!s->cfg.proxy_protocol)
        return 0;
    c->flags |= UDS_CF_HIDDEN;
    int ms = s->cfg.frame_timeout_ms > 0 ? s->cfg.frame_timeout_ms : UDS_PROXY_HEADER_MS;
    uds_tlist_append(&s->frames, &c->frame, s->now_ms + (uint64_t)ms);
    return 0;
}

/* Admits the accepted socket fd as a connection, with its CONNECTED event (or its REFUSED
 * event, if the uid/gid policy refuses it; none yet for a connection hidden until its PROXY
 * header comes). A client admitted while the server shuts down is closed at once, once what it
 * sent is answered (handed back, if it retires). Returns n. */
static int admit(uds_server *s, int fd, uds_event *ev, int n)
{
    int32_t pid = -1;
    uint32_t uid = (uint32_t)-1, gid = (uint32_t)-1;
    uds_event *e;
    if (!s->inet)
        uds_sock_peercred(fd, &pid, &uid, &gid);
    if (!s->inet && !uds_policy_allows_peer(&s->policy, fd, uid, gid)) {
        /* Counted before the close, so a client that sees its end finds it counted. */
        UDS_COUNT(s->stats.closed[UDS_CLOSE_UNAUTHORIZED], 1);
        uds_sock_discard_unread(fd); /* what it sent already: EOF for it, not a reset */
        close(fd);
        e = uds_event_next(ev, &n, UDS_EV_REFUSED, -1, 0);
        e->reason = UDS_CLOSE_UNAUTHORIZED;
    } else if (s->cfg.max_connections > 0 && s->live >= s->cfg.max_connections) {
        UDS_COUNT(s->stats.closed[UDS_CLOSE_REJECTED], 1); /* before the close, as above */
        close(fd); /* over the cap: established clients come first */
        return n;
    } else {
        uds_conn *c = NULL;
        if (s->inet ? admit_tcp(s, fd, &c) < 0 : (c = uds_conn_new(s, fd)) == NULL) {
            if (!s->inet)
                close(fd);
            return n;
        }
        if (c->flags & UDS_CF_HIDDEN)
            return n;
        e = uds_event_next(ev, &n, UDS_EV_CONNECTED, fd, c->id);
        UDS_COUNT(s->stats.accepted, 1);
        if (s->retiring)
            uds_conn_move(s, c);
        else if (s->shutting_down)
            uds_conn_close(s, c, UDS_CLOSE_SHUTDOWN, 0, 1);
    }
    e->pid = pid;
    e->uid = uid;
    e->gid = gid;
    return n;
}

static int accept_some(uds_server *s, uds_event *ev, int n, int cap)
{
    for (int i = 0; i < UDS_ACCEPT_BUDGET && n < cap; i++) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                pause_accepting(s);
            return n; /* EAGAIN: none left */
        }
        s->accept_backoff_ms = UDS_ACCEPT_BACKOFF_MIN;
        n = admit(s, fd, ev, n);
    }
    return n;
}

/* ---- clients handed over (UDS_ADOPT_HANDOFF) ------------------------------------------------ */

/* Receives one handed-over client from the master socket: returns its socket (>= 0); -EAGAIN
 * when none waits; -EINVAL for a packet that brought no socket that can be served (closed);
 * -EPIPE at end-of-file or on an error, after which nothing more comes. */
static int receive_handed(uds_server *s)
{
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    uds_recv_info info;
    info.want_addr = info.want_creds = info.real_len = 0;
    ssize_t r = uds_recv_msg(s->listen_fd, &iov, 1, 1, &info);
    if (r == -EAGAIN)
        return -EAGAIN;
    if (r <= 0 && info.nfds == 0)
        return -EPIPE; /* (a packet of no bytes, which the contract rules out, reads as EOF too) */
    if (info.nfds == 0)
        return -EINVAL; /* (more than one socket in a packet: the kernel closed the rest) */
    int fd = info.fds[0];
    if (uds_sock_take_handed(fd, s->sock_type) < 0) {
        close(fd);
        return -EINVAL;
    }
    return fd;
}

/* Admits the clients handed over, as accept_some() does those it accepts; at end-of-file the
 * master socket leaves epoll for good. Returns n; *empty: whether no more waits. */
static int receive_some(uds_server *s, uds_event *ev, int n, int cap, int *empty)
{
    *empty = 0;
    for (int i = 0; i < UDS_ACCEPT_BUDGET && n < cap; i++) {
        int fd = receive_handed(s);
        if (fd >= 0)
            n = admit(s, fd, ev, n);
        else if (fd != -EINVAL) {
            if (fd == -EPIPE && !s->shutting_down)
                uds_poller_del(&s->poller, s->listen_fd);
            *empty = 1;
            return n;
        }
    }
    return n;
}

/* Shutting down: the clients handed over before it are admitted (each closing once answered);
 * the drain ends when the queue is found empty (or after flush_timeout). */
static int drain_handed(uds_server *s, uds_event *ev, int n, int cap)
{
    int empty;
    n = receive_some(s, ev, n, cap, &empty);
    if (empty || s->now_ms >= s->drain_until) {
        s->drain_until = 0;
        s->live--; /* (counted while draining: see shutdown_conns()) */
    }
    return n;
}

/* ---- a turn ---------------------------------------------------------------------------------- */

static void flush_scheduled(uds_server *s)
{
    uds_conn *c = s->flush_head;
    s->flush_head = NULL;
    while (c) {
        uds_conn *next = c->flush_next;
        c->flags &= ~UDS_CF_FLUSH;
        if (!(c->flags & UDS_CF_WANT_OUT))
            uds_conn_flush(s, c);
        c = next;
    }
}

static void expire_deadlines(uds_server *s)
{
    uds_tnode *t;
    while ((t = uds_tlist_due(&s->linger, s->now_ms)) != NULL) {
        uds_conn *c = CONN_OF(t, linger);
        uds_tlist_remove(&s->linger, t);
        /* Not idle in time to be handed back: closed as a shutdown closes it (a frame begun is
         * dropped), its output given up unless it took it all. */
        if ((c->flags & UDS_CF_MOVE) && uds_buf_len(&c->out) == 0) {
            uds_conn_close(s, c, UDS_CLOSE_SHUTDOWN, 0, 0);
            continue;
        }
        /* What is still queued is given up: a closing client's, or replies past max_output
         * that an open one took none of in time. */
        uds_conn_fail(s, c, (c->flags & UDS_CF_CLOSING) ? c->reason
                            : (c->flags & UDS_CF_MOVE) ? UDS_CLOSE_SHUTDOWN : UDS_CLOSE_SLOW_CONSUMER,
                      c->err);
    }
    while ((t = uds_tlist_due(&s->idle, s->now_ms)) != NULL)
        uds_conn_close(s, CONN_OF(t, idle), UDS_CLOSE_IDLE_TIMEOUT, 0, 0);
    while ((t = uds_tlist_due(&s->frames, s->now_ms)) != NULL)
        uds_conn_close(s, CONN_OF(t, frame), UDS_CLOSE_FRAME_TIMEOUT, 0, 0);
}

/* Serves the pending connections in order while the batch has room. The one the full batch
 * cut short goes behind those that got no turn, so one client pipelining without pause cannot
 * starve the others. */
static int serve_pending(uds_server *s, uds_event *ev, int n, int cap)
{
    uds_conn *c = s->pending_head, *cut = NULL;
    s->pending_head = s->pending_tail = NULL;
    while (c) {
        uds_conn *next = c->pending_next;
        c->flags &= ~UDS_CF_PENDING;
        if (c->flags & UDS_CF_FINAL)
            ; /* finished earlier in this turn */
        else if ((c->flags & UDS_CF_READ_DUE) && s->turn_read >= UDS_TURN_READ_BUDGET)
            uds_conn_mark_pending(s, c); /* its read is for the next turn */
        else if (n < cap) {
            if (c->flags & UDS_CF_READ_DUE) {
                c->flags &= ~UDS_CF_READ_DUE;
                uds_conn_read(s, c);
            }
            n = uds_conn_serve(s, c, ev, n, cap);
            if (n >= cap)
                cut = c;
        } else
            uds_conn_mark_pending(s, c);
        c = next;
    }
    if (cut != NULL && !(cut->flags & UDS_CF_FINAL))
        uds_conn_mark_pending(s, cut);
    return n;
}

static int wait_timeout(const uds_server *s, int timeout_ms)
{
    /* Output queued between turns waits for the turn's flush, and a connection reported
     * closed keeps its socket (its peer sees no end-of-file) until the turn frees it. */
    if (s->pending_head || s->flush_head || s->finished)
        return 0;
    int64_t t = timeout_ms < 0 ? -1 : timeout_ms;
    t = uds_timeout_list(t, &s->linger, s->now_ms);
    t = uds_timeout_list(t, &s->idle, s->now_ms);
    t = uds_timeout_list(t, &s->frames, s->now_ms);
    if (s->accept_paused)
        t = uds_timeout_at(t, s->accept_retry_ms, s->now_ms);
    return uds_timeout_int(t);
}

/* Whether the turn needs the clock before its wait: a deadline to expire or to wait for, or
 * work before the wait that may set one (pending connections, queued output, closes). A quiet
 * server with none skips the read (about 0.1 us with a virtual machine's clock); the wait's
 * end reads it for what follows. */
static int clock_due(const uds_server *s)
{
    return s->idle.head != NULL || s->linger.head != NULL || s->frames.head != NULL ||
           s->pending_head != NULL || s->flush_head != NULL || s->finished != NULL ||
           s->accept_paused || s->drain_until > 0;
}

static int poll_conns(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    if (clock_due(s))
        uds_clock_update(&s->now_ms);
    uds_conn_free_finished(s);
    /* The last batch's messages are done with; reads not parsed yet (their connections wait
     * on the pending list) move to their own buffers before the arena is reused. */
    for (uds_conn *c = s->pending_head; c != NULL; c = c->pending_next)
        uds_conn_keep_unparsed(s, c);
    s->arena_used = 0;
    s->turn_read = 0;
    flush_scheduled(s);
    expire_deadlines(s);
    resume_accepting(s);
    int n = serve_pending(s, ev, 0, cap);
    if (s->drain_until > 0 && n < cap) {
        n = drain_handed(s, ev, n, cap);
        if (s->drain_until == 0)
            return n; /* over: the caller may be done, so no wait (work left is pending) */
    }
    if (n >= cap)
        return n;

    int k = uds_poller_wait(&s->poller, s->ready, cap - n, n > 0 ? 0 : wait_timeout(s, timeout_ms),
                            s->cfg.busy_poll_us);
    if (k < 0)
        return n > 0 ? n : k;
    uds_clock_update(&s->now_ms); /* the wait may have been long: reads renew deadlines from now */
    for (int i = 0; i < k; i++) {
        int fd = s->ready[i].fd;
        unsigned what = s->ready[i].events;
        if (fd == s->listen_fd) {
            int empty;
            n = s->cfg.adopt == UDS_ADOPT_HANDOFF ? receive_some(s, ev, n, cap, &empty)
                                                  : accept_some(s, ev, n, cap);
        } else if (fd >= 0 && fd < s->nconns && s->conns[fd] != NULL) {
            uds_conn *c = s->conns[fd];
            if ((what & (UDS_POLL_OUT | UDS_POLL_HUP)) && (c->flags & UDS_CF_WANT_OUT))
                uds_conn_flush(s, c);
            if (!(what & (UDS_POLL_IN | UDS_POLL_HUP)))
                continue;
            if (s->turn_read < UDS_TURN_READ_BUDGET) {
                uds_conn_read(s, c);
            } else {
                /* Read first in the next turn, before those epoll reports then (it keeps
                 * reporting in one order the sockets that stay readable). */
                c->flags |= UDS_CF_READ_DUE;
                uds_conn_mark_pending(s, c);
            }
        }
    }
    return serve_pending(s, ev, n, cap);
}

/* ---- the caller's requests ------------------------------------------------------------------- */

/* The connection (slot, id) if it is live and its socket works, else NULL. */
static uds_conn *working(const uds_server *s, int slot, uint64_t id)
{
    uds_conn *c = uds_conn_find(s, slot, id);
    return c != NULL && !(c->flags & UDS_CF_DEAD) ? c : NULL;
}

static int send_conn(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                     const int *fds, int nfds, int how)
{
    uds_conn *c = working(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    if (nfds > 0 && s->inet)
        return -EOPNOTSUPP; /* descriptors travel over Unix sockets only */
    return nfds > 0 ? uds_conn_send_fds(s, c, data, len, fds, nfds) : uds_conn_send(s, c, data, len, how);
}

static int reply_run_conn(uds_server *s, int slot, uint64_t id, const char *data,
                          const int16_t *lens, int n, int *rcs)
{
    uds_conn *c = working(s, slot, id);
    if (c != NULL)
        return uds_conn_send_run(s, c, data, lens, n, rcs);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        rcs[i] = lens[i] < 0 ? 0 : -ENOTCONN;
        failed += lens[i] >= 0;
    }
    return failed;
}

static int close_conn(uds_server *s, int slot, uint64_t id, int reason)
{
    uds_conn *c = uds_conn_find(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    uds_clock_update(&s->now_ms);
    uds_conn_close(s, c, reason, 0, 0);
    return 0;
}

static int hold_conn(uds_server *s, int slot, uint64_t id, int hold)
{
    uds_conn *c = uds_conn_find(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    uds_conn_hold(s, c, hold);
    return 0;
}

static int timeout_conns(const uds_server *s) { return wait_timeout(s, -1); }

static int peer_address_conn(uds_server *s, int slot, uint64_t id, char *name, size_t *len)
{
    uds_conn *c = uds_conn_find(s, slot, id);
    if (c != NULL && c->origin != NULL)
        return uds_sock_inet_format((const struct sockaddr *)c->origin, name, len);
    return c == NULL ? -ENOTCONN : uds_sock_name(c->fd, 1, name, len);
}

static uds_stats **stats_conn(uds_server *s, int slot, uint64_t id)
{
    uds_conn *c = uds_conn_find(s, slot, id);
    return c == NULL ? NULL : &c->stats;
}

/* No more clients: each connection delivers what it was sent, gets its replies out (bounded
 * by flush_timeout) and closes, or, retiring, is handed back once idle. The master socket is
 * not needed any more, unless clients were handed over on it before the shutdown: those are
 * still admitted (the drain counts as live until the queue is found empty). */
static int shutdown_conns(uds_server *s)
{
    for (int i = 0; i < s->nconns; i++) {
        uds_conn *c = s->conns[i];
        if (c == NULL || (c->flags & UDS_CF_FINAL))
            continue;
        if (s->retiring)
            uds_conn_move(s, c);
        else
            uds_conn_close(s, c, UDS_CLOSE_SHUTDOWN, 0, 1);
    }
    if (s->cfg.adopt != UDS_ADOPT_HANDOFF)
        return 0;
    s->drain_until = s->now_ms + (uint64_t)s->cfg.flush_timeout_ms + 1;
    s->live++;
    return 1;
}

/* Connections of a Unix socket can be handed back; a TCP one no server of this API takes over. */
static int retire_conns(uds_server *s)
{
    if (s->inet)
        return -EOPNOTSUPP;
    s->retiring = 1;
    return 0;
}

static int detach_conn(uds_server *s, int slot, uint64_t id)
{
    if (s->inet)
        return -EOPNOTSUPP;
    uds_conn *c = uds_conn_find(s, slot, id);
    if (c == NULL || (c->flags & (UDS_CF_CLOSING | UDS_CF_DEAD | UDS_CF_NO_READ)))
        return -ENOTCONN;
    return uds_conn_idle(s, c) ? uds_conn_hand_back(s, c) : -EBUSY;
}

static void free_conns(uds_server *s)
{
    uds_conn_free_finished(s);
    uds_conn_free_all(s);
}

const uds_kind_ops uds_conn_kind = {
    .poll = poll_conns, .send = send_conn, .reply_run = reply_run_conn, .close = close_conn,
    .peer_address = peer_address_conn, .stats = stats_conn, .hold = hold_conn,
    .timeout = timeout_conns, .retire = retire_conns, .detach = detach_conn,
    .shutdown = shutdown_conns, .free = free_conns,
};
