/*
 * leaves.h - the declarations of the core's leaves (csrc/README.md lists them), which know
 * nothing of a server, a connection or a peer: buffers, ancillary data, the peer table, the
 * poller, timers, sockets (Unix and TCP), scratch. Included by internal.h, which says the
 * rest; its constants of bounded work come first there.
 */
#ifndef UDS_LEAVES_H
#define UDS_LEAVES_H

#ifndef UDS_INTERNAL_H
#error "include internal.h, not leaves.h"
#endif

/* ==== leaves: none of these knows a server or a connection ================================= */

/* ---- byte buffer (buf.c) --------------------------------------------------------------- */

/* Bytes live in data[start..end); capacity cap. Grows geometrically, allocated lazily. */
typedef struct uds_buf {
    char *data;
    size_t start; /* first unconsumed byte */
    size_t end;   /* one past the last byte */
    size_t cap;   /* bytes allocated */
} uds_buf;

/* Large buffers given back, kept warm for the next connection that needs one. Connections give
 * their buffers back as soon as they are empty (an idle connection holds nothing); without the
 * pool, every large message would allocate, fault in and unmap a fresh buffer, since glibc
 * serves blocks this big with mmap(): that churn, not the copying, halved 64 KiB throughput. */
#define UDS_POOL_SLOTS 16
#define UDS_POOL_MIN (64 * 1024)          /* buffers at least this big are pooled */
#define UDS_POOL_BYTES (16 * 1024 * 1024) /* the pool holds at most this much */
#define UDS_BUF_FIRST 4096                /* a buffer's first size */
#define UDS_POOL_SMALL 256                /* first-size buffers kept, at most (1 MiB) */
typedef struct uds_pool {
    char *data[UDS_POOL_SLOTS];
    size_t cap[UDS_POOL_SLOTS];
    int n;        /* buffers held */
    size_t bytes; /* their capacity in all */
    /* Buffers of the first size, the one nearly every small reply takes: without them, a
     * client with one request in flight would cost a malloc() and a free() per message. */
    char *small[UDS_POOL_SMALL];
    int nsmall;
} uds_pool;

/* Makes room for at least n bytes after end, moving the live bytes to the front first if that
 * is enough; an unallocated buffer takes a pooled one if one fits. May move data: no pointer
 * into the buffer survives it. pool may be NULL. Returns 0 or -ENOMEM. */
int uds_buf_reserve(uds_buf *b, size_t n, uds_pool *pool);

/* Appends n bytes. Returns 0 or -ENOMEM (the buffer is unchanged then). */
int uds_buf_append(uds_buf *b, const void *p, size_t n, uds_pool *pool);

/* Gives the storage back (to the pool if it is large and the pool has room, else to malloc);
 * the buffer is empty and unallocated afterwards. pool may be NULL. */
void uds_buf_release(uds_buf *b, uds_pool *pool);

/* Frees what the pool holds. */
void uds_pool_free(uds_pool *pool);

static inline size_t uds_buf_len(const uds_buf *b) { return b->end - b->start; }

/* ---- ancillary data (msg.c) ------------------------------------------------------------------ */

/* Descriptors in arrival order, each with the stream offset it belongs to. An output queue
 * also holds, after each message's descriptors, UDS_FDQ_END at the offset where it ends. */
#define UDS_FDQ_END (-1)
typedef struct uds_fdq {
    int *fd;
    uint64_t *at;
    int head, n, cap; /* live entries: [head, n) */
} uds_fdq;

/* Appends fd. Returns 0 or -ENOMEM (fd is then not queued). */
int uds_fdq_push(uds_fdq *q, int fd, uint64_t at);
/* How many descriptors at the head belong before stream offset end. */
int uds_fdq_count_before(const uds_fdq *q, uint64_t end);
/* Takes the head descriptor off the queue (which must not be empty) and returns it. */
int uds_fdq_pop(uds_fdq *q);
/* Closes every descriptor queued and frees the storage. */
void uds_fdq_clear(uds_fdq *q);
static inline int uds_fdq_len(const uds_fdq *q) { return q->n - q->head; }
static inline uint64_t uds_fdq_head_at(const uds_fdq *q) { return q->at[q->head]; }

/* Duplicates fds[0..n) into out[0..n), close-on-exec (ours to send later; the caller keeps its
 * own). Returns 0, or -errno with nothing left open (-EBADF for a descriptor not open). */
int uds_fds_dup(const int *fds, int n, int *out);
/* Closes fds[0..n). */
void uds_fds_close(const int *fds, int n);

/* What one recvmsg() brought besides bytes. */
typedef struct uds_recv_info {
    int want_addr;            /* in: fill addr / addr_len with the sender's address */
    int want_creds;           /* in: make room for SCM_CREDENTIALS (SO_PASSCRED is on) */
    int real_len;             /* in: return a message's real length even if cut (MSG_TRUNC) */
    int flags;                /* out: msg_flags (MSG_TRUNC, MSG_CTRUNC) */
    int nfds;                 /* out: descriptors received, close-on-exec, in fds */
    int fds[UDS_MAX_FDS];
    int has_creds;            /* out: creds holds the sender's credentials */
    struct ucred creds;
    struct sockaddr_un addr;  /* out: the sender's address, with want_addr */
    socklen_t addr_len;
} uds_recv_info;

/* One non-blocking recvmsg() into iov[0..iovcnt), with room for max_fds descriptors (more set
 * MSG_CTRUNC in info->flags; those that came are still in info->fds). EINTR is retried.
 * Returns the bytes read (the real length with info->real_len), or -errno (-EAGAIN too). */
ssize_t uds_recv_msg(int fd, struct iovec *iov, int iovcnt, int max_fds, uds_recv_info *info);
/* Closes the descriptors info holds. */
void uds_recv_info_close_fds(uds_recv_info *info);
/* One non-blocking sendmsg() of data[0..len) with fds[0..nfds) attached, to `to` if given.
 * No SIGPIPE; EINTR retried. Returns the bytes sent or -errno. */
ssize_t uds_send_msg(int fd, const char *data, size_t len, const int *fds, int nfds,
                     const struct sockaddr_un *to, socklen_t tolen);

/* ---- the address table (addr_table.c) ---------------------------------------------------- */

/* What the table knows of an entry: embedded in the DATAGRAM kind's peer (struct uds_peer). */
typedef struct uds_addr_key {
    int slot;                /* index in the table's slots: unique among its entries */
    uint64_t hash;           /* of the address */
    struct sockaddr_un addr; /* the address */
    socklen_t addr_len;
} uds_addr_key;

/* Entries by slot, and an index from address to slot (open addressing, linear probing, no
 * tombstones; index entries are slot + 1, 0: empty). */
typedef struct uds_addr_table {
    uds_addr_key **slots; /* by slot; NULL: free */
    int cap, n;           /* slots allocated, entries held */
    int32_t *index;
    size_t index_size;    /* a power of two, at least twice n */
} uds_addr_table;

/* Sets k->hash from its address. */
void uds_addr_key_hash(uds_addr_key *k);
/* The entry with the address of k (whose hash is set), or NULL. */
uds_addr_key *uds_addr_table_find(const uds_addr_table *t, const uds_addr_key *k);
/* Adds k (its address and hash set) in a free slot, which it sets. Returns 0 or -ENOMEM. */
int uds_addr_table_add(uds_addr_table *t, uds_addr_key *k);
/* Takes k out of the table (its slot is free again). */
void uds_addr_table_remove(uds_addr_table *t, const uds_addr_key *k);
/* Frees the table's storage (not the entries). */
void uds_addr_table_free(uds_addr_table *t);
/* The entry in slot, or NULL. */
static inline uds_addr_key *uds_addr_table_at(const uds_addr_table *t, int slot)
{
    return slot >= 0 && slot < t->cap ? t->slots[slot] : NULL;
}

/* ---- epoll backend and the wakeup pipe (poller.c) ------------------------------------------ */

#define UDS_POLL_IN 1u
#define UDS_POLL_OUT 2u
#define UDS_POLL_HUP 4u /* hang-up or error: reported whatever the interest */

typedef struct uds_ready {
    int fd;          /* the descriptor that is ready */
    unsigned events; /* UDS_POLL_* */
} uds_ready;

typedef struct uds_poller {
    int ep;               /* the epoll descriptor */
    int wake_rd, wake_wr; /* the wakeup pipe: a byte written makes the wait return */
} uds_poller;

/* Opens the epoll descriptor and the wakeup pipe (close-on-exec, non-blocking). Returns 0 or
 * -errno (nothing left open). */
int uds_poller_open(uds_poller *p);
/* Closes both. A poller never opened (all -1) is fine. */
void uds_poller_close(uds_poller *p);
/* Sets the interest of fd to events (0: none, but stay registered). add: first time.
 * Return 0 or -errno. */
int uds_poller_add(const uds_poller *p, int fd, unsigned events);
int uds_poller_mod(const uds_poller *p, int fd, unsigned events);
int uds_poller_del(const uds_poller *p, int fd);
/* Waits up to timeout_ms for at most max ready descriptors and fills out[]; a wakeup is
 * drained here and not reported. spin_us > 0: while nothing is ready, polls without sleeping
 * for that long before it sleeps. Returns how many, 0 on timeout, a wakeup, or when a signal
 * interrupted the wait, or -errno. */
int uds_poller_wait(const uds_poller *p, uds_ready *out, int max, int timeout_ms, int spin_us);
/* Makes a wait in progress (or the next one) return. Thread-safe, async-signal-safe.
 * Returns 0 or -errno. */
int uds_poller_wake(const uds_poller *p);

/* ---- the clock and deadline lists (timers.c) ----------------------------------------------- */

/* Reads the monotonic clock into *now_ms, which never goes back. */
void uds_clock_update(uint64_t *now_ms);

/* A list ordered by deadline without sorting: every node of a list gets the same timeout, so
 * appending keeps the order, and expiry looks only at the head. O(1) everything. */
typedef struct uds_tnode {
    struct uds_tnode *prev, *next;
    uint64_t deadline_ms; /* monotonic */
    int linked;           /* on its list */
} uds_tnode;

typedef struct uds_tlist {
    uds_tnode *head, *tail;
} uds_tlist;

/* (Re)places n at the tail with the given deadline (not earlier than the others'). */
void uds_tlist_append(uds_tlist *l, uds_tnode *n, uint64_t deadline_ms);
/* Takes n off the list; a no-op if it is not on it. */
void uds_tlist_remove(uds_tlist *l, uds_tnode *n);
/* The head if its deadline has come, else NULL. */
uds_tnode *uds_tlist_due(const uds_tlist *l, uint64_t now_ms);

/* Timeouts in ms for a wait, -1 for none. The sooner of timeout and the head of l's deadline. */
int64_t uds_timeout_list(int64_t timeout, const uds_tlist *l, uint64_t now_ms);
/* The sooner of timeout and time at_ms (0 if it has come). */
int64_t uds_timeout_at(int64_t timeout, uint64_t at_ms, uint64_t now_ms);
/* timeout as epoll_wait() takes it. */
int uds_timeout_int(int64_t timeout);

/* ---- TCP sockets (sock_tcp.c) ------------------------------------------------------------ */

#define UDS_INET_NAME_MAX 56 /* "[" IPv6 "]:" port, and a NUL */

/* Makes a TCP socket bound to host (a numeric IPv4 or IPv6 address) and port (0: any free
 * one), SO_REUSEADDR, listening, non-blocking, close-on-exec; sets *fd. Returns 0, -EINVAL for
 * a host that is not a numeric address or a bad port or backlog, or -errno (-EADDRINUSE). */
int uds_sock_listen_tcp(const char *host, int port, int backlog, int *fd);
/* Sets the options of an accepted TCP connection: TCP_NODELAY if nodelay; keepalive_s > 0:
 * keepalive probes after that many idle seconds (see uds_config). Returns 0 or -errno. */
int uds_sock_tcp_options(int fd, int nodelay, int keepalive_s);
/* Writes an AF_INET or AF_INET6 address as "HOST:PORT" ("[HOST]:PORT" for IPv6) to name (room
 * for UDS_INET_NAME_MAX) and its length to *len. Returns 0, or -EAFNOSUPPORT for another
 * family. */
int uds_sock_inet_format(const struct sockaddr *sa, char *name, size_t *len);
/* The client address a PROXY header names (info->family 4 or 6) as a socket address. */
void uds_sock_proxy_addr(const uds_proxy_info *info, struct sockaddr_storage *ss);

/* ---- socket helpers and the uid/gid policy (sock.c) -------------------------------------- */

/* The master socket's life: see uds_server_new() for the contract. type: SOCK_STREAM,
 * SOCK_SEQPACKET (both listen) or SOCK_DGRAM. On success sets *fd and the device/inode of the
 * socket file it made (0 and 0 for an abstract name: no file). */
int uds_sock_listen(const char *path, int type, unsigned mode, int backlog, int *fd, dev_t *dev,
                    ino_t *ino);

/* Takes a socket made elsewhere (inherited, or the application's): an AF_UNIX socket (inet:
 * AF_INET or AF_INET6) of this type, bound, made to listen if it does not; or (_handoff) the
 * SOCK_SEQPACKET pair end clients are handed over on. Sets *fd to a close-on-exec duplicate,
 * non-blocking, and *saved_flags to the file status flags to restore when done. Returns 0 or
 * -errno (see uds_server_new()). */
int uds_sock_adopt(int fd, int type, int inet, int backlog, int *out, int *saved_flags);
int uds_sock_adopt_handoff(int fd, int *out, int *saved_flags);
/* Readies a client handed over as accept4() does ours: 0, or -EPROTOTYPE (not one of type). */
int uds_sock_take_handed(int fd, int type);

/* Writes fd's own address (peer: its peer's) as uds_server_address() describes, for a Unix
 * or an internet socket. Returns 0 or -errno. */
int uds_sock_name(int fd, int peer, char *name, size_t *len);
/* The same for an address at hand. Returns 0. */
int uds_sock_format_name(const struct sockaddr_un *sa, socklen_t salen, char *name, size_t *len);

/* Removes path if it is still the socket file (dev, ino). Returns 1 if removed, 0 if not
 * (gone or replaced by another file), -errno on error. */
int uds_sock_unlink_if_same(const char *path, dev_t dev, ino_t ino);

/* Reads and drops what waits unread in a stream socket about to be closed (at most
 * UDS_LINGER_DISCARD bytes), so that its peer sees end-of-file rather than a reset. */
void uds_sock_discard_unread(int fd);

/* Reads the peer's credentials (SO_PEERCRED); (-1, -1, -1) if they cannot be read. */
void uds_sock_peercred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid);

/* Who may connect: with no list, everyone; else a listed uid or a listed gid. */
typedef struct uds_policy {
    uint32_t *uids; /* copies of the caller's lists */
    int n_uids;
    uint32_t *gids;
    int n_gids;
} uds_policy;

/* Copies the lists. Returns 0, -EINVAL (a negative count, or NULL with a count) or -ENOMEM. */
int uds_policy_init(uds_policy *p, const uint32_t *uids, int n_uids, const uint32_t *gids,
                    int n_gids);
void uds_policy_free(uds_policy *p);
/* 1 if uid or gid is allowed, else 0. */
int uds_policy_allows(const uds_policy *p, uint32_t uid, uint32_t gid);
/* The same for the peer of a connected socket fd, whose supplementary groups (SO_PEERGROUPS)
 * count too. */
int uds_policy_allows_peer(const uds_policy *p, int fd, uint32_t uid, uint32_t gid);

/* ---- the scratch area (scratch.c) ------------------------------------------------------------ */

/* Where a message too big for the room a read has spills over (SEQPACKET, DGRAM): reserved
 * (mmap, no swap reserved) on first use and touched only as used. */
typedef struct uds_scratch {
    char *data;
    size_t len;
} uds_scratch;

/* Sets iov[] for one message of at most limit bytes: iov[0] the room at `at`, and iov[1] the
 * scratch area for what the room cannot hold. Returns the iovec count (1 or 2), or -ENOMEM. */
int uds_scratch_iov(uds_scratch *sc, size_t limit, struct iovec iov[2], char *at, size_t room);
/* A message spilled n bytes into the scratch area (now copied out): large spills give the
 * memory back. */
void uds_scratch_used(uds_scratch *sc, size_t n);
void uds_scratch_free(uds_scratch *sc);

#endif /* UDS_LEAVES_H */
