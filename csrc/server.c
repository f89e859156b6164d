/*
 * server.c - the loop: accepts clients, runs each turn (flush, timers, attention, wait,
 * readiness), and the API the caller drives it with. What happens to one connection is in
 * conn.c.
 *
 * A turn, in uds_poll(): free what the last batch finished with; flush the replies queued
 * since (one send() per connection); expire deadlines; deliver frames already buffered; wait
 * for readiness (not at all if events are ready); accept, read, write; deliver again.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONN_OF(node, field) ((uds_conn *)((char *)(node) - offsetof(uds_conn, field)))

void uds_server_clock(uds_server *s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    if (now > s->now_ms)
        s->now_ms = now;
}

static uds_conn *conn_get(const uds_server *s, int slot, uint64_t id)
{
    if (slot < 0 || slot >= s->nconns)
        return NULL;
    uds_conn *c = s->conns[slot];
    if (c == NULL || c->id != id || (c->flags & UDS_CF_FINAL))
        return NULL;
    return c;
}

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
    uds_poller_del(s->ep, s->listen_fd);
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
    if (uds_poller_add(s->ep, s->listen_fd, UDS_POLL_IN) == 0)
        s->accept_paused = 0;
}

int uds_policy_allows(const uds_server *s, uint32_t uid, uint32_t gid)
{
    if (s->cfg.n_allow_uid == 0 && s->cfg.n_allow_gid == 0)
        return 1;
    for (int i = 0; i < s->cfg.n_allow_uid; i++)
        if (s->allow_uid[i] == uid)
            return 1;
    for (int i = 0; i < s->cfg.n_allow_gid; i++)
        if (s->allow_gid[i] == gid)
            return 1;
    return 0;
}

/* A connecting client may also be let in by one of its supplementary groups. */
static int allowed(const uds_server *s, int fd, uint32_t uid, uint32_t gid)
{
    return uds_policy_allows(s, uid, gid) ||
           (s->cfg.n_allow_gid > 0 && uds_sock_in_groups(fd, s->allow_gid, s->cfg.n_allow_gid));
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
        int32_t pid;
        uint32_t uid, gid;
        if (uds_sock_peercred(fd, &pid, &uid, &gid) < 0) {
            pid = -1;
            uid = gid = (uint32_t)-1;
        }
        if (!allowed(s, fd, uid, gid)) {
            /* Counted before the close, so a client that sees its end finds it counted. */
            UDS_COUNT(s->stats.closed[UDS_CLOSE_UNAUTHORIZED], 1);
            uds_sock_discard_unread(fd); /* what it sent already: EOF for it, not a reset */
            close(fd);
            uds_event *e = &ev[n++];
            memset(e, 0, sizeof *e);
            e->type = UDS_EV_REFUSED;
            e->slot = -1;
            e->pid = pid;
            e->uid = uid;
            e->gid = gid;
            continue;
        }
        if (s->cfg.max_connections > 0 && s->live >= s->cfg.max_connections) {
            UDS_COUNT(s->stats.closed[UDS_CLOSE_REJECTED], 1); /* before the close, as above */
            close(fd); /* over the cap: established clients come first */
            continue;
        }
        uds_conn *c = uds_conn_new(s, fd);
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
        e->pid = pid;
        e->uid = uid;
        e->gid = gid;
        e->nfds = 0;
        e->fds = NULL;
        UDS_COUNT(s->stats.accepted, 1);
    }
    return n;
}

/* ---- a turn ---------------------------------------------------------------------------------- */

static void flush_dirty(uds_server *s)
{
    uds_conn *c = s->dirty_head;
    s->dirty_head = NULL;
    while (c) {
        uds_conn *next = c->dirty_next;
        c->flags &= ~UDS_CF_DIRTY;
        if (!(c->flags & UDS_CF_WANT_OUT))
            uds_conn_flush(s, c);
        c = next;
    }
}

static void expire(uds_server *s)
{
    uds_tnode *t;
    while ((t = s->linger.head) != NULL && t->deadline_ms <= s->now_ms) {
        uds_conn *c = CONN_OF(t, linger);
        uds_tlist_remove(&s->linger, t);
        /* What is still queued is given up: a closing client's, or replies past max_output
         * that an open one took none of in time. */
        uds_conn_fail(s, c, (c->flags & UDS_CF_CLOSING) ? c->reason : UDS_CLOSE_SLOW_CONSUMER, c->err);
    }
    while ((t = s->idle.head) != NULL && t->deadline_ms <= s->now_ms)
        uds_conn_close(s, CONN_OF(t, idle), UDS_CLOSE_IDLE_TIMEOUT, 0, 0);
    while ((t = s->frames.head) != NULL && t->deadline_ms <= s->now_ms)
        uds_conn_close(s, CONN_OF(t, frame), UDS_CLOSE_FRAME_TIMEOUT, 0, 0);
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
            n = uds_conn_attend(s, c, ev, n, cap);
            if (n >= cap)
                cut = c;
        } else
            uds_conn_attn_push(s, c);
        c = next;
    }
    if (cut != NULL && !(cut->flags & UDS_CF_FINAL))
        uds_conn_attn_push(s, cut);
    return n;
}

static int64_t sooner(int64_t a, int64_t b)
{
    return a < 0 ? b : (b < 0 || a < b) ? a : b;
}

static int wait_timeout(const uds_server *s, int timeout_ms)
{
    if (s->attn_head)
        return 0;
    int64_t t = timeout_ms < 0 ? -1 : timeout_ms;
    t = sooner(t, uds_tlist_due_in(&s->linger, s->now_ms));
    t = sooner(t, uds_tlist_due_in(&s->idle, s->now_ms));
    t = sooner(t, uds_tlist_due_in(&s->frames, s->now_ms));
    if (s->accept_paused)
        t = sooner(t, s->accept_retry_ms > s->now_ms ? (int64_t)(s->accept_retry_ms - s->now_ms) : 0);
    return t > INT_MAX ? INT_MAX : (int)t;
}

void uds_server_drain_wakeups(uds_server *s)
{
    char sink[64];
    for (;;) {
        ssize_t r = read(s->wake_rd, sink, sizeof sink);
        if (r > 0 || (r < 0 && errno == EINTR))
            continue;
        return; /* EAGAIN: drained */
    }
}

int uds_scratch_iov(uds_server *s, struct iovec iov[2], char *at, size_t room)
{
    size_t limit = s->cfg.max_message + 1;
    iov[0].iov_base = at;
    iov[0].iov_len = room < limit ? room : limit;
    if (room >= limit)
        return 1;
    if (s->scratch == NULL) {
        void *p = mmap(NULL, limit, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return -ENOMEM;
        s->scratch = p;
        s->scratch_len = limit;
    }
    iov[1].iov_base = s->scratch;
    iov[1].iov_len = limit - room;
    return 2;
}

void uds_scratch_used(uds_server *s, size_t n)
{
    if (n > UDS_SCRATCH_KEEP)
        madvise(s->scratch, s->scratch_len, MADV_DONTNEED);
}


int uds_poll(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    if (cap < 1)
        return -EINVAL;
    s->turn++;
    uds_server_clock(s);
    if (s->cfg.kind == UDS_KIND_DGRAM) {
        s->arena_used = 0;
        s->fd_out_n = 0;
        return uds_dgram_poll(s, ev, cap, timeout_ms);
    }
    uds_conn_bury(s);
    /* The last batch's messages are done with; reads not parsed yet (their connections wait
     * on the attention list) move to their own buffers before the arena is reused. */
    for (uds_conn *c = s->attn_head; c != NULL; c = c->attn_next)
        uds_conn_settle(s, c);
    s->arena_used = 0;
    s->fd_out_n = 0; /* the descriptors handed out last turn are the caller's now */
    flush_dirty(s);
    expire(s);
    resume_accepting(s);
    int n = serve_attention(s, ev, 0, cap);
    if (n >= cap)
        return n;

    int k = uds_poller_wait(s->ep, s->ready, cap - n, n > 0 ? 0 : wait_timeout(s, timeout_ms));
    if (k < 0)
        return n > 0 ? n : k;
    uds_server_clock(s); /* the wait may have been long: reads below renew deadlines from now */
    for (int i = 0; i < k; i++) {
        int fd = s->ready[i].fd;
        unsigned what = s->ready[i].events;
        if (fd == s->listen_fd) {
            n = accept_some(s, ev, n, cap);
        } else if (fd == s->wake_rd) {
            uds_server_drain_wakeups(s);
        } else if (fd >= 0 && fd < s->nconns && s->conns[fd] != NULL) {
            uds_conn *c = s->conns[fd];
            if ((what & (UDS_POLL_OUT | UDS_POLL_HUP)) && (c->flags & UDS_CF_WANT_OUT))
                uds_conn_flush(s, c);
            if (what & (UDS_POLL_IN | UDS_POLL_HUP))
                uds_conn_read(s, c);
        }
    }
    return serve_attention(s, ev, n, cap);
}

/* ---- the caller's requests ------------------------------------------------------------------- */

/* uds_send() (reply 0) or uds_reply() (reply 1). */
static int send_one(uds_server *s, int slot, uint64_t id, const char *data, size_t len, int reply)
{
    if (s->cfg.kind == UDS_KIND_DGRAM)
        return uds_dgram_send(s, slot, id, data, len, NULL, 0);
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL || (c->flags & UDS_CF_DEAD))
        return -ENOTCONN;
    return reply ? uds_conn_reply(s, c, data, len) : uds_conn_send(s, c, data, len);
}

int uds_send(uds_server *s, int slot, uint64_t id, const char *data, size_t len)
{
    return send_one(s, slot, id, data, len, 0);
}

int uds_reply(uds_server *s, int slot, uint64_t id, const char *data, size_t len)
{
    return send_one(s, slot, id, data, len, 1);
}

int uds_send_fds(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                 const int *fds, int nfds)
{
    if (s->cfg.kind == UDS_KIND_DGRAM)
        return uds_dgram_send(s, slot, id, data, len, fds, nfds);
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL || (c->flags & UDS_CF_DEAD))
        return -ENOTCONN;
    return uds_conn_send_fds(s, c, data, len, fds, nfds);
}

/* Writes the layout item of a payload of len bytes (at most UDS_PACK_MAX) at p; returns its end. */
static char *layout_item(char *p, size_t len)
{
    char digits[UDS_LAYOUT_ITEM_MAX];
    int k = 0;
    do {
        digits[k++] = (char)('0' + len % 10);
        len /= 10;
    } while (len > 0);
    while (k > 0)
        *p++ = digits[--k];
    *p++ = 's';
    return p;
}

int uds_poll_batch(uds_server *s, uds_event *ev, int cap, int timeout_ms, uds_batch *b)
{
    int n = uds_poll(s, ev, cap, timeout_ms);
    size_t used = 0;
    char *item = b->layout;
    int all = 1, fds = 0, runs = 0;
    for (int i = 0; i < n; i++) {
        size_t len = ev[i].len;
        int message = ev[i].type == UDS_EV_MESSAGE;
        fds |= message && ev[i].nfds > 0;
        if (!all)
            continue;
        if (!message || ev[i].nfds > 0 || ev[i].slot < 0 || len > UDS_PACK_MAX || b->pack_cap - used < len) {
            all = 0;
            continue;
        }
        if (len > 0)
            memcpy(b->pack + used, ev[i].data, len);
        used += len;
        item = layout_item(item, len);
        /* A new run when the connection changes (by id as well: a slot is reused). */
        if (runs == 0 || b->run_slot[runs - 1] != ev[i].slot || ev[i - 1].id != ev[i].id)
            b->run_slot[runs++] = ev[i].slot;
        b->run_end[runs - 1] = (uint32_t)i + 1;
    }
    b->pack_used = used;
    b->layout_len = (size_t)(item - b->layout);
    b->runs = runs;
    b->all_packed = all;
    b->any_fds = fds;
    return n;
}

int uds_reply_batch(uds_server *s, const uds_event *ev, int first, int n, const char *data,
                    const int16_t *lens, int *rcs)
{
    int failed = 0;
    ev += first;
    if (s->cfg.kind == UDS_KIND_DGRAM) {
        for (int i = 0; i < n; i++) {
            rcs[i] = lens[i] < 0 ? 0 : uds_dgram_send(s, ev[i].slot, ev[i].id, data, (size_t)lens[i], NULL, 0);
            failed += rcs[i] < 0;
            data += lens[i] < 0 ? 0 : lens[i];
        }
        return failed;
    }
    /* The replies to one connection's run of events go in one call. */
    for (int i = 0, j; i < n; i = j) {
        size_t run_bytes = 0;
        for (j = i; j < n && ev[j].slot == ev[i].slot && ev[j].id == ev[i].id; j++)
            run_bytes += lens[j] < 0 ? 0 : (size_t)lens[j];
        uds_conn *c = conn_get(s, ev[i].slot, ev[i].id);
        if (c == NULL || (c->flags & UDS_CF_DEAD)) {
            for (int k = i; k < j; k++) {
                rcs[k] = lens[k] < 0 ? 0 : -ENOTCONN;
                failed += lens[k] >= 0;
            }
        } else {
            failed += uds_conn_send_run(s, c, data, lens + i, j - i, rcs + i);
        }
        data += run_bytes;
    }
    return failed;
}

int uds_close(uds_server *s, int slot, uint64_t id, int reason)
{
    if (s->cfg.kind == UDS_KIND_DGRAM)
        return uds_dgram_close(s, slot, id, reason);
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    uds_server_clock(s);
    uds_conn_close(s, c, reason, 0, 0);
    return 0;
}

int uds_conn_set_stats(uds_server *s, int slot, uint64_t id, uds_stats *stats)
{
    if (s->cfg.kind == UDS_KIND_DGRAM)
        return uds_dgram_set_stats(s, slot, id, stats);
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
    if (s->path[0] != '\0')
        uds_sock_unlink_if_same(s->path, s->file_dev, s->file_ino);
    if (!s->accept_paused)
        uds_poller_del(s->ep, s->listen_fd);
    if (s->saved_flags >= 0)
        fcntl(s->listen_fd, F_SETFL, s->saved_flags); /* the owner's socket, as it was */
    close(s->listen_fd);
    s->listen_fd = -1;
}

int uds_shutdown(uds_server *s)
{
    if (!s->shutting_down && s->cfg.kind == UDS_KIND_DGRAM) {
        /* The socket stays open: replies still go out from it. */
        s->shutting_down = 1;
        uds_server_clock(s);
        if (s->path[0] != '\0')
            uds_sock_unlink_if_same(s->path, s->file_dev, s->file_ino);
        uds_poller_del(s->ep, s->listen_fd);
        uds_dgram_shutdown(s);
    } else if (!s->shutting_down) {
        s->shutting_down = 1;
        close_master(s);
        uds_server_clock(s);
        for (int i = 0; i < s->nconns; i++) {
            uds_conn *c = s->conns[i];
            if (c != NULL && !(c->flags & UDS_CF_FINAL))
                uds_conn_close(s, c, UDS_CLOSE_SHUTDOWN, 0, 1);
        }
    }
    return uds_live(s);
}

int uds_live(const uds_server *s) { return s->live + (s->dgram_drain_until > 0); }

void uds_server_stats_get(const uds_server *s, uds_server_stats *out)
{
    const uint64_t *from = (const uint64_t *)&s->stats;
    uint64_t *to = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        to[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
}

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

int uds_server_address(const uds_server *s, char *name, size_t *len)
{
    if (s->listen_fd < 0)
        return -EBADF;
    return uds_sock_name(s->listen_fd, 0, name, len);
}

int uds_peer_address(uds_server *s, int slot, uint64_t id, char *name, size_t *len)
{
    if (s->cfg.kind == UDS_KIND_DGRAM)
        return uds_dgram_peer_address(s, slot, id, name, len);
    uds_conn *c = conn_get(s, slot, id);
    if (c == NULL)
        return -ENOTCONN;
    return uds_sock_name(c->fd, 1, name, len);
}

/* Copies a policy list, so that the caller's may go away. */
static int copy_ids(const uint32_t *from, int n, uint32_t **to)
{
    if (n == 0)
        return 0;
    if (n < 0 || from == NULL || (*to = malloc((size_t)n * sizeof **to)) == NULL)
        return n < 0 || from == NULL ? -EINVAL : -ENOMEM;
    memcpy(*to, from, (size_t)n * sizeof **to);
    return 0;
}

int uds_server_new(uds_server **out, const char *path, const uds_config *cfg)
{
    if (uds_frame_check(cfg->framing, "", 0) < 0 || cfg->max_message < 1 ||
        cfg->max_message > 0xFFFFFFFFu || cfg->flush_timeout_ms < 0 || cfg->max_connections < 0 ||
        cfg->idle_timeout_ms < 0 || cfg->frame_timeout_ms < 0 || cfg->max_fds < 0 ||
        cfg->max_fds > UDS_MAX_FDS ||
        (cfg->kind != UDS_KIND_STREAM && cfg->kind != UDS_KIND_SEQPACKET &&
         cfg->kind != UDS_KIND_DGRAM) ||
        (cfg->kind == UDS_KIND_DGRAM && cfg->idle_timeout_ms < 1))
        return -EINVAL;
    if (!cfg->adopt && path[0] != '@' && strlen(path) >= sizeof ((uds_server *)0)->path)
        return -ENAMETOOLONG;
    uds_server *s = calloc(1, sizeof *s);
    if (s == NULL)
        return -ENOMEM;
    s->cfg = *cfg;
    s->listen_fd = s->ep = s->wake_rd = s->wake_wr = s->saved_flags = -1;
    s->sock_type = cfg->kind == UDS_KIND_SEQPACKET ? SOCK_SEQPACKET
                   : cfg->kind == UDS_KIND_DGRAM   ? SOCK_DGRAM
                                                   : SOCK_STREAM;
    s->retry_backoff_ms = UDS_RETRY_MIN_MS;
    if (cfg->kind == UDS_KIND_SEQPACKET)
        s->cfg.framing = UDS_FRAMING_U32; /* how packets are kept in buffers (see conn.c) */
    s->cfg.allow_uid = s->cfg.allow_gid = NULL;
    s->next_id = 1;
    s->accept_backoff_ms = UDS_ACCEPT_BACKOFF_MIN;
    if ((s->arena = malloc(UDS_ARENA_SIZE)) == NULL) {
        free(s);
        return -ENOMEM;
    }
    int rc, pipefd[2];
    if ((rc = copy_ids(cfg->allow_uid, cfg->n_allow_uid, &s->allow_uid)) < 0 ||
        (rc = copy_ids(cfg->allow_gid, cfg->n_allow_gid, &s->allow_gid)) < 0)
        goto fail;
    s->cfg.allow_uid = s->allow_uid;
    s->cfg.allow_gid = s->allow_gid;
    if (cfg->max_fds > 0 && (s->fd_out = malloc(UDS_FD_OUT_MAX * sizeof *s->fd_out)) == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    s->high_water = UDS_HIGH_WATER_MAX;
    if (cfg->max_output > 0 && cfg->max_output / 2 < s->high_water)
        s->high_water = cfg->max_output / 2 > 0 ? cfg->max_output / 2 : 1;
    if (!cfg->adopt && path[0] != '@')
        strcpy(s->path, path); /* a file of ours, to remove at the end */

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
    if (cfg->adopt)
        rc = uds_sock_adopt(cfg->adopt_fd, s->sock_type, cfg->backlog, &s->listen_fd,
                            &s->saved_flags);
    else
        rc = uds_sock_listen(path, s->sock_type, cfg->mode, cfg->backlog, &s->listen_fd,
                             &s->file_dev, &s->file_ino);
    if (rc < 0)
        goto fail;
    /* SEQPACKET: every packet then comes with its sender's credentials, which is how a packet
     * of no bytes tells itself apart from end-of-file (accepted sockets inherit it). DGRAM:
     * every datagram's sender, for the uid/gid policy and the caller. */
    int on = 1;
    if (s->sock_type != SOCK_STREAM &&
        setsockopt(s->listen_fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) < 0) {
        rc = -errno;
        goto fail;
    }
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
    uds_conn_bury(s);
    for (int i = 0; i < s->nconns; i++) {
        uds_conn *c = s->conns[i];
        if (c == NULL)
            continue;
        close(c->fd);
        uds_conn_free_buffers(s, c);
        free(c);
    }
    free(s->conns);
    uds_dgram_free(s);
    free(s->allow_uid);
    free(s->allow_gid);
    free(s->fd_out);
    if (s->scratch != NULL)
        munmap(s->scratch, s->scratch_len);
    uds_pool_free(&s->pool);
    free(s->arena);
    if (s->ep >= 0)
        close(s->ep);
    if (s->wake_rd >= 0)
        close(s->wake_rd);
    if (s->wake_wr >= 0)
        close(s->wake_wr);
    free(s);
}
