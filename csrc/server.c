/*
 * server.c - the loop: accepts clients, reads and cuts frames, queues and flushes replies, and
 * takes each connection from accept to its CLOSED event.
 *
 * Rules this file keeps:
 * - A MESSAGE event points into its connection's input buffer. That buffer is neither moved nor
 *   freed until the next uds_poll(): a connection that handed out a pointer in this turn is not
 *   read again in this turn (level-triggered epoll reports it again), and a finished connection
 *   goes to the graveyard, freed (and its descriptor closed) at the start of the next turn. So
 *   the caller may read every event of a batch, and a slot is never reused within one.
 * - Replies queued between two polls leave at the start of the next one: one send() per
 *   connection per turn, however many replies it holds.
 * - A connection is finished only when nothing more is owed to it: every complete frame it sent
 *   was delivered, the turn that delivered the last one is over (its replies are queued), and
 *   its output is drained or its flush deadline has passed.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Counters may be read by another thread: store them whole. */
#define COUNT(field, delta) __atomic_store_n(&(field), (field) + (delta), __ATOMIC_RELAXED)

#define UDS_CF_POLLED 0x400u /* registered with epoll */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- lists ----------------------------------------------------------------------------------- */

static void attn_push(uds_server *s, uds_conn *c)
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

static void dirty_push(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_DIRTY | UDS_CF_WANT_OUT))
        return; /* already due to flush, or waiting for EPOLLOUT */
    c->flags |= UDS_CF_DIRTY;
    c->dirty_next = s->dirty_head;
    s->dirty_head = c;
}

/* The flush timeout is the same for every connection, so appending keeps the list ordered by
 * deadline: expiry looks only at the head. */
static void linger_push(uds_server *s, uds_conn *c)
{
    c->flags |= UDS_CF_LINGER;
    c->linger_next = NULL;
    c->linger_prev = s->linger_tail;
    if (s->linger_tail)
        s->linger_tail->linger_next = c;
    else
        s->linger_head = c;
    s->linger_tail = c;
}

static void linger_remove(uds_server *s, uds_conn *c)
{
    if (!(c->flags & UDS_CF_LINGER))
        return;
    c->flags &= ~UDS_CF_LINGER;
    if (c->linger_prev)
        c->linger_prev->linger_next = c->linger_next;
    else
        s->linger_head = c->linger_next;
    if (c->linger_next)
        c->linger_next->linger_prev = c->linger_prev;
    else
        s->linger_tail = c->linger_prev;
}

/* ---- connection state ------------------------------------------------------------------------ */

static uds_conn *conn_get(const uds_server *s, int slot, uint64_t id)
{
    if (slot < 0 || slot >= s->nconns)
        return NULL;
    uds_conn *c = s->conns[slot];
    if (c == NULL || c->id != id || (c->flags & UDS_CF_FINAL))
        return NULL;
    return c;
}

static void conn_fail(uds_server *s, uds_conn *c, int reason, int err);

/* Registers with epoll what the connection waits for. A connection that waits for nothing is
 * taken out of epoll altogether: a hang-up would otherwise be reported at every turn. */
static void update_interest(uds_server *s, uds_conn *c)
{
    unsigned ev = ((c->flags & UDS_CF_NO_READ) ? 0u : UDS_POLL_IN) |
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
        conn_fail(s, c, UDS_CLOSE_ERROR, -rc);
}

static void set_want_out(uds_server *s, uds_conn *c, int on)
{
    if (!!(c->flags & UDS_CF_WANT_OUT) == on)
        return;
    c->flags ^= UDS_CF_WANT_OUT;
    update_interest(s, c);
}

/* The socket is broken: close without flushing, at the next attention pass. */
static void conn_fail(uds_server *s, uds_conn *c, int reason, int err)
{
    if (c->flags & UDS_CF_DEAD)
        return;
    if (!(c->flags & UDS_CF_CLOSING)) {
        c->reason = reason;
        c->err = err;
    }
    c->flags |= UDS_CF_DEAD | UDS_CF_NO_READ;
    c->flags &= ~UDS_CF_WANT_OUT;
    update_interest(s, c);
    attn_push(s, c);
}

/* Stops reading and arranges for the connection to close once nothing more is owed to it.
 * keep_input: frames already received are still delivered (shutdown); otherwise dropped. */
static void conn_close(uds_server *s, uds_conn *c, int reason, int err, int keep_input)
{
    if (!keep_input) {
        /* Pointers already handed out stay valid: the bytes are not moved, only skipped. */
        c->in.start = c->in.end;
        c->scan = 0;
    }
    if (c->flags & UDS_CF_CLOSING)
        return;
    c->flags |= UDS_CF_CLOSING | UDS_CF_NO_READ;
    c->reason = reason;
    c->err = err;
    c->deadline_ms = now_ms() + (uint64_t)s->cfg.flush_timeout_ms;
    linger_push(s, c);
    update_interest(s, c);
    attn_push(s, c);
}

static uds_conn *conn_new(uds_server *s, int fd)
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
    return c;
}

/* Closing a Unix stream socket while bytes it never read wait in its queue makes Linux report
 * ECONNRESET to the peer instead of end-of-file, and a peer that reads its last replies and
 * then meets a reset takes the close for a failure. So read and drop what is queued first
 * (nginx's "lingering close"), within a bound. */
static void discard_unread(int fd)
{
    char sink[16384];
    for (size_t total = 0; total < UDS_LINGER_DISCARD;) {
        ssize_t r = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (r > 0)
            total += (size_t)r;
        else if (!(r < 0 && errno == EINTR))
            return;
    }
}

/* Frees finished connections: their descriptors close only now, so that within one batch a
 * slot always means one connection. */
static void bury(uds_server *s)
{
    /* A connection may be finished while it is (again) on the attention list: drop it there
     * first, so that nothing points at it once it is freed. */
    if (s->graveyard == NULL)
        return;
    uds_conn *c = s->attn_head;
    s->attn_head = s->attn_tail = NULL;
    while (c) {
        uds_conn *next = c->attn_next;
        c->flags &= ~UDS_CF_ATTN;
        if (!(c->flags & UDS_CF_FINAL))
            attn_push(s, c);
        c = next;
    }
    while (s->graveyard) {
        c = s->graveyard;
        s->graveyard = c->grave_next;
        s->conns[c->fd] = NULL;
        if (!(c->flags & (UDS_CF_EOF | UDS_CF_DEAD)))
            discard_unread(c->fd);
        close(c->fd);
        uds_buf_release(&c->in);
        uds_buf_release(&c->out);
        free(c);
    }
}

/* ---- I/O ------------------------------------------------------------------------------------- */

static void conn_read(uds_server *s, uds_conn *c)
{
    if (c->flags & UDS_CF_NO_READ)
        return;
    if (c->msg_turn == s->turn)
        return; /* its buffer must not move in this turn; epoll reports it again */
    uds_buf *b = &c->in;
    if (b->start == b->end) {
        b->start = b->end = 0;
        if (b->cap > UDS_BUF_KEEP)
            uds_buf_release(b); /* a big message is over: don't keep its room */
    }
    size_t budget = UDS_READ_BUDGET;
    while (budget > 0) {
        if (uds_buf_reserve(b, UDS_READ_MIN) < 0) {
            conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
            return;
        }
        size_t room = b->cap - b->end;
        if (room > budget)
            room = budget;
        ssize_t r = recv(c->fd, b->data + b->end, room, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            conn_fail(s, c, errno == ECONNRESET ? UDS_CLOSE_PEER : UDS_CLOSE_ERROR, errno);
            return;
        }
        if (r == 0) {
            /* The peer shut its writing end. It may still read: deliver what it sent, send the
             * replies, then close (see attend()). */
            c->flags |= UDS_CF_EOF | UDS_CF_NO_READ;
            update_interest(s, c);
            break;
        }
        b->end += (size_t)r;
        budget -= (size_t)r;
        if ((size_t)r < room)
            break; /* drained for now */
    }
    attn_push(s, c);
}

/* One send() of everything queued. What does not fit waits for EPOLLOUT. */
static void conn_flush(uds_server *s, uds_conn *c)
{
    uds_buf *b = &c->out;
    size_t len = uds_buf_len(b);
    if (len == 0 || (c->flags & UDS_CF_DEAD))
        return;
    ssize_t w;
    do
        w = send(c->fd, b->data + b->start, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w < 0) {
        if (errno == EAGAIN) {
            set_want_out(s, c, 1);
            return;
        }
        conn_fail(s, c, (errno == EPIPE || errno == ECONNRESET) ? UDS_CLOSE_PEER : UDS_CLOSE_ERROR,
                  errno);
        return;
    }
    b->start += (size_t)w;
    if (b->start < b->end) {
        set_want_out(s, c, 1);
        return;
    }
    b->start = b->end = 0;
    if (b->cap > UDS_BUF_KEEP)
        uds_buf_release(b);
    set_want_out(s, c, 0);
    if (c->flags & UDS_CF_CLOSING)
        attn_push(s, c); /* drained: it may be finished now */
}

static void flush_dirty(uds_server *s)
{
    uds_conn *c = s->dirty_head;
    s->dirty_head = NULL;
    while (c) {
        uds_conn *next = c->dirty_next;
        c->flags &= ~UDS_CF_DIRTY;
        if (!(c->flags & UDS_CF_WANT_OUT))
            conn_flush(s, c);
        c = next;
    }
}

static int accept_some(uds_server *s, uds_event *ev, int n, int cap)
{
    for (int i = 0; i < UDS_ACCEPT_BUDGET && n < cap; i++) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            break; /* EAGAIN: none left. Out of descriptors or memory: retry at the next turn. */
        }
        uds_conn *c = conn_new(s, fd);
        if (c == NULL) {
            close(fd);
            continue;
        }
        uds_event *e = &ev[n++];
        e->type = UDS_EV_CONNECTED;
        e->slot = fd;
        e->id = c->id;
        e->data = NULL;
        e->len = 0;
        e->reason = e->err = 0;
        if (uds_sock_peercred(fd, &e->pid, &e->uid, &e->gid) < 0) {
            e->pid = -1;
            e->uid = e->gid = (uint32_t)-1;
        }
    }
    return n;
}

/* ---- attention: delivering frames and finishing connections ---------------------------------- */

static int conn_parse(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    uds_buf *b = &c->in;
    while (n < cap && b->start < b->end) {
        size_t off = 0, plen = 0;
        ssize_t r = uds_frame_next(s->cfg.framing, b->data + b->start, b->end - b->start,
                                   s->cfg.max_message, &c->scan, &off, &plen);
        if (r == 0)
            break;
        if (r < 0) {
            /* Replies owed for the frames before this one still go out. */
            conn_close(s, c, UDS_CLOSE_TOO_LARGE, 0, 0);
            break;
        }
        uds_event *e = &ev[n++];
        e->type = UDS_EV_MESSAGE;
        e->slot = c->fd;
        e->id = c->id;
        e->data = b->data + b->start + off;
        e->len = plen;
        b->start += (size_t)r;
        c->scan = 0;
        c->msg_turn = s->turn;
        COUNT(c->stats->msgs_in, 1);
        COUNT(c->stats->bytes_in, plen);
    }
    if (b->start == b->end)
        b->start = b->end = 0; /* indexes only: the bytes stay where they are */
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
    c->flags |= UDS_CF_FINAL | UDS_CF_NO_READ;
    c->flags &= ~UDS_CF_WANT_OUT;
    update_interest(s, c);
    linger_remove(s, c);
    c->grave_next = s->graveyard;
    s->graveyard = c;
    s->live--;
    return n;
}

static int attend(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    if (!(c->flags & UDS_CF_DEAD)) {
        n = conn_parse(s, c, ev, n, cap);
        if (n >= cap)
            return n; /* the batch is full: serve_attention() queues it again, last */
        if ((c->flags & UDS_CF_EOF) && !(c->flags & UDS_CF_CLOSING))
            conn_close(s, c, UDS_CLOSE_PEER, 0, 1); /* a trailing partial frame is dropped */
        if (!(c->flags & UDS_CF_CLOSING))
            return n;
        if (c->msg_turn == s->turn) {
            attn_push(s, c); /* the replies to this turn's messages are not queued yet */
            return n;
        }
        if (uds_buf_len(&c->out) > 0)
            return n; /* EPOLLOUT or the flush deadline comes back to it */
    }
    return finish(s, c, ev, n);
}

/* Attends the connections in order while the batch has room. The one the full batch cut
 * short goes behind those that got no turn, so one client pipelining without pause cannot
 * starve the others. */
static int serve_attention(uds_server *s, uds_event *ev, int n, int cap)
{
    uds_conn *c = s->attn_head, *cut = NULL;
    s->attn_head = s->attn_tail = NULL;
    while (c) {
        uds_conn *next = c->attn_next;
        c->flags &= ~UDS_CF_ATTN;
        if (c->flags & UDS_CF_FINAL)
            ; /* finished earlier in this turn */
        else if (n < cap) {
            n = attend(s, c, ev, n, cap);
            if (n >= cap)
                cut = c;
        } else
            attn_push(s, c);
        c = next;
    }
    if (cut != NULL && !(cut->flags & UDS_CF_FINAL))
        attn_push(s, cut);
    return n;
}

static void expire_linger(uds_server *s, uint64_t now)
{
    while (s->linger_head && s->linger_head->deadline_ms <= now) {
        uds_conn *c = s->linger_head;
        linger_remove(s, c);
        conn_fail(s, c, c->reason, c->err); /* what is still queued is given up */
    }
}

static int wait_timeout(const uds_server *s, int timeout_ms, uint64_t now)
{
    if (s->attn_head)
        return 0;
    if (s->linger_head == NULL)
        return timeout_ms;
    uint64_t d = s->linger_head->deadline_ms;
    uint64_t left = d > now ? d - now : 0;
    if (left > INT_MAX)
        left = INT_MAX;
    return (timeout_ms < 0 || (int)left < timeout_ms) ? (int)left : timeout_ms;
}

static void drain_wakeups(uds_server *s)
{
    char sink[64];
    for (;;) {
        ssize_t r = read(s->wake_rd, sink, sizeof sink);
        if (r > 0 || (r < 0 && errno == EINTR))
            continue;
        return; /* EAGAIN: drained */
    }
}

int uds_poll(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    if (cap < 1)
        return -EINVAL;
    s->turn++;
    bury(s);
    flush_dirty(s);
    uint64_t now = now_ms();
    expire_linger(s, now);
    int n = serve_attention(s, ev, 0, cap);
    if (n >= cap)
        return n;

    int k = uds_poller_wait(s->ep, s->ready, cap - n, n > 0 ? 0 : wait_timeout(s, timeout_ms, now));
    if (k < 0)
        return n > 0 ? n : k;
    for (int i = 0; i < k; i++) {
        int fd = s->ready[i].fd;
        unsigned what = s->ready[i].events;
        if (fd == s->listen_fd) {
            n = accept_some(s, ev, n, cap);
        } else if (fd == s->wake_rd) {
            drain_wakeups(s);
        } else if (fd >= 0 && fd < s->nconns && s->conns[fd] != NULL) {
            uds_conn *c = s->conns[fd];
            if ((what & (UDS_POLL_OUT | UDS_POLL_HUP)) && (c->flags & UDS_CF_WANT_OUT))
                conn_flush(s, c);
            if (what & (UDS_POLL_IN | UDS_POLL_HUP))
                conn_read(s, c);
        }
    }
    return serve_attention(s, ev, n, cap);
}

/* ---- the caller's requests ------------------------------------------------------------------- */

int uds_send(uds_server *s, int slot, uint64_t id, const char *data, size_t len)
{
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL || (c->flags & UDS_CF_DEAD))
        return -ENOTCONN;
    unsigned char hdr[4];
    int trailer;
    int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
    if (h < 0)
        return h;
    int rc = uds_frame_check(s->cfg.framing, data, len);
    if (rc < 0)
        return rc;
    uds_buf *b = &c->out;
    if (len > SIZE_MAX - 8 || (rc = uds_buf_reserve(b, (size_t)h + len + (size_t)trailer)) < 0)
        return rc < 0 ? rc : -ENOMEM;
    memcpy(b->data + b->end, hdr, (size_t)h);
    b->end += (size_t)h;
    if (len > 0)
        memcpy(b->data + b->end, data, len);
    b->end += len;
    if (trailer)
        b->data[b->end++] = '\n';
    COUNT(c->stats->msgs_out, 1);
    COUNT(c->stats->bytes_out, len);
    dirty_push(s, c);
    return 0;
}

int uds_close(uds_server *s, int slot, uint64_t id, int reason)
{
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    conn_close(s, c, reason, 0, 0);
    return 0;
}

int uds_conn_set_stats(uds_server *s, int slot, uint64_t id, uds_stats *stats)
{
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    *stats = *c->stats;
    c->stats = stats;
    return 0;
}

/* ---- server life ------------------------------------------------------------------------------- */

static void close_master(uds_server *s)
{
    if (s->listen_fd < 0)
        return;
    /* Remove the file while still listening (libuv does the same): as long as we answer, no
     * other server takes the file for stale and replaces it, so the inode check cannot race
     * with it. */
    uds_sock_unlink_if_same(s->path, s->file_dev, s->file_ino);
    uds_poller_del(s->ep, s->listen_fd);
    close(s->listen_fd);
    s->listen_fd = -1;
}

int uds_shutdown(uds_server *s)
{
    if (!s->shutting_down) {
        s->shutting_down = 1;
        close_master(s);
        for (int i = 0; i < s->nconns; i++) {
            uds_conn *c = s->conns[i];
            if (c != NULL && !(c->flags & UDS_CF_FINAL))
                conn_close(s, c, UDS_CLOSE_SHUTDOWN, 0, 1);
        }
    }
    return s->live;
}

int uds_live(const uds_server *s) { return s->live; }

int uds_wakeup(uds_server *s)
{
    ssize_t w;
    do
        w = write(s->wake_wr, "", 1);
    while (w < 0 && errno == EINTR);
    /* EAGAIN: the pipe is full, so a wakeup is pending anyway. */
    return (w < 0 && errno != EAGAIN) ? -errno : 0;
}

int uds_wakeup_fd(const uds_server *s) { return s->wake_wr; }

int uds_listen_fd(const uds_server *s) { return s->listen_fd; }

int uds_server_new(uds_server **out, const char *path, const uds_config *cfg)
{
    if (uds_frame_check(cfg->framing, "", 0) < 0 || cfg->max_message < 1 ||
        cfg->max_message > 0xFFFFFFFFu || cfg->flush_timeout_ms < 0)
        return -EINVAL;
    if (strlen(path) >= sizeof ((uds_server *)0)->path)
        return -ENAMETOOLONG;
    uds_server *s = calloc(1, sizeof *s);
    if (s == NULL)
        return -ENOMEM;
    s->cfg = *cfg;
    s->listen_fd = s->ep = s->wake_rd = s->wake_wr = -1;
    s->next_id = 1;
    strcpy(s->path, path);

    int rc, pipefd[2];
    if ((rc = uds_poller_open()) < 0)
        goto fail;
    s->ep = rc;
    if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC) < 0) {
        rc = -errno;
        goto fail;
    }
    s->wake_rd = pipefd[0];
    s->wake_wr = pipefd[1];
    if ((rc = uds_poller_add(s->ep, s->wake_rd, UDS_POLL_IN)) < 0)
        goto fail;
    /* The socket file comes last: once it exists, clients may connect. */
    rc = uds_sock_listen(path, cfg->mode, cfg->backlog, &s->listen_fd, &s->file_dev,
                         &s->file_ino);
    if (rc < 0)
        goto fail;
    if ((rc = uds_poller_add(s->ep, s->listen_fd, UDS_POLL_IN)) < 0)
        goto fail;
    *out = s;
    return 0;
fail:
    uds_server_free(s);
    return rc;
}

void uds_server_free(uds_server *s)
{
    if (s == NULL)
        return;
    close_master(s);
    bury(s);
    for (int i = 0; i < s->nconns; i++) {
        uds_conn *c = s->conns[i];
        if (c == NULL)
            continue;
        close(c->fd);
        uds_buf_release(&c->in);
        uds_buf_release(&c->out);
        free(c);
    }
    free(s->conns);
    if (s->ep >= 0)
        close(s->ep);
    if (s->wake_rd >= 0)
        close(s->wake_rd);
    if (s->wake_wr >= 0)
        close(s->wake_wr);
    free(s);
}
