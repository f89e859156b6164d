/*
 * sock.c - socket helpers: the master socket's birth and end, names, peer credentials, and
 * the uid/gid policy that admits peers by their credentials.
 *
 * The socket file is the one piece of server state that outlives a crash, and other processes
 * share its directory. So: never remove what is not a socket, never remove a socket somebody
 * answers on, never let it exist with a wider mode than asked for, and at the end remove it
 * only if it is still the file this server made.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int make_addr(const char *path, struct sockaddr_un *sa, socklen_t *len)
{
    size_t n = strlen(path);
    if (n == 0)
        return -EINVAL;
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    if (path[0] == '@') {
        /* The abstract namespace: sun_path starts with a NUL and the name is exactly the
         * bytes that follow, counted by the address length (no terminator). */
        if (n > sizeof sa->sun_path)
            return -ENAMETOOLONG;
        memcpy(sa->sun_path + 1, path + 1, n - 1);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
        return 0;
    }
    /* Keep the terminating NUL inside sun_path: a name that fills it exactly is legal for the
     * kernel but gets truncated by many peers, so refuse it rather than truncate. */
    if (n >= sizeof sa->sun_path)
        return -ENAMETOOLONG;
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

/* Makes way for the listening socket: returns 0 if path is free (absent, or a stale socket
 * now removed). */
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

/* Binds fd under a fresh temporary name in the directory of path; writes that name, as a
 * path, to tmp. When the temporary path would not fit in sun_path, binds through the
 * directory's descriptor in /proc instead (the final path itself was checked to fit). */
static int bind_temp(int fd, const char *path, char *tmp, size_t tmpsz)
{
    const char *slash = strrchr(path, '/');
    size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0; /* with its '/' */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    for (unsigned attempt = 0; attempt < 16; attempt++) {
        char name[48];
        snprintf(name, sizeof name, ".pyuds-%x-%lx%x", (unsigned)getpid(), (unsigned long)ts.tv_nsec,
                 attempt);
        if (dirlen + strlen(name) >= tmpsz)
            return -ENAMETOOLONG;
        memcpy(tmp, path, dirlen);
        strcpy(tmp + dirlen, name);

        struct sockaddr_un sa;
        socklen_t len;
        int dirfd = -1, rc = make_addr(tmp, &sa, &len);
        if (rc == -ENAMETOOLONG) {
            char dir[4096];
            if (dirlen >= sizeof dir)
                return -ENAMETOOLONG;
            memcpy(dir, path, dirlen);
            dir[dirlen] = '\0';
            dirfd = open(dirlen ? dir : ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (dirfd < 0)
                return -errno;
            char via[64];
            snprintf(via, sizeof via, "/proc/self/fd/%d/%s", dirfd, name);
            rc = make_addr(via, &sa, &len);
        }
        if (rc == 0)
            rc = bind(fd, (const struct sockaddr *)&sa, len) < 0 ? -errno : 0;
        if (dirfd >= 0)
            close(dirfd);
        if (rc != -EADDRINUSE)
            return rc; /* bound, or a real error */
        /* that name is taken: try another */
    }
    return -EADDRINUSE;
}

/* Moves from to to, failing with -EEXIST rather than replacing anything at to. */
static int rename_noreplace(const char *from, const char *to)
{
    if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -errno;
    /* The filesystem has no RENAME_NOREPLACE; link() never replaces either. */
    if (link(from, to) < 0)
        return -errno;
    unlink(from);
    return 0;
}

/* Datagram sockets have nothing to listen() on. */
static int start_listening(int fd, int type, int backlog)
{
    if (type == SOCK_DGRAM)
        return 0;
    return listen(fd, backlog) < 0 ? -errno : 0;
}

/* A socket in the abstract namespace: no file, so nothing stale to clear and no moment at
 * which a half-made one could be seen; the kernel refuses a name in use (-EADDRINUSE). */
static int listen_abstract(const struct sockaddr_un *sa, socklen_t len, int type, int backlog,
                           int *fdp)
{
    int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int rc = bind(fd, (const struct sockaddr *)sa, len) < 0 ? -errno : 0;
    if (rc == 0)
        rc = start_listening(fd, type, backlog);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    *fdp = fd;
    return 0;
}

/* pyuds servers starting in one directory take turns through an exclusive flock() on the
 * directory, held from clearing a stale file until the new socket listens (microseconds). Under
 * it, a socket that refuses connections cannot be one of ours between bind() and listen(), so
 * clear_stale() may take it for stale, and the socket can be bound straight to path: the kernel
 * then reports path as its address (getsockname(), getpeername(), recvfrom(), ss, /proc/net/unix).
 * Returns the locked directory's descriptor, or -errno: the directory cannot be opened for
 * reading (no read permission, say), or the lock stayed taken for UDS_DIR_LOCK_WAIT_MS. */
#define UDS_DIR_LOCK_WAIT_MS 1000
static int lock_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[sizeof ((struct sockaddr_un *)0)->sun_path + 1] = ".";
    if (slash) {
        size_t dirlen = slash == path ? 1 : (size_t)(slash - path); /* "/x" is in "/" */
        if (dirlen >= sizeof dir)
            return -ENAMETOOLONG;
        memcpy(dir, path, dirlen);
        dir[dirlen] = '\0';
    }
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return -errno;
    /* Not a blocking flock(): whoever holds the lock for long (any process that can read the
     * directory can take it) costs a starting server this wait and its true address, no more. */
    for (int waited_ms = 0; waited_ms < UDS_DIR_LOCK_WAIT_MS;) {
        if (flock(dirfd, LOCK_EX | LOCK_NB) == 0)
            return dirfd;
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK)
            break; /* e.g. ENOLCK on a filesystem without locks */
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL); /* woken early by a signal: counted all the same */
        waited_ms++;
    }
    close(dirfd);
    return -EWOULDBLOCK;
}

/* Releases lock_dir()'s lock. LOCK_UN first: closing alone would leave the lock held by any
 * copy of the descriptor that a fork() in another thread made meanwhile. */
static void unlock_dir(int dirfd)
{
    flock(dirfd, LOCK_UN);
    close(dirfd);
}

/* Binds fd straight to path, under lock_dir()'s lock, and sets *st to the file made. The file is
 * at path, with at most mode, from bind() on; it answers from listen() on. */
static int bind_in_place(int fd, const struct sockaddr_un *sa, socklen_t len, const char *path,
                         unsigned mode, int type, int backlog, struct stat *st)
{
    int rc;
    for (int attempt = 0;; attempt++) {
        if ((rc = clear_stale(sa, len, path)) < 0)
            return rc;
        if (bind(fd, (const struct sockaddr *)sa, len) == 0)
            break;
        rc = -errno;
        /* -EADDRINUSE: something not taking the lock put a file there since clear_stale()
         * looked: look again. */
        if (rc != -EADDRINUSE || attempt == 3)
            return rc;
    }
    if (lstat(path, st) < 0)
        return -errno; /* removed by someone not taking the lock: our socket is unreachable */
    /* The umask may have narrowed the mode; widen it to exactly what was asked for. */
    if ((st->st_mode & 07777) != mode && chmod(path, mode) < 0)
        rc = -errno;
    else
        rc = start_listening(fd, type, backlog);
    if (rc < 0)
        uds_sock_unlink_if_same(path, st->st_dev, st->st_ino);
    return rc;
}

/* Binds fd and listens under a temporary name in path's directory, then renames the file into
 * place, and sets *st to the file made. For when lock_dir() fails: the file at path listens from
 * the instant it appears, so no server starting at the same moment can take it for stale. The
 * kernel keeps the temporary name as the socket's address, though. */
static int bind_renamed(int fd, const struct sockaddr_un *sa, socklen_t len, const char *path,
                        unsigned mode, int type, int backlog, struct stat *st)
{
    char tmp[4096];
    int rc = bind_temp(fd, path, tmp, sizeof tmp);
    if (rc < 0)
        return rc;
    if (lstat(tmp, st) < 0)
        return -errno; /* it vanished: nothing of ours to remove */
    if ((st->st_mode & 07777) != mode && chmod(tmp, mode) < 0)
        rc = -errno;
    else
        rc = start_listening(fd, type, backlog);
    for (int attempt = 0; rc == 0; attempt++) {
        if ((rc = clear_stale(sa, len, path)) < 0)
            break;
        rc = rename_noreplace(tmp, path);
        if (rc == 0)
            return 0;
        /* -EEXIST: another server put a file there since clear_stale() looked: look again
         * (it is live, most likely, and then the answer is -EADDRINUSE). */
        if (rc != -EEXIST || attempt == 3)
            break;
        rc = 0;
    }
    uds_sock_unlink_if_same(tmp, st->st_dev, st->st_ino);
    return rc;
}

int uds_sock_listen(const char *path, int type, unsigned mode, int backlog, int *fdp,
                    dev_t *dev, ino_t *ino)
{
    struct sockaddr_un sa;
    socklen_t len;
    struct stat st;
    int rc = make_addr(path, &sa, &len);
    if (rc < 0)
        return rc;
    if (mode > 0777 || backlog < 1)
        return -EINVAL;
    *dev = 0;
    *ino = 0;
    if (path[0] == '@')
        return listen_abstract(&sa, len, type, backlog, fdp);

    int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* Linux creates the socket file with the mode of the socket's own inode, masked by the
     * umask. Setting that mode before bind() means the file never exists, not even for an
     * instant, with wider permissions than asked for; the umask is process-wide, so it is left
     * alone. */
    if (fchmod(fd, mode) < 0) {
        rc = -errno;
    } else {
        int dirfd = lock_dir(path);
        if (dirfd >= 0) {
            rc = bind_in_place(fd, &sa, len, path, mode, type, backlog, &st);
            unlock_dir(dirfd);
        } else {
            rc = bind_renamed(fd, &sa, len, path, mode, type, backlog, &st);
        }
    }
    if (rc < 0) {
        close(fd);
        return rc;
    }
    *fdp = fd;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return 0;
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

/* Whether fd is a socket of this family (inet: AF_INET or AF_INET6, else AF_UNIX) and type:
 * 0, or -errno. */
static int is_kind(int fd, int type, int inet)
{
    int val;
    socklen_t vlen = sizeof val;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &val, &vlen) < 0)
        return -errno; /* -EBADF, or -ENOTSOCK for a descriptor that is not a socket */
    if (inet ? val != AF_INET && val != AF_INET6 : val != AF_UNIX)
        return -EAFNOSUPPORT;
    vlen = sizeof val;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &val, &vlen) < 0)
        return -errno;
    return val == type ? 0 : -EPROTOTYPE;
}

static int is_unix(int fd, int type) { return is_kind(fd, type, 0); }

/* A close-on-exec duplicate of fd, non-blocking, so that the owner's descriptor outlives the
 * server. Non-blocking is a property of the shared open file, so it is set on both: *saved_flags
 * gets the flags as they were, to put back. */
static int dup_nonblocking(int fd, int *fdp, int *saved_flags)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -errno;
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup < 0)
        return -errno;
    if (!(flags & O_NONBLOCK) && fcntl(dup, F_SETFL, flags | O_NONBLOCK) < 0) {
        int err = errno;
        close(dup);
        return -err;
    }
    *fdp = dup;
    *saved_flags = flags;
    return 0;
}

int uds_sock_adopt(int fd, int type, int inet, int backlog, int *fdp, int *saved_flags)
{
    int rc = is_kind(fd, type, inet);
    if (rc < 0)
        return rc;
    struct sockaddr_storage ss;
    socklen_t salen = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &salen) < 0)
        return -errno;
    /* Not bound: nobody could reach it. (An unbound TCP socket reports port 0.) */
    if (inet ? ((struct sockaddr_in *)&ss)->sin_port == 0
             : salen <= offsetof(struct sockaddr_un, sun_path))
        return -EDESTADDRREQ;
    if (type != SOCK_DGRAM) {
        int val;
        socklen_t vlen = sizeof val;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &val, &vlen) < 0)
            return -errno;
        if (!val && listen(fd, backlog) < 0)
            return -errno;
    }
    return dup_nonblocking(fd, fdp, saved_flags);
}

int uds_sock_adopt_handoff(int fd, int *fdp, int *saved_flags)
{
    int rc = is_unix(fd, SOCK_SEQPACKET);
    return rc < 0 ? rc : dup_nonblocking(fd, fdp, saved_flags);
}

int uds_sock_take_handed(int fd, int type)
{
    int flags = fcntl(fd, F_GETFL), on = 1;
    if (is_unix(fd, type) < 0)
        return -EPROTOTYPE;
    /* Non-blocking, as accept4() makes ours (the sender may have accepted without it). A
     * SEQPACKET connection needs SO_PASSCRED (see server.c's open_master()); one accepted by
     * the sender's own master socket has it already. */
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
        (type == SOCK_SEQPACKET && setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) < 0))
        return -errno;
    return 0;
}

int uds_sock_format_name(const struct sockaddr_un *sa, socklen_t salen, char *name, size_t *len)
{
    size_t n = salen > offsetof(struct sockaddr_un, sun_path)
                   ? salen - offsetof(struct sockaddr_un, sun_path)
                   : 0;
    if (n > sizeof sa->sun_path)
        n = sizeof sa->sun_path;
    if (n > 0 && sa->sun_path[0] == '\0') {
        name[0] = '@'; /* abstract: '@', then exactly the name's bytes */
        memcpy(name + 1, sa->sun_path + 1, n - 1);
    } else {
        n = strnlen(sa->sun_path, n);
        memcpy(name, sa->sun_path, n);
    }
    *len = n;
    return 0;
}

int uds_sock_name(int fd, int peer, char *name, size_t *len)
{
    struct sockaddr_storage ss;
    socklen_t salen = sizeof ss;
    if ((peer ? getpeername(fd, (struct sockaddr *)&ss, &salen)
              : getsockname(fd, (struct sockaddr *)&ss, &salen)) < 0)
        return -errno;
    if (ss.ss_family != AF_UNIX)
        return uds_sock_inet_format((const struct sockaddr *)&ss, name, len);
    return uds_sock_format_name((const struct sockaddr_un *)&ss, salen, name, len);
}

/* Closing a Unix stream socket while bytes it never read wait in its queue makes Linux report
 * ECONNRESET to the peer instead of end-of-file, and a peer that reads its last replies and
 * then meets a reset takes the close for a failure. So read and drop what is queued first
 * (nginx's "lingering close"), within a bound. */
void uds_sock_discard_unread(int fd)
{
    char sink[16384];
    for (size_t total = 0; total < UDS_LINGER_DISCARD;) {
        ssize_t r = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (r > 0)
            total += (size_t)r;
        else if (!(r < 0 && errno == EINTR))
            return;
    }
}

void uds_sock_peercred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        *pid = -1;
        *uid = *gid = (uint32_t)-1;
        return;
    }
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
}

/* ---- the uid/gid policy --------------------------------------------------------------------- */

/* Copies a policy list, so that the caller's may go away. */
static int copy_ids(const uint32_t *from, int n, uint32_t **to)
{
    *to = NULL;
    if (n == 0)
        return 0;
    if (n < 0 || from == NULL)
        return -EINVAL;
    if ((*to = malloc((size_t)n * sizeof **to)) == NULL)
        return -ENOMEM;
    memcpy(*to, from, (size_t)n * sizeof **to);
    return 0;
}

int uds_policy_init(uds_policy *p, const uint32_t *uids, int n_uids, const uint32_t *gids,
                    int n_gids)
{
    int rc;
    p->gids = NULL;
    if ((rc = copy_ids(uids, n_uids, &p->uids)) < 0 || (rc = copy_ids(gids, n_gids, &p->gids)) < 0) {
        uds_policy_free(p);
        return rc;
    }
    p->n_uids = n_uids;
    p->n_gids = n_gids;
    return 0;
}

void uds_policy_free(uds_policy *p)
{
    free(p->uids);
    free(p->gids);
    p->uids = p->gids = NULL;
    p->n_uids = p->n_gids = 0;
}

int uds_policy_allows(const uds_policy *p, uint32_t uid, uint32_t gid)
{
    if (p->n_uids == 0 && p->n_gids == 0)
        return 1;
    for (int i = 0; i < p->n_uids; i++)
        if (p->uids[i] == uid)
            return 1;
    for (int i = 0; i < p->n_gids; i++)
        if (p->gids[i] == gid)
            return 1;
    return 0;
}

/* 1 if a supplementary group of fd's peer (SO_PEERGROUPS) is among gids[0..n), else 0. */
static int in_peer_groups(int fd, const uint32_t *gids, int n)
{
    gid_t small[64], *groups = small;
    socklen_t len = sizeof small;
    int found = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0) {
        if (errno != ERANGE || (groups = malloc(len)) == NULL)
            return 0; /* no supplementary groups known: only the primary one counts */
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0)
            len = 0;
    }
    for (size_t i = 0; i < len / sizeof *groups && !found; i++)
        for (int j = 0; j < n && !found; j++)
            found = groups[i] == gids[j];
    if (groups != small)
        free(groups);
    return found;
}

int uds_policy_allows_peer(const uds_policy *p, int fd, uint32_t uid, uint32_t gid)
{
    return uds_policy_allows(p, uid, gid) || (p->n_gids > 0 && in_peer_groups(fd, p->gids, p->n_gids));
}
