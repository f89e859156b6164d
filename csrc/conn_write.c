/*
 * conn_write.c - a connection's output: queueing framed messages (one at a time, a run of
 * replies at once, or with descriptors), writing straight through when nothing waits, and
 * flushing the queue with the descriptors that go along. Output is bounded: a push that would
 * take it past max_output closes the connection as a slow consumer; replies are kept (reading
 * paused at the high-water mark, so they are bounded by what one turn's requests are owed).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

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
    if (s->packets) {
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
        if (s->packets && nfds == 0) {
            int want, sent = send_packets(c, &want);
            if (sent > 0) {
                sent_any = 1;
                if (sent == want)
                    continue;
                break; /* the socket is full */
            }
            w = sent; /* an error; -EAGAIN is handled below */
        } else if (nfds > 0 || s->packets) {
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
    if (c->linger.linked && !(c->flags & (UDS_CF_CLOSING | UDS_CF_MOVE)) &&
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
    if (c->flags & (UDS_CF_CLOSING | UDS_CF_MOVE))
        uds_conn_mark_pending(s, c); /* drained: it may be finished (or handed back) now */
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

/* Whether a frame may go straight to the socket: nothing waits to go before it. Streams only: a
 * packet must leave whole, with the others. */
static int nothing_waits(const uds_server *s, const uds_conn *c)
{
    return !s->packets && uds_buf_len(&c->out) == 0 && uds_fdq_len(&c->out_fds) == 0 &&
           !(c->flags & (UDS_CF_CLOSING | UDS_CF_DEAD | UDS_CF_WANT_OUT));
}

/* What a direct write returned (w), as the bytes the socket took: 0 if none (full or failing:
 * the caller queues them, and the flush finds out). */
static size_t took(uds_server *s, uds_conn *c, ssize_t w)
{
    if (w <= 0)
        return 0;
    uds_conn_touch(s, c);
    return (size_t)w;
}

/* One send() of p[0..n): see took(). */
static size_t send_now(uds_server *s, uds_conn *c, const char *p, size_t n)
{
    ssize_t w;
    do
        w = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    return took(s, c, w);
}

/* Writes one whole frame at p; returns its end. */
static char *frame_at(char *p, const unsigned char *hdr, int h, const char *data, size_t len,
                      int trailer)
{
    memcpy(p, hdr, (size_t)h);
    if (len > 0)
        memcpy(p + h, data, len);
    p += (size_t)h + len;
    if (trailer)
        *p++ = '\n';
    return p;
}

/* A large frame (or the one reply of a turn) goes straight to the socket when nothing waits to
 * go before it, which saves copying it into the output buffer (libuv's uv_write() tries a write
 * first too). Returns the bytes of the frame the socket took (see send_now()). */
static size_t write_through(uds_server *s, uds_conn *c, const unsigned char *hdr, int h,
                            const char *data, size_t len, int trailer)
{
    if (!nothing_waits(s, c))
        return 0;
    size_t frame = (size_t)h + len + (size_t)trailer;
    if (frame <= UDS_SMALL_SEND) {
        /* A small frame in one piece: send() costs the kernel less than sendmsg()'s iovecs. */
        char small[UDS_SMALL_SEND];
        frame_at(small, hdr, h, data, len, trailer);
        return send_now(s, c, small, frame);
    }
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
    return took(s, c, w);
}

/* Counts msgs messages (bytes of payload) as sent to c. Done before they reach the socket: a
 * client that holds its reply must never read a counter that lacks it. (Unsigned: adding
 * UINT64_MAX and the negated bytes takes back a message that could not be queued after all.) */
static void count_out(uds_server *s, uds_conn *c, uint64_t msgs, uint64_t bytes)
{
    UDS_COUNT(c->stats->msgs_out, msgs);
    UDS_COUNT(c->stats->bytes_out, bytes);
    UDS_COUNT(s->stats.msgs_out, msgs);
    UDS_COUNT(s->stats.bytes_out, bytes);
}

/* After messages were queued to c or written out: what is queued leaves at the next flush;
 * reading from c pauses if its output reached the high-water mark. */
static void queued(uds_server *s, uds_conn *c)
{
    if (uds_buf_len(&c->out) == 0)
        return; /* all of it went straight out */
    if (uds_buf_len(&c->out) >= s->high_water && !(c->flags & UDS_CF_PAUSED))
        uds_conn_pause_reading(s, c);
    uds_conn_schedule_flush(s, c);
}

int uds_conn_send(uds_server *s, uds_conn *c, const char *data, size_t len, int how)
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
            if (how == UDS_SEND_PUSH) {
                uds_conn_fail(s, c, UDS_CLOSE_SLOW_CONSUMER, 0);
                return -ENOBUFS;
            }
            /* Reading stopped at the high-water mark, so this is the tail of one turn's
             * replies: kept, but the client must now take some within flush_timeout. */
            if (!c->linger.linked) {
                uds_clock_update(&s->now_ms); /* handlers may have run long since the poll */
                uds_tlist_append(&s->linger, &c->linger, s->now_ms + (uint64_t)s->cfg.flush_timeout_ms);
            }
        }
    }
    count_out(s, c, 1, len);
    size_t sent = len >= UDS_WRITE_THROUGH_MIN || how == UDS_SEND_NOW
                      ? write_through(s, c, hdr, h, data, len, trailer) : 0;
    if (sent == frame) {
        c->tx_total += frame;
    } else if ((rc = uds_buf_reserve(b, frame - sent, &s->pool)) < 0) {
        count_out(s, c, UINT64_MAX, 0 - (uint64_t)len);
        if (sent > 0) /* the peer has the start of a frame whose rest cannot be kept */
            uds_conn_fail(s, c, UDS_CLOSE_ERROR, -rc);
        return rc;
    } else {
        put_frame(c, hdr, h, data, len, trailer, sent);
    }
    queued(s, c);
    return 0;
}

/* Frames the replies of a run (see uds_conn_send_run()) back to back at `to`, which has room for
 * them all; sets rcs[] and adds to the counts. Returns the bytes written. */
static size_t frame_run(uds_server *s, const char *data, const int16_t *lens, int n, int *rcs,
                        char *to, uint64_t *msgs, uint64_t *bytes, int *failed)
{
    char *p = to;
    for (int i = 0; i < n; i++) {
        if (lens[i] < 0) {
            rcs[i] = 0;
            continue;
        }
        size_t len = (size_t)lens[i];
        unsigned char hdr[4];
        int trailer;
        int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
        rcs[i] = h < 0 ? h : uds_frame_check(s->cfg.framing, data, len);
        if (rcs[i] == 0) {
            p = frame_at(p, hdr, h, data, len, trailer);
            *msgs += 1;
            *bytes += len;
        }
        *failed += rcs[i] < 0;
        data += len;
    }
    return (size_t)(p - to);
}

int uds_conn_send_run(uds_server *s, uds_conn *c, const char *data, const int16_t *lens, int n,
                      int *rcs)
{
    uds_buf *b = &c->out;
    size_t room = 0; /* framed: at most 5 bytes of framing each */
    for (int i = 0; i < n; i++)
        room += lens[i] < 0 ? 0 : (size_t)lens[i] + 5;
    int failed = 0;
    uint64_t msgs = 0, bytes = 0;
    if (room == 0) { /* no reply at all: every one -1 */
        for (int i = 0; i < n; i++)
            rcs[i] = 0;
        return 0;
    }
    if (room <= UDS_SMALL_SEND && (s->cfg.max_output == 0 || room <= s->cfg.max_output) &&
        nothing_waits(s, c)) {
        /* Small, and nothing waits before them: to the socket now, from one stack copy (the
         * usual case, a client with a request or a few in flight); what it does not take is
         * queued (within max_output: it is no more than room). */
        char run[UDS_SMALL_SEND];
        size_t framed = frame_run(s, data, lens, n, rcs, run, &msgs, &bytes, &failed);
        count_out(s, c, msgs, bytes);
        size_t sent = framed > 0 ? send_now(s, c, run, framed) : 0;
        c->tx_total += framed;
        if (sent < framed && uds_buf_append(b, run + sent, framed - sent, &s->pool) < 0)
            uds_conn_fail(s, c, UDS_CLOSE_ERROR, ENOMEM); /* the peer may have half a frame */
    } else if ((s->cfg.max_output > 0 && uds_buf_len(b) + room > s->cfg.max_output) ||
               uds_buf_reserve(b, room, &s->pool) < 0) {
        /* Near the limit (or short of memory): one by one, each decided as a reply is. */
        for (int i = 0; i < n; i++) {
            if (lens[i] < 0) {
                rcs[i] = 0;
                continue;
            }
            rcs[i] = (c->flags & UDS_CF_DEAD) ? -ENOTCONN : uds_conn_send(s, c, data, (size_t)lens[i], UDS_SEND_REPLY);
            failed += rcs[i] < 0;
            data += lens[i];
        }
        return failed;
    } else {
        size_t framed = frame_run(s, data, lens, n, rcs, b->data + b->end, &msgs, &bytes, &failed);
        b->end += framed;
        c->tx_total += framed;
        count_out(s, c, msgs, bytes);
    }
    if (msgs > 0)
        queued(s, c);
    return failed;
}

int uds_conn_send_fds(uds_server *s, uds_conn *c, const char *data, size_t len, const int *fds,
                      int nfds)
{
    if (nfds == 0)
        return uds_conn_send(s, c, data, len, UDS_SEND_PUSH);
    unsigned char hdr[4];
    int trailer;
    int h = uds_frame_header(s->cfg.framing, len, hdr, &trailer);
    if (h < 0)
        return h;
    if (!s->packets && h + len + (size_t)trailer == 0)
        return -EINVAL; /* a stream carries descriptors only with at least one byte */
    /* Duplicates, queued before the message so that a failure leaves nothing half done. */
    int dups[UDS_MAX_FDS];
    int rc = uds_fds_dup(fds, nfds, dups);
    if (rc < 0)
        return rc;
    uds_fdq *q = &c->out_fds;
    uint64_t at = c->tx_total;
    int pushed = 0;
    while (pushed < nfds && (rc = uds_fdq_push(q, dups[pushed], at)) == 0)
        pushed++;
    uds_fds_close(dups + pushed, nfds - pushed); /* those not queued (none if all went well) */
    /* On a stream, a mark where the message ends: the send that carries its descriptors stops
     * there, so that a reader, who can only tell that they came with some byte of its read, gives
     * them to this message and not to one queued after it. */
    if (rc == 0 && !s->packets &&
        (rc = uds_fdq_push(q, UDS_FDQ_END, at + (size_t)h + len + (size_t)trailer)) == 0)
        pushed++;
    if (rc == 0)
        rc = uds_conn_send(s, c, data, len, UDS_SEND_PUSH);
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
