/*
 * test_kinds.c - the socket kinds and ancillary data end to end, in C alone (so that valgrind
 * sees them too): a SEQPACKET server on an abstract name passing descriptors both ways, a
 * DATAGRAM server with its peers (replies, the sender with no address, eviction, a full peer,
 * idle expiry), an adopted socket that outlives its server, clients handed over by another
 * process's socket (UDS_ADOPT_HANDOFF), and servers freed while they still hold descriptors,
 * which must all be closed.
 */
#define _GNU_SOURCE
#include "internal.h" /* uds_send_msg() */
#include "check.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    while (d != NULL && readdir(d) != NULL)
        n++;
    if (d != NULL)
        closedir(d);
    return n;
}

static socklen_t address(const char *name, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    size_t n = strlen(name);
    memcpy(sa->sun_path, name, n);
    if (name[0] == '@') {
        sa->sun_path[0] = '\0';
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    }
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

static int connect_kind(const char *name, int type)
{
    struct sockaddr_un sa;
    socklen_t len = address(name, &sa);
    return check_connect(AF_UNIX, type, &sa, len);
}

/* sendmsg() of data with nfds descriptors: the core's own helper, on the client's side. */
static ssize_t send_with(int fd, const void *data, size_t len, const int *fds, int nfds)
{
    return uds_send_msg(fd, data, len, fds, nfds, NULL, 0);
}

/* recvmsg() of one message; *fd gets the first descriptor that came (else -1). */
static ssize_t recv_with(int fd, void *buf, size_t len, int *got_fd)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                        .msg_controllen = sizeof ctl.buf};
    ssize_t r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    *got_fd = -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    if (r >= 0 && cm != NULL && cm->cmsg_type == SCM_RIGHTS)
        memcpy(got_fd, CMSG_DATA(cm), sizeof(int));
    return r;
}

/* Polls and answers: each message is echoed; with descriptors, "x" is written to each, they
 * are closed, and the reply carries reply_fd. Returns the events seen; counts CLOSED by
 * reason in closed[] when given. */
static int serve(uds_server *s, int timeout_ms, int reply_fd, int *closed)
{
    uds_event ev[16];
    int n = uds_poll(s, ev, 16, timeout_ms);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_MESSAGE) {
            for (int k = 0; k < ev[i].nfds; k++) {
                CHECK(write(ev[i].fds[k], "x", 1) == 1);
                close(ev[i].fds[k]);
            }
            int rc = ev[i].nfds > 0
                         ? uds_send_fds(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len, &reply_fd, 1)
                         : uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len);
            CHECK(rc == 0 || (ev[i].slot < 0 && rc == -ENOTCONN));
        } else if (ev[i].type == UDS_EV_CLOSED && closed != NULL) {
            closed[ev[i].reason]++;
        }
    }
    return n;
}

static void seqpacket(void)
{
    char name[64];
    snprintf(name, sizeof name, "@uds-test-kinds-%d", (int)getpid());
    uds_config cfg = {.max_message = 1 << 20, .backlog = 8, .flush_timeout_ms = 1000,
                      .kind = UDS_KIND_SEQPACKET, .max_fds = 4};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, name, &cfg) == 0);
    if (s == NULL)
        return;
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    int c = connect_kind(name, SOCK_SEQPACKET);
    int big = 1 << 20;
    setsockopt(c, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(c, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    size_t large_len = 150000;
    char *large = malloc(large_len), *back = malloc(large_len + 1);
    for (size_t k = 0; k < large_len; k++)
        large[k] = (char)(k * 7);
    int two[2] = {pipefd[1], pipefd[1]};
    CHECK(send_with(c, "", 0, NULL, 0) == 0);
    CHECK(send_with(c, "abc", 3, two, 2) == 3);
    CHECK(send_with(c, large, large_len, NULL, 0) == (ssize_t)large_len);
    for (int round = 0; round < 50; round++)
        serve(s, 10, pipefd[0], NULL);
    int fd;
    CHECK(recv_with(c, back, large_len + 1, &fd) == 0 && fd == -1);
    CHECK(recv_with(c, back, large_len + 1, &fd) == 3 && memcmp(back, "abc", 3) == 0 && fd >= 0);
    if (fd >= 0) {
        close(fd); /* our pipe's read end, passed back */
    }
    CHECK(recv_with(c, back, large_len + 1, &fd) == (ssize_t)large_len &&
          memcmp(back, large, large_len) == 0);
    char xs[4];
    CHECK(read(pipefd[0], xs, sizeof xs) == 2); /* the server wrote to both passed copies */
    /* Freed while a packet with descriptors waits unread: the server closes what it holds. */
    CHECK(send_with(c, "late", 4, two, 2) == 4);
    serve(s, 10, pipefd[0], NULL);
    CHECK(send_with(c, "later", 5, two, 2) == 5);
    uds_server_free(s);
    close(c);
    close(pipefd[0]);
    close(pipefd[1]);
    free(large);
    free(back);
}

static int dgram_client(void)
{
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa_family_t)) < 0) { /* autobind */
        perror("bind");
        exit(2);
    }
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static void datagram(const char *dir)
{
    char path[128];
    snprintf(path, sizeof path, "%s/d.sock", dir);
    struct sockaddr_un sa;
    socklen_t salen = address(path, &sa);
    uds_config cfg = {.max_message = 4096, .mode = 0600, .backlog = 1, .flush_timeout_ms = 1000,
                      .kind = UDS_KIND_DGRAM, .max_fds = 2, .idle_timeout_ms = 200,
                      .max_connections = 2, .max_output = 1 << 20};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, path, &cfg) == 0);
    if (s == NULL)
        return;
    int closed[UDS_CLOSE_REASONS] = {0};
    int c[3];
    char buf[64];
    for (int i = 0; i < 3; i++) {
        c[i] = dgram_client();
        CHECK(sendto(c[i], "ping", 4, 0, (struct sockaddr *)&sa, salen) == 4);
        serve(s, 10, -1, closed);
        /* The reply comes from the path itself: the socket was bound to it, not renamed. */
        struct sockaddr_un from;
        socklen_t fromlen = sizeof from;
        CHECK(recvfrom(c[i], buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen) == 4);
        CHECK(fromlen == salen && strcmp(from.sun_path, path) == 0);
    }
    CHECK(closed[UDS_CLOSE_EVICTED] == 1); /* two peers at most: the first was forgotten */
    int anon = socket(AF_UNIX, SOCK_DGRAM, 0);
    CHECK(sendto(anon, "who", 3, 0, (struct sockaddr *)&sa, salen) == 3);
    serve(s, 10, -1, closed);
    /* A full peer: replies wait on the server, then all arrive in order. */
    int tiny = 1;
    setsockopt(c[2], SOL_SOCKET, SO_RCVBUF, &tiny, sizeof tiny);
    for (int i = 0; i < 40; i++) {
        snprintf(buf, sizeof buf, "%02d", i);
        CHECK(sendto(c[2], buf, 2, 0, (struct sockaddr *)&sa, salen) == 2);
        serve(s, 0, -1, closed);
    }
    for (int i = 0; i < 40; i++) {
        char want[8];
        snprintf(want, sizeof want, "%02d", i);
        ssize_t r;
        while ((r = recv(c[2], buf, sizeof buf, MSG_DONTWAIT)) < 0)
            serve(s, 5, -1, closed); /* the retry timer sends more as room appears */
        CHECK(r == 2 && memcmp(buf, want, 2) == 0);
    }
    for (int round = 0; round < 100 && uds_live(s) > 0; round++)
        serve(s, 10, -1, closed); /* idle expiry */
    CHECK(closed[UDS_CLOSE_IDLE_TIMEOUT] == 2);
    uds_server_stats st;
    uds_server_stats_get(s, &st);
    CHECK(st.replies_unroutable == 1 && st.msgs_in == 44);
    /* Freed with a datagram and its descriptors unread, and replies queued for a full peer. */
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    CHECK(sendto(c[2], "q", 1, 0, (struct sockaddr *)&sa, salen) == 1);
    serve(s, 10, -1, closed);
    for (int i = 0; i < 8; i++) { /* (the server's queue holds net.unix.max_dgram_qlen) */
        CHECK(sendto(c[2], "fill", 4, MSG_DONTWAIT, (struct sockaddr *)&sa, salen) == 4);
        serve(s, 10, -1, closed);
    }
    struct iovec iov = {.iov_base = "f", .iov_len = 1};
    union {
        char b[CMSG_SPACE(sizeof(int))];
        struct cmsghdr a;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr mh = {.msg_name = &sa, .msg_namelen = salen, .msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pipefd[1], sizeof(int));
    sendmsg(c[0], &mh, MSG_DONTWAIT);
    uds_server_free(s);
    for (int i = 0; i < 3; i++)
        close(c[i]);
    close(anon);
    close(pipefd[0]);
    close(pipefd[1]);
}

static void adopted(const char *dir)
{
    char path[128];
    snprintf(path, sizeof path, "%s/a.sock", dir);
    struct sockaddr_un sa;
    socklen_t salen = address(path, &sa);
    int own = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(bind(own, (struct sockaddr *)&sa, salen) == 0);
    uds_config cfg = {.max_message = 4096, .backlog = 8, .flush_timeout_ms = 1000,
                      .adopt = 1, .adopt_fd = own};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, "", &cfg) == 0);
    if (s == NULL)
        return;
    char name[112];
    size_t len = 0;
    CHECK(uds_server_address(s, name, &len) == 0 && len == strlen(path) &&
          memcmp(name, path, len) == 0);
    int c = connect_kind(path, SOCK_STREAM);
    CHECK(send(c, "\0\0\0\2hi", 6, 0) == 6);
    for (int round = 0; round < 5; round++)
        serve(s, 10, -1, NULL);
    char buf[8];
    CHECK(recv(c, buf, sizeof buf, 0) == 6);
    close(c);
    uds_server_free(s);
    CHECK(access(path, F_OK) == 0); /* not ours to remove */
    c = connect_kind(path, SOCK_STREAM); /* the owner's socket still listens */
    close(c);
    close(own);
    unlink(path);
}

/* Accepts one client on listener and hands it over on sup, as a supervisor process does. */
static void hand_over(int listener, int sup)
{
    int fd = accept(listener, NULL, NULL);
    CHECK(fd >= 0 && send_with(sup, "c", 1, &fd, 1) == 1);
    close(fd);
}

/* Polls once; counts CONNECTED events from this process in *ours, echoes messages. */
static int serve_handed(uds_server *s, int *ours, int *closed)
{
    uds_event ev[16];
    int n = uds_poll(s, ev, 16, 10);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        if (ev[i].type == UDS_EV_CONNECTED)
            *ours += ev[i].pid == (int32_t)getpid() && ev[i].uid == getuid();
        else if (ev[i].type == UDS_EV_MESSAGE)
            CHECK(uds_send(s, ev[i].slot, ev[i].id, ev[i].data, ev[i].len) == 0);
        else if (ev[i].type == UDS_EV_CLOSED)
            closed[ev[i].reason]++;
    }
    return n;
}

/* Clients accepted by another socket and handed over on a SOCK_SEQPACKET pair: admitted with
 * their credentials, served, and still admitted and answered when the shutdown comes after
 * they were handed over; what cannot be served is closed; end-of-file stops the handing. */
static void handed(const char *dir, int kind, int type)
{
    char path[128];
    snprintf(path, sizeof path, "%s/h.sock", dir);
    struct sockaddr_un sa;
    socklen_t salen = address(path, &sa);
    int listener = socket(AF_UNIX, type, 0), pair[2];
    CHECK(bind(listener, (struct sockaddr *)&sa, salen) == 0 && listen(listener, 8) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair) == 0);
    uds_config cfg = {.max_message = 4096, .backlog = 8, .flush_timeout_ms = 1000, .kind = kind,
                      .adopt = UDS_ADOPT_HANDOFF, .adopt_fd = pair[1]};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, path, &cfg) == 0); /* (path is ignored) */
    close(pair[1]); /* the server has its own */
    if (s == NULL)
        return;
    int ours = 0, closed[UDS_CLOSE_REASONS] = {0};
    /* SEQPACKET: the empty packet is a message (the listener never set SO_PASSCRED). */
    const char *req = type == SOCK_STREAM ? "\0\0\0\2hi" : "";
    size_t req_len = type == SOCK_STREAM ? 6 : 0;
    int c = connect_kind(path, type);
    hand_over(listener, pair[0]);
    CHECK(send(c, req, req_len, 0) == (ssize_t)req_len);
    for (int round = 0; round < 5; round++)
        serve_handed(s, &ours, closed);
    char buf[8];
    CHECK(ours == 1 && recv(c, buf, sizeof buf, 0) == (ssize_t)req_len);
    /* What cannot be a client is closed: a pipe, a packet with no socket. */
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    CHECK(send_with(pair[0], "p", 1, &pipefd[0], 1) == 1 && send_with(pair[0], "n", 1, NULL, 0) == 1);
    close(pipefd[0]);
    for (int round = 0; round < 3; round++)
        serve_handed(s, &ours, closed);
    signal(SIGPIPE, SIG_IGN);
    CHECK(ours == 1 && write(pipefd[1], "x", 1) < 0 && errno == EPIPE); /* closed everywhere */
    signal(SIGPIPE, SIG_DFL);
    close(pipefd[1]);
    /* Handed over, with a request sent, then the shutdown: still admitted and answered. */
    int late = connect_kind(path, type);
    size_t late_len = type == SOCK_STREAM ? 6 : 2;
    CHECK(send(late, type == SOCK_STREAM ? req : "hi", late_len, 0) == (ssize_t)late_len);
    hand_over(listener, pair[0]);
    uds_shutdown(s);
    for (int round = 0; round < 50 && uds_live(s) > 0; round++)
        serve_handed(s, &ours, closed);
    CHECK(ours == 2 && uds_live(s) == 0 && closed[UDS_CLOSE_SHUTDOWN] == 2);
    uds_server_free(s); /* (closes what the last turn finished) */
    CHECK(recv(late, buf, sizeof buf, 0) == (ssize_t)late_len && recv(late, buf, sizeof buf, 0) == 0);
    close(late);
    close(c);
    close(pair[0]);
    close(listener);
    unlink(path);
}

/* The other end gone: the server stops taking clients from the pair, and does not spin. */
static void handing_ends(void)
{
    int pair[2];
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair) == 0);
    uds_config cfg = {.max_message = 4096, .backlog = 8, .flush_timeout_ms = 1000,
                      .adopt = UDS_ADOPT_HANDOFF, .adopt_fd = pair[1]};
    uds_server *s = NULL;
    CHECK(uds_server_new(&s, "", &cfg) == 0);
    close(pair[1]);
    close(pair[0]);
    if (s == NULL)
        return;
    uds_event ev[4];
    CHECK(uds_poll(s, ev, 4, 10) == 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(uds_poll(s, ev, 4, 50) == 0); /* waited: the master socket is out of epoll */
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 >= 40);
    uds_server_free(s);
    /* A handoff socket must be a SOCK_SEQPACKET pair, and the kind one with connections. */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    cfg.adopt_fd = fd;
    CHECK(uds_server_new(&s, "", &cfg) == -EPROTOTYPE);
    cfg.kind = UDS_KIND_DGRAM;
    cfg.idle_timeout_ms = 1000;
    CHECK(uds_server_new(&s, "", &cfg) == -EINVAL);
    close(fd);
}

int main(void)
{
    char dir[] = "/tmp/uds-kinds-XXXXXX";
    check_mkdtemp(dir);
    int before = open_fds();
    seqpacket();
    datagram(dir);
    adopted(dir);
    handed(dir, UDS_KIND_STREAM, SOCK_STREAM);
    handed(dir, UDS_KIND_SEQPACKET, SOCK_SEQPACKET);
    handing_ends();
    CHECK(open_fds() == before); /* every descriptor received or duplicated was closed */
    rmdir(dir);
    return check_done("test_kinds");
}
