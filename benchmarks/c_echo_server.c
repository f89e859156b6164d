/*
 * c_echo_server: the practical limit of one core for a u32-framed echo server on a Unix socket,
 * or on TCP.
 *
 *   c_echo_server PATH
 *   c_echo_server tcp://IPV4:PORT      (SO_REUSEADDR; TCP_NODELAY on every connection)
 *
 * One thread, one epoll loop, non-blocking sockets. Each readable connection gets one read of
 * up to 256 KiB; the complete u32 frames in it (4-byte big-endian payload length, then the
 * payload) are cut out one by one and each is copied into the reply buffer as its own reply;
 * then the replies go out with one write. An incomplete frame waits in a per-connection buffer
 * until the rest arrives; unsent replies wait in a per-connection buffer for EPOLLOUT. A
 * connection is closed on EOF, on an error, or when it announces a payload over 64 MiB.
 * SIGINT or SIGTERM: close everything, remove the socket file, exit 0.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define HDR_LEN 4u
#define MAX_PAYLOAD (64u << 20)
#define RBUF_SIZE (256u * 1024u)
#define WBUF_SIZE (256u * 1024u)
#define OUT_HIGH (4u << 20)       /* stop reading a client that owes us this much unsent output */
#define KEEP_CAP (1u << 20)       /* drained buffers larger than this are freed */
#define MAX_EVENTS 1024
#define ACCEPT_BATCH 1024

struct conn {
    int fd;
    uint32_t events;              /* what epoll is watching for */
    unsigned char *in;            /* an incomplete frame: in[0, in_len) */
    size_t in_len, in_cap;
    unsigned char *out;           /* unsent replies: out[out_off, out_len) */
    size_t out_off, out_len, out_cap;
};

static int ep = -1, lfd = -1, sfd = -1, spare_fd = -1;
static struct conn **conns;       /* indexed by fd */
static size_t conns_cap;
static unsigned char rbuf[RBUF_SIZE];
static unsigned char wbuf[WBUF_SIZE];  /* replies built during one turn, if nothing is pending */
static size_t wlen;
static int spilled;               /* this turn's replies went to c->out instead of wbuf */
static int tcp;                   /* listening on TCP, not on a Unix socket */

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n);
    if (!p) {
        fprintf(stderr, "c_echo_server: out of memory\n");
        exit(1);
    }
    return p;
}

static void reserve(unsigned char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    size_t n = *cap ? *cap * 2 : 4096;
    while (n < need)
        n *= 2;
    *buf = xrealloc(*buf, n);
    *cap = n;
}

static void out_append(struct conn *c, const unsigned char *p, size_t n)
{
    if (n == 0)
        return;
    if (c->out_off > 0 && c->out_len + n > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    reserve(&c->out, &c->out_cap, c->out_len + n);
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void close_conn(struct conn *c)
{
    close(c->fd);                 /* also leaves the epoll set */
    conns[c->fd] = NULL;
    free(c->in);
    free(c->out);
    free(c);
}

static int update_events(struct conn *c)
{
    size_t pending = c->out_len - c->out_off;
    uint32_t want = (pending < OUT_HIGH ? EPOLLIN : 0) | (pending ? EPOLLOUT : 0);
    if (want == c->events)
        return 0;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = want;
    ev.data.fd = c->fd;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        return -1;
    c->events = want;
    return 0;
}

/* One complete frame (header included): its reply is the same bytes. */
static void emit(struct conn *c, const unsigned char *frame, size_t len)
{
    if (!spilled && wlen + len <= WBUF_SIZE) {
        memcpy(wbuf + wlen, frame, len);
        wlen += len;
        return;
    }
    if (!spilled) {
        out_append(c, wbuf, wlen);
        wlen = 0;
        spilled = 1;
    }
    out_append(c, frame, len);
}

static uint32_t read_len(const unsigned char *p)
{
    uint32_t be;
    memcpy(&be, p, HDR_LEN);
    return be32toh(be);
}

/* Cut the frames out of newly read bytes. Returns -1 if the client must be dropped. */
static int cut_frames(struct conn *c, const unsigned char *p, size_t n)
{
    if (c->in_len > 0) {
        /* complete the frame started in an earlier read */
        if (c->in_len < HDR_LEN) {
            size_t take = HDR_LEN - c->in_len;
            if (take > n)
                take = n;
            reserve(&c->in, &c->in_cap, HDR_LEN);
            memcpy(c->in + c->in_len, p, take);
            c->in_len += take;
            p += take;
            n -= take;
            if (c->in_len < HDR_LEN)
                return 0;
        }
        uint32_t plen = read_len(c->in);
        if (plen > MAX_PAYLOAD)
            return -1;
        size_t flen = HDR_LEN + (size_t)plen;
        size_t take = flen - c->in_len;
        if (take > n)
            take = n;
        reserve(&c->in, &c->in_cap, flen);
        memcpy(c->in + c->in_len, p, take);
        c->in_len += take;
        p += take;
        n -= take;
        if (c->in_len < flen)
            return 0;
        emit(c, c->in, flen);
        c->in_len = 0;
        if (c->in_cap > KEEP_CAP) {
            free(c->in);
            c->in = NULL;
            c->in_cap = 0;
        }
    }
    while (n >= HDR_LEN) {
        uint32_t plen = read_len(p);
        if (plen > MAX_PAYLOAD)
            return -1;
        size_t flen = HDR_LEN + (size_t)plen;
        if (n < flen)
            break;
        emit(c, p, flen);
        p += flen;
        n -= flen;
    }
    if (n > 0) {
        size_t need = n >= HDR_LEN ? HDR_LEN + (size_t)read_len(p) : n;
        reserve(&c->in, &c->in_cap, need);
        memcpy(c->in, p, n);
        c->in_len = n;
    }
    return 0;
}

/* One write of what the connection is owed. Returns -1 if the client must be dropped. */
static int write_out(struct conn *c, const unsigned char *p, size_t n, int from_wbuf)
{
    ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        w = 0;
    }
    if (from_wbuf) {
        if ((size_t)w < n)
            out_append(c, p + w, n - (size_t)w);
    } else {
        c->out_off += (size_t)w;
        if (c->out_off == c->out_len) {
            c->out_off = c->out_len = 0;
            if (c->out_cap > KEEP_CAP) {
                free(c->out);
                c->out = NULL;
                c->out_cap = 0;
            }
        }
    }
    return 0;
}

static void on_readable(struct conn *c)
{
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        close_conn(c);
        return;
    }
    if (r == 0) {
        close_conn(c);
        return;
    }
    wlen = 0;
    spilled = c->out_off < c->out_len;   /* replies must queue behind unsent ones */
    int bad = cut_frames(c, rbuf, (size_t)r) < 0;
    int rc = 0;
    if (!spilled && wlen > 0)
        rc = write_out(c, wbuf, wlen, 1);
    else if (c->out_off < c->out_len)
        rc = write_out(c, c->out + c->out_off, c->out_len - c->out_off, 0);
    if (bad) {
        /* the replies to the frames before the bad one got their one write; then hang up */
        fprintf(stderr, "c_echo_server: fd %d: payload over %u bytes, closing\n", c->fd, MAX_PAYLOAD);
        close_conn(c);
        return;
    }
    if (rc < 0 || update_events(c) < 0)
        close_conn(c);
}

static void on_writable(struct conn *c)
{
    if (c->out_off < c->out_len &&
        write_out(c, c->out + c->out_off, c->out_len - c->out_off, 0) < 0) {
        close_conn(c);
        return;
    }
    if (update_events(c) < 0)
        close_conn(c);
}

static void on_accept(void)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            if (errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                /* out of fds: accept with the spare one and hang up, so the backlog drains */
                perror("c_echo_server: accept4");
                close(spare_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0)
                    close(fd);
                spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            perror("c_echo_server: accept4");
            return;
        }
        if (tcp) {
            int on = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        }
        if ((size_t)fd >= conns_cap) {
            size_t n = conns_cap ? conns_cap : 1024;
            while (n <= (size_t)fd)
                n *= 2;
            conns = xrealloc(conns, n * sizeof *conns);
            memset(conns + conns_cap, 0, (n - conns_cap) * sizeof *conns);
            conns_cap = n;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            fprintf(stderr, "c_echo_server: out of memory\n");
            exit(1);
        }
        c->fd = fd;
        c->events = EPOLLIN;
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.fd = fd;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            perror("c_echo_server: epoll_ctl");
            close(fd);
            free(c);
            continue;
        }
        conns[fd] = c;
    }
}

/* Remove a leftover socket file at path, unless a server still listens on it. */
static int remove_stale(const char *path, const struct sockaddr_un *sa, socklen_t salen)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        perror("c_echo_server: lstat");
        return -1;
    }
    if (!S_ISSOCK(st.st_mode)) {
        fprintf(stderr, "c_echo_server: %s exists and is not a socket; not removing it\n", path);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("c_echo_server: socket");
        return -1;
    }
    int live = connect(fd, (const struct sockaddr *)sa, salen) == 0 || errno == EAGAIN;
    close(fd);
    if (live) {
        fprintf(stderr, "c_echo_server: a server is listening on %s already\n", path);
        return -1;
    }
    if (unlink(path) < 0 && errno != ENOENT) {
        perror("c_echo_server: removing the old socket file");
        return -1;
    }
    return 0;
}

/* Listens on "tcp://IPV4:PORT" (addr is what follows "tcp://"): sets lfd. Returns 0, or 2 for a
 * bad address, 1 if it cannot listen. */
static int listen_tcp(const char *addr)
{
    struct sockaddr_in in;
    memset(&in, 0, sizeof in);
    char host[64];
    const char *colon = strrchr(addr, ':');
    size_t hlen = colon ? (size_t)(colon - addr) : 0;
    char *end = NULL;
    unsigned long port = colon ? strtoul(colon + 1, &end, 10) : 0;
    if (!colon || hlen == 0 || hlen >= sizeof host || *end || port > 65535) {
        fprintf(stderr, "c_echo_server: tcp://IPV4:PORT expected, not tcp://%s\n", addr);
        return 2;
    }
    memcpy(host, addr, hlen);
    host[hlen] = '\0';
    in.sin_family = AF_INET;
    in.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &in.sin_addr) != 1) {
        fprintf(stderr, "c_echo_server: %s is not an IPv4 address\n", host);
        return 2;
    }
    int on = 1;
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
        bind(lfd, (const struct sockaddr *)&in, sizeof in) < 0 || listen(lfd, SOMAXCONN) < 0) {
        perror("c_echo_server: listen");
        return 1;
    }
    tcp = 1;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2 || argv[1][0] == '\0' || argv[1][0] == '-') {
        fprintf(stderr, "usage: c_echo_server PATH|tcp://IPV4:PORT\n");
        return 2;
    }
    const char *path = argv[1];
    struct stat mine = {0};
    if (strncmp(path, "tcp://", 6) == 0) {
        int rc = listen_tcp(path + 6);
        if (rc != 0)
            return rc;
        path = ""; /* no file to remove at the end */
    }
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t plen = strlen(path);
    if (plen >= sizeof sa.sun_path) {
        fprintf(stderr, "c_echo_server: path too long (at most %zu bytes)\n", sizeof sa.sun_path - 1);
        return 2;
    }
    memcpy(sa.sun_path, path, plen);
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
        (sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        perror("c_echo_server: signalfd");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    if (!tcp && remove_stale(path, &sa, salen) < 0)
        return 1;
    if (!tcp && ((lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0 ||
                 bind(lfd, (const struct sockaddr *)&sa, salen) < 0)) {
        perror("c_echo_server: bind");
        return 1;
    }
    if (!tcp && (stat(path, &mine) < 0 || listen(lfd, SOMAXCONN) < 0)) {
        perror("c_echo_server: listen");
        unlink(path);
        return 1;
    }
    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    int ok = ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) == 0;
    ev.data.fd = sfd;
    ok = ok && epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev) == 0;
    if (!ok) {
        perror("c_echo_server: epoll");
        if (!tcp)
            unlink(path);
        return 1;
    }
    fprintf(stderr, "c_echo_server: listening on %s (pid %d)\n", argv[1], (int)getpid());

    static struct epoll_event evs[MAX_EVENTS];
    int running = 1;
    while (running) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("c_echo_server: epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                on_accept();
                continue;
            }
            if (fd == sfd) {
                running = 0;
                continue;
            }
            struct conn *c = (size_t)fd < conns_cap ? conns[fd] : NULL;
            if (!c)
                continue;   /* closed earlier in this batch */
            uint32_t e = evs[i].events;
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (c->events & EPOLLIN) {
                    on_readable(c);
                    continue;
                }
                if (!(e & EPOLLOUT)) {   /* hung up while we were not reading */
                    close_conn(c);
                    continue;
                }
            }
            if (e & EPOLLOUT)
                on_writable(c);
        }
    }

    for (size_t fd = 0; fd < conns_cap; fd++)
        if (conns[fd])
            close_conn(conns[fd]);
    free(conns);
    close(lfd);
    struct stat now;
    if (!tcp && stat(path, &now) == 0 && now.st_dev == mine.st_dev && now.st_ino == mine.st_ino)
        unlink(path);
    close(ep);
    close(sfd);
    if (spare_fd >= 0)
        close(spare_fd);
    return 0;
}
