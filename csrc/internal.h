/*
 * internal.h - what the core's files share and the outside never sees. Its sections follow the
 * layering of csrc/README.md, bottom first: the leaves (buffers, ancillary data, the peer
 * table, the poller, timers, sockets, scratch), which know nothing of a server, in leaves.h;
 * then the server state and the operations each socket kind provides; then the connections of
 * the connection kinds (state, reading, writing). A file calls only functions of files below
 * its own.
 */
#ifndef UDS_INTERNAL_H
#define UDS_INTERNAL_H

#ifndef _GNU_SOURCE
#error "define _GNU_SOURCE before including internal.h (struct ucred, accept4, ...)"
#endif
#include "uds.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>

/* Bounded work per readiness and per turn, so one busy client cannot starve the rest. */
#define UDS_ACCEPT_BUDGET 64          /* accepts per master-socket readiness */
#define UDS_READ_CHUNK (64 * 1024)    /* bytes asked for by one read into a connection's buffer */
#define UDS_ARENA_READ (256 * 1024)   /* ... into the arena: what a client sent in one go is read,
                                       * answered and written back together, in one write */
#define UDS_READ_BUDGET (256 * 1024)  /* bytes read from one connection per readiness (a large
                                       * u32 frame in progress is read in up to this much) */
#define UDS_TURN_READ_BUDGET (256 * 1024) /* bytes read per turn, across connections: past it,
                                         * the connections still readable wait for the next
                                         * turn, read first then (see uds_server.turn_read) */
#define UDS_CONN_MSGS_PER_TURN 128    /* messages one connection delivers per turn */
#define UDS_WRITE_THROUGH_MIN (1024 * 1024) /* payloads this big try the socket before the
                                       * buffer. Smaller ones are copied and leave with the
                                       * turn's others in one write: a reader takes them as
                                       * they were written, and 64 KiB replies in a write each
                                       * cost the C load generator a fifth more than in one */
#define UDS_SMALL_SEND 4096           /* replies this small, with nothing waiting before them,
                                       * are sent at once from one stack copy */
#define UDS_ARENA_SIZE (2 * 1024 * 1024) /* the shared read arena (see uds_server.arena): it
                                         * holds about 32 reads of 64 KiB a turn, each whole */
#define UDS_ARENA_MIN_READ (16 * 1024) /* arena room below which reads use their own buffers */
#define UDS_EPOLL_BATCH 256           /* readiness events taken per epoll_wait */
#define UDS_LINGER_DISCARD (1024 * 1024) /* unread bytes dropped at close, at most */
#define UDS_HIGH_WATER_MAX (1024 * 1024) /* output high-water mark, at most */
#define UDS_ACCEPT_BACKOFF_MIN 50     /* ms before accepting again after running out of fds */
#define UDS_ACCEPT_BACKOFF_MAX 500    /* ... doubling up to this */
#define UDS_PACKETS_PER_READ 64       /* SEQPACKET: packets read per readiness, at most */
#define UDS_PACKETS_PER_SEND 64       /* SEQPACKET: packets given to one sendmmsg(), at most */
#define UDS_FD_OUT_MAX 4096           /* descriptors handed out per batch, at most */
#define UDS_DGRAMS_PER_READ 256       /* DGRAM: datagrams read per readiness, at most */
#define UDS_RETRY_MIN_MS 1            /* DGRAM: replies to a full peer are retried after this */
#define UDS_RETRY_MAX_MS 64           /* ... doubling up to this while none goes out */
#define UDS_SCRATCH_KEEP (256 * 1024) /* scratch bytes kept resident after a large message */
#define UDS_PROXY_HEADER_MS 10000     /* proxy_protocol: the header's deadline if frame_timeout_ms
                                       * is 0 (none); else it is frame_timeout_ms */

/* Counters may be read by another thread: store them whole. */
#define UDS_COUNT(field, delta) __atomic_store_n(&(field), (field) + (delta), __ATOMIC_RELAXED)

#include "leaves.h"

/* ==== the server ============================================================================ */

typedef struct uds_conn uds_conn;

/* How a message is sent (uds_kind_ops.send). */
#define UDS_SEND_PUSH 0  /* uds_send(): bounded by max_output */
#define UDS_SEND_REPLY 1 /* uds_reply(): may pass it (see there) */
#define UDS_SEND_NOW 2   /* a reply that is the last of its turn: to the socket at once, if
                          * nothing waits before it (else as UDS_SEND_REPLY) */

/* What each socket kind does for the server (server.c, batch.c): one table per kind
 * (uds_conn_kind in conn_server.c, uds_dgram_kind in dgram_server.c). (slot, id) names a
 * connection or a DGRAM peer; a call for one that is finished returns -ENOTCONN. */
typedef struct uds_kind_ops {
    /* The kind's part of a turn (see uds_poll()). */
    int (*poll)(uds_server *s, uds_event *ev, int cap, int timeout_ms);
    /* uds_send() (how UDS_SEND_PUSH), uds_reply() (_REPLY or _NOW), uds_send_fds() (nfds). */
    int (*send)(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                const int *fds, int nfds, int how);
    /* Replies to one peer's run of events, as uds_reply_batch() describes; returns failures. */
    int (*reply_run)(uds_server *s, int slot, uint64_t id, const char *data,
                     const int16_t *lens, int n, int *rcs);
    int (*close)(uds_server *s, int slot, uint64_t id, int reason);
    int (*peer_address)(uds_server *s, int slot, uint64_t id, char *name, size_t *len);
    /* Where the peer's counters pointer is (see uds_conn_set_stats()), or NULL. */
    uds_stats **(*stats)(uds_server *s, int slot, uint64_t id);
    int (*hold)(uds_server *s, int slot, uint64_t id, int hold); /* uds_hold() */
    int (*timeout)(const uds_server *s); /* uds_timeout(), the clock read already */
    /* Before uds_retire()'s shutdown: makes its connections be handed back rather than closed;
     * -EOPNOTSUPP if the kind cannot. */
    int (*retire)(uds_server *s);
    int (*detach)(uds_server *s, int slot, uint64_t id); /* uds_conn_detach() */
    /* Starts the graceful shutdown (see uds_shutdown()); the socket file is gone already and
     * the master socket out of epoll. Returns 1 if the kind still needs the master socket
     * (DGRAM: replies go from it; a handoff drain reads it), 0 if it may be closed now. */
    int (*shutdown)(uds_server *s);
    /* Frees what the kind holds, closing every descriptor, with no events. */
    void (*free)(uds_server *s);
} uds_kind_ops;

extern const uds_kind_ops uds_conn_kind;  /* STREAM and SEQPACKET */
extern const uds_kind_ops uds_dgram_kind; /* DGRAM */

struct uds_server {
    const uds_kind_ops *kind; /* the kind's side of each call */
    uds_config cfg;         /* a copy of the caller's (its lists point into policy) */
    char path[108];         /* the socket file's name ("" if none of ours: abstract, adopted) */
    int sock_type;          /* SOCK_STREAM, SOCK_SEQPACKET or SOCK_DGRAM */
    int inet;               /* TCP: an internet socket (no descriptors, no credentials) */
    int listen_fd;          /* the master socket (DGRAM: the socket), -1 once closed */
    int saved_flags;        /* adopted master socket: its file status flags to put back; else -1 */
    dev_t file_dev;         /* identity of the socket file we made */
    ino_t file_ino;
    uds_policy policy;      /* the uid/gid policy */
    uds_poller poller;
    uds_scratch scratch;
    int *fd_out;            /* descriptors handed out with this batch's events */
    int fd_out_n;
    int shutting_down;      /* uds_shutdown() was called */
    int retiring;           /* ... by uds_retire(): connections are handed back, not closed */
    uint64_t turn;          /* uds_poll() calls so far */
    uint64_t now_ms;        /* the clock, read once per turn */
    uint64_t next_id;       /* id of the next connection or peer */
    int live;               /* connections (peers) not yet reported closed, and 1 for a DGRAM
                             * shutdown still reading what was sent before it */
    char *arena;            /* reads land here back to back; messages point into it; reset at
                             * the start of each turn, so idle peers hold no input buffer */
    size_t arena_used;
    size_t turn_read;       /* bytes read from connections in this turn. Past
                             * UDS_TURN_READ_BUDGET, a turn reads no more: what it read, the
                             * bytes objects made of it and the replies sent from those stay in
                             * the CPU's cache (64 KiB messages from 16 clients: 18 us of server
                             * CPU per message instead of 22 with every ready one read at once) */
    uds_server_stats stats;
    uds_pool pool;          /* large buffers kept warm between connections and messages */
    uds_tlist idle;         /* connections (peers) by idle deadline */
    uds_tlist linger;       /* by flush deadline: closing ones, and open connections owed
                             * replies past max_output (the deadline to take some) */
    uint64_t drain_until;   /* shutting down: what waits on the master socket (datagrams, clients
                             * handed over) is still taken until none is left or this deadline */
    uds_ready ready[UDS_EPOLL_BATCH]; /* what the last wait reported */

    /* The connection kinds (conn*.c) */
    int packets;            /* SEQPACKET: the kernel keeps message boundaries (one packet is one
                             * message); else a byte stream cut by the framing */
    uds_conn **conns;       /* indexed by fd */
    int nconns;             /* length of conns */
    uds_conn *pending_head, *pending_tail; /* connections with work to do before the wait */
    uds_conn *flush_head;   /* connections with output queued since the last flush */
    uds_conn *finished;     /* reported closed: freed at the start of the next turn */
    uds_tlist frames;       /* connections with an incomplete frame, by frame deadline */
    size_t high_water;      /* output at which reading pauses */
    int accept_paused;      /* out of descriptors: the master socket is out of epoll */
    uint64_t accept_retry_ms; /* when to try accepting again */
    int accept_backoff_ms;  /* the next pause's length */

    /* The DGRAM kind (dgram_server.c) */
    uds_addr_table peers;
    struct uds_peer *closing; /* peers closing */
    struct uds_peer *retry;   /* peers with replies queued */
    uint64_t retry_at;        /* when to retry them (0: none) */
    int retry_backoff_ms;
    uds_buf big;              /* this turn's datagram that did not fit the arena */
};

/* Hands n descriptors out with event e: returns where to put them (room for n must be left:
 * UDS_FD_OUT_MAX - fd_out_n), or NULL for n == 0. Inline: every message passes here. */
static inline int *uds_fd_out(uds_server *s, uds_event *e, int n)
{
    int *at = n > 0 ? s->fd_out + s->fd_out_n : NULL;
    e->nfds = n;
    e->fds = at;
    s->fd_out_n += n;
    return at;
}

/* A new event of this type at ev[*n] (counted), every other field zero. */
static inline uds_event *uds_event_next(uds_event *ev, int *n, int type, int slot, uint64_t id)
{
    uds_event *e = &ev[(*n)++];
    *e = (uds_event){.type = type, .slot = slot, .id = id};
    return e;
}

/* ==== the DATAGRAM kind's peers (dgram_peer.c) ============================================== */

/* Peer flags. */
#define UDS_PF_CLOSING 0x1u /* finish once its queued replies are out (or given up) */
#define UDS_PF_FINAL 0x2u   /* its CLOSED event was emitted */
#define UDS_PF_REFUSED 0x4u /* refused: kept (silent) until it expires, its datagrams dropped */
#define UDS_PF_RETRY 0x8u   /* on the retry list */

typedef struct uds_peer uds_peer;
struct uds_peer {
    uds_addr_key key;         /* its address, where replies go, and its slot (first: the table
                               * hands back keys) */
    unsigned flags;           /* UDS_PF_* */
    uint64_t id;              /* unique for the server's lifetime (shared with connections) */
    struct ucred creds;       /* the process behind the address (another one: another peer) */
    int reason, err;          /* closing: why */
    uds_stats *stats;         /* where the counters go: own_stats or the caller's */
    uds_stats own_stats;
    uds_tnode lru;            /* by last traffic: idle expiry, and who is forgotten first */
    uds_tnode linger;         /* closing with replies queued: the flush deadline */
    struct uds_dgram *out_head, *out_tail; /* replies waiting for room in its queue */
    size_t out_bytes;         /* their bytes */
    uds_peer *close_next;     /* closing list */
    uds_peer *retry_next;     /* retry list */
};

#define UDS_PEER_OF(node, field) ((uds_peer *)((char *)(node) - offsetof(uds_peer, field)))

/* A new peer for a sender at key's address (hash set) with these credentials, in the table and
 * counted live (its CONNECTED event is the caller's to emit). NULL: no memory. */
uds_peer *uds_peer_new(uds_server *s, const uds_addr_key *key, const struct ucred *creds);
/* The peer (slot, id) if it is not reported closed yet, else NULL. */
uds_peer *uds_peer_find(const uds_server *s, int slot, uint64_t id);
/* Traffic: renews its idle deadline (and its place in the least-recently-active order). */
void uds_peer_touch(uds_server *s, uds_peer *p);
/* Queues or sends one datagram to p, as uds_send() describes. */
int uds_peer_send(uds_server *s, uds_peer *p, const char *data, size_t len, const int *fds,
                  int nfds);
/* Retries the queued replies of full peers, when the back-off says so. */
void uds_peer_retry_full(uds_server *s);
/* Drops the replies queued for p (closing the descriptors they hold). */
void uds_peer_give_up_replies(uds_peer *p);
/* Starts closing p: it finishes once its queued replies are out or its flush deadline passes
 * (at once if nothing is queued: the turn reports it). */
void uds_peer_close(uds_server *s, uds_peer *p, int reason, int err);
/* Emits p's CLOSED event at ev[n] and forgets it; a refused peer is kept, silent, until it
 * expires, so that its datagrams cost nothing more. Returns n + 1. */
int uds_peer_report_closed(uds_server *s, uds_peer *p, uds_event *ev, int n);
/* Forgets p at once, whatever it was doing: reports it closed for reason (unless it was
 * already reported), gives up what was queued for it. Returns n. */
int uds_peer_forget(uds_server *s, uds_peer *p, int reason, uds_event *ev, int n);
/* Takes p out of every list and the table, and frees it. */
void uds_peer_free(uds_server *s, uds_peer *p);
/* Frees every peer, without events. */
void uds_peer_free_all(uds_server *s);

/* ==== connections of the connection kinds =================================================== */

/* Connection flags. */
#define UDS_CF_NO_READ 0x01u   /* reading stopped for good: EOF, closing or shutting down */
#define UDS_CF_EOF 0x02u       /* the peer closed its writing end */
#define UDS_CF_CLOSING 0x04u   /* close once drained; reason is set */
#define UDS_CF_DEAD 0x10u      /* the socket failed: close without flushing */
#define UDS_CF_FINAL 0x20u     /* its CLOSED event was emitted; freed at the next turn */
#define UDS_CF_PENDING 0x40u   /* on the pending list */
#define UDS_CF_FLUSH 0x80u     /* on the flush list */
#define UDS_CF_WANT_OUT 0x200u /* EPOLLOUT registered: output waits for room */
#define UDS_CF_POLLED 0x400u   /* registered with epoll */
#define UDS_CF_PAUSED 0x800u   /* output at the high-water mark: no reading, no delivering */
#define UDS_CF_FRAMES 0x1000u  /* complete frames may wait in in: read no more until delivered */
#define UDS_CF_DRAIN 0x2000u   /* shutting down: read until the queue is empty once, then stop */
#define UDS_CF_HELD 0x4000u    /* UDS_HOLD_READ: the caller has it neither read nor delivered */
#define UDS_CF_OWED 0x8000u    /* UDS_HOLD_OPEN: the caller owes it replies: not finished */
#define UDS_CF_HIDDEN 0x10000u /* proxy_protocol: its PROXY header is not whole yet, so it is
                                * not reported (no CONNECTED event yet, no message) */
#define UDS_CF_MOVE 0x20000u   /* uds_retire(): handed back once idle; read only to the end of
                                * the frame it has begun */
#define UDS_CF_MOVED 0x40000u  /* handed back: its socket is the caller's, never closed here */
#define UDS_CF_READ_DUE 0x80000u /* readable, left unread when the turn's read budget ran out:
                                  * pending, read first in the next turn */

struct uds_conn {
    int fd;                 /* the data socket; also its slot */
    unsigned flags;         /* UDS_CF_* */
    uint64_t id;            /* unique for the server's lifetime */
    uds_buf in;             /* received bytes not yet consumed that outlive a turn: a partial
                             * frame, or frames held back; unallocated otherwise */
    const char *view;       /* this turn's read, in the server's arena, not yet parsed (in is
                             * empty then); NULL otherwise */
    size_t view_len;
    uds_buf out;            /* framed bytes waiting to be written */
    size_t scan;            /* line framing: bytes of in known to hold no '\n' */
    uint64_t msg_turn;      /* the turn that last handed out a pointer into in */
    unsigned turn_msgs;     /* messages delivered in msg_turn */
    int reason;             /* closing: UDS_CLOSE_* */
    int err;                /* closing with UDS_CLOSE_ERROR: the errno */
    uint64_t rx_total;      /* bytes received so far: stream offsets of the input */
    uint64_t tx_total;      /* bytes queued for output so far: stream offsets of the output */
    uds_fdq in_fds;         /* descriptors received, not yet delivered, each at the offset of
                             * the last byte of the read that brought it */
    uds_fdq out_fds;        /* our duplicates of descriptors to send, each at the offset of the
                             * first byte of its message */
    uint64_t bad_fds_at;    /* 0, or 1 + the offset from which input came with descriptors over
                             * the limit: frames reaching it are refused (UDS_CLOSE_TOO_MANY_FDS) */
    uds_stats *stats;       /* where the counters go: own_stats or the caller's */
    uds_stats own_stats;    /* counters until uds_conn_set_stats() */
    uds_tnode linger;       /* closing: the flush deadline; open, owed replies past
                             * max_output: the deadline to take some */
    uds_tnode idle;         /* idle timeout, renewed by traffic */
    uds_tnode frame;        /* frame timeout, while a frame is incomplete */
    uds_conn *pending_next; /* pending list: has work to do before the next wait */
    uds_conn *flush_next;   /* flush list: output queued since the last flush */
    uds_conn *finished_next; /* finished list: freed at the start of the next turn */
    struct sockaddr_storage *origin; /* proxy_protocol: the client its PROXY header named
                                      * (NULL: the socket's own peer stands) */
};

/* ---- connection state (conn.c) ------------------------------------------------------------ */

/* Registers an accepted socket as a connection (with epoll, in conns[]). NULL: no memory. */
uds_conn *uds_conn_new(uds_server *s, int fd);
/* The live connection (slot, id): not reported closed yet. NULL otherwise. */
uds_conn *uds_conn_find(const uds_server *s, int slot, uint64_t id);
/* Puts c on the pending list: it has frames to deliver or may be finished. */
void uds_conn_mark_pending(uds_server *s, uds_conn *c);
/* Puts c on the flush list: its output goes at the start of the next turn. */
void uds_conn_schedule_flush(uds_server *s, uds_conn *c);
void uds_conn_touch(uds_server *s, uds_conn *c);         /* traffic: renew the idle deadline */
void uds_conn_stop_reading(uds_server *s, uds_conn *c, unsigned also_flags); /* for good */
void uds_conn_set_want_out(uds_server *s, uds_conn *c, int on); /* wait for EPOLLOUT, or not */
void uds_conn_pause_reading(uds_server *s, uds_conn *c); /* output at the high-water mark */
void uds_conn_resume_if_drained(uds_server *s, uds_conn *c);
void uds_conn_hold(uds_server *s, uds_conn *c, int hold); /* see uds_hold() */
/* Starts or stops the frame deadline: it runs while an incomplete frame waits for bytes the
 * client owes; a frame delivered restarts it. */
void uds_conn_time_frame(uds_server *s, uds_conn *c, int delivered);
/* Moves a read still unparsed out of the arena into c's own buffer (the arena is reset at the
 * next turn). */
void uds_conn_keep_unparsed(uds_server *s, uds_conn *c);
/* Closes once nothing more is owed. keep_input: what the client sent before now is still
 * delivered, including what waits unread in the socket (shutdown); otherwise it is dropped and
 * reading stops at once. */
void uds_conn_close(uds_server *s, uds_conn *c, int reason, int err, int keep_input);
/* The socket is broken (or the connection must go now): close without flushing. */
void uds_conn_fail(uds_server *s, uds_conn *c, int reason, int err);
/* Whether c holds input not yet delivered (a frame begun, frames held back, a read unparsed). */
int uds_conn_holds_input(const uds_conn *c);
/* Starts handing c back (uds_retire()): reading stops at a frame boundary (at once if it holds
 * no input), and it is handed back once idle, or closed if it is not within flush_timeout. */
void uds_conn_move(uds_server *s, uds_conn *c);
/* A moving connection was served: reading stops if it holds no frame begun (what its client
 * sends next stays in the socket). Returns whether it is idle, as uds_conn_detach() says. */
int uds_conn_move_settle(uds_server *s, uds_conn *c);
/* Whether c is idle as uds_conn_detach() says: it could leave now. */
int uds_conn_idle(const uds_server *s, const uds_conn *c);
/* Takes idle c out of the server, its socket left open: returns that socket (the caller's
 * now). c is finished (freed at the next turn, its socket not closed), counted as MOVED. */
int uds_conn_hand_back(uds_server *s, uds_conn *c);
/* uds_conn_hand_back() reported: a CLOSED event at ev[n], reason MOVED, with the socket (one
 * descriptor of room must be left in the batch). Returns n + 1. */
int uds_conn_report_moved(uds_server *s, uds_conn *c, uds_event *ev, int n);
/* Emits c's CLOSED event at ev[n] and moves it to the finished list; returns n + 1. */
int uds_conn_report_closed(uds_server *s, uds_conn *c, uds_event *ev, int n);
/* Frees the finished connections (closing their descriptors) at the start of a turn. */
void uds_conn_free_finished(uds_server *s);
/* Frees every connection, finished or not, without events. */
void uds_conn_free_all(uds_server *s);

/* ---- reading and delivering (conn_read.c) ------------------------------------------------- */

/* Reads what c's readiness allows (bounded), and puts it on the pending list. */
void uds_conn_read(uds_server *s, uds_conn *c);
/* Serves a pending connection: delivers its frames as MESSAGE events from ev[n] while the batch
 * has room, and reports it closed once nothing more is owed. Returns the new n. */
int uds_conn_serve(uds_server *s, uds_conn *c, uds_event *ev, int n, int cap);

/* ---- queueing and writing (conn_write.c) -------------------------------------------------- */

/* Writes c's output while the socket takes it; waits for EPOLLOUT for the rest. */
void uds_conn_flush(uds_server *s, uds_conn *c);
/* Queues a framed message: how UDS_SEND_PUSH as uds_send(), else as uds_reply(). */
int uds_conn_send(uds_server *s, uds_conn *c, const char *data, size_t len, int how);
/* Queues up to n framed replies at once (reply i has lens[i] bytes, -1 for none, back to back
 * in data): one reservation and one accounting when they all fit under max_output, else
 * uds_conn_send() one by one. rcs[i] gets what uds_conn_send() would return for reply i (0
 * for none); returns how many failed. */
int uds_conn_send_run(uds_server *s, uds_conn *c, const char *data, const int16_t *lens, int n,
                      int *rcs);
/* ... with descriptors (see uds_send_fds). */
int uds_conn_send_fds(uds_server *s, uds_conn *c, const char *data, size_t len, const int *fds,
                      int nfds);

#endif /* UDS_INTERNAL_H */
