/*
 * poller.c - the epoll backend: level-triggered interest in readable / writable descriptors.
 * The loop (server.c) knows only these five functions.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <sys/epoll.h>

int uds_poller_open(void)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    return ep < 0 ? -errno : ep;
}

static int ctl(int ep, int op, int fd, unsigned events)
{
    struct epoll_event e = {0};
    e.events = ((events & UDS_POLL_IN) ? EPOLLIN : 0u) | ((events & UDS_POLL_OUT) ? EPOLLOUT : 0u);
    e.data.fd = fd;
    return epoll_ctl(ep, op, fd, &e) < 0 ? -errno : 0;
}

int uds_poller_add(int ep, int fd, unsigned events) { return ctl(ep, EPOLL_CTL_ADD, fd, events); }

int uds_poller_mod(int ep, int fd, unsigned events) { return ctl(ep, EPOLL_CTL_MOD, fd, events); }

int uds_poller_del(int ep, int fd) { return ctl(ep, EPOLL_CTL_DEL, fd, 0); }

int uds_poller_wait(int ep, uds_ready *out, int max, int timeout_ms)
{
    struct epoll_event evs[UDS_EPOLL_BATCH];
    if (max > UDS_EPOLL_BATCH)
        max = UDS_EPOLL_BATCH;
    int n = epoll_wait(ep, evs, max, timeout_ms);
    if (n < 0)
        /* EINTR is not retried here: the caller returns so its host can run signal handlers. */
        return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        unsigned ev = evs[i].events, r = 0;
        if (ev & EPOLLIN)
            r |= UDS_POLL_IN;
        if (ev & EPOLLOUT)
            r |= UDS_POLL_OUT;
        if (ev & (EPOLLHUP | EPOLLERR))
            r |= UDS_POLL_HUP;
        out[i].fd = evs[i].data.fd;
        out[i].events = r;
    }
    return n;
}
