/*
 * conn_read.c - a connection's input: stream reads and SEQPACKET packets, into the read arena or
 * the connection's own buffer, with the descriptors that come along; then cutting frames and
 * delivering them as MESSAGE events, and reporting the connection closed once nothing more is
 * owed to it.
 *
 * Rules this file keeps:
 * - A MESSAGE event points into the server's read arena or its connection's own input buffer.
 *   Neither is moved nor freed until the next uds_poll(): the arena only grows within a turn;
 *   a connection that handed out a pointer in this turn is not read again in this turn
 *   (level-triggered epoll reports it again); a finished connection is freed (and its
 *   descriptor closed) only at the start of the next turn.
 * - An idle connection holds no buffer: reads of a connection with nothing buffered go to the
 *   arena, and only what outlives the turn (a partial frame, frames held back) is copied to
 *   its own buffer.
 * - Memory per connection is bounded: it reads a chunk at a time and no more while complete
 *   frames wait; while its unsent output is at the high-water mark it is neither read nor
 *   served (its client waits, the kernel holds what it sends).
 * - A connection is finished only when nothing more is owed to it: every complete frame it sent
 *   was delivered, the turn that delivered the last one is over (its replies are queued), and
 *   its output is drained or its flush deadline has passed.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- reading ------------------------------------------------------------------------------ */

/* Bytes the frame in progress is known to lack (a large u32 frame arriving), else 0. */
static size_t frame_need(const uds_server *s, const uds_conn *c)
{
    if (c->in.data == NULL || (c->flags & UDS_CF_HIDDEN))
        return 0; /* (a PROXY header first: its bytes are no frame header) */
    return uds_frame_missing(s->cfg.framing, c->in.data + c->in.start, uds_buf_len(&c->in),
                             s->cfg.max_message);
}

/* Input from offset c->rx_total on came with too many descriptors (or ones that could not be
 * kept): refuse the frames it reaches, read no more. */
static void refuse_fds_from_here(uds_server *s, uds_conn *c)
{
    if (c->bad_fds_at == 0)
        c->bad_fds_at = c->rx_total + 1;
    uds_conn_stop_reading(s, c, 0);
}

/* Queues the descriptors a read of r bytes brought, at the offset of its last byte. */
static void keep_fds(uds_server *s, uds_conn *c, uds_recv_info *info, size_t r)
{
    if (info->nfds == 0)
        return;
    UDS_COUNT(s->stats.fds_in, (uint64_t)info->nfds);
    /* More than fit (MSG_CTRUNC: the kernel closed the rest), or more than two messages' worth
     * waiting (a message takes at most max_fds; the one after it may have begun). */
    if ((info->flags & MSG_CTRUNC) || r == 0 ||
        uds_fdq_len(&c->in_fds) + info->nfds > 2 * s->cfg.max_fds) {
        uds_recv_info_close_fds(info);
        refuse_fds_from_here(s, c);
        return;
    }
    for (int i = 0; i < info->nfds; i++) {
        if (uds_fdq_push(&c->in_fds, info->fds[i], c->rx_total + r - 1) < 0) {
            uds_fds_close(info->fds + i, info->nfds - i);
            refuse_fds_from_here(s, c);
            return;
        }
    }
}

/* The end of a readiness: nothing more for now (a shutdown drain ends there), end-of-file (the
 * peer shut its writing end, but it may still read: what it sent is delivered and answered
 * before the close), or a failure (the connection is failing). err: 0 for end-of-file. */
static void read_ended(uds_server *s, uds_conn *c, int err)
{
    if (err == 0)
        uds_conn_stop_reading(s, c, UDS_CF_EOF);
    else if (err != EAGAIN)
        uds_conn_fail(s, c, err == ECONNRESET ? UDS_CLOSE_PEER : UDS_CLOSE_ERROR, err);
    else if (c->flags & UDS_CF_DRAIN)
        uds_conn_stop_reading(s, c, 0); /* drained */
}

/* One read of a stream into `into`. Returns the bytes read (> 0), or 0 when this readiness is
 * over (see read_ended). */
static size_t recv_some(uds_server *s, uds_conn *c, char *into, size_t room)
{
    ssize_t r;
    if (s->cfg.max_fds > 0) {
        uds_recv_info info;
        struct iovec iov = {.iov_base = into, .iov_len = room};
        info.want_addr = info.want_creds = info.real_len = 0;
        r = uds_recv_msg(c->fd, &iov, 1, s->cfg.max_fds, &info); /* -errno on failure */
        if (r >= 0)
            keep_fds(s, c, &info, (size_t)r);
    } else {
        do
            r = recv(c->fd, into, room, 0);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            r = -errno;
    }
    if (r > 0) {
        c->rx_total += (size_t)r;
        s->turn_read += (size_t)r;
        return (size_t)r;
    }
    read_ended(s, c, (int)-r);
    return 0;
}

/* The len bytes read at the arena's free part become c's view (unparsed input of this turn). */
static void take_arena(uds_server *s, uds_conn *c, size_t len)
{
    c->view = s->arena + s->arena_used;
    c->view_len = len;
    s->arena_used += len;
}

/* How much a read into a buffer that would have to grow for want bytes should ask for: no more
 * than the socket holds (0: nothing, as far as the kernel knows). A client trickling in a
 * frame thus makes the server hold about what it sent, not a whole read's reservation. */
static size_t growth_read_size(const uds_conn *c, size_t want)
{
    int queued = 0;
    if (ioctl(c->fd, FIONREAD, &queued) < 0 || queued < 0)
        return want; /* not known: read as usual */
    return (size_t)queued < want ? (size_t)queued : want;
}

/* The len bytes read at p took all that was asked for and end inside a u32 frame: reads the
 * bytes that frame still lacks right behind them, if they fit in room, so that the frame is
 * whole where it was read (in the arena, it is not copied to the connection's buffer to wait
 * for its end: a large frame would otherwise be copied once more than it is read). Returns the
 * bytes added. */
static size_t complete_last_frame(uds_server *s, uds_conn *c, char *p, size_t len, size_t room)
{
    size_t pos = 0, scan = 0, off, plen;
    ssize_t r;
    while (pos < len && (r = uds_frame_next(UDS_FRAMING_U32, p + pos, len - pos, s->cfg.max_message,
                                            &scan, &off, &plen)) > 0)
        pos += (size_t)r;
    size_t need = uds_frame_missing(UDS_FRAMING_U32, p + pos, len - pos, s->cfg.max_message);
    if (need == 0 || need > room || need > UDS_READ_BUDGET)
        return 0; /* complete, over max_message (refused when parsed), or too much for now */
    return recv_some(s, c, p + len, need);
}

/* A read for a connection with nothing buffered: one chunk, into the arena (and the rest of a
 * u32 frame that chunk ends in). */
static void read_into_arena(uds_server *s, uds_conn *c)
{
    size_t room = UDS_ARENA_SIZE - s->arena_used, want = room < UDS_ARENA_READ ? room : UDS_ARENA_READ;
    char *at = s->arena + s->arena_used;
    size_t got = recv_some(s, c, at, want);
    if (got == want && s->cfg.framing == UDS_FRAMING_U32 &&
        !(c->flags & (UDS_CF_NO_READ | UDS_CF_HIDDEN)))
        got += complete_last_frame(s, c, at, got, room - got);
    if (got > 0) {
        take_arena(s, c, got);
        uds_conn_touch(s, c);
    }
    uds_conn_mark_pending(s, c);
}

/* One SEQPACKET packet into buffer b (which has room for 4 + min(max_message + 1, a chunk)
 * bytes), stored as a u32 frame: the length the packet had, then its bytes. So everything
 * downstream of reading is as for a u32 stream. A packet longer than max_message is stored as
 * its header alone: parsing refuses it as too large, after the packets before it.
 * Returns -1 if no packet came (the readiness is over, see read_ended), else how many of its
 * bytes did not fit in b and wait at the start of the scratch area. */
static ssize_t recv_packet(uds_server *s, uds_conn *c, uds_buf *b)
{
    struct iovec iov[2];
    int iovcnt = uds_scratch_iov(&s->scratch, s->cfg.max_message + 1, iov, b->data + b->end + 4,
                                 b->cap - b->end - 4);
    if (iovcnt < 0) {
        uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
        return -1;
    }
    size_t room = iov[0].iov_len;
    uds_recv_info info;
    info.want_addr = info.real_len = 0;
    info.want_creds = 1; /* SO_PASSCRED is on: see uds_server_new() */
    ssize_t r = uds_recv_msg(c->fd, iov, iovcnt, s->cfg.max_fds, &info);
    /* A packet of no bytes reads as 0, as end-of-file does; but every packet comes with its
     * sender's credentials, and end-of-file with none. */
    if (r < 0 || (r == 0 && !info.has_creds)) {
        read_ended(s, c, r < 0 ? (int)-r : 0);
        return -1;
    }
    size_t len = (size_t)r;
    int too_large = (info.flags & MSG_TRUNC) || len > s->cfg.max_message;
    uint64_t claim = too_large ? s->cfg.max_message + 1 : len; /* too large: over max_message */
    int trailer;
    uds_frame_header(UDS_FRAMING_U32, claim > 0xFFFFFFFFu ? 0xFFFFFFFFu : claim,
                     (unsigned char *)b->data + b->end, &trailer);
    size_t stored = too_large ? 0 : len, in_room = stored < room ? stored : room;
    b->end += 4 + in_room;
    if (too_large) {
        uds_recv_info_close_fds(&info);
        uds_conn_stop_reading(s, c, 0); /* the packets before it are still delivered and answered */
    } else {
        keep_fds(s, c, &info, 4 + stored);
    }
    c->rx_total += 4 + stored;
    s->turn_read += 4 + stored;
    return (ssize_t)(stored - in_room);
}

/* The packets read into the arena so far become the connection's view, and move on to its
 * own buffer (further packets of this readiness go there). */
static void arena_to_buffer(uds_server *s, uds_conn *c, uds_buf *arena)
{
    if (arena->end == 0)
        return;
    take_arena(s, c, arena->end);
    uds_conn_keep_unparsed(s, c);
}

/* SEQPACKET: reads packets while there are some, within a bound; into the arena while the
 * connection holds nothing and the arena has room, else into its own buffer. */
static void read_packets(uds_server *s, uds_conn *c)
{
    size_t need = 4 + (s->cfg.max_message + 1 < UDS_READ_CHUNK ? s->cfg.max_message + 1
                                                                 : UDS_READ_CHUNK);
    uds_buf *b = &c->in, arena = {0};
    int to_arena = 0, got = 0;
    if (b->start == b->end) {
        uds_buf_release(b, &s->pool);
        if (c->view == NULL && UDS_ARENA_SIZE - s->arena_used >= need) {
            /* The arena's free part, posing as a buffer that never grows. */
            arena.data = s->arena + s->arena_used;
            arena.cap = UDS_ARENA_SIZE - s->arena_used;
            to_arena = 1;
        }
    }
    for (int i = 0; i < UDS_PACKETS_PER_READ && !(c->flags & UDS_CF_NO_READ); i++) {
        if (to_arena && arena.cap - arena.end < need) {
            arena_to_buffer(s, c, &arena);
            to_arena = 0;
        }
        if (!to_arena && uds_buf_reserve(b, need, &s->pool) < 0)
            uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
        if (c->flags & UDS_CF_DEAD)
            return;
        ssize_t spilled = recv_packet(s, c, to_arena ? &arena : b);
        if (spilled < 0)
            break;
        got = 1;
        if (spilled > 0) {
            /* Longer than the room it had: the rest waits in the scratch area. */
            if (to_arena) {
                arena_to_buffer(s, c, &arena);
                to_arena = 0;
            }
            if (uds_buf_append(b, s->scratch.data, (size_t)spilled, &s->pool) < 0)
                uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
            uds_scratch_used(&s->scratch, (size_t)spilled);
            if (c->flags & UDS_CF_DEAD)
                return;
        }
    }
    if (to_arena && arena.end > 0)
        take_arena(s, c, arena.end);
    if (got)
        uds_conn_touch(s, c);
    uds_conn_mark_pending(s, c);
}

/* Being handed back (UDS_CF_MOVE): how much of room the read into at may take, so that it
 * ends no later than the frame begun in c's input: u32, the rest of its header or its payload;
 * a line, up to its '\n', found by peeking at the socket (a read of 1 byte if nothing waits:
 * it finds end-of-file or the error, and cannot pass a line's end). Raw reads and packets are
 * whole messages: their connections hold no frame begun and are not read at all. */
static size_t move_room(uds_server *s, uds_conn *c, char *at, size_t room)
{
    size_t have = uds_buf_len(&c->in), need = 0;
    if (s->cfg.framing == UDS_FRAMING_U32)
        need = have < 4 ? 4 - have : frame_need(s, c);
    else if (s->cfg.framing == UDS_FRAMING_LINE) {
        ssize_t r;
        do
            r = recv(c->fd, at, room, MSG_PEEK);
        while (r < 0 && errno == EINTR);
        const char *nl = r > 0 ? memchr(at, '\n', (size_t)r) : NULL;
        need = r <= 0 ? 1 : nl != NULL ? (size_t)(nl - at) + 1 : (size_t)r;
    }
    return need < room ? need : room;
}

void uds_conn_read(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_NO_READ | UDS_CF_PAUSED | UDS_CF_HELD | UDS_CF_FRAMES))
        return; /* complete frames wait: the kernel keeps the rest until they are delivered */
    if ((c->flags & UDS_CF_MOVE) && !uds_conn_holds_input(c))
        return; /* what its client sends next goes with its socket */
    if (c->msg_turn == s->turn)
        return; /* its buffer must not move in this turn; epoll reports it again */
    if (s->packets) {
        read_packets(s, c);
        return;
    }
    uds_buf *b = &c->in;
    if (b->start == b->end) {
        uds_buf_release(b, &s->pool); /* nothing outlived the last turn: hold nothing */
        if (c->view == NULL && UDS_ARENA_SIZE - s->arena_used >= UDS_ARENA_MIN_READ) {
            read_into_arena(s, c);
            return;
        }
    }
    size_t budget = UDS_READ_BUDGET, got = 0;
    for (;;) {
        size_t want = UDS_READ_CHUNK, need = frame_need(s, c);
        if (need > want)
            want = need < budget ? need : budget;
        if (b->cap - uds_buf_len(b) < want) {
            want = growth_read_size(c, want);
            if (want == 0) {
                if (got)
                    break; /* nothing more waits */
                want = 1;  /* still read: end-of-file and errors show only to a read */
            }
        }
        if (uds_buf_reserve(b, want, &s->pool) < 0) {
            uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
            return;
        }
        /* Ask for want, not for all the room the buffer happens to have: what one read takes
         * in bounds the replies one turn can add to the output. */
        size_t room = b->cap - b->end;
        if (room > want)
            room = want;
        if ((c->flags & UDS_CF_MOVE) && (room = move_room(s, c, b->data + b->end, room)) == 0)
            break; /* (a frame over max_message: refused as it is parsed) */
        size_t r = recv_some(s, c, b->data + b->end, room);
        if (r == 0) {
            if (c->flags & UDS_CF_DEAD)
                return;
            break;
        }
        b->end += r;
        budget -= r;
        got += r;
        /* More in this readiness only for a large frame still arriving. */
        if (r < room || budget == 0 || frame_need(s, c) == 0 || (c->flags & UDS_CF_NO_READ))
            break;
    }
    if (got)
        uds_conn_touch(s, c);
    uds_conn_mark_pending(s, c);
}

/* ---- delivering frames, and finishing ------------------------------------------------------ */

#define FDS_REFUSED (-1) /* see frame_fds() */
#define FDS_NO_ROOM (-2)

/* The descriptors received for the frame that ends at stream offset frame_end: how many (then
 * taken off c's queue into the batch); FDS_REFUSED if they break the limit (c is closing); or
 * FDS_NO_ROOM if this batch has no room left to hand them out. */
static int frame_fds(uds_server *s, uds_conn *c, uds_event *e, uint64_t frame_end)
{
    int nfds = uds_fdq_count_before(&c->in_fds, frame_end);
    if (nfds > s->cfg.max_fds || (c->bad_fds_at && frame_end >= c->bad_fds_at)) {
        uds_conn_close(s, c, UDS_CLOSE_TOO_MANY_FDS, 0, 0);
        return FDS_REFUSED;
    }
    if (nfds > UDS_FD_OUT_MAX - s->fd_out_n)
        return FDS_NO_ROOM;
    int *fds = uds_fd_out(s, e, nfds);
    for (int i = 0; i < nfds; i++)
        fds[i] = uds_fdq_pop(&c->in_fds);
    return nfds;
}

/* pos bytes of c's input are delivered: what outlives the turn moves to c's own buffer. */
static void consume_input(uds_server *s, uds_conn *c, size_t pos)
{
    if (c->view) {
        c->view += pos;
        c->view_len -= pos;
        if (c->view_len == 0)
            c->view = NULL;
        uds_conn_keep_unparsed(s, c);
    } else {
        c->in.start += pos;
        if (c->in.start == c->in.end)
            c->in.start = c->in.end = 0; /* indexes only: the bytes stay where they are */
    }
}

/* A connection of a proxy_protocol server is hidden until its PROXY header, the first bytes
 * it sends, is whole. Then the client it names becomes its peer, its CONNECTED event goes at
 * ev[*n], and the header's size is returned; 0 while the header is not whole; -1 if there
 * will be none (not one, or no memory): it is closing, still hidden, and so refused. */
static ssize_t take_proxy_header(uds_server *s, uds_conn *c, const char *base, size_t len,
                                 uds_event *ev, int *n)
{
    uds_proxy_info info;
    ssize_t r = uds_proxy_parse(base, len, &info);
    if (r == 0)
        return 0; /* its deadline, set at accept, keeps running */
    if (r > 0 && info.family != 0) {
        c->origin = malloc(sizeof *c->origin);
        if (c->origin == NULL)
            r = -ENOMEM;
        else
            uds_sock_proxy_addr(&info, c->origin);
    }
    if (r < 0) {
        uds_conn_close(s, c, UDS_CLOSE_PROXY_HEADER, r == -ENOMEM ? ENOMEM : 0, 0);
        return -1;
    }
    c->flags &= ~UDS_CF_HIDDEN;
    uds_tlist_remove(&s->frames, &c->frame);
    uds_event *e = uds_event_next(ev, n, UDS_EV_CONNECTED, c->fd, c->id);
    e->pid = -1;
    e->uid = e->gid = (uint32_t)-1;
    UDS_COUNT(s->stats.accepted, 1);
    return r;
}

/* Hands out c's complete frames as MESSAGE events while the batch has room, c has not used up
 * its share of this turn, and its output is below the high-water mark.
 *
 * This loop is the C half of the per-message path; the rest is the recv() that filled the
 * arena, and the replies framed and sent by uds_conn_send_run() (at once, or at the next turn).
 * Where the time goes (perf record on the server, pipelined benchmark: 64 B, 64 connections x
 * 16 in flight, ~400 ns of server CPU per message): the kernel's recv(), send(), epoll and the
 * client's wakeup about 48%; Python (the loop and the handler) about 37%; this core about 9%
 * and libc's copies 6%. For one request at a time (latency) the kernel's wakeups and context
 * switches take three quarters of it. So a cycle saved here matters less than a syscall. */
static int deliver_frames(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    int delivered = 0;
    if (c->msg_turn != s->turn)
        c->turn_msgs = 0;
    c->flags &= ~UDS_CF_FRAMES;
    /* The bytes: this turn's read in the arena, or what the connection keeps (never both). */
    const char *base = c->view;
    size_t len = c->view_len, pos = 0;
    if (base == NULL) {
        base = c->in.data != NULL ? c->in.data + c->in.start : ""; /* (NULL + 0 is undefined) */
        len = uds_buf_len(&c->in);
    }
    if (c->flags & UDS_CF_HIDDEN) {
        ssize_t h = take_proxy_header(s, c, base, len, ev, &n);
        if (h <= 0) {
            if (h == 0)
                consume_input(s, c, 0); /* keeps the header's beginning for the next read */
            return n;
        }
        pos = (size_t)h;
    }
    while (pos < len) {
        if (n >= cap || c->turn_msgs >= UDS_CONN_MSGS_PER_TURN ||
            (c->flags & (UDS_CF_PAUSED | UDS_CF_HELD))) {
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
        uds_event *e = &ev[n];
        e->nfds = 0;
        e->fds = NULL;
        if (uds_fdq_len(&c->in_fds) > 0 || c->bad_fds_at) {
            int nfds = frame_fds(s, c, e, c->rx_total - len + pos + (size_t)r);
            if (nfds == FDS_REFUSED)
                return n;
            if (nfds == FDS_NO_ROOM) {
                c->flags |= UDS_CF_FRAMES; /* next turn */
                break;
            }
        }
        n++;
        e->type = UDS_EV_MESSAGE;
        e->slot = c->fd;
        e->id = c->id;
        e->data = base + pos + off;
        e->len = plen;
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
    consume_input(s, c, pos);
    if (c->bad_fds_at && !(c->flags & UDS_CF_FRAMES))
        uds_conn_close(s, c, UDS_CLOSE_TOO_MANY_FDS, 0, 0); /* nothing good is left */
    else
        uds_conn_time_frame(s, c, delivered);
    return n;
}

/* A connection being handed back, its frames delivered: handed back once idle (its CLOSED
 * event brings its socket), a turn after its last message at the earliest (its replies are
 * queued by then). Until then it waits for its output to drain, or for the caller's release. */
static int serve_moving(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    if (c->msg_turn == s->turn) {
        uds_conn_mark_pending(s, c);
        return n;
    }
    if (!uds_conn_move_settle(s, c))
        return n;
    if (n >= cap || s->fd_out_n >= UDS_FD_OUT_MAX) {
        uds_conn_mark_pending(s, c); /* no room for its event (or its socket) in this batch */
        return n;
    }
    return uds_conn_report_moved(s, c, ev, n);
}

int uds_conn_serve(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap)
{
    if (!(c->flags & UDS_CF_DEAD)) {
        n = deliver_frames(s, c, ev, n, cap);
        if (c->flags & UDS_CF_FRAMES) {
            /* More frames wait. Batch full: the turn puts it back on the pending list. Its share of
             * the turn spent: next turn. Paused: when its output drains. Held: when the caller
             * releases it. */
            if (n < cap && !(c->flags & (UDS_CF_PAUSED | UDS_CF_HELD)))
                uds_conn_mark_pending(s, c);
            return n;
        }
        if ((c->flags & UDS_CF_EOF) && !(c->flags & UDS_CF_CLOSING))
            uds_conn_close(s, c, UDS_CLOSE_PEER, 0, 1); /* a trailing partial frame is dropped */
        if (!(c->flags & UDS_CF_CLOSING))
            return (c->flags & UDS_CF_MOVE) ? serve_moving(s, c, ev, n, cap) : n;
        if (c->flags & UDS_CF_DRAIN) {
            if (c->flags & UDS_CF_HELD)
                return n; /* the caller's release brings it back here */
            /* Shutting down: read what still waits (no readiness may ever come for it). The
             * read ends the drain on EAGAIN; bytes it finds come back here as pending work,
             * also when the same read ended the drain (packets read up to EAGAIN). */
            uint64_t before = c->rx_total;
            uds_conn_read(s, c);
            if ((c->flags & UDS_CF_DRAIN) || c->rx_total != before) {
                uds_conn_mark_pending(s, c);
                return n;
            }
        }
        if (c->flags & UDS_CF_OWED)
            return n; /* replies still to come: the caller's release brings it back here */
        if (c->msg_turn == s->turn) {
            uds_conn_mark_pending(s, c); /* the replies to this turn's messages are not queued yet */
            return n;
        }
        if (uds_buf_len(&c->out) > 0)
            return n; /* EPOLLOUT or the flush deadline comes back to it */
    }
    if (n >= cap) {
        uds_conn_mark_pending(s, c); /* no room for its CLOSED event in this batch */
        return n;
    }
    return uds_conn_report_closed(s, c, ev, n);
}
