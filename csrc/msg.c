/*
 * msg.c - ancillary data: descriptors passed with messages (SCM_RIGHTS), the sender's
 * credentials (SCM_CREDENTIALS), the queues that tie descriptors to stream offsets, and the
 * duplicates made of descriptors to send.
 *
 * On a stream socket Linux attaches passed descriptors to the bytes of the send that carried
 * them, and may glue the bytes of earlier sends into the same read; but the read that brings
 * descriptors ends within the send that carried them. A sender puts descriptors on a
 * message's first byte, so they belong to the message holding the last byte of that read: the
 * queues record that byte's offset in the stream.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- descriptor queues -------------------------------------------------------------------- */

int uds_fdq_push(uds_fdq *q, int fd, uint64_t at)
{
    if (q->head > 0 && q->head == q->n)
        q->head = q->n = 0; /* empty: start over at the front */
    if (q->n == q->cap) {
        if (q->head > 0) {
            memmove(q->fd, q->fd + q->head, (size_t)(q->n - q->head) * sizeof *q->fd);
            memmove(q->at, q->at + q->head, (size_t)(q->n - q->head) * sizeof *q->at);
            q->n -= q->head;
            q->head = 0;
        } else {
            int cap = q->cap ? q->cap * 2 : 8;
            int *fd = realloc(q->fd, (size_t)cap * sizeof *fd);
            if (fd == NULL)
                return -ENOMEM;
            q->fd = fd;
            uint64_t *at = realloc(q->at, (size_t)cap * sizeof *at);
            if (at == NULL)
                return -ENOMEM;
            q->at = at;
            q->cap = cap;
        }
    }
    q->fd[q->n] = fd;
    q->at[q->n] = at;
    q->n++;
    return 0;
}

int uds_fdq_count_before(const uds_fdq *q, uint64_t end)
{
    int k = 0;
    while (q->head + k < q->n && q->at[q->head + k] < end)
        k++;
    return k;
}

int uds_fdq_pop(uds_fdq *q)
{
    int fd = q->fd[q->head++];
    if (q->head == q->n)
        q->head = q->n = 0;
    return fd;
}

void uds_fdq_clear(uds_fdq *q)
{
    while (uds_fdq_len(q) > 0) {
        int fd = uds_fdq_pop(q);
        if (fd != UDS_FDQ_END)
            close(fd);
    }
    free(q->fd);
    free(q->at);
    memset(q, 0, sizeof *q);
}

/* ---- sendmsg / recvmsg with ancillary data ------------------------------------------------ */

/* Room for the most descriptors one message may bring and one set of credentials. */
#define CMSG_ROOM (CMSG_SPACE(sizeof(int) * UDS_MAX_FDS) + CMSG_SPACE(sizeof(struct ucred)))

ssize_t uds_recv_msg(int fd, struct iovec *iov, int iovcnt, int max_fds, uds_recv_info *info)
{
    union {
        char buf[CMSG_ROOM];
        struct cmsghdr align;
    } ctl;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)iovcnt;
    mh.msg_name = info->want_addr ? &info->addr : NULL;
    mh.msg_namelen = info->want_addr ? sizeof info->addr : 0;
    /* Room for exactly max_fds descriptors: one more and the kernel says MSG_CTRUNC. */
    mh.msg_control = ctl.buf;
    mh.msg_controllen = (max_fds > 0 ? CMSG_SPACE(sizeof(int) * (size_t)max_fds) : 0) +
                        (info->want_creds ? CMSG_SPACE(sizeof(struct ucred)) : 0);
    if (mh.msg_controllen == 0)
        mh.msg_control = NULL;
    info->nfds = 0;
    info->has_creds = 0;
    info->flags = 0;
    ssize_t r;
    do
        r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT | (info->real_len ? MSG_TRUNC : 0));
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    info->flags = mh.msg_flags;
    info->addr_len = mh.msg_namelen;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET)
            continue;
        if (cm->cmsg_type == SCM_RIGHTS) {
            size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < n && info->nfds < UDS_MAX_FDS; i++)
                memcpy(&info->fds[info->nfds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
        } else if (cm->cmsg_type == SCM_CREDENTIALS &&
                   cm->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
            memcpy(&info->creds, CMSG_DATA(cm), sizeof info->creds);
            info->has_creds = 1;
        }
    }
    return r;
}

void uds_recv_info_close_fds(uds_recv_info *info)
{
    uds_fds_close(info->fds, info->nfds);
    info->nfds = 0;
}

ssize_t uds_send_msg(int fd, const char *data, size_t len, const int *fds, int nfds,
                     const struct sockaddr_un *to, socklen_t tolen)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * UDS_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_name = (void *)to;
    mh.msg_namelen = to ? tolen : 0;
    if (nfds > 0) {
        memset(ctl.buf, 0, sizeof ctl.buf);
        mh.msg_control = ctl.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t w;
    do
        w = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    return w < 0 ? -errno : w;
}

/* ---- descriptors to send later ------------------------------------------------------------ */

int uds_fds_dup(const int *fds, int n, int *out)
{
    for (int i = 0; i < n; i++) {
        if ((out[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3)) < 0) {
            int err = errno;
            uds_fds_close(out, i);
            return -err;
        }
    }
    return 0;
}

void uds_fds_close(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}
