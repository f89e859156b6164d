/*
 * test_server.c - the core end to end, in C alone: a server and its clients in one thread
 * (non-blocking clients, the server polled in between), so that it runs the same way under
 * valgrind and the sanitizers. Echoes pipelined frames of many sizes, then exercises the ways
 * connections end: a client that vanishes mid-frame, one that half-closes, one the server
 * closes, and a shutdown that must deliver what is owed and leave nothing behind.
 */
#define _GNU_SOURCE
#include "uds.h"
#include "check.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CLIENTS 8
#define REQUESTS 200



typedef struct client {
    int fd;
    unsigned char *out; /* every request, framed, back to back */
    size_t out_len, sent;
    unsigned char *in; /* what came back */
    size_t in_len, in_cap;
} client;

static size_t request_size(int c, int i)
{
    /* 0 bytes up to ~100 KiB, varied */
    return (size_t)((c * 7919 + i * 104729) % 1000) * (size_t)((i % 7 == 0) ? 100 : 1);
}

static unsigned char payload_byte(int c, int i, size_t k) { return (unsigned char)(c * 31 + i * 17 + k); }

/* A u32-framed server's config, messages up to 1 MiB. */
static uds_config u32_config(int flush_timeout_ms, size_t max_output)
{
    uds_config cfg = {0};
    cfg.framing = UDS_FRAMING_U32;
    cfg.max_message = 1 << 20;
    cfg.backlog = 64;
    cfg.mode = 0600;
    cfg.flush_timeout_ms = flush_timeout_ms;
    cfg.max_output = max_output;
    return cfg;
}

static int connect_to(const char *path)
{
    struct sockaddr_un sa = {0};
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("connect");
        exit(2);
    }
    return fd;
}

/* One server turn: echo every message, count closes. Returns the number of events. */
static int turn(uds_server *s, uds_event *ev, int *closed)
{
    int n = uds_poll(s, ev, 64, 10);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_MESSAGE && ev[i].len == 4 && memcmp(ev[i].data, "stop", 4) == 0)
            CHECK(uds_close(s, ev[i].slot, ev[i].id, UDS_CLOSE_CLOSED) == 0);
        else if (ev[i].type == UDS_EV_MESSAGE)
            CHECK(uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len) == 0);
        else if (ev[i].type == UDS_EV_CLOSED)
            (*closed)++;
    }
    return n;
}

static void pump(client *cl)
{
    if (cl->sent < cl->out_len) {
        ssize_t w = send(cl->fd, cl->out + cl->sent, cl->out_len - cl->sent, MSG_NOSIGNAL);
        if (w > 0)
            cl->sent += (size_t)w;
    }
    for (;;) {
        if (cl->in_cap - cl->in_len < 65536) {
            cl->in_cap = cl->in_cap * 2 + 65536;
            cl->in = realloc(cl->in, cl->in_cap);
        }
        ssize_t r = recv(cl->fd, cl->in + cl->in_len, cl->in_cap - cl->in_len, 0);
        if (r <= 0)
            return;
        cl->in_len += (size_t)r;
    }
}

static void echo_many(uds_server *s, const char *path, uds_event *ev)
{
    client cl[CLIENTS];
    int closed = 0;
    for (int c = 0; c < CLIENTS; c++) {
        memset(&cl[c], 0, sizeof cl[c]);
        cl[c].fd = connect_to(path);
        for (int i = 0; i < REQUESTS; i++)
            cl[c].out_len += 4 + request_size(c, i);
        cl[c].out = malloc(cl[c].out_len);
        size_t at = 0;
        for (int i = 0; i < REQUESTS; i++) {
            size_t n = request_size(c, i);
            cl[c].out[at++] = (unsigned char)(n >> 24);
            cl[c].out[at++] = (unsigned char)(n >> 16);
            cl[c].out[at++] = (unsigned char)(n >> 8);
            cl[c].out[at++] = (unsigned char)n;
            for (size_t k = 0; k < n; k++)
                cl[c].out[at++] = payload_byte(c, i, k);
        }
    }
    for (int round = 0; round < 100000; round++) {
        int done = 1;
        for (int c = 0; c < CLIENTS; c++) {
            pump(&cl[c]);
            done &= cl[c].in_len == cl[c].out_len;
        }
        if (done)
            break;
        turn(s, ev, &closed);
    }
    for (int c = 0; c < CLIENTS; c++) {
        /* An echo of every frame, in order: exactly the bytes sent. */
        CHECK(cl[c].in_len == cl[c].out_len);
        CHECK(cl[c].in_len == cl[c].out_len && memcmp(cl[c].in, cl[c].out, cl[c].out_len) == 0);
        close(cl[c].fd);
        free(cl[c].out);
        free(cl[c].in);
    }
    for (int round = 0; round < 1000 && closed < CLIENTS; round++)
        turn(s, ev, &closed);
    CHECK(closed == CLIENTS);
    CHECK(uds_live(s) == 0);
}

static void endings(uds_server *s, const char *path, uds_event *ev)
{
    int closed = 0;
    /* Vanishes mid-frame: announces 1000 bytes, sends 3. */
    int a = connect_to(path);
    CHECK(send(a, "\0\0\3\xe8" "abc", 7, 0) == 7);
    /* Half-closes after two requests: still gets both replies, then EOF. */
    int b = connect_to(path);
    CHECK(send(b, "\0\0\0\1x\0\0\0\2yz", 11, 0) == 11);
    shutdown(b, SHUT_WR);
    /* Closed by the server after its first message. */
    int c = connect_to(path);
    CHECK(send(c, "\0\0\0\4stop", 8, 0) == 8);
    for (int round = 0; round < 50; round++) {
        turn(s, ev, &closed);
        if (round == 5)
            close(a);
    }
    char buf[64];
    ssize_t r = recv(b, buf, sizeof buf, 0);
    CHECK(r == 11 && memcmp(buf, "\0\0\0\1x\0\0\0\2yz", 11) == 0);
    for (int round = 0; round < 50; round++)
        turn(s, ev, &closed);
    CHECK(recv(b, buf, sizeof buf, 0) == 0); /* end-of-file */
    CHECK(recv(c, buf, sizeof buf, 0) == 0); /* closed by the server: end-of-file, no reply */
    close(b);
    close(c);
    for (int round = 0; round < 50; round++)
        turn(s, ev, &closed);
    CHECK(closed == 3);
    CHECK(uds_live(s) == 0);
}

static void shutdown_delivers(uds_server *s, uds_event *ev, const char *path)
{
    int closed = 0;
    int fd = connect_to(path);
    for (int i = 0; i < 20; i++)
        CHECK(send(fd, "\0\0\0\2hi", 6, 0) == 6);
    turn(s, ev, &closed); /* accepted */
    CHECK(uds_shutdown(s) == 1);
    struct stat st;
    CHECK(lstat(path, &st) < 0 && errno == ENOENT); /* the file goes first */
    for (int round = 0; round < 100 && uds_live(s) > 0; round++)
        turn(s, ev, &closed);
    CHECK(closed == 1);
    turn(s, ev, &closed); /* finished connections close their descriptors at the next turn */
    char buf[256];
    size_t got = 0;
    ssize_t r;
    while ((r = recv(fd, buf + got, sizeof buf - got, 0)) > 0)
        got += (size_t)r;
    CHECK(got == 120); /* every request received before the shutdown was answered */
    CHECK(r == 0);     /* then end-of-file */
    close(fd);
}

/* Polls with uds_poll_batch() until a turn brings messages; answers connects on the way. */
static int batch_turn(uds_server *s, uds_event *ev, uds_batch *b)
{
    for (int round = 0; round < 100; round++) {
        int n = uds_poll_batch(s, ev, 64, 10, b);
        CHECK(n >= 0);
        if (n > 0 && ev[0].type == UDS_EV_MESSAGE)
            return n;
    }
    CHECK(!"no messages came");
    return 0;
}

/* uds_serve_one(): batch_whole()'s turn of one message, that message in the return value (its
 * slot with it when its connection is not the last one's); interrupted or draining with no
 * connection live, it queues the reply but does not poll. */
static void serve_one(uds_server *s, uds_batch *b, int a, int c)
{
    char buf[64];
    b->srv = s;
    b->timeout_ms = 10;
    b->last_slot = -1;
    CHECK(send(c, "\0\0\0\3abc", 7, 0) == 7);
    int64_t one = -1;
    for (int round = 0; round < 20 && one < 0; round++)
        one = uds_serve_one(b, NULL, -1);
    CHECK(one == ((int64_t)(b->ev[0].slot + 1) << UDS_ONE_SHIFT | 3) && b->n == 1);
    CHECK(memcmp(b->pack, "abc", 3) == 0);
    int c_slot = b->ev[0].slot;
    /* Interrupted: the reply is queued and leaves at the next poll, but nothing is polled now,
     * not even the message already waiting. */
    CHECK(send(c, "\0\0\0\1x", 5, 0) == 5);
    b->interrupt = 1;
    CHECK(uds_serve_one(b, "ABC", 3) == -1 && b->n == 0 && b->reply_rc == 0 && b->one_len == -1);
    CHECK(uds_serve_one(b, NULL, -1) == -1 && b->n == 0);
    b->interrupt = 0;
    one = uds_serve_one(b, NULL, -1); /* the poll: the reply leaves, the message comes */
    CHECK(one == 1 && memcmp(b->pack, "x", 1) == 0); /* from the same connection: its length */
    CHECK(recv(c, buf, sizeof buf, 0) == 7 && memcmp(buf, "\0\0\0\3ABC", 7) == 0);
    CHECK(send(a, "\0\0\0\2yz", 6, 0) == 6);
    one = -1;
    for (int round = 0; round < 20 && one < 0; round++)
        one = uds_serve_one(b, NULL, -1);
    CHECK(one == ((int64_t)(b->ev[0].slot + 1) << UDS_ONE_SHIFT | 2) && b->ev[0].slot != c_slot);
    CHECK(memcmp(b->pack, "yz", 2) == 0);
    CHECK(uds_serve_one(b, "YZ", 2) == -1 && b->n == 0); /* its reply; then nothing comes */
    CHECK(recv(a, buf, sizeof buf, 0) == 6 && memcmp(buf, "\0\0\0\2YZ", 6) == 0);
    /* Draining: polled as usual while a connection is live (nothing comes: n 0 from the wait). */
    b->draining = 1;
    CHECK(uds_serve_one(b, NULL, -1) == -1 && b->n == 0);
    b->draining = 0;
    b->srv = NULL; /* let go of */
    CHECK(uds_serve_one(b, NULL, -1) == -1 && b->n == -EBADF);
    b->srv = s;
}

/* uds_poll_batch() describes a batch whole (the packed payloads, their layout, the runs per
 * connection) and uds_reply_batch() answers it in one call; a payload too big to pack makes
 * the batch one to take event by event; a batch of one message is answered with the next
 * poll. */
static void batch_whole(uds_server *s, const char *path, uds_event *ev)
{
    char pack[8192], layout[64 * UDS_LAYOUT_ITEM_MAX];
    int32_t run_slot[64];
    uint32_t run_end[64];
    uds_batch b = {.ev = ev, .cap = 64, .pack = pack, .pack_cap = sizeof pack, .layout = layout,
                   .run_slot = run_slot, .run_end = run_end};
    int a = connect_to(path);
    for (int round = 0; round < 20; round++) /* both accepted before anything is sent */
        CHECK(uds_poll_batch(s, ev, 64, 10, &b) >= 0);
    int c = connect_to(path);
    for (int round = 0; round < 20; round++)
        CHECK(uds_poll_batch(s, ev, 64, 10, &b) >= 0);
    CHECK(send(a, "\0\0\0\1a\0\0\0\0\0\0\0\3ccc", 16, 0) == 16);
    CHECK(send(c, "\0\0\0\2dd\0\0\0\2ee", 12, 0) == 12);
    int n = batch_turn(s, ev, &b); /* both were readable before the poll: one turn */
    CHECK(n == 5 && b.all_packed && !b.any_fds && b.runs == 2);
    int a_first = ev[0].len == 1;
    const char *want_layout = a_first ? "1s0s3s2s2s" : "2s2s1s0s3s";
    const char *want_pack = a_first ? "acccddee" : "ddeeaccc";
    CHECK(b.layout_len == 10 && memcmp(layout, want_layout, 10) == 0);
    CHECK(b.pack_used == 8 && memcmp(pack, want_pack, 8) == 0);
    CHECK(run_end[0] == (a_first ? 3u : 2u) && run_end[1] == 5);
    CHECK(run_slot[0] == ev[0].slot && run_slot[1] == ev[4].slot && run_slot[0] != run_slot[1]);
    /* The replies back to back: "A", nothing at all (a zero-length frame), none (-1) to "ccc",
     * "DD", "EE". */
    int16_t lens[5];
    char data[16];
    size_t used = 0;
    for (int i = 0; i < 5; i++) {
        lens[i] = ev[i].len == 3 ? -1 : (int16_t)ev[i].len;
        for (size_t k = 0; lens[i] >= 0 && k < ev[i].len; k++)
            data[used++] = (char)(ev[i].data[k] - 'a' + 'A');
    }
    int rcs[5] = {1, 1, 1, 1, 1};
    CHECK(uds_reply_batch(s, ev, 0, 5, data, lens, rcs) == 0);
    CHECK(rcs[0] == 0 && rcs[1] == 0 && rcs[2] == 0 && rcs[3] == 0 && rcs[4] == 0);
    CHECK(uds_poll_batch(s, ev, 64, 10, &b) >= 0); /* the replies leave */
    char buf[64];
    CHECK(recv(a, buf, sizeof buf, 0) == 9 && memcmp(buf, "\0\0\0\1A\0\0\0\0", 9) == 0);
    CHECK(recv(c, buf, sizeof buf, 0) == 12 && memcmp(buf, "\0\0\0\2DD\0\0\0\2EE", 12) == 0);
    /* A payload over UDS_PACK_MAX: not packed, so not all_packed. */
    static char big[4 + UDS_PACK_MAX + 1];
    memcpy(big, "\0\0\x10\x01", 4);
    CHECK(send(a, big, sizeof big, 0) == (ssize_t)sizeof big);
    n = batch_turn(s, ev, &b);
    CHECK(n == 1 && ev[0].len == UDS_PACK_MAX + 1 && !b.all_packed && b.one_len == -1);
    /* A batch of one packed message says so, and uds_reply_poll_batch() answers it as it polls
     * (the reply leaves at the poll after). */
    CHECK(send(c, "\0\0\0\2hi", 6, 0) == 6);
    n = batch_turn(s, ev, &b);
    CHECK(n == 1 && b.one_len == 2 && b.one_slot == ev[0].slot && memcmp(pack, "hi", 2) == 0);
    CHECK(uds_reply_poll_batch(s, "HI", 2, 10, &b) >= 0 && b.reply_rc == 0);
    CHECK(uds_reply_poll_batch(s, NULL, -1, 10, &b) >= 0 && b.reply_rc == 0);
    CHECK(recv(c, buf, sizeof buf, 0) == 6 && memcmp(buf, "\0\0\0\2HI", 6) == 0);
    serve_one(s, &b, a, c);
    close(a);
    close(c);
    int closed = 0;
    for (int round = 0; round < 50 && closed < 2; round++) {
        int k = uds_poll_batch(s, ev, 64, 10, &b);
        for (int i = 0; i < k; i++)
            closed += ev[i].type == UDS_EV_CLOSED;
    }
    CHECK(closed == 2);
}

/* Replies may take a client's output past max_output, pushes may not; a client with replies
 * past it that takes none of its output for flush_timeout is a slow consumer, and one that
 * reads gets them all. Client 0 reads; 1 does not; 2 is then pushed to. */
static void replies_past_the_cap(const char *dir)
{
    char path[128];
    snprintf(path, sizeof path, "%s/cap.sock", dir);
    uds_config cfg = u32_config(200, 64 * 1024);
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, path, &cfg) == 0);
    if (s == NULL)
        return;
    enum { BIG = 1 << 20 };
    char *big = calloc(1, BIG), *sink = malloc(BIG);
    int fd[3], reasons[3] = {-1, -1, -1};
    uint64_t ids[3] = {0};
    uds_event ev[8];
    for (int k = 0; k < 3; k++) { /* one at a time: ids[k] is client k's connection */
        fd[k] = connect_to(path);
        CHECK(write(fd[k], "\0\0\0\1x", 5) == 5);
        for (int round = 0; round < 100 && ids[k] == 0; round++) {
            int n = uds_poll(s, ev, 8, 5);
            CHECK(n >= 0);
            for (int i = 0; i < n; i++) {
                if (ev[i].type != UDS_EV_MESSAGE)
                    continue;
                ids[k] = ev[i].id;
                CHECK(uds_reply(s, ev[i].slot, ev[i].id, big, BIG) == 0); /* 16 times the cap */
                if (k == 2)
                    CHECK(uds_send(s, ev[i].slot, ev[i].id, "push", 4) == -ENOBUFS);
            }
        }
        CHECK(ids[k] != 0);
    }
    size_t got = 0;
    for (int round = 0; round < 500 && (reasons[1] < 0 || reasons[2] < 0 || got < 4 + BIG); round++) {
        int n = uds_poll(s, ev, 8, 5);
        CHECK(n >= 0);
        for (int i = 0; i < n; i++)
            for (int k = 0; k < 3; k++)
                if (ev[i].type == UDS_EV_CLOSED && ev[i].id == ids[k])
                    reasons[k] = ev[i].reason;
        for (ssize_t r; (r = read(fd[0], sink, BIG)) > 0;)
            got += (size_t)r;
    }
    CHECK(got == 4 + BIG);     /* the reader got its reply whole */
    CHECK(reasons[0] == -1);   /* and is still connected */
    CHECK(reasons[1] == UDS_CLOSE_SLOW_CONSUMER && reasons[2] == UDS_CLOSE_SLOW_CONSUMER);
    for (int k = 0; k < 3; k++)
        close(fd[k]);
    free(big);
    free(sink);
    uds_server_free(s);
}

/* The first event of type at a turn of at most cap events (timeout 0); none: -1. */
static int poll_for(uds_server *s, uds_event *ev, int cap, int type)
{
    int n = uds_poll(s, ev, cap, 0);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++)
        if (ev[i].type == type)
            return i;
    return -1;
}

/* A caller waiting in its own loop: the epoll descriptor shows readiness, uds_timeout() says
 * when a turn has work no readiness announces, and uds_hold() keeps a connection from being
 * read (frames it holds come once it is released) or from being finished. */
static void held(const char *dir)
{
    char path[128];
    snprintf(path, sizeof path, "%s/held.sock", dir);
    uds_config cfg = u32_config(1000, 1 << 22);
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, path, &cfg) == 0);
    if (s == NULL)
        return;
    uds_event ev[8];
    int fd = connect_to(path);
    struct pollfd pfd = {.fd = uds_epoll_fd(s), .events = POLLIN};
    CHECK(poll(&pfd, 1, 1000) == 1); /* the connection waits to be accepted */
    int k = poll_for(s, ev, 8, UDS_EV_CONNECTED);
    CHECK(k == 0);
    int slot = ev[0].slot;
    uint64_t id = ev[0].id;
    CHECK(uds_hold(s, slot, id, 4) == -EINVAL && uds_hold(s, slot, id + 1, 0) == -ENOTCONN);
    CHECK(uds_timeout(s) == -1); /* no deadline, nothing to do */
    CHECK(send(fd, "\0\0\0\1a\0\0\0\1b\0\0\0\1c", 15, 0) == 15);
    CHECK(poll(&pfd, 1, 1000) == 1);
    CHECK(poll_for(s, ev, 1, UDS_EV_MESSAGE) == 0 && ev[0].data[0] == 'a'); /* batch of one */
    /* b and c wait in its buffer: held, they are not delivered, nor anything more read. */
    CHECK(uds_hold(s, slot, id, UDS_HOLD_READ | UDS_HOLD_OPEN) == 0);
    CHECK(send(fd, "\0\0\0\1d", 5, 0) == 5);
    for (int round = 0; round < 5; round++)
        CHECK(poll_for(s, ev, 8, UDS_EV_MESSAGE) == -1);
    CHECK(uds_timeout(s) == -1);
    CHECK(uds_hold(s, slot, id, UDS_HOLD_OPEN) == 0);
    CHECK(uds_timeout(s) == 0); /* released: b and c come without new bytes */
    CHECK(uds_poll(s, ev, 8, 0) == 2 && ev[0].data[0] == 'b' && ev[1].data[0] == 'c');
    CHECK(poll_for(s, ev, 8, UDS_EV_MESSAGE) == 0 && ev[0].data[0] == 'd'); /* read again */
    /* Owed replies: end-of-file does not finish it until the caller releases it. */
    shutdown(fd, SHUT_WR);
    CHECK(poll(&pfd, 1, 1000) == 1);
    for (int round = 0; round < 5; round++)
        CHECK(poll_for(s, ev, 8, UDS_EV_CLOSED) == -1);
    CHECK(uds_reply(s, slot, id, "late", 4) == 0);
    CHECK(uds_timeout(s) == 0); /* the reply waits for the next turn's flush */
    CHECK(uds_hold(s, slot, id, 0) == 0);
    int closed = -1;
    for (int round = 0; round < 5 && closed < 0; round++)
        closed = poll_for(s, ev, 8, UDS_EV_CLOSED);
    CHECK(closed >= 0 && ev[closed].reason == UDS_CLOSE_PEER);
    char buf[16];
    CHECK(recv(fd, buf, sizeof buf, 0) == 8 && memcmp(buf, "\0\0\0\4late", 8) == 0);
    CHECK(uds_timeout(s) == 0); /* reported closed: its descriptor waits for the next turn */
    CHECK(uds_poll(s, ev, 8, 0) == 0); /* its descriptor is closed at this turn */
    CHECK(recv(fd, buf, sizeof buf, 0) == 0);
    close(fd);
    uds_server_free(s);
}

int main(void)
{
    char dir[] = "/tmp/uds-test-XXXXXX";
    check_mkdtemp(dir);
    char path[128];
    snprintf(path, sizeof path, "%s/s.sock", dir);
    uds_config cfg = u32_config(1000, 1 << 22);
    cfg.frame_timeout_ms = 10000;
    uds_server *s = NULL;
    int rc = uds_server_new(&s, path, &cfg);
    if (rc < 0) {
        fprintf(stderr, "uds_server_new: %s\n", strerror(-rc));
        return 2;
    }
    uds_event ev[64];

    echo_many(s, path, ev);
    endings(s, path, ev);
    batch_whole(s, path, ev);
    shutdown_delivers(s, ev, path);
    replies_past_the_cap(dir);
    held(dir);
    uds_server_stats st;
    uds_server_stats_get(s, &st);
    CHECK(st.current == 0);
    CHECK(st.accepted == CLIENTS + 6);
    CHECK(st.msgs_in == st.msgs_out + 4); /* "stop", and batch_whole()'s "ccc", big one and "x", got no reply */
    CHECK(st.closed[UDS_CLOSE_CLOSED] == 1 && st.closed[UDS_CLOSE_SHUTDOWN] == 1);
    uds_server_free(s);
    rmdir(dir);

    return check_done("test_server");
}
