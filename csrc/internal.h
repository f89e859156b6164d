/*
 * internal.h - what the core's files share and the outside never sees: the server and
 * connection structs, the byte buffer, the epoll backend and the socket helpers.
 */
#ifndef UDS_INTERNAL_H
#define UDS_INTERNAL_H

#include "uds.h"

#include <sys/stat.h>

/* Bounded work per readiness, so one busy client cannot starve the rest. */
#define UDS_ACCEPT_BUDGET 64        /* accepts per master-socket readiness */
#define UDS_READ_BUDGET (256 * 1024) /* bytes read from one connection per readiness */
#define UDS_READ_MIN (16 * 1024)    /* free room ensured before each read */
#define UDS_BUF_KEEP (256 * 1024)   /* an emptied buffer larger than this is given back */
#define UDS_EPOLL_BATCH 256         /* readiness events taken per epoll_wait */
#define UDS_LINGER_DISCARD (1024 * 1024) /* unread bytes dropped at close, at most */

/* ---- byte buffer (buf.c) --------------------------------------------------------------- */

/* Bytes live in data[start..end); capacity cap. Grows geometrically, allocated lazily. */
typedef struct uds_buf {
    char *data;
    size_t start; /* first unconsumed byte */
    size_t end;   /* one past the last byte */
    size_t cap;   /* bytes allocated */
} uds_buf;

/* Makes room for at least n bytes after end, moving the live bytes to the front first if that
 * is enough. May move data: no pointer into the buffer survives it. Returns 0 or -ENOMEM. */
int uds_buf_reserve(uds_buf *b, size_t n);

/* Appends n bytes. Returns 0 or -ENOMEM (the buffer is unchanged then). */
int uds_buf_append(uds_buf *b, const void *p, size_t n);

/* Frees the storage; the buffer is empty and unallocated afterwards. */
void uds_buf_release(uds_buf *b);

static inline size_t uds_buf_len(const uds_buf *b) { return b->end - b->start; }

/* ---- epoll backend (poller.c) -------------------------------------------------------------- */

#define UDS_POLL_IN 1u
#define UDS_POLL_OUT 2u
#define UDS_POLL_HUP 4u /* hang-up or error: reported whatever the interest */

typedef struct uds_ready {
    int fd;          /* the descriptor that is ready */
    unsigned events; /* UDS_POLL_* */
} uds_ready;

/* Returns an epoll descriptor (close-on-exec) or -errno. */
int uds_poller_open(void);
/* Sets the interest of fd to events (0: none, but stay registered). add: first time.
 * Return 0 or -errno. */
int uds_poller_add(int ep, int fd, unsigned events);
int uds_poller_mod(int ep, int fd, unsigned events);
int uds_poller_del(int ep, int fd);
/* Waits up to timeout_ms for at most max ready descriptors, fills out[]. Returns how many,
 * 0 on timeout or when a signal interrupted the wait, or -errno. */
int uds_poller_wait(int ep, uds_ready *out, int max, int timeout_ms);

/* ---- socket helpers (sock.c) --------------------------------------------------------------- */

/* The master socket's life: see uds_server_new() for the contract. On success sets *fd and
 * the device/inode of the socket file it made. */
int uds_sock_listen(const char *path, unsigned mode, int backlog, int *fd, dev_t *dev,
                    ino_t *ino);

/* Removes path if it is still the socket file (dev, ino). Returns 1 if removed, 0 if not
 * (gone or replaced by another file), -errno on error. */
int uds_sock_unlink_if_same(const char *path, dev_t dev, ino_t ino);

/* Reads the peer's credentials (SO_PEERCRED). Returns 0 or -errno. */
int uds_sock_peercred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid);

/* ---- server and connections (server.c) ------------------------------------------------------ */

/* Connection flags. */
#define UDS_CF_NO_READ 0x01u  /* reading stopped: EOF, closing or shutting down */
#define UDS_CF_EOF 0x02u      /* the peer closed its writing end */
#define UDS_CF_CLOSING 0x04u  /* close once drained; reason is set */
#define UDS_CF_NO_SEND 0x08u  /* the application closed it: refuse further sends */
#define UDS_CF_DEAD 0x10u     /* the socket failed: close without flushing */
#define UDS_CF_FINAL 0x20u    /* its CLOSED event was emitted; freed at the next turn */
#define UDS_CF_ATTN 0x40u     /* on the attention list */
#define UDS_CF_DIRTY 0x80u    /* on the dirty list */
#define UDS_CF_LINGER 0x100u  /* on the linger list */
#define UDS_CF_WANT_OUT 0x200u /* EPOLLOUT registered: output waits for room */

typedef struct uds_conn uds_conn;
struct uds_conn {
    int fd;                 /* the data socket; also its slot */
    unsigned flags;         /* UDS_CF_* */
    uint64_t id;            /* unique for the server's lifetime */
    uds_buf in;             /* received bytes not yet consumed */
    uds_buf out;            /* framed bytes waiting to be written */
    size_t scan;            /* line framing: bytes of in known to hold no '\n' */
    uint64_t msg_turn;      /* the turn that last handed out a pointer into in */
    uint64_t deadline_ms;   /* closing: give up flushing at this time (monotonic) */
    int reason;             /* closing: UDS_CLOSE_* */
    int err;                /* closing with UDS_CLOSE_ERROR: the errno */
    uds_stats *stats;       /* where the counters go: own_stats or the caller's */
    uds_stats own_stats;    /* counters until uds_conn_set_stats() */
    uds_conn *attn_next;    /* attention list: has work to do before the next wait */
    uds_conn *dirty_next;   /* dirty list: output queued since the last flush */
    uds_conn *linger_prev;  /* linger list (doubly linked, ordered by deadline) */
    uds_conn *linger_next;
    uds_conn *grave_next;   /* graveyard: finished, freed at the start of the next turn */
};

struct uds_server {
    uds_config cfg;         /* a copy of the caller's */
    char path[108];         /* the socket file's name */
    int listen_fd;          /* the master socket, -1 once closed */
    dev_t file_dev;         /* identity of the socket file we made */
    ino_t file_ino;
    int ep;                 /* the epoll descriptor */
    int wake_rd, wake_wr;   /* the wakeup pipe */
    int shutting_down;      /* uds_shutdown() was called */
    uint64_t turn;          /* uds_poll() calls so far */
    uint64_t next_id;       /* id of the next accepted connection */
    int live;               /* connections not yet reported closed */
    uds_conn **conns;       /* indexed by fd */
    int nconns;             /* length of conns */
    uds_conn *attn_head, *attn_tail;
    uds_conn *dirty_head;
    uds_conn *linger_head, *linger_tail;
    uds_conn *graveyard;
    uds_ready ready[UDS_EPOLL_BATCH]; /* what epoll_wait reported */
};

#endif /* UDS_INTERNAL_H */
