/*
 * poller.c - the epoll backend: level-triggered interest in readable / writable descriptors,
 * and the wakeup pipe that lets another thread (or a signal handler) end a wait. The loop knows
 * only the functions of this file.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

int uds_poller_open(uds_poller *p)
{
    int pipefd[2];
    p->wake_rd = p->wake_wr = -1;
    if ((p->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return -errno;
    int rc = 0;
    if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC) < 0)
        rc = -errno;
    else {
        p->wake_rd = pipefd[0];
        p->wake_wr = pipefd[1];
        rc = uds_poller_add(p, p->wake_rd, UDS_POLL_IN);
    }
    if (rc < 0)
        uds_poller_close(p);
    return rc;
}

void uds_poller_close(uds_poller *p)
{
    int *fds[] = {&p->ep, &p->wake_rd, &p->wake_wr};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static int ctl(const uds_poller *p, int op, int fd, unsigned events)
{
    struct epoll_event e = {0};
    e.events = ((events & UDS_POLL_IN) ? EPOLLIN : 0u) | ((events & UDS_POLL_OUT) ? EPOLLOUT : 0u);
    e.data.fd = fd;
    return epoll_ctl(p->ep, op, fd, &e) < 0 ? -errno : 0;
}

int uds_poller_add(const uds_poller *p, int fd, unsigned events)
{
    return ctl(p, EPOLL_CTL_ADD, fd, events);
}

int uds_poller_mod(const uds_poller *p, int fd, unsigned events)
{
    return ctl(p, EPOLL_CTL_MOD, fd, events);
}

int uds_poller_del(const uds_poller *p, int fd) { return ctl(p, EPOLL_CTL_DEL, fd, 0); }

static void drain_wakeups(const uds_poller *p)
{
    char sink[64];
    for (;;) {
        ssize_t r = read(p->wake_rd, sink, sizeof sink);
        if (r > 0 || (r < 0 && errno == EINTR))
            continue;
        return; /* EAGAIN: drained */
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* epoll_wait(), or while nothing is ready, epoll_wait() without sleeping for up to spin_us
 * first (never past timeout_ms). */
static int wait_spinning(const uds_poller *p, struct epoll_event *evs, int max, int timeout_ms,
                         int spin_us)
{
    int n = 0;
    if (spin_us > 0 && timeout_ms != 0) {
        uint64_t start = now_ns(), spin_ns = (uint64_t)spin_us * 1000u;
        if (timeout_ms > 0 && spin_ns > (uint64_t)timeout_ms * 1000000u)
            spin_ns = (uint64_t)timeout_ms * 1000000u;
        do
            n = epoll_wait(p->ep, evs, max, 0);
        while (n == 0 && now_ns() - start < spin_ns);
        if (n == 0 && timeout_ms > 0) { /* the spin counts against the timeout */
            uint64_t spent_ms = (now_ns() - start) / 1000000u;
            timeout_ms = spent_ms >= (uint64_t)timeout_ms ? 0 : timeout_ms - (int)spent_ms;
        }
    }
    return n != 0 ? n : epoll_wait(p->ep, evs, max, timeout_ms);
}

int uds_poller_wait(const uds_poller *p, uds_ready *out, int max, int timeout_ms, int spin_us)
{
    struct epoll_event evs[UDS_EPOLL_BATCH];
    if (max > UDS_EPOLL_BATCH)
        max = UDS_EPOLL_BATCH;
    int n = wait_spinning(p, evs, max, timeout_ms, spin_us);
    if (n < 0)
        /* EINTR is not retried here: the caller returns so its host can run signal handlers. */
        return errno == EINTR ? 0 : -errno;
    int k = 0;
    for (int i = 0; i < n; i++) {
        unsigned ev = evs[i].events, r = 0;
        if (evs[i].data.fd == p->wake_rd) {
            drain_wakeups(p);
            continue;
        }
        if (ev & EPOLLIN)
            r |= UDS_POLL_IN;
        if (ev & EPOLLOUT)
            r |= UDS_POLL_OUT;
        if (ev & (EPOLLHUP | EPOLLERR))
            r |= UDS_POLL_HUP;
        out[k].fd = evs[i].data.fd;
        out[k++].events = r;
    }
    return k;
}

int uds_poller_wake(const uds_poller *p)
{
    ssize_t w;
    do
        w = write(p->wake_wr, "", 1);
    while (w < 0 && errno == EINTR);
    /* EAGAIN: the pipe is full, so a wakeup is pending anyway. */
    return (w < 0 && errno != EAGAIN) ? -errno : 0;
}
