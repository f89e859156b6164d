/*
 * conn_io.c - a connection's reads and writes: stream reads and SEQPACKET packets, into the
 * read arena or the connection's own buffer, with the descriptors that come along; queueing
 * framed replies, and flushing them with the descriptors that go along. The state they move
 * the connection through is in conn.c, which also states the rules both files keep.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- reading ------------------------------------------------------------------------------ */

/* Bytes the frame in progress is known to lack (a large u32 frame arriving), else 0. */
static size_t frame_need(const uds_server *s, const uds_conn *c)
{
    if (c->in.data == NULL)
        return 0;
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
            for (int j = i; j < info->nfds; j++)
                close(info->fds[j]);
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

/* A read for a connection with nothing buffered: one chunk, into the arena. */
static void read_into_arena(uds_server *s, uds_conn *c)
{
    size_t room = UDS_ARENA_SIZE - s->arena_used;
    size_t got = recv_some(s, c, s->arena + s->arena_used, room < UDS_READ_CHUNK ? room : UDS_READ_CHUNK);
    if (got > 0) {
        take_arena(s, c, got);
        uds_conn_touch(s, c);
    }
    uds_conn_attn_push(s, c);
}

void uds_conn_settle(uds_server *s, uds_conn *c)
{
    if (c->view == NULL)
        return;
    int rc = uds_buf_append(&c->in, c->view, c->view_len, &s->pool);
    c->view = NULL;
    if (rc < 0)
        uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
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
    int iovcnt = uds_scratch_iov(s, iov, b->data + b->end + 4, b->cap - b->end - 4);
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
    return (ssize_t)(stored - in_room);
}

/* The packets read into the arena so far become the connection's view, and move on to its
 * own buffer (further packets of this readiness go there). */
static void arena_to_buffer(uds_server *s, uds_conn *c, uds_buf *arena)
{
    if (arena->end == 0)
        return;
    take_arena(s, c, arena->end);
    uds_conn_settle(s, c);
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
            if (uds_buf_append(b, s->scratch, (size_t)spilled, &s->pool) < 0)
                uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM);
            uds_scratch_used(s, (size_t)spilled);
            if (c->flags & UDS_CF_DEAD)
                return;
        }
    }
    if (to_arena && arena.end > 0)
        take_arena(s, c, arena.end);
    if (got)
        uds_conn_touch(s, c);
    uds_conn_attn_push(s, c);
}

void uds_conn_read(uds_server *s, uds_conn *c)
{
    if (c->flags & (UDS_CF_NO_READ | UDS_CF_PAUSED | UDS_CF_FRAMES))
        return; /* complete frames wait: the kernel keeps the rest until they are delivered */
    if (c->msg_turn == s->turn)
        return; /* its buffer must not move in this turn; epoll reports it again */
    if (s->sock_type == SOCK_SEQPACKET) {
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
    uds_conn_attn_push(s, c);
}

/* ---- writing ------------------------------------------------------------------------------ */

/* Takes the marks of messages with descriptors that end at or before stream offset sent off
 * the head of the output's queue. */
static void drop_passed_ends(uds_fdq *q, uint64_t sent)
{
    while (uds_fdq_len(q) > 0 && q->fd[q->head] == UDS_FDQ_END && uds_fdq_head_at(q) <= sent)
        uds_fdq_pop(q);
}

/* What the next send() takes from the output: n bytes from p, with the nfds descriptors that
 * go with them (*fds: the head of the queue). A stream sends up to the next message that
 * carries descriptors; that message's first byte carries them, and that send ends with the
 * message (at its UDS_FDQ_END mark). A SEQPACKET connection sends one packet at a time (the
 * output holds u32 frames; the header is ours, not sent). */
static void next_send(uds_server *s, uds_conn *c, const char **p, size_t *n, const int **fds,
                      int *nfds, size_t *skip)
{
    uds_buf *b = &c->out;
    size_t len = uds_buf_len(b);
    uint64_t start = c->tx_total - len;
    *p = b->data + b->start;
    *n = len;
    *nfds = 0;
    *skip = 0;
    if (s->sock_type == SOCK_SEQPACKET) {
        size_t scan = 0;
        uds_frame_next(UDS_FRAMING_U32, *p, len, 0xFFFFFFFFu, &scan, skip, n);
        *p += *skip;
    }
    uds_fdq *q = &c->out_fds;
    drop_passed_ends(q, start);
    int k = uds_fdq_len(q);
    if (k == 0)
        return;
    uint64_t at = uds_fdq_head_at(q);
    if (at > start) {
        if (at - start < *n)
            *n = (size_t)(at - start); /* plain bytes up to the message with descriptors */
        return;
    }
    *fds = q->fd + q->head;
    while (*nfds < k && q->at[q->head + *nfds] == start)
        (*nfds)++;
    if (*nfds < k && q->at[q->head + *nfds] - start < *n)
        *n = (size_t)(q->at[q->head + *nfds] - start); /* the next one's go with its own bytes */
}

/* SEQPACKET: the packets at the head of the output that carry no descriptors, up to
 * UDS_PACKETS_PER_SEND, in one sendmmsg() rather than a send() each. Sets *want to how many
 * were offered; returns how many went, or -errno (-EAGAIN: none had room). */
static int send_packets(uds_conn *c, int *want)
{
    struct mmsghdr mm[UDS_PACKETS_PER_SEND];
    struct iovec iov[UDS_PACKETS_PER_SEND];
    uds_buf *b = &c->out;
    uint64_t offset = c->tx_total - uds_buf_len(b); /* of b->start */
    uint64_t fds_at = uds_fdq_len(&c->out_fds) > 0 ? uds_fdq_head_at(&c->out_fds) : UINT64_MAX;
    size_t pos = b->start;
    int k = 0;
    while (k < UDS_PACKETS_PER_SEND && pos < b->end && offset + (pos - b->start) < fds_at) {
        size_t scan = 0, off = 0, len = 0;
        uds_frame_next(UDS_FRAMING_U32, b->data + pos, b->end - pos, 0xFFFFFFFFu, &scan, &off, &len);
        iov[k].iov_base = b->data + pos + off;
        iov[k].iov_len = len;
        memset(&mm[k], 0, sizeof mm[k]);
        mm[k].msg_hdr.msg_iov = &iov[k];
        mm[k].msg_hdr.msg_iovlen = 1;
        pos += off + len;
        k++;
    }
    *want = k;
    int r;
    do
        r = sendmmsg(c->fd, mm, (unsigned)k, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    for (int i = 0; i < r; i++)
        b->start += 4 + iov[i].iov_len;
    return r;
}

void uds_conn_flush(uds_server *s, uds_conn *c)
{
    uds_buf *b = &c->out;
    if (uds_buf_len(b) == 0 || (c->flags & UDS_CF_DEAD))
        return;
    int sent_any = 0;
    while (uds_buf_len(b) > 0) {
        const char *p;
        const int *fds = NULL;
        size_t n, skip;
        int nfds;
        next_send(s, c, &p, &n, &fds, &nfds, &skip);
        ssize_t w;
        if (s->sock_type == SOCK_SEQPACKET && nfds == 0) {
            int want, sent = send_packets(c, &want);
            if (sent > 0) {
                sent_any = 1;
                if (sent == want)
                    continue;
                break; /* the socket is full */
            }
            w = sent; /* an error; -EAGAIN is handled below */
        } else if (nfds > 0 || s->sock_type == SOCK_SEQPACKET) {
            w = uds_send_msg(c->fd, p, n, fds, nfds, NULL, 0);
        } else {
            do
                w = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            while (w < 0 && errno == EINTR);
            if (w < 0)
                w = -errno;
        }
        if (w < 0) {
            if (w == -EAGAIN)
                break;
            int peer = w == -EPIPE || w == -ECONNRESET;
            uds_conn_fail(s, c, peer ? UDS_CLOSE_PEER : UDS_CLOSE_ERROR, (int)-w);
            return;
        }
        sent_any = 1;
        if (nfds > 0) {
            /* Sent with the first byte: ours to close now (the peer has its own). */
            UDS_COUNT(s->stats.fds_out, (uint64_t)nfds);
            for (int i = 0; i < nfds; i++)
                close(uds_fdq_pop(&c->out_fds));
        }
        b->start += skip + (size_t)w;
        if ((size_t)w < n)
            break; /* the socket is full */
    }
    if (sent_any)
        uds_conn_touch(s, c);
    if (c->linger.linked && !(c->flags & UDS_CF_CLOSING) &&
        (sent_any || uds_buf_len(b) <= s->cfg.max_output)) {
        /* Replies past max_output wait: the client has flush_timeout from its last progress
         * to take some, and none once it is back under the limit. */
        uds_tlist_remove(&s->linger, &c->linger);
        if (uds_buf_len(b) > s->cfg.max_output)
            uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
    }
    drop_passed_ends(&c->out_fds, c->tx_total - uds_buf_len(b));
    if (b->start < b->end) {
        uds_conn_set_want_out(s, c, 1); /* the rest when the peer has read */
        uds_conn_resume_if_drained(s, c);
        return;
    }
    uds_buf_release(b, &s->pool); /* drained: an idle connection holds nothing */
    uds_conn_set_want_out(s, c, 0);
    uds_conn_resume_if_drained(s, c);
    if (c->flags & UDS_CF_CLOSING)
        uds_conn_attn_push(s, c); /* drained: it may be finished now */
}

/* Writes one frame into c's output, where room was reserved for it: all of it but its first
 * `sent` bytes, which went straight to the socket. */
static void put_frame(uds_conn *c, const unsigned char *hdr, int h, const char *data, size_t len,
                      int trailer, size_t sent)
{
    uds_buf *b = &c->out;
    size_t skip = sent < (size_t)h ? sent : (size_t)h;
    memcpy(b->data + b->end, hdr + skip, (size_t)h - skip);
    b->end += (size_t)h - skip;
    sent -= skip;
    skip = sent < len ? sent : len;
    if (len > skip)
        memcpy(b->data + b->end, data + skip, len - skip);
    b->end += len - skip;
    if (trailer && sent <= len)
        b->data[b->end++] = '\n';
    c->tx_total += (size_t)h + len + (size_t)trailer;
}

/* A large frame goes straight to the socket when nothing waits to go before it, which saves
 * copying it into the output buffer (libuv's uv_write() tries a write first too). Streams only:
 * a packet must leave whole, with the others. Returns the bytes of the frame the socket took,
 * 0 if none (full or failing: the frame is queued, and the flush finds out). */
static size_t write_through(uds_server *s, uds_conn *c, const unsigned char *hdr, int h,
                            const char *data, size_t len, int trailer)
{
    if (s->sock_type != SOCK_STREAM || uds_buf_len(&c->out) > 0 || uds_fdq_len(&c->out_fds) > 0 ||
        (c->flags & (UDS_CF_CLOSING | UDS_CF_DEAD | UDS_CF_WANT_OUT)))
        return 0;
    char nl = '\n';
    struct iovec iov[3] = {{(void *)hdr, (size_t)h}, {(void *)data, len}, {&nl, (size_t)trailer}};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = 3;
    ssize_t w;
    do
        w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w <= 0)
        return 0;
    uds_conn_touch(s, c);
    return (size_t)w;
}

/* Accounts for msgs messages (bytes of payload) just queued to c or written out, which leave at
 * the next flush; reading from c pauses if its output reached the high-water mark. */
static void queued(uds_server *s, uds_conn *c, uint64_t msgs, uint64_t bytes)
{
    UDS_COUNT(c->stats->msgs_out, msgs);
    UDS_COUNT(c->stats->bytes_out, bytes);
    UDS_COUNT(s->stats.msgs_out, msgs);
    UDS_COUNT(s->stats.bytes_out, bytes);
    if (uds_buf_len(&c->out) == 0)
        return; /* all of it went straight out */
    if (uds_buf_len(&c->out) >= s->high_water && !(c->flags & UDS_CF_PAUSED))
        uds_conn_pause_reading(s, c);
    uds_conn_dirty_push(s, c);
}

/* Queues one frame; reply: it answers a request (see uds_conn_reply), else it is pushed. */
static int queue_frame(uds_server *s, uds_conn *c, const char *data, size_t len, int reply)
{
    unsigned char hdr[4];
    int trailer;
    int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
    if (h < 0)
        return h;
    int rc = uds_frame_check(s->cfg.framing, data, len);
    if (rc < 0)
        return rc;
    if (len > SIZE_MAX - 8)
        return -ENOMEM;
    size_t frame = (size_t)h + len + (size_t)trailer;
    uds_buf *b = &c->out;
    if (s->cfg.max_output > 0 && uds_buf_len(b) + frame > s->cfg.max_output) {
        if (!(c->flags & UDS_CF_WANT_OUT))
            uds_conn_flush(s, c); /* a reading client may make room right now */
        if (c->flags & UDS_CF_DEAD)
            return -ENOTCONN;
        if (uds_buf_len(b) + frame > s->cfg.max_output) {
            if (!reply) {
                uds_conn_fail(s, c, UDS_CLOSE_SLOW_CONSUMER, 0);
                return -ENOBUFS;
            }
            /* Reading stopped at the high-water mark, so this is the tail of one turn's
             * replies: kept, but the client must now take some within flush_timeout. */
            if (!c->linger.linked) {
                uds_server_clock(s); /* handlers may have run long since the poll */
                uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
            }
        }
    }
    size_t sent = len >= UDS_WRITE_THROUGH_MIN ? write_through(s, c, hdr, h, data, len, trailer) : 0;
    if (sent == frame) {
        c->tx_total += frame;
    } else if ((rc = uds_buf_reserve(b, frame - sent, &s->pool)) < 0) {
        if (sent > 0) /* the peer has the start of a frame whose rest cannot be kept */
            uds_conn_fail(s, c, UDS_CLOSE_ERROR, -rc);
        return rc;
    } else {
        put_frame(c, hdr, h, data, len, trailer, sent);
    }
    queued(s, c, 1, len);
    return 0;
}

int uds_conn_send(uds_server *s, uds_conn *c, const char *data, size_t len)
{
    return queue_frame(s, c, data, len, 0);
}

int uds_conn_reply(uds_server *s, uds_conn *c, const char *data, size_t len)
{
    return queue_frame(s, c, data, len, 1);
}

int uds_conn_send_run(uds_server *s, uds_conn *c, const char *data, const int16_t *lens, int n,
                      int *rcs)
{
    uds_buf *b = &c->out;
    size_t room = 0; /* framed: at most 5 bytes of framing each */
    for (int i = 0; i < n; i++)
        room += lens[i] < 0 ? 0 : (size_t)lens[i] + 5;
    int failed = 0;
    if ((s->cfg.max_output > 0 && uds_buf_len(b) + room > s->cfg.max_output) ||
        uds_buf_reserve(b, room, &s->pool) < 0) {
        /* Near the limit (or short of memory): one by one, each decided as uds_reply() does. */
        for (int i = 0; i < n; i++) {
            if (lens[i] < 0) {
                rcs[i] = 0;
                continue;
            }
            rcs[i] = (c->flags & UDS_CF_DEAD) ? -ENOTCONN : uds_conn_reply(s, c, data, (size_t)lens[i]);
            failed += rcs[i] < 0;
            data += lens[i];
        }
        return failed;
    }
    uint64_t msgs = 0, bytes = 0;
    for (int i = 0; i < n; i++) {
        if (lens[i] < 0) {
            rcs[i] = 0;
            continue;
        }
        size_t len = (size_t)lens[i];
        unsigned char hdr[4];
        int trailer;
        int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
        int rc = h < 0 ? h : uds_frame_check(s->cfg.framing, data, len);
        rcs[i] = rc;
        if (rc < 0) {
            failed++;
            data += len;
            continue;
        }
        put_frame(c, hdr, h, data, len, trailer, 0);
        msgs++;
        bytes += len;
        data += len;
    }
    if (msgs > 0)
        queued(s, c, msgs, bytes);
    return failed;
}

int uds_conn_send_fds(uds_server *s, uds_conn *c, const char *data, size_t len, const int *fds,
                      int nfds)
{
    if (nfds < 0 || nfds > UDS_MAX_FDS)
        return -EINVAL;
    if (nfds == 0)
        return uds_conn_send(s, c, data, len);
    unsigned char hdr[4];
    int trailer;
    int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
    if (h < 0)
        return h;
    if (s->sock_type == SOCK_STREAM && h + len + (size_t)trailer == 0)
        return -EINVAL; /* a stream carries descriptors only with at least one byte */
    /* Duplicates, queued before the message so that a failure leaves nothing half done. */
    uds_fdq *q = &c->out_fds;
    uint64_t at = c->tx_total;
    int rc = 0, pushed = 0;
    for (; pushed < nfds; pushed++) {
        int dup = fcntl(fds[pushed], F_DUPFD_CLOEXEC, 3);
        if (dup < 0) {
            rc = -errno;
            break;
        }
        if ((rc = uds_fdq_push(q, dup, at)) < 0) {
            close(dup);
            break;
        }
    }
    /* On a stream, a mark where the message ends: the send that carries its descriptors stops
     * there, so that a reader, who can only tell that they came with some byte of its read, gives
     * them to this message and not to one queued after it. */
    if (rc == 0 && s->sock_type == SOCK_STREAM &&
        (rc = uds_fdq_push(q, UDS_FDQ_END, at + (size_t)h + len + (size_t)trailer)) == 0)
        pushed++;
    if (rc == 0)
        rc = uds_conn_send(s, c, data, len);
    if (rc < 0) {
        /* Take ours back off the tail. A slow-consumer close may have emptied the queue. */
        for (; pushed > 0 && uds_fdq_len(q) > 0; pushed--) {
            int fd = q->fd[--q->n];
            if (fd >= 0)
                close(fd);
        }
        return rc;
    }
    return 0;
}
