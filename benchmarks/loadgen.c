/*
 * loadgen: a single-thread epoll load generator for u32-framed echo servers on Unix sockets,
 * or on TCP: --path tcp://IPV4:PORT (TCP_NODELAY on, as the servers have it).
 *
 * u32 framing: each message is a 4-byte big-endian payload length, then the payload.
 *
 *   loadgen --path PATH [--conns N] [--depth D] [--size S] [--duration SECS] [--warmup SECS]
 *           [--verify echo|none] [--connect-timeout SECS]
 *   loadgen --path PATH --idle N --hold SECS [--size S] [--connect-timeout SECS]
 *
 * Normal mode keeps exactly D requests in flight on each of N connections for warmup +
 * duration seconds, verifies every reply and prints one JSON line. Idle mode opens N
 * connections, does one verified round trip on each, prints {"idle_conns":N,"ready":true},
 * then holds the connections open and idle for SECS seconds.
 *
 * Payload byte i of request seq on connection c is byte (i % 8) (little-endian) of the 64-bit
 * word  seed(c, seq) + (i / 8) * GOLDEN,  so a reply can be checked in a streaming fashion,
 * without keeping a copy of what was sent.
 *
 * Exit status: 0 = all replies arrived and matched, 1 = mismatch, lost reply or failed
 * connection (the JSON line is still printed), 2 = usage or connect error.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>

#define HDR_LEN 4u
#define MAX_SIZE (64u << 20)          /* largest --size accepted */
#define MAX_CONNS (1u << 20)
#define MAX_DEPTH (1u << 16)
#define RBUF_SIZE (256u * 1024u)      /* one read() takes up to this much */
#define MAX_EVENTS 1024
#define NS_PER_S 1000000000ull
#define DRAIN_NS (2ull * NS_PER_S)   /* how long in-flight replies may take after the end */
#define MAX_REPORTS 10                /* detailed error messages printed to stderr */
#define GOLDEN 0x9E3779B97F4A7C15ull

/* ---- latency histogram: log-linear buckets, 128 per power of two (<0.4% error) ---- */

#define SUB_BITS 7
#define SUB_COUNT (1u << SUB_BITS)
#define HIST_BUCKETS ((64 - SUB_BITS + 1) * SUB_COUNT)

static unsigned hist_index(uint64_t v)
{
    if (v < 2 * SUB_COUNT)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;
    return shift * SUB_COUNT + (unsigned)(v >> shift);
}

/* Midpoint of a bucket, in ns. */
static double hist_value(unsigned idx)
{
    if (idx < 2 * SUB_COUNT)
        return (double)idx;
    unsigned shift = idx / SUB_COUNT - 1;
    uint64_t lower = (uint64_t)(idx - shift * SUB_COUNT) << shift;
    return (double)lower + (double)((1ull << shift) - 1) / 2.0;
}

/* ---- state ---- */

enum verify_mode { VERIFY_ECHO, VERIFY_NONE };

struct conn {
    int fd;
    uint32_t idx;
    int dead;
    int want_out;             /* EPOLLOUT currently requested */
    uint64_t sent_seq;        /* next request to queue */
    uint64_t recv_seq;        /* next reply expected; in flight = sent_seq - recv_seq */
    uint64_t *send_ts;        /* [depth], indexed by seq % depth */
    unsigned char *out;       /* unsent bytes are out[out_off, out_len) */
    size_t out_off, out_len, out_cap;
    /* reply parser (streaming: a reply may span any number of reads) */
    int in_frame;
    uint32_t hdr_have;
    unsigned char hdr[HDR_LEN];
    uint32_t cur_len, cur_off;
    int cur_bad, cur_unsolicited;
    uint64_t cur_seed;
};

static struct {
    /* options */
    const char *path;
    uint32_t conns, depth, size;
    double duration, warmup, connect_timeout, hold;
    enum verify_mode verify;
    uint32_t idle;            /* 0 = normal mode */
    /* run state */
    int ep;
    struct conn *c;
    uint32_t nconns;
    uint64_t measure_start, measure_end;
    int sending;
    uint64_t live_inflight;   /* requests in flight on live connections */
    uint64_t lost_dead;       /* requests in flight on connections that died */
    uint64_t errors, failures, msgs, bytes_in;
    unsigned reports;
    uint64_t hist[HIST_BUCKETS];
    uint64_t hist_n;
} g;

static unsigned char rbuf[RBUF_SIZE];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static uint64_t secs_to_ns(double s)
{
    return (uint64_t)(s * 1e9 + 0.5);
}

/* splitmix64 finaliser */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

static uint64_t msg_seed(uint32_t conn, uint64_t seq)
{
    return mix64(((uint64_t)conn << 40) ^ seq ^ 0x5555555555555555ull);
}

static void fill_payload(unsigned char *dst, size_t len, uint64_t seed)
{
    uint64_t w = seed;
    size_t i = 0;
    for (; i + 8 <= len; i += 8, w += GOLDEN) {
        uint64_t le = htole64(w);
        memcpy(dst + i, &le, 8);
    }
    if (i < len) {
        uint64_t le = htole64(w);
        memcpy(dst + i, &le, len - i);
    }
}

/* Check src[0, len) against payload bytes [off, off + len) of the message with this seed.
 * Returns -1 if they match, else the payload offset of the first differing byte, with the
 * received and expected bytes in *got / *want. */
static long check_payload(const unsigned char *src, size_t len, size_t off, uint64_t seed,
                          unsigned *got, unsigned *want)
{
    size_t i = 0;
    uint64_t w = seed + (uint64_t)(off / 8) * GOLDEN;
    size_t b = off % 8;
    while (i < len) {
        uint64_t le = htole64(w);
        unsigned char exp[8];
        memcpy(exp, &le, 8);
        if (b == 0 && len - i >= 8) {
            /* fast path: whole aligned words */
            uint64_t v;
            memcpy(&v, src + i, 8);
            if (v == le) {
                i += 8;
                w += GOLDEN;
                continue;
            }
        }
        size_t n = 8 - b;
        if (n > len - i)
            n = len - i;
        for (size_t k = 0; k < n; k++) {
            if (src[i + k] != exp[b + k]) {
                *got = src[i + k];
                *want = exp[b + k];
                return (long)(off + i + k);
            }
        }
        i += n;
        b = 0;
        w += GOLDEN;
    }
    return -1;
}

static void report(const struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A detailed error message on stderr (the first MAX_REPORTS only). */
static void report(const struct conn *c, const char *fmt, ...)
{
    if (g.reports >= MAX_REPORTS) {
        if (g.reports == MAX_REPORTS)
            fprintf(stderr, "loadgen: (further errors not shown)\n");
        g.reports++;
        return;
    }
    g.reports++;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: conn %u: ", c->idx);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void conn_fail(struct conn *c, const char *why)
{
    uint64_t inflight = c->sent_seq - c->recv_seq;
    report(c, "%s (%" PRIu64 " requests in flight)", why, inflight);
    close(c->fd);              /* also removes it from the epoll set */
    c->fd = -1;
    c->dead = 1;
    g.failures++;
    g.lost_dead += inflight;
    g.live_inflight -= inflight;
}

static void set_want_out(struct conn *c, int want)
{
    if (want == c->want_out)
        return;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_fail(c, "epoll_ctl failed");
        return;
    }
    c->want_out = want;
}

/* Fill the connection's pipeline back up to depth (requests are appended to c->out). */
static void queue_requests(struct conn *c, uint64_t now)
{
    uint64_t inflight = c->sent_seq - c->recv_seq;
    if (inflight >= g.depth)
        return;
    size_t frame = HDR_LEN + (size_t)g.size;
    uint64_t count = g.depth - inflight;
    if (c->out_len + count * frame > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    /* Unsent bytes belong to requests in flight, so they and `count` more frames fit in
     * out_cap (depth frames) -- unless a broken server answered a request before it was
     * entirely sent: never write past the buffer then. */
    uint64_t room = (c->out_cap - c->out_len) / frame;
    if (count > room)
        count = room;
    uint32_t be_len = htobe32(g.size);
    unsigned char *p = c->out + c->out_len;
    for (; count > 0; count--) {
        memcpy(p, &be_len, HDR_LEN);
        fill_payload(p + HDR_LEN, g.size, msg_seed(c->idx, c->sent_seq));
        c->send_ts[c->sent_seq % g.depth] = now;
        c->sent_seq++;
        g.live_inflight++;
        p += frame;
    }
    c->out_len = (size_t)(p - c->out);
}

/* One write of everything pending. */
static void flush_out(struct conn *c)
{
    if (c->out_off < c->out_len) {
        ssize_t r = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (r > 0) {
            c->out_off += (size_t)r;
        } else if (r < 0 && errno != EAGAIN && errno != EINTR) {
            char why[128];
            snprintf(why, sizeof why, "write failed: %s", strerror(errno));
            conn_fail(c, why);
            return;
        }
        if (c->out_off == c->out_len)
            c->out_off = c->out_len = 0;
    }
    set_want_out(c, c->out_off < c->out_len);
}

static void begin_frame(struct conn *c)
{
    uint32_t be_len;
    memcpy(&be_len, c->hdr, HDR_LEN);
    c->cur_len = be32toh(be_len);
    c->cur_off = 0;
    c->cur_bad = 0;
    c->cur_unsolicited = 0;
    c->in_frame = 1;
    if (c->sent_seq == c->recv_seq) {
        c->cur_unsolicited = 1;
        c->cur_bad = 1;
        report(c, "reply of %" PRIu32 " bytes with no request in flight", c->cur_len);
        return;
    }
    if (g.verify == VERIFY_ECHO) {
        if (c->cur_len != g.size) {
            c->cur_bad = 1;
            report(c, "reply to request #%" PRIu64 ": length %" PRIu32 ", expected %" PRIu32,
                   c->recv_seq, c->cur_len, g.size);
        }
        c->cur_seed = msg_seed(c->idx, c->recv_seq);
    }
}

static void end_frame(struct conn *c, uint64_t now)
{
    c->in_frame = 0;
    if (c->cur_unsolicited) {
        g.errors++;
        return;
    }
    uint64_t seq = c->recv_seq++;
    g.live_inflight--;
    if (c->cur_bad)
        g.errors++;
    uint64_t ts = c->send_ts[seq % g.depth];
    if (ts >= g.measure_start) {
        uint64_t lat = now >= ts ? now - ts : 0;
        g.hist[hist_index(lat)]++;
        g.hist_n++;
    }
    if (now >= g.measure_start && now < g.measure_end) {
        g.msgs++;
        g.bytes_in += c->cur_len;
    }
}

static void parse_replies(struct conn *c, const unsigned char *p, size_t n, uint64_t now)
{
    const unsigned char *end = p + n;
    while (p < end) {
        if (!c->in_frame) {
            if (c->hdr_have == 0 && (size_t)(end - p) >= HDR_LEN) {
                memcpy(c->hdr, p, HDR_LEN);
                p += HDR_LEN;
            } else {
                size_t take = HDR_LEN - c->hdr_have;
                if (take > (size_t)(end - p))
                    take = (size_t)(end - p);
                memcpy(c->hdr + c->hdr_have, p, take);
                c->hdr_have += (uint32_t)take;
                p += take;
                if (c->hdr_have < HDR_LEN)
                    break;
                c->hdr_have = 0;
            }
            begin_frame(c);
        }
        size_t take = c->cur_len - c->cur_off;
        if (take > (size_t)(end - p))
            take = (size_t)(end - p);
        if (take && !c->cur_bad && g.verify == VERIFY_ECHO) {
            unsigned got, want;
            long bad = check_payload(p, take, c->cur_off, c->cur_seed, &got, &want);
            if (bad >= 0) {
                c->cur_bad = 1;
                report(c, "reply to request #%" PRIu64 ": payload byte %ld is 0x%02x, expected 0x%02x",
                       c->recv_seq, bad, got, want);
            }
        }
        c->cur_off += (uint32_t)take;
        p += take;
        if (c->cur_off == c->cur_len)
            end_frame(c, now);
    }
}

static void on_readable(struct conn *c)
{
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        char why[128];
        snprintf(why, sizeof why, "read failed: %s", strerror(errno));
        conn_fail(c, why);
        return;
    }
    if (r == 0) {
        conn_fail(c, "connection closed by the server");
        return;
    }
    uint64_t now = now_ns();
    parse_replies(c, rbuf, (size_t)r, now);
    if (g.sending) {
        if (now >= g.measure_end)
            g.sending = 0;
        else
            queue_requests(c, now);
    }
    flush_out(c);
}

/* One epoll_wait and the handling of what it returns. */
static void dispatch(int timeout_ms)
{
    static struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(g.ep, evs, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return;
        perror("loadgen: epoll_wait");
        exit(2);
    }
    for (int i = 0; i < n; i++) {
        struct conn *c = evs[i].data.ptr;
        if (c->dead)
            continue;
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
            on_readable(c);
        else if (evs[i].events & EPOLLOUT)
            flush_out(c);
    }
}

static int ms_until(uint64_t now, uint64_t until)
{
    if (until <= now)
        return 0;
    uint64_t ms = (until - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* ---- setup ---- */

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            perror("loadgen: setrlimit(RLIMIT_NOFILE)");
    }
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / NS_PER_S), (long)(ns % NS_PER_S) };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* A non-blocking TCP connect in progress: waits for its handshake until deadline. Returns 0
 * once connected, or -1 with errno set. */
static int finish_connect(int fd, uint64_t deadline)
{
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    uint64_t now = now_ns();
    int ms = now < deadline ? (int)((deadline - now) / 1000000u) + 1 : 0;
    int r = poll(&p, 1, ms);
    if (r <= 0) {
        errno = r == 0 ? ETIMEDOUT : errno;
        return -1;
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

/* Connect one non-blocking socket, retrying while the listener's backlog is full (EAGAIN),
 * nobody listens yet (ECONNREFUSED) or the socket file is not there yet (ENOENT). Gives up
 * after timeout_ns without success. Returns the fd, or -1 with errno set. */
static int connect_one(const struct sockaddr_storage *sa, socklen_t salen, uint64_t timeout_ns)
{
    uint64_t deadline = now_ns() + timeout_ns;
    for (;;) {
        int fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        int rc = connect(fd, (const struct sockaddr *)sa, salen);
        if (rc < 0 && errno == EINPROGRESS) /* TCP: the handshake takes a round trip */
            rc = finish_connect(fd, deadline);
        if (rc == 0) {
            int on = 1;
            if (sa->ss_family == AF_INET)
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
            return fd;
        }
        int e = errno;
        close(fd);
        if ((e == EAGAIN || e == ECONNREFUSED || e == ENOENT || e == EINTR) && now_ns() < deadline) {
            sleep_ns(200000);
            continue;
        }
        errno = e;
        return -1;
    }
}

/* The server's address: g.path, a Unix socket's path or "tcp://IPV4:PORT". Returns its length,
 * or 0 if it is neither. */
static socklen_t target(struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (strncmp(g.path, "tcp://", 6) == 0) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        char host[64];
        const char *colon = strrchr(g.path + 6, ':');
        size_t hlen = colon ? (size_t)(colon - (g.path + 6)) : 0;
        if (!colon || hlen == 0 || hlen >= sizeof host)
            return 0;
        memcpy(host, g.path + 6, hlen);
        host[hlen] = '\0';
        char *end;
        unsigned long port = strtoul(colon + 1, &end, 10);
        if (*end || port > 65535 || inet_pton(AF_INET, host, &in->sin_addr) != 1)
            return 0;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        return sizeof *in;
    }
    struct sockaddr_un *un = (struct sockaddr_un *)ss;
    size_t plen = strlen(g.path);
    if (plen == 0 || plen >= sizeof un->sun_path)
        return 0;
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, g.path, plen);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
}

/* Open n connections, each with room for g.depth requests in flight. */
static void open_conns(uint32_t n)
{
    struct sockaddr_storage sa;
    socklen_t salen = target(&sa);

    g.ep = epoll_create1(EPOLL_CLOEXEC);
    if (g.ep < 0) {
        perror("loadgen: epoll_create1");
        exit(2);
    }
    g.c = calloc(n, sizeof *g.c);
    if (!g.c) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(2);
    }
    uint32_t depth = g.depth;
    size_t cap = (size_t)depth * (HDR_LEN + (size_t)g.size);
    for (uint32_t i = 0; i < n; i++) {
        struct conn *c = &g.c[i];
        c->idx = i;
        c->out_cap = cap;
        c->out = malloc(cap ? cap : 1);
        c->send_ts = malloc(depth * sizeof *c->send_ts);
        if (!c->out || !c->send_ts) {
            fprintf(stderr, "loadgen: out of memory (%u connections x %zu bytes of send buffer)\n", n, cap);
            exit(2);
        }
        c->fd = connect_one(&sa, salen, secs_to_ns(g.connect_timeout));
        if (c->fd < 0) {
            int e = errno;
            fprintf(stderr, "loadgen: cannot connect to %s (connection %u of %u): %s%s\n", g.path,
                    i + 1, n, strerror(e),
                    e == EMFILE ? " (raise the open file limit: ulimit -n)" :
                    (e == EAGAIN || e == ECONNREFUSED || e == ENOENT) ? " (gave up after --connect-timeout)" : "");
            exit(2);
        }
        g.nconns = i + 1;
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.ptr = c;
        if (epoll_ctl(g.ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
            perror("loadgen: epoll_ctl");
            exit(2);
        }
    }
}

static void close_conns(void)
{
    for (uint32_t i = 0; i < g.nconns; i++) {
        if (!g.c[i].dead)
            close(g.c[i].fd);
        free(g.c[i].out);
        free(g.c[i].send_ts);
    }
    free(g.c);
    g.c = NULL;
    close(g.ep);
}

/* ---- modes ---- */

static void print_percentile(const char *name, double p)
{
    if (g.hist_n == 0) {
        printf(",\"%s\":null", name);
        return;
    }
    uint64_t rank = (uint64_t)(p * (double)g.hist_n);
    if ((double)rank < p * (double)g.hist_n)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t cum = 0;
    unsigned i = 0;
    for (; i < HIST_BUCKETS; i++) {
        cum += g.hist[i];
        if (cum >= rank)
            break;
    }
    printf(",\"%s\":%.3f", name, hist_value(i) / 1000.0);
}

static int run_normal(void)
{
    open_conns(g.conns);
    uint64_t t0 = now_ns();
    g.measure_start = t0 + secs_to_ns(g.warmup);
    g.measure_end = g.measure_start + secs_to_ns(g.duration);
    uint64_t drain_end = g.measure_end + DRAIN_NS;
    g.sending = 1;
    for (uint32_t i = 0; i < g.nconns; i++) {
        queue_requests(&g.c[i], now_ns());
        flush_out(&g.c[i]);
    }
    for (;;) {
        uint64_t now = now_ns();
        if (g.sending && now >= g.measure_end)
            g.sending = 0;
        if (!g.sending && (g.live_inflight == 0 || now >= drain_end))
            break;
        dispatch(ms_until(now, g.sending ? g.measure_end : drain_end));
    }
    uint64_t lost = g.lost_dead + g.live_inflight;
    if (g.live_inflight)
        fprintf(stderr, "loadgen: %" PRIu64 " replies still missing %.1f s after the end\n",
                g.live_inflight, DRAIN_NS / 1e9);
    close_conns();

    double secs = g.duration;
    double payload = (double)g.msgs * g.size + (double)g.bytes_in;
    printf("{\"conns\":%u,\"depth\":%u,\"size\":%u,\"duration_s\":%.3f,\"msgs\":%" PRIu64
           ",\"msgs_per_s\":%.1f,\"mb_per_s\":%.3f",
           g.conns, g.depth, g.size, secs, g.msgs, (double)g.msgs / secs, payload / 1e6 / secs);
    print_percentile("p50_us", 0.50);
    print_percentile("p99_us", 0.99);
    print_percentile("p999_us", 0.999);
    printf(",\"errors\":%" PRIu64 ",\"lost\":%" PRIu64 "}\n", g.errors, lost);
    fflush(stdout);
    return (g.errors == 0 && lost == 0 && g.failures == 0) ? 0 : 1;
}

static int run_idle(void)
{
    g.depth = 1;                    /* one request per connection */
    g.conns = g.idle;
    open_conns(g.idle);
    g.measure_start = UINT64_MAX;   /* nothing is timed in idle mode */
    g.measure_end = 0;
    g.sending = 0;
    for (uint32_t i = 0; i < g.nconns; i++) {
        queue_requests(&g.c[i], now_ns());
        flush_out(&g.c[i]);
    }
    /* wait for the replies; give up when none has come for --connect-timeout seconds */
    uint64_t patience = secs_to_ns(g.connect_timeout);
    uint64_t deadline = now_ns() + patience;
    uint64_t missing = g.live_inflight;
    for (;;) {
        uint64_t now = now_ns();
        if (g.live_inflight < missing) {
            missing = g.live_inflight;
            deadline = now + patience;
        }
        if (g.live_inflight == 0 || now >= deadline)
            break;
        dispatch(ms_until(now, deadline));
    }
    int ready = g.live_inflight == 0 && g.errors == 0 && g.failures == 0;
    if (!ready) {
        fprintf(stderr, "loadgen: idle setup failed: %" PRIu64 " replies missing (none came for %.1f s), %"
                PRIu64 " errors, %" PRIu64 " failed connections\n",
                g.live_inflight, g.connect_timeout, g.errors, g.failures);
        printf("{\"idle_conns\":%u,\"ready\":false}\n", g.idle);
        fflush(stdout);
        close_conns();
        return 1;
    }
    printf("{\"idle_conns\":%u,\"ready\":true}\n", g.idle);
    fflush(stdout);

    /* Hold: nothing should happen; anything read (data or EOF) is reported as a failure. */
    deadline = now_ns() + secs_to_ns(g.hold);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline)
            break;
        dispatch(ms_until(now, deadline));
    }
    close_conns();
    if (g.errors || g.failures) {
        fprintf(stderr, "loadgen: during the hold: %" PRIu64 " unexpected replies, %" PRIu64
                " connections lost\n", g.errors, g.failures);
        return 1;
    }
    return 0;
}

/* ---- command line ---- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --path PATH|tcp://IPV4:PORT [--conns N=64] [--depth D=16] [--size S=64]\n"
            "               [--duration SECS=3] [--warmup SECS=1] [--verify echo|none]\n"
            "               [--connect-timeout SECS=10]\n"
            "       loadgen --path PATH --idle N --hold SECS [--size S=64] [--connect-timeout SECS=10]\n");
}

static void bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "loadgen: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    usage(stderr);
    exit(2);
}

static uint32_t parse_u32(const char *name, const char *s, uint32_t lo, uint32_t hi)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi) {
        fprintf(stderr, "loadgen: --%s must be an integer from %u to %u, not '%s'\n", name, lo, hi, s);
        usage(stderr);
        exit(2);
    }
    return (uint32_t)v;
}

static double parse_secs(const char *name, const char *s, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "loadgen: --%s must be a number of seconds from %g to %g, not '%s'\n", name, lo, hi, s);
        usage(stderr);
        exit(2);
    }
    return v;
}

/* Built alone, this is the program's main(); built into pyuds (see build_ffi.py) it is
 * uds_loadgen_main(), which `pyuds bench` runs in a process of its own. */
#ifndef UDS_LOADGEN_ENTRY
#define UDS_LOADGEN_ENTRY main
#endif
int UDS_LOADGEN_ENTRY(int argc, char **argv);
int UDS_LOADGEN_ENTRY(int argc, char **argv)
{
    enum { O_PATH = 1, O_CONNS, O_DEPTH, O_SIZE, O_DURATION, O_WARMUP, O_VERIFY, O_CTIMEOUT,
           O_IDLE, O_HOLD, O_HELP };
    static const struct option longopts[] = {
        { "path", required_argument, NULL, O_PATH },
        { "conns", required_argument, NULL, O_CONNS },
        { "depth", required_argument, NULL, O_DEPTH },
        { "size", required_argument, NULL, O_SIZE },
        { "duration", required_argument, NULL, O_DURATION },
        { "warmup", required_argument, NULL, O_WARMUP },
        { "verify", required_argument, NULL, O_VERIFY },
        { "connect-timeout", required_argument, NULL, O_CTIMEOUT },
        { "idle", required_argument, NULL, O_IDLE },
        { "hold", required_argument, NULL, O_HOLD },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    g.conns = 64;
    g.depth = 16;
    g.size = 64;
    g.duration = 3;
    g.warmup = 1;
    g.verify = VERIFY_ECHO;
    g.connect_timeout = 10;
    g.hold = -1;
    int normal_only = 0;   /* a normal-mode-only option was given */
    const char *normal_opt = NULL;

    opterr = 0;
    int o;
    while ((o = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (o) {
        case O_PATH: g.path = optarg; break;
        case O_CONNS: g.conns = parse_u32("conns", optarg, 1, MAX_CONNS); normal_only = 1; normal_opt = "--conns"; break;
        case O_DEPTH: g.depth = parse_u32("depth", optarg, 1, MAX_DEPTH); normal_only = 1; normal_opt = "--depth"; break;
        case O_SIZE: g.size = parse_u32("size", optarg, 0, MAX_SIZE); break;
        case O_DURATION: g.duration = parse_secs("duration", optarg, 0.001, 86400); normal_only = 1; normal_opt = "--duration"; break;
        case O_WARMUP: g.warmup = parse_secs("warmup", optarg, 0, 86400); normal_only = 1; normal_opt = "--warmup"; break;
        case O_VERIFY:
            if (strcmp(optarg, "echo") == 0)
                g.verify = VERIFY_ECHO;
            else if (strcmp(optarg, "none") == 0)
                g.verify = VERIFY_NONE;
            else
                bad_usage("--verify must be 'echo' or 'none', not '%s'", optarg);
            normal_only = 1;
            normal_opt = "--verify";
            break;
        case O_CTIMEOUT: g.connect_timeout = parse_secs("connect-timeout", optarg, 0.001, 86400); break;
        case O_IDLE: g.idle = parse_u32("idle", optarg, 1, MAX_CONNS); break;
        case O_HOLD: g.hold = parse_secs("hold", optarg, 0, 86400); break;
        case O_HELP: usage(stdout); return 0;
        default:
            bad_usage("unknown option or missing argument: %s", argv[optind - 1]);
        }
    }
    if (optind < argc)
        bad_usage("unexpected argument: %s", argv[optind]);
    if (!g.path)
        bad_usage("%s", "--path is required");
    struct sockaddr_storage ss;
    if (target(&ss) == 0)
        bad_usage("--path must be a socket path of 1 to 107 bytes, or tcp://IPV4:PORT: %s", g.path);
    if ((g.idle != 0) != (g.hold >= 0))
        bad_usage("%s", "--idle and --hold go together");
    if (g.idle && normal_only)
        bad_usage("%s cannot be used with --idle", normal_opt);

    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    return g.idle ? run_idle() : run_normal();
}
