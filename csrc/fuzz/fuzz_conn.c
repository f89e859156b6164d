/*
 * fuzz_conn.c - libFuzzer harness: a real server (one per stream framing, and a SEQPACKET one,
 * made once) and, per input, one real client connection fed arbitrary bytes in arbitrary
 * pieces (packets, for SEQPACKET), some carrying descriptors, with the server polled in
 * between, echoing what it delivers (a batch of one message with the next poll, as pyuds
 * does; bigger batches in one call) and sometimes closing the client. Checks that events are
 * well formed, that no message brings more than max_fds descriptors, and that every
 * connection is finished and its descriptor freed.
 * Input: server, then pairs (piece length, action), then the bytes.
 */
#define _GNU_SOURCE
#include "internal.h" /* uds_send_msg() */

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX 4096
#define MAX_FDS 2
#define SERVERS 4 /* the three stream framings, then SEQPACKET */

static uds_server *servers[SERVERS];
static char paths[SERVERS][108];
static int spare_fd; /* what clients pass: the read end of a pipe */

static void setup(void)
{
    static char dir[] = "/tmp/uds-fuzz-XXXXXX";
    if (mkdtemp(dir) == NULL)
        abort();
    int pipefd[2];
    if (pipe(pipefd) < 0)
        abort();
    spare_fd = pipefd[0];
    for (int f = 0; f < SERVERS; f++) {
        uds_config cfg = {0};
        cfg.framing = f < 3 ? f : UDS_FRAMING_U32;
        cfg.kind = f < 3 ? UDS_KIND_STREAM : UDS_KIND_SEQPACKET;
        cfg.max_fds = MAX_FDS;
        cfg.max_message = MAX;
        cfg.backlog = 16;
        cfg.mode = 0600;
        cfg.flush_timeout_ms = 0;
        cfg.max_output = 64 * 1024;
        snprintf(paths[f], sizeof paths[f], "%s/%d.sock", dir, f);
        if (uds_server_new(&servers[f], paths[f], &cfg) < 0)
            abort();
    }
}

/* Open descriptors of this process: passed ones that nobody closed would pile up. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        abort();
    int n = 0;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n;
}

/* A batch described whole must match its events: the layout's items their lengths, pack their
 * bytes, the runs their connections. Aborts if not. */
static void check_batch(const uds_event *ev, int n, const uds_batch *b)
{
    const char *item = b->layout, *end = b->layout + b->layout_len;
    size_t off = 0;
    int run = 0;
    for (int i = 0; i < n; i++) {
        size_t len = 0;
        while (item < end && *item >= '0' && *item <= '9')
            len = len * 10 + (size_t)(*item++ - '0');
        if (item == end || *item++ != 's' || len != ev[i].len || off + len > b->pack_used ||
            (len > 0 && memcmp(b->pack + off, ev[i].data, len) != 0))
            abort();
        off += len;
        if (i > 0 && (ev[i].slot != ev[i - 1].slot || ev[i].id != ev[i - 1].id))
            run++;
        if (run >= b->runs || b->run_slot[run] != ev[i].slot || b->run_end[run] < (uint32_t)i + 1 ||
            (b->run_end[run] == (uint32_t)i + 1) != (i + 1 == n || ev[i + 1].slot != ev[i].slot ||
                                                     ev[i + 1].id != ev[i].id))
            abort();
    }
    if (item != end || off != b->pack_used || run + 1 != b->runs)
        abort();
}

/* Per server, kept from turn to turn: its events and batch, and the reply to a batch of one
 * message, which goes with the next poll (uds_reply_poll_batch()), as pyuds's loop sends it. */
static struct turn_state {
    uds_event ev[32];
    uds_batch b;
    char pack[64 * 1024], layout[32 * UDS_LAYOUT_ITEM_MAX];
    int32_t run_slot[32];
    uint32_t run_end[32];
    char reply[MAX];
    int64_t reply_len; /* -1: none */
} states[SERVERS];

static int turn(uds_server *s, int close_on_message)
{
    int which = 0;
    while (servers[which] != s)
        which++;
    struct turn_state *st = &states[which];
    if (st->b.ev == NULL) {
        st->b = (uds_batch){.ev = st->ev, .cap = 32, .pack = st->pack, .pack_cap = sizeof st->pack,
                            .layout = st->layout, .run_slot = st->run_slot, .run_end = st->run_end};
        st->reply_len = -1;
    }
    uds_event *ev = st->ev;
    int n = uds_reply_poll_batch(s, st->reply, st->reply_len, 0, &st->b);
    st->reply_len = -1;
    if (n < 0)
        abort();
    if (st->b.one_len != (n == 1 && st->b.all_packed ? (int64_t)ev[0].len : -1))
        abort();
    if (n > 0 && st->b.all_packed) {
        check_batch(ev, n, &st->b);
        if (!close_on_message && n == 1) {
            /* Echoed with the next poll; no reply to one that starts with an odd byte. */
            if (!(ev[0].len > 0 && (ev[0].data[0] & 1))) {
                memcpy(st->reply, ev[0].data, ev[0].len);
                st->reply_len = (int64_t)ev[0].len;
            }
            return n;
        }
        if (!close_on_message) {
            /* Echo the whole batch in one call, as pyuds's batch path does; no reply (-1) to
             * payloads that start with an odd byte. */
            static char echo[sizeof st->pack];
            int16_t lens[32];
            int rcs[32];
            size_t used = 0;
            for (int i = 0; i < n; i++) {
                lens[i] = ev[i].len > 0 && (ev[i].data[0] & 1) ? -1 : (int16_t)ev[i].len;
                if (lens[i] > 0)
                    memcpy(echo + used, ev[i].data, ev[i].len);
                used += lens[i] > 0 ? (size_t)lens[i] : 0;
            }
            uds_reply_batch(s, ev, 0, n, echo, lens, rcs); /* may refuse: fine */
            return n;
        }
    }
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_MESSAGE) {
            if (ev[i].len > MAX || (ev[i].len > 0 && ev[i].data == NULL))
                abort();
            volatile char touch = ev[i].len ? ev[i].data[ev[i].len - 1] : 0; /* readable */
            (void)touch;
            if (ev[i].nfds < 0 || ev[i].nfds > MAX_FDS) {
                fprintf(stderr, "nfds %d\n", ev[i].nfds);
                abort();
            }
            for (int k = 0; k < ev[i].nfds; k++) /* the caller's to close */
                if (close(ev[i].fds[k]) < 0) {
                    fprintf(stderr, "close fd %d failed\n", ev[i].fds[k]);
                    abort();
                }
            if (close_on_message)
                uds_close(s, ev[i].slot, ev[i].id, UDS_CLOSE_CLOSED);
            else if (ev[i].nfds > 0) /* a descriptor back, with its end-of-message mark */
                uds_send_fds(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len, &spare_fd, 1);
            else
                uds_reply(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len); /* may refuse: fine */
        } else if (ev[i].type != UDS_EV_CONNECTED && ev[i].type != UDS_EV_CLOSED) {
            abort();
        }
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (servers[0] == NULL)
        setup();
    if (size < 1)
        return 0;
    int which = data[0] % SERVERS;
    uds_server *s = servers[which];
    const char *path = paths[which];
    data++, size--;
    uds_server_stats st;
    uds_server_stats_get(s, &st);
    uint64_t accepted = st.accepted;

    struct sockaddr_un sa = {0};
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, (which < 3 ? SOCK_STREAM : SOCK_SEQPACKET) | SOCK_NONBLOCK, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        abort();
    char sink[8192];
    size_t pos = 0;
    while (pos + 2 <= size) {
        size_t piece = 1 + data[pos] % 64;
        uint8_t action = data[pos + 1];
        pos += 2;
        if (piece > size - pos)
            piece = size - pos;
        /* action bits 1-2: pass that many descriptors (3 is more than the server takes). */
        int nfds = (action >> 1) & 3;
        int fds[3] = {spare_fd, spare_fd, spare_fd};
        if ((piece > 0 || which == 3) &&
            uds_send_msg(fd, (const char *)data + pos, piece, fds, nfds, NULL, 0) >= 0)
            pos += piece;
        turn(s, action == 0xff);
        if (action & 1)
            while (recv(fd, sink, sizeof sink, 0) > 0) /* a client that reads */
                ;
        if (action == 0xfe)
            shutdown(fd, SHUT_WR);
    }
    close(fd);
    /* The server must have taken the connection and finished it. */
    for (int i = 0; i < 200; i++) {
        turn(s, 0);
        uds_server_stats_get(s, &st);
        if (st.accepted == accepted + 1 && uds_live(s) == 0)
            break;
    }
    turn(s, 0); /* frees what the last turn finished */
    if (st.accepted != accepted + 1 || uds_live(s) != 0) {
        fprintf(stderr, "a connection that never finishes: accepted %llu of %llu, live %d\n",
                (unsigned long long)st.accepted, (unsigned long long)accepted + 1, uds_live(s));
        abort();
    }
    static int baseline = -1;
    static unsigned inputs;
    if (++inputs % 256 == 0) {
        int n = count_fds();
        if (baseline < 0)
            baseline = n;
        else if (n > baseline) {
            char cmd[64];
            snprintf(cmd, sizeof cmd, "ls -l /proc/%d/fd >&2", (int)getpid());
            if (system(cmd) != 0)
                abort();
            fprintf(stderr, "baseline %d now %d\n", baseline, n);
            abort(); /* a descriptor leaked */
        }
    }
    return 0;
}
