/*
 * fuzz_conn.c - libFuzzer harness: a real server (one per framing, made once) and, per input,
 * one real client connection fed arbitrary bytes in arbitrary pieces, with the server polled
 * in between, echoing what it delivers and sometimes closing the client. Checks that events
 * are well formed and that every connection is finished and its descriptor freed.
 * Input: framing, then pairs (piece length, action), then the bytes.
 */
#define _GNU_SOURCE
#include "uds.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX 4096

static uds_server *servers[3];
static char paths[3][108];

static void setup(void)
{
    static char dir[] = "/tmp/uds-fuzz-XXXXXX";
    if (mkdtemp(dir) == NULL)
        abort();
    for (int f = 0; f < 3; f++) {
        uds_config cfg = {0};
        cfg.framing = f;
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

static int turn(uds_server *s, int close_on_message)
{
    uds_event ev[32];
    int n = uds_poll(s, ev, 32, 0);
    if (n < 0)
        abort();
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_MESSAGE) {
            if (ev[i].len > MAX || (ev[i].len > 0 && ev[i].data == NULL))
                abort();
            volatile char touch = ev[i].len ? ev[i].data[ev[i].len - 1] : 0; /* readable */
            (void)touch;
            if (close_on_message)
                uds_close(s, ev[i].slot, ev[i].id, UDS_CLOSE_LOCAL);
            else
                uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len); /* may refuse: fine */
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
    uds_server *s = servers[data[0] % 3];
    const char *path = paths[data[0] % 3];
    data++, size--;
    uds_server_stats st;
    uds_server_stats_get(s, &st);
    uint64_t accepted = st.accepted;

    struct sockaddr_un sa = {0};
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
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
        if (piece > 0 && send(fd, data + pos, piece, MSG_NOSIGNAL) > 0)
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
    if (st.accepted != accepted + 1 || uds_live(s) != 0)
        abort(); /* a connection that never finishes */
    return 0;
}
