/*
 * test_tcp.c - the TCP kind end to end, in C alone (so that valgrind sees it too): a server on
 * 127.0.0.1 with any free port, echoing; its address and its clients' as text; descriptors
 * refused; then a proxy_protocol server, whose connections are reported only once their PROXY
 * header is whole (v1 sent a byte at a time, v2 with the first frame in the same write), with
 * the header's client as their peer; and the connections it refuses, each counted: a
 * malformed header, one that ends before its header does, one that sends nothing in time.
 */
#define _GNU_SOURCE
#include "uds.h"
#include "check.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uds_config tcp_config(int proxy, int frame_timeout_ms)
{
    uds_config cfg = {0};
    cfg.kind = UDS_KIND_TCP;
    cfg.framing = UDS_FRAMING_U32;
    cfg.max_message = 1 << 16;
    cfg.backlog = 16;
    cfg.flush_timeout_ms = 1000;
    cfg.frame_timeout_ms = frame_timeout_ms;
    cfg.tcp_nodelay = 1;
    cfg.tcp_keepalive_s = 30;
    cfg.proxy_protocol = proxy;
    return cfg;
}

/* The server's port, from its address as text ("127.0.0.1:PORT"). */
static int server_port(uds_server *s)
{
    char name[112];
    size_t len = 0;
    CHECK(uds_server_address(s, name, &len) == 0);
    name[len] = '\0';
    CHECK(strncmp(name, "127.0.0.1:", 10) == 0);
    return atoi(name + 10);
}

static int connect_tcp(int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return check_connect(AF_INET, SOCK_STREAM, &sa, sizeof sa);
}

/* Polls until an event of this type comes (echoing messages meanwhile), at most 5 s.
 * Returns it in *out, or fails the check. */
static int wait_event(uds_server *s, int type, uds_event *out)
{
    uds_event ev[16];
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int n = uds_poll(s, ev, 16, 20);
        CHECK(n >= 0);
        int found = 0;
        for (int i = 0; i < n; i++) {
            if (ev[i].type == UDS_EV_MESSAGE)
                CHECK(uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len) == 0);
            if (ev[i].type == type && !found) {
                *out = ev[i];
                found = 1;
            }
        }
        if (found)
            return 1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 5) {
            fprintf(stderr, "event %d did not come\n", type);
            CHECK(!"event did not come");
            return 0;
        }
    }
}

/* The echo of "hello", framed, read back while the server turns (echoing); 1 if it came whole
 * within 5 s. */
static int echoed(uds_server *s, int fd)
{
    uds_event ev[16];
    char buf[9];
    size_t got = 0;
    for (int turns = 0; got < sizeof buf && turns < 250; turns++) {
        int n = uds_poll(s, ev, 16, 20);
        for (int i = 0; i < n; i++)
            if (ev[i].type == UDS_EV_MESSAGE)
                CHECK(uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len) == 0);
        ssize_t r = recv(fd, buf + got, sizeof buf - got, MSG_DONTWAIT);
        if (r == 0)
            return 0;
        if (r > 0)
            got += (size_t)r;
    }
    return got == sizeof buf && memcmp(buf, "\0\0\0\5hello", 9) == 0;
}

static void peer_is(uds_server *s, const uds_event *e, const char *want)
{
    char name[112];
    size_t len = 0;
    CHECK(uds_peer_address(s, e->slot, e->id, name, &len) == 0);
    name[len] = '\0';
    if (strcmp(name, want) != 0) {
        fprintf(stderr, "peer %s, not %s\n", name, want);
        CHECK(!"peer address");
    }
}

/* The connection's peer is the client socket fd itself. */
static void peer_is_socket(uds_server *s, const uds_event *e, int fd)
{
    struct sockaddr_in me;
    socklen_t melen = sizeof me;
    getsockname(fd, (struct sockaddr *)&me, &melen);
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u", ntohs(me.sin_port));
    peer_is(s, e, want);
}

static void plain_tcp(void)
{
    uds_server *s;
    uds_config cfg = tcp_config(0, 0);
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == 0);
    int fd = connect_tcp(server_port(s));
    uds_event e;
    wait_event(s, UDS_EV_CONNECTED, &e);
    CHECK(e.pid == -1 && e.uid == (uint32_t)-1); /* no credentials over TCP */
    peer_is_socket(s, &e, fd);
    int one = 1;
    CHECK(uds_send_fds(s, e.slot, e.id, "x", 1, &one, 1) == -EOPNOTSUPP);
    CHECK(send(fd, "\0\0\0\5hello", 9, 0) == 9);
    CHECK(echoed(s, fd));
    close(fd);
    wait_event(s, UDS_EV_CLOSED, &e);
    CHECK(e.reason == UDS_CLOSE_PEER);
    uds_server_free(s);
}

/* A proxy_protocol server's connection, header then "hello": reported once the header is
 * whole, with the header's client as its peer. bytewise: one byte per write. */
static void proxied(uds_server *s, int port, const char *header, size_t len, int bytewise,
                    const char *peer)
{
    int fd = connect_tcp(port);
    uds_event ev[4];
    if (bytewise) {
        for (size_t i = 0; i + 1 < len; i++) {
            CHECK(send(fd, header + i, 1, 0) == 1);
            /* Nothing is reported before the header is whole. */
            CHECK(uds_poll(s, ev, 4, 5) == 0 && uds_live(s) == 1);
        }
        CHECK(send(fd, header + len - 1, 1, 0) == 1);
        CHECK(send(fd, "\0\0\0\5hello", 9, 0) == 9);
    } else {
        char buf[256];
        memcpy(buf, header, len);
        memcpy(buf + len, "\0\0\0\5hello", 9);
        CHECK(send(fd, buf, len + 9, 0) == (ssize_t)(len + 9));
    }
    uds_event e;
    wait_event(s, UDS_EV_CONNECTED, &e);
    peer_is(s, &e, peer);
    CHECK(echoed(s, fd));
    close(fd);
    wait_event(s, UDS_EV_CLOSED, &e);
}

/* A connection that must be refused: REFUSED, counted, and the client sees its end. */
static void refused(uds_server *s, int port, const char *send_first, size_t len, int shut)
{
    uds_server_stats before, after;
    uds_server_stats_get(s, &before);
    int fd = connect_tcp(port);
    if (len > 0)
        CHECK(send(fd, send_first, len, 0) == (ssize_t)len);
    if (shut)
        shutdown(fd, SHUT_WR);
    uds_event e;
    wait_event(s, UDS_EV_REFUSED, &e);
    CHECK(e.reason == UDS_CLOSE_PROXY_HEADER && e.slot == -1);
    uds_server_stats_get(s, &after);
    CHECK(after.closed[UDS_CLOSE_PROXY_HEADER] == before.closed[UDS_CLOSE_PROXY_HEADER] + 1);
    CHECK(after.accepted == before.accepted && after.msgs_in == before.msgs_in);
    char c;
    uds_poll(s, &e, 1, 0); /* frees it: the client sees end-of-file */
    CHECK(recv(fd, &c, 1, 0) == 0);
    close(fd);
}

static void proxy_protocol(void)
{
    uds_server *s;
    uds_config cfg = tcp_config(1, 300);
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == 0);
    int port = server_port(s);
    const char v1[] = "PROXY TCP4 203.0.113.7 127.0.0.1 51234 8000\r\n";
    proxied(s, port, v1, sizeof v1 - 1, 1, "203.0.113.7:51234");
    const char v1_6[] = "PROXY TCP6 2001:db8::7 ::1 443 8000\r\n";
    proxied(s, port, v1_6, sizeof v1_6 - 1, 0, "[2001:db8::7]:443");
    const char v2[] = "\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\xc6\x33\x64\x09\x7f\0\0\1\xc3\x50\x1f\x40";
    proxied(s, port, v2, sizeof v2 - 1, 0, "198.51.100.9:50000");

    /* LOCAL (a balancer's health check): the connection's own peer stands. */
    int fd = connect_tcp(port);
    CHECK(send(fd, "\r\n\r\n\0\r\nQUIT\n\x20\0\0\0", 16, 0) == 16);
    uds_event e;
    wait_event(s, UDS_EV_CONNECTED, &e);
    peer_is_socket(s, &e, fd);
    close(fd);
    wait_event(s, UDS_EV_CLOSED, &e);

    refused(s, port, "\0\0\0\5hello", 9, 0);                       /* no header: a frame */
    refused(s, port, "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", 35, 0); /* malformed */
    refused(s, port, "PROXY TCP4 1.2.3.4", 18, 1);                 /* ends before its end */
    refused(s, port, "PROXY TCP4 1.2.3.4", 18, 0);                 /* too slow (300 ms) */
    refused(s, port, "", 0, 0);                                    /* silent */
    CHECK(uds_live(s) == 0);
    uds_server_free(s);
}

static void bad_configs(void)
{
    uds_server *s;
    uds_config cfg = tcp_config(0, 0);
    CHECK(uds_server_new(&s, "localhost", &cfg) == -EINVAL); /* names are the caller's to resolve */
    cfg.mode = 0600;
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == -EINVAL); /* no socket file: no mode */
    cfg = tcp_config(0, 0);
    cfg.tcp_port = 65536;
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == -EINVAL);
    cfg = tcp_config(1, 0);
    cfg.kind = UDS_KIND_STREAM;
    cfg.mode = 0600;
    CHECK(uds_server_new(&s, "/tmp/never-made.sock", &cfg) == -EINVAL); /* TCP's options */
    /* A port in use. */
    uds_server *a;
    cfg = tcp_config(0, 0);
    CHECK(uds_server_new(&a, "127.0.0.1", &cfg) == 0);
    cfg.tcp_port = server_port(a);
    CHECK(uds_server_new(&s, "127.0.0.1", &cfg) == -EADDRINUSE);
    uds_server_free(a);
}

int main(void)
{
    plain_tcp();
    proxy_protocol();
    bad_configs();
    return check_done("test_tcp");
}
