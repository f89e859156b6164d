/*
 * sock.c - socket helpers: the master socket's birth and end, peer credentials.
 *
 * The socket file is the one piece of server state that outlives a crash, and other processes
 * share its directory. So: never remove what is not a socket, never remove a socket somebody
 * answers on, never let it exist with a wider mode than asked for, and at the end remove it
 * only if it is still the file this server made.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static int make_addr(const char *path, struct sockaddr_un *sa, socklen_t *len)
{
    size_t n = strlen(path);
    if (n == 0)
        return -EINVAL;
    /* Keep the terminating NUL inside sun_path: a name that fills it exactly is legal for the
     * kernel but gets truncated by many peers, so refuse it rather than truncate. */
    if (n >= sizeof sa->sun_path)
        return -ENAMETOOLONG;
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, n + 1);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

/* Connects to sa with a socket of the given type. Returns 0 if something answered (or is
 * there but busy), else -errno (-ECONNREFUSED: bound, nobody listening). */
static int probe(const struct sockaddr_un *sa, socklen_t len, int type)
{
    for (;;) {
        int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -errno;
        int rc = connect(fd, (const struct sockaddr *)sa, len);
        int err = rc < 0 ? errno : 0;
        close(fd);
        if (err == EINTR)
            continue;
        /* EAGAIN: a live listener whose backlog is full. */
        if (err == 0 || err == EAGAIN || err == EINPROGRESS)
            return 0;
        return -err;
    }
}

/* Makes way for bind(): returns 0 if path is free (absent, or a stale socket now removed). */
static int clear_stale(const struct sockaddr_un *sa, socklen_t len, const char *path)
{
    static const int types[] = {SOCK_STREAM, SOCK_SEQPACKET, SOCK_DGRAM};
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(st.st_mode))
        return -ENOTSOCK; /* a file, directory or symlink: never ours to remove */

    /* A socket of another type refuses a stream connect with EPROTOTYPE, so ask in its own
     * type before deciding that it is stale. */
    int rc = -EPROTOTYPE;
    for (size_t i = 0; i < sizeof types / sizeof types[0] && rc == -EPROTOTYPE; i++)
        rc = probe(sa, len, types[i]);
    if (rc == 0)
        return -EADDRINUSE;
    if (rc == -ENOENT)
        return 0; /* removed meanwhile */
    if (rc != -ECONNREFUSED)
        return rc; /* e.g. -EACCES: we cannot tell, so we touch nothing */

    /* Nobody listens: the leftover of a server that died. Remove it only if it is still the
     * file we probed. */
    rc = uds_sock_unlink_if_same(path, st.st_dev, st.st_ino);
    return rc < 0 ? rc : 0;
}

int uds_sock_listen(const char *path, unsigned mode, int backlog, int *fdp, dev_t *dev,
                    ino_t *ino)
{
    struct sockaddr_un sa;
    socklen_t len;
    struct stat st;
    int rc = make_addr(path, &sa, &len);
    if (rc < 0)
        return rc;
    if (mode > 0777 || backlog < 1)
        return -EINVAL;
    rc = clear_stale(&sa, len, path);
    if (rc < 0)
        return rc;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* Linux creates the socket file with the mode of the socket's own inode, masked by the
     * umask. Setting that mode before bind() means the file never exists, not even for an
     * instant, with wider permissions than asked for; the umask is process-wide, so it is left
     * alone. */
    if (fchmod(fd, mode) < 0)
        goto fail;
    /* EADDRINUSE here: somebody created path since clear_stale() looked. */
    if (bind(fd, (const struct sockaddr *)&sa, len) < 0)
        goto fail;
    if (lstat(path, &st) < 0)
        goto fail;
    /* The umask may have narrowed the mode; widen it to exactly what was asked for. */
    if ((st.st_mode & 07777) != mode && chmod(path, mode) < 0)
        goto fail_unlink;
    if (listen(fd, backlog) < 0)
        goto fail_unlink;
    *fdp = fd;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return 0;

fail_unlink:
    rc = -errno;
    uds_sock_unlink_if_same(path, st.st_dev, st.st_ino);
    close(fd);
    return rc;
fail:
    rc = -errno;
    close(fd);
    return rc;
}

int uds_sock_unlink_if_same(const char *path, dev_t dev, ino_t ino)
{
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    if (st.st_dev != dev || st.st_ino != ino)
        return 0; /* another server's file now: not ours to remove */
    if (unlink(path) < 0)
        return errno == ENOENT ? 0 : -errno;
    return 1;
}

int uds_sock_peercred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return -errno;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}
