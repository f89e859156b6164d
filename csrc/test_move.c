/*
 * test_move.c - connections handed back (uds_conn_detach(), uds_retire()) and served on by
 * another server that takes them from a socket pair, as pyuds's workers hand theirs to the
 * workers that replace them: what the client sent and the first server did not read goes with
 * the socket and is answered by the second; a frame begun is finished (and answered) first,
 * with no byte of the next one read; a connection not idle in time is closed.
 */
#define _GNU_SOURCE
#include "internal.h" /* uds_send_msg() */
#include "check.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define ROUNDS 400 /* turns a wait may take, each at most 5 ms */

/* What the turns of one server saw. */
typedef struct seen {
    int connected, messages;
    int closed[UDS_CLOSE_REASONS];
    int slot;    /* the last client connected */
    uint64_t id;
    int to;      /* where clients handed back go (the other server's pair), or -1 */
} seen;

static int connect_to(const char *path, int type)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, path);
    return check_connect(AF_UNIX, type, &sa, sizeof sa);
}

/* One turn: every message echoed, every connection handed back passed on to s->to. */
static void step(uds_server *srv, seen *s)
{
    uds_event ev[16];
    int n = uds_poll(srv, ev, 16, 5);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_CONNECTED) {
            s->connected++;
            s->slot = ev[i].slot;
            s->id = ev[i].id;
        } else if (ev[i].type == UDS_EV_MESSAGE) {
            s->messages++;
            CHECK(uds_send(srv, ev[i].slot, ev[i].id, ev[i].data, ev[i].len) == 0);
        } else if (ev[i].type == UDS_EV_CLOSED) {
            s->closed[ev[i].reason]++;
            CHECK((ev[i].reason == UDS_CLOSE_MOVED) == (ev[i].nfds == 1));
            if (ev[i].nfds == 1) {
                CHECK(s->to >= 0 && uds_send_msg(s->to, "c", 1, ev[i].fds, 1, NULL, 0) == 1);
                close(ev[i].fds[0]);
            }
        }
    }
}

/* Turns both servers until len bytes came back on c (blocking c: read only when some wait),
 * and checks them. */
static void expect(int c, const char *want, size_t len, uds_server *a, seen *sa, uds_server *b, seen *sb)
{
    char got[256];
    size_t have = 0;
    for (int round = 0; round < ROUNDS && have < len; round++) {
        step(a, sa);
        if (b != NULL)
            step(b, sb);
        ssize_t r = recv(c, got + have, sizeof got - have, MSG_DONTWAIT);
        if (r > 0)
            have += (size_t)r;
    }
    CHECK(have == len && memcmp(got, want, len) == 0);
}

static void turns(uds_server *srv, seen *s, int rounds)
{
    for (int round = 0; round < rounds; round++)
        step(srv, s);
}

/* A server that takes its clients from a new SOCK_SEQPACKET pair: *to is the giving end. */
static uds_server *taker(uds_config cfg, int *to)
{
    int pair[2];
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) == 0);
    cfg.adopt = UDS_ADOPT_HANDOFF;
    cfg.adopt_fd = pair[1];
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, "", &cfg) == 0);
    close(pair[1]);
    *to = pair[0];
    return s;
}

/* Server a on dir/name (path: its path, room for 128 bytes), and b, a taker(). Returns 0, or
 * -1 if either could not be made. */
static int two_servers(const char *dir, const char *name, uds_config cfg, char *path,
                       uds_server **a, uds_server **b, int *to_b)
{
    snprintf(path, 128, "%s/%s", dir, name);
    *a = NULL;
    CHECK(uds_server_new(a, path, &cfg) == 0);
    *b = taker(cfg, to_b);
    return *a != NULL && *b != NULL ? 0 : -1;
}

/* The client moved to b leaves: b sees it go. Then both servers end. */
static void part(int c, uds_server *a, uds_server *b, seen *sb, int to_b)
{
    close(c);
    for (int round = 0; round < ROUNDS && sb->closed[UDS_CLOSE_PEER] == 0; round++)
        step(b, sb);
    CHECK(sb->closed[UDS_CLOSE_PEER] == 1);
    uds_server_free(a);
    uds_server_free(b);
    close(to_b);
}

/* uds_conn_detach(): only an idle connection leaves; the request it has not read goes with it,
 * and the server that takes it over answers it (readable with no new edge). */
static void detach(const char *dir)
{
    char path[128];
    uds_config cfg = {.framing = UDS_FRAMING_U32, .max_message = 4096, .backlog = 8,
                      .mode = 0600, .flush_timeout_ms = 1000};
    uds_server *a, *b;
    int to_b;
    if (two_servers(dir, "d.sock", cfg, path, &a, &b, &to_b) < 0)
        return;
    seen sa = {.to = to_b}, sb = {.to = -1};
    int c = connect_to(path, SOCK_STREAM);
    CHECK(send(c, "\0\0\0\3one", 7, 0) == 7);
    uds_event ev[16];
    int n = 0;
    for (int round = 0; round < ROUNDS && n < 2; round++)
        n += uds_poll(a, ev + n, 16 - n, 5);
    CHECK(n == 2 && ev[0].type == UDS_EV_CONNECTED && ev[1].type == UDS_EV_MESSAGE);
    int slot = ev[0].slot;
    uint64_t id = ev[0].id;
    CHECK(uds_conn_detach(a, slot, id) == -EBUSY); /* its message's turn is on */
    CHECK(uds_send(a, slot, id, "one", 3) == 0);
    expect(c, "\0\0\0\3one", 7, a, &sa, NULL, NULL);
    CHECK(uds_hold(a, slot, id, UDS_HOLD_OPEN) == 0);
    CHECK(uds_conn_detach(a, slot, id) == -EBUSY); /* a reply is owed */
    CHECK(uds_hold(a, slot, id, 0) == 0);
    CHECK(send(c, "\0\0\0\5ab", 6, 0) == 6); /* half a frame, read: -EBUSY until it is whole */
    turns(a, &sa, 5);
    CHECK(uds_conn_detach(a, slot, id) == -EBUSY);
    CHECK(send(c, "cde", 3, 0) == 3);
    expect(c, "\0\0\0\5abcde", 9, a, &sa, NULL, NULL);
    /* Reading held, a request waits in the socket: it goes with the connection. */
    CHECK(uds_hold(a, slot, id, UDS_HOLD_READ) == 0);
    CHECK(send(c, "\0\0\0\3two", 7, 0) == 7);
    turns(a, &sa, 3);
    int fd = uds_conn_detach(a, slot, id);
    CHECK(fd >= 0 && uds_conn_detach(a, slot, id) == -ENOTCONN && uds_live(a) == 0);
    uds_server_stats st;
    uds_server_stats_get(a, &st);
    CHECK(st.closed[UDS_CLOSE_MOVED] == 1 && st.current == 0 && st.msgs_in == 2);
    CHECK(uds_send_msg(to_b, "c", 1, &fd, 1, NULL, 0) == 1);
    close(fd);
    expect(c, "\0\0\0\3two", 7, a, &sa, b, &sb);
    CHECK(sb.connected == 1 && sb.messages == 1);
    CHECK(send(c, "\0\0\0\5three", 9, 0) == 9);
    expect(c, "\0\0\0\5three", 9, a, &sa, b, &sb);
    turns(a, &sa, 3);
    CHECK(sa.closed[UDS_CLOSE_MOVED] == 0 && sa.messages == 1); /* no event for it at a */
    part(c, a, b, &sb, to_b);
}

/* uds_retire(): an idle client leaves at once; one with a frame begun is read to that frame's
 * end and no further, answered, then handed back with the next frame unread; one that never
 * finishes its frame is closed after flush_timeout. The other server answers what they send. */
static void retire(const char *dir, int framing)
{
    int u32 = framing == UDS_FRAMING_U32;
    char path[128];
    uds_config cfg = {.framing = framing, .max_message = 4096, .backlog = 8, .mode = 0600,
                      .flush_timeout_ms = 500};
    uds_server *a, *b;
    int to_b;
    if (two_servers(dir, "r.sock", cfg, path, &a, &b, &to_b) < 0)
        return;
    seen sa = {.to = to_b}, sb = {.to = -1};
    int idle = connect_to(path, SOCK_STREAM), mid = connect_to(path, SOCK_STREAM);
    int stuck = connect_to(path, SOCK_STREAM);
    const char *hi = u32 ? "\0\0\0\2hi" : "hi\n", *x = u32 ? "\0\0\0\4abcd" : "abcd\n";
    size_t hi_len = u32 ? 6 : 3, x_len = u32 ? 8 : 5;
    CHECK(send(idle, hi, hi_len, 0) == (ssize_t)hi_len);
    expect(idle, hi, hi_len, a, &sa, NULL, NULL);
    CHECK(send(mid, x, x_len - 2, 0) == (ssize_t)x_len - 2 && send(stuck, x, 3, 0) == 3);
    turns(a, &sa, 5); /* (read: frames begun) */
    CHECK(uds_retire(a) == 3 && uds_retire(a) == 3);
    turns(a, &sa, 5);
    CHECK(sa.closed[UDS_CLOSE_MOVED] == 1 && uds_live(a) == 2); /* the idle one */
    /* The rest of the frame and a whole next one in one piece: the first answered here, the
     * next there. */
    char rest[16];
    memcpy(rest, x + x_len - 2, 2);
    memcpy(rest + 2, hi, hi_len);
    CHECK(send(mid, rest, 2 + hi_len, 0) == (ssize_t)(2 + hi_len));
    char both[32];
    memcpy(both, x, x_len);
    memcpy(both + x_len, hi, hi_len);
    expect(mid, both, x_len + hi_len, a, &sa, b, &sb);
    CHECK(sa.closed[UDS_CLOSE_MOVED] == 2 && sb.connected == 2 && sb.messages == 1);
    CHECK(send(idle, x, x_len, 0) == (ssize_t)x_len); /* sent after it moved: answered there */
    expect(idle, x, x_len, a, &sa, b, &sb);
    for (int round = 0; round < ROUNDS && uds_live(a) > 0; round++)
        step(a, &sa);
    CHECK(uds_live(a) == 0 && sa.closed[UDS_CLOSE_SHUTDOWN] == 1 && sa.closed[UDS_CLOSE_MOVED] == 2);
    uds_server_free(a); /* (a connection reported closed keeps its socket until the next turn) */
    uds_server_free(b);
    char buf[8];
    CHECK(recv(stuck, buf, sizeof buf, 0) == 0); /* closed: end-of-file, no reset */
    close(idle);
    close(mid);
    close(stuck);
    close(to_b);
}

/* SEQPACKET: packets waiting unread at the retirement go with the connection. */
static void retire_packets(const char *dir)
{
    char path[128];
    uds_config cfg = {.max_message = 4096, .backlog = 8, .mode = 0600, .flush_timeout_ms = 1000,
                      .kind = UDS_KIND_SEQPACKET};
    uds_server *a, *b;
    int to_b;
    if (two_servers(dir, "p.sock", cfg, path, &a, &b, &to_b) < 0)
        return;
    seen sa = {.to = to_b}, sb = {.to = -1};
    int c = connect_to(path, SOCK_SEQPACKET);
    CHECK(send(c, "one", 3, 0) == 3);
    expect(c, "one", 3, a, &sa, NULL, NULL);
    CHECK(send(c, "two", 3, 0) == 3 && send(c, "three", 5, 0) == 5);
    CHECK(uds_retire(a) == 1);
    expect(c, "two", 3, a, &sa, b, &sb); /* (a packet a read: recv() takes one) */
    expect(c, "three", 5, a, &sa, b, &sb);
    CHECK(sa.closed[UDS_CLOSE_MOVED] == 1 && sa.messages == 1 && sb.messages == 2);
    part(c, a, b, &sb, to_b);
}

/* Servers whose connections no server of this API takes over. */
static void not_handed_back(void)
{
    uds_config cfg = {.max_message = 4096, .backlog = 8, .flush_timeout_ms = 1000,
                      .kind = UDS_KIND_TCP};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == 0);
    if (s != NULL) {
        CHECK(uds_retire(s) == -EOPNOTSUPP && uds_conn_detach(s, 0, 1) == -EOPNOTSUPP);
        uds_server_free(s);
    }
    char name[64];
    snprintf(name, sizeof name, "@uds-test-move-%d", (int)getpid());
    uds_config dg = {.max_message = 4096, .backlog = 1, .flush_timeout_ms = 1000, .idle_timeout_ms = 1000,
                     .max_connections = 4, .kind = UDS_KIND_DGRAM};
    s = NULL;
    CHECK(uds_server_new(&s, name, &dg) == 0);
    if (s != NULL) {
        CHECK(uds_retire(s) == -EOPNOTSUPP && uds_conn_detach(s, 0, 1) == -EOPNOTSUPP);
        uds_server_free(s);
    }
}

int main(void)
{
    char dir[] = "/tmp/uds-move-XXXXXX";
    check_mkdtemp(dir);
    detach(dir);
    retire(dir, UDS_FRAMING_U32);
    retire(dir, UDS_FRAMING_LINE);
    retire_packets(dir);
    not_handed_back();
    rmdir(dir);
    return check_done("test_move");
}
