/*
 * uds.h - the C core of pyuds: a Unix-domain-socket server driven by one epoll loop.
 *
 * C99 + POSIX (Linux). Knows nothing of Python: the caller pulls batches of events with
 * uds_poll() and answers with uds_send() / uds_close(). The same loop serves TCP connections
 * (UDS_KIND_TCP), which are streams like a Unix stream's in every respect but the socket.
 *
 * Conventions (libuv's): every function that can fail returns >= 0 on success and -errno on
 * failure; nothing is left in errno. EINTR is retried inside, EAGAIN never leaves the core.
 * None of these functions is thread-safe except uds_wakeup(): one thread drives a server.
 *
 * The part between "cffi-begin" and "cffi-end" is handed to cffi's cdef() as it is, so it holds
 * only declarations cffi can parse; the compiler fills in the constant values.
 *
 * Layering: the files behind this API form layers, leaves (framing, buffers, sockets...) at the
 * bottom, this API at the top; no file calls a function of a file above its own. csrc/README.md
 * lists them in order.
 */
#ifndef UDS_H
#define UDS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* cffi-begin */

/* Framings of a SOCK_STREAM connection. */
#define UDS_FRAMING_U32 0  /* 4-byte big-endian payload length, then the payload */
#define UDS_FRAMING_LINE 1 /* payload bytes, then '\n'; the payload holds no '\n' */
#define UDS_FRAMING_RAW 2  /* whatever one read returns is one message */

/* Socket kinds (uds_config.kind). */
#define UDS_KIND_STREAM 0    /* SOCK_STREAM: connections, messages cut by the framing */
#define UDS_KIND_SEQPACKET 1 /* SOCK_SEQPACKET: connections, the kernel keeps boundaries */
#define UDS_KIND_DGRAM 2     /* SOCK_DGRAM: no connections; each sender address is a peer,
                              * reported like a connection (see dgram_server.c) */
#define UDS_KIND_TCP 3       /* TCP over IPv4 or IPv6: connections, messages cut by the framing;
                              * no descriptors, no credentials */

/* Event types filled in by uds_poll(). */
#define UDS_EV_CONNECTED 1 /* a client was accepted; pid/uid/gid hold its credentials */
#define UDS_EV_MESSAGE 2   /* a complete message; data/len locate its payload, fds/nfds the
                            * descriptors that came with it */
#define UDS_EV_CLOSED 3    /* the connection is gone; reason (and err) say why. Reason MOVED:
                            * it was handed back, its socket open, in fds[0] (see uds_retire()) */
#define UDS_EV_REFUSED 4   /* a client was closed before it became a connection (slot is -1):
                            * reason UNAUTHORIZED, the uid/gid policy refused it at accept
                            * (pid/uid/gid: who); reason PROXY_HEADER, it did not begin with a
                            * valid PROXY protocol header in time */

/* Why a connection closed (uds_event.reason). The core itself produces PEER, ERROR,
 * TOO_LARGE, SHUTDOWN and MOVED; the others are passed in by the caller through uds_close(). */
#define UDS_CLOSE_PEER 1          /* the peer closed its end or vanished */
#define UDS_CLOSE_ERROR 2         /* a socket error; err holds the errno */
#define UDS_CLOSE_TOO_LARGE 3     /* a frame exceeded max_message */
#define UDS_CLOSE_SHUTDOWN 4      /* the server shut down */
#define UDS_CLOSE_CLOSED 5        /* the application closed it */
#define UDS_CLOSE_REJECTED 6      /* the application refused it when it connected */
#define UDS_CLOSE_HANDLER_ERROR 7 /* the application's handler failed on its message */
#define UDS_CLOSE_IDLE_TIMEOUT 8  /* nothing received or sent for idle_timeout_ms */
#define UDS_CLOSE_FRAME_TIMEOUT 9 /* a frame took longer than frame_timeout_ms to arrive */
#define UDS_CLOSE_SLOW_CONSUMER 10 /* its unsent output would exceed max_output */
#define UDS_CLOSE_UNAUTHORIZED 11 /* refused by the uid/gid policy or the application */
#define UDS_CLOSE_TOO_MANY_FDS 12 /* it sent more descriptors with a message than max_fds */
#define UDS_CLOSE_EVICTED 13      /* DGRAM: forgotten to make room for a new peer */
#define UDS_CLOSE_PROXY_HEADER 14 /* TCP with proxy_protocol: no valid PROXY header came first, or
                                   * not within the header's deadline (never a connection) */
#define UDS_CLOSE_MOVED 15        /* handed back to the caller with its socket still open, to be
                                   * served elsewhere (uds_retire(), uds_conn_detach()) */
#define UDS_CLOSE_REASONS 16      /* length of uds_server_stats.closed */

/* Framing helpers. */

/* Finds the first complete frame at the start of buf[0..len).
 * For UDS_FRAMING_LINE, *scan carries between calls how many leading bytes are already known
 * to hold no '\n' (start at 0, reset to 0 after each frame), so a long line arriving in small
 * pieces is scanned once; other framings ignore it.
 * Returns the frame's size in bytes (> 0) and sets *payload_off / *payload_len;
 * 0 if the frame is not complete yet (for UDS_FRAMING_RAW: if len == 0);
 * -EMSGSIZE if its payload is, or would be, longer than max_payload (for u32 as soon as the
 * header is in; for line once max_payload + 1 bytes hold no '\n');
 * -EINVAL for an unknown framing. Reads nothing outside buf[0..len). */
ssize_t uds_frame_next(int framing, const char *buf, size_t len, size_t max_payload,
                       size_t *scan, size_t *payload_off, size_t *payload_len);

/* How many more bytes the frame that begins buf[0..len) needs, when the framing says so in
 * advance (u32, once the header is in): 0 if that is not known, the frame is complete, or it
 * is over max_payload (nothing is set aside for a frame that will be refused). */
size_t uds_frame_missing(int framing, const char *buf, size_t len, size_t max_payload);

/* The bytes that framing adds around a payload of len bytes: writes the header to hdr (room for
 * 4 bytes) and returns its size (0 if none), sets *trailer to the byte count that follows the
 * payload (1 for '\n', else 0).
 * Returns -EMSGSIZE if len does not fit the framing (u32: len > 0xFFFFFFFF), -EINVAL for an
 * unknown framing. The payload itself is not checked (see uds_frame_check). */
int uds_frame_header(int framing, size_t len, unsigned char *hdr, int *trailer);

/* Whether payload may be sent as one message in this framing: 0 if so; -EINVAL if a line
 * payload contains '\n' (the peer would see two messages); -EMSGSIZE if it is too long for the
 * header; -EINVAL for an unknown framing. */
int uds_frame_check(int framing, const char *payload, size_t len);

/* The PROXY protocol (HAProxy's, versions 1 and 2): what a balancer sends first on each
 * connection it makes to a server, naming the client it connected for. */
typedef struct uds_proxy_info {
    int version;        /* 1 or 2 */
    int family;         /* 4 (IPv4) or 6 (IPv6): src and dst hold the addresses; 0: the header
                         * names none (v1 UNKNOWN, v2 LOCAL, a v2 Unix or unspecified family),
                         * and the connection's own peer stands */
    uint8_t src[16];    /* the client's address (4 or 16 bytes), network byte order */
    uint8_t dst[16];    /* the address the client connected to */
    uint16_t src_port;
    uint16_t dst_port;
} uds_proxy_info;

/* Parses the PROXY protocol header (v1 or v2) at the start of buf[0..len).
 * Returns the header's size in bytes (> 0) and fills *out; 0 if buf[0..len) may begin a valid
 * header that is not complete yet; -EPROTO as soon as buf cannot begin a valid one (a byte
 * that no header could hold, a v1 line past 107 bytes without its CR LF, a v2 version,
 * command, family or length outside the specification, a v2 datagram transport). The bytes
 * after the header are not looked at. Reads nothing outside buf[0..len). */
ssize_t uds_proxy_parse(const char *buf, size_t len, uds_proxy_info *out);

/* Server. */

/* What uds_config.adopt_fd is (uds_config.adopt). */
#define UDS_ADOPT_LISTENER 1 /* a socket of the server's kind already bound (and maybe listening):
                              * the server works on a duplicate of it and never removes its file */
#define UDS_ADOPT_HANDOFF 2  /* STREAM and SEQPACKET: one end of a SOCK_SEQPACKET pair over which
                              * another process (which accepted them) hands clients over: each
                              * packet, of at least one byte, carries one connected socket of the
                              * server's kind (SCM_RIGHTS; more are closed), admitted as if
                              * accepted here (SO_PEERCRED, the uid/gid policy, max_connections;
                              * a socket of another family or type is closed). End-of-file: no
                              * more are admitted. uds_shutdown() still admits those already
                              * queued, each closed as shutting down once what it sent before
                              * is answered. The server works on a duplicate of the socket */

typedef struct uds_server uds_server;

typedef struct uds_config {
    int framing;          /* UDS_FRAMING_* */
    size_t max_message;   /* longest payload accepted from a client, >= 1 */
    int backlog;          /* listen() backlog */
    unsigned int mode;    /* permission bits of the socket file, <= 0777 */
    int flush_timeout_ms; /* how long a closing connection may take to drain its output */
    int max_connections;  /* live connections at most; more are closed as accepted; 0: no cap */
    size_t max_output;    /* unsent output per connection at most; 0: no cap. Reading from a
                           * connection pauses while its output is at or above the high-water
                           * mark, min(max_output / 2, 1 MiB), and resumes below half of it */
    int idle_timeout_ms;  /* close a connection that received and sent nothing this long; 0: never */
    int frame_timeout_ms; /* close a connection whose frame, once begun, is not complete this
                           * long afterwards (time spent paused does not count); 0: never */
    int kind;             /* UDS_KIND_*; framing is ignored for SEQPACKET */
    int adopt;            /* UDS_ADOPT_*: serve on socket adopt_fd (path is then ignored, and
                           * the server owns no socket file); 0: create the socket at path */
    int adopt_fd;
    int max_fds;          /* descriptors accepted with one message, at most (<= UDS_MAX_FDS);
                           * more close the connection (UDS_CLOSE_TOO_MANY_FDS); 0: none */
    const uint32_t *allow_uid; /* if either list is non-empty, only peers whose uid is in */
    int n_allow_uid;           /* allow_uid, or whose gid or a supplementary group is in */
    const uint32_t *allow_gid; /* allow_gid, are accepted; the others are closed at accept */
    int n_allow_gid;           /* (UDS_EV_REFUSED). The lists are copied. */
    int busy_poll_us;     /* before sleeping for readiness, poll without sleeping this long (a
                           * core spent for latency: a request arriving meanwhile is taken
                           * without waking the thread); 0: never, <= 1000000 */
    /* UDS_KIND_TCP only. path is then a numeric IPv4 or IPv6 address (no brackets); an adopted
     * socket must be a TCP one. max_fds is taken as 0, mode and the uid/gid lists must be
     * left empty (0): TCP carries neither descriptors nor credentials. */
    int tcp_port;         /* the port to listen on, 0..65535 (0: any free one) */
    int tcp_nodelay;      /* 1: TCP_NODELAY on every connection (replies leave at once) */
    int tcp_keepalive_s;  /* > 0: keepalive probes after this many idle seconds, then every
                           * third of it (at least 1 s); 3 unanswered fail the connection
                           * (UDS_CLOSE_ERROR, ETIMEDOUT); 0: none. <= 32767 */
    int proxy_protocol;   /* 1: every connection must begin with a PROXY protocol header (v1
                           * or v2); until it is whole the connection is not reported, and
                           * one that sends anything else, ends first, or takes longer than
                           * frame_timeout_ms (10 s if that is 0) is closed, counted as
                           * UDS_CLOSE_PROXY_HEADER, with a REFUSED event. Its peer address is
                           * then the one the header names */
} uds_config;

#define UDS_MAX_FDS 253 /* the most descriptors Linux passes in one message (SCM_MAX_FD) */

/* One event of a batch. Pointers stay valid until the next uds_poll() on the same server. */
typedef struct uds_event {
    int type;          /* UDS_EV_* */
    int slot;          /* the connection's slot: unique among live connections, reused later;
                        * DGRAM: -1 for a message from a sender with no address (unanswerable) */
    uint64_t id;       /* the connection's id: unique for the server's lifetime, from 1 */
    const char *data;  /* MESSAGE: the payload */
    size_t len;        /* MESSAGE: payload length; CLOSED: output bytes discarded unsent */
    int reason;        /* CLOSED: UDS_CLOSE_* */
    int err;           /* CLOSED: the errno for UDS_CLOSE_ERROR, else 0 */
    int32_t pid;       /* CONNECTED: peer's pid (SO_PEERCRED at accept); DGRAM: also MESSAGE,
                        * the sender's (SCM_CREDENTIALS of that datagram) */
    uint32_t uid;      /* CONNECTED: peer's uid */
    uint32_t gid;      /* CONNECTED: peer's gid */
    int nfds;          /* MESSAGE: descriptors that came with it (see fds) */
    const int *fds;    /* MESSAGE: those descriptors, close-on-exec; CLOSED with reason MOVED:
                        * the connection's socket (nfds 1). They are the caller's from now on:
                        * it must close them */
} uds_event;

/* Per-connection counters of payload messages and bytes, received and queued for sending.
 * The core writes them with relaxed atomic stores so another thread may read them. */
typedef struct uds_stats {
    uint64_t msgs_in;
    uint64_t bytes_in;
    uint64_t msgs_out;
    uint64_t bytes_out;
} uds_stats;

/* Counters of a whole server. The core writes them with relaxed atomic stores. */
typedef struct uds_server_stats {
    uint64_t accepted;      /* connections handed to the caller (CONNECTED events) */
    uint64_t current;       /* connections live now */
    uint64_t msgs_in;       /* messages delivered, and their payload bytes */
    uint64_t bytes_in;
    uint64_t msgs_out;      /* messages queued for sending, and their payload bytes */
    uint64_t bytes_out;
    uint64_t accept_pauses; /* times accepting paused because descriptors ran out */
    uint64_t fds_in;        /* descriptors received with messages, and sent */
    uint64_t fds_out;
    uint64_t dgrams_truncated; /* DGRAM: datagrams dropped for being longer than max_message
                                * or bringing more than max_fds descriptors */
    uint64_t dgrams_refused;   /* DGRAM: datagrams dropped by the uid/gid policy or from a
                                * refused peer */
    uint64_t replies_unroutable; /* DGRAM: replies to senders with no address, not sent */
    uint64_t closed[16];    /* connections closed, by reason: closed[UDS_CLOSE_*]; connections
                             * closed at accept for max_connections count as REJECTED */
} uds_server_stats;

/* The batch described whole, for a caller that takes a whole batch at once (pyuds's Python loop
 * makes every message of it in one call and walks it connection by connection). The caller owns
 * every array. Small payloads are copied into pack back to back; layout then describes them as
 * text, one item per event: its length in decimal followed by 's' (the notation of Python's
 * struct module, which cuts pack into one bytes object per payload with it). Consecutive events
 * of one connection form a run. pack, layout and the runs are complete only when all_packed. */
#define UDS_PACK_MAX 4096    /* payloads up to this size are packed */
#define UDS_ONE_SHIFT 13     /* uds_serve_one(): (slot + 1) << 13 | length (a packed length < 2^13) */
#define UDS_LAYOUT_ITEM_MAX 5 /* bytes of layout one event takes at most ("4096s") */
typedef struct uds_batch {
    uds_event *ev;      /* uds_reply_poll_batch(): the events, ev[0..cap) */
    int cap;
    /* uds_serve_one()'s: */
    uds_server *srv;    /* the server */
    int timeout_ms;     /* the wait's limit (-1: none) */
    int draining;       /* nonzero: no poll once no connection is live */
    int interrupt;      /* nonzero: no poll (the caller has work of its own: a stop, requests
                         * from other threads); any thread may set it, the caller clears it */
    int last_slot;      /* the connection of the last one message returned (-1: none, as the
                         * caller sets it before a first call) */
    uint64_t last_id;
    char *pack;         /* packed payloads */
    size_t pack_cap;    /* bytes of pack, at most 4 GiB - 2 */
    char *layout;       /* [cap * UDS_LAYOUT_ITEM_MAX] out: the items of pack, not terminated */
    int32_t *run_slot;  /* [cap] out: the slot of each run's connection */
    uint32_t *run_end;  /* [cap] out: the index of the event after each run */
    /* The rest is filled in, all int64_t in a row, so that a caller may read them as one array
     * (Python does: an index into a memoryview costs less than a struct field through cffi). */
    int64_t pack_used;  /* bytes of pack filled */
    int64_t layout_len; /* bytes of layout filled */
    int64_t runs;       /* runs filled */
    int64_t all_packed; /* 1 if every event is a MESSAGE whose payload is packed */
    int64_t any_fds;    /* 1 if some event brings descriptors */
    int64_t one_len;    /* the batch is one MESSAGE, packed (the usual turn of a client with one
                         * request at a time): its length; else -1 */
    int64_t one_slot;   /* ... and its connection's slot */
    int64_t reply_rc;   /* uds_reply_poll_batch(): what queueing its reply returned (0: none) */
    int64_t n;          /* uds_serve_one(): what uds_poll() returned */
} uds_batch;

/* Creates the master socket and binds it to path, then listens. A path that starts with '@'
 * names a socket in Linux's abstract namespace ('@' stands for the leading NUL): no file is
 * made or removed, and file permissions do not apply (mode is ignored).
 * An existing path is replaced only if it is a socket nobody answers on (connect refused);
 * the socket file is created with at most cfg->mode (never a wider mode, not even for an
 * instant) and then set to exactly cfg->mode. The socket's address, as the kernel reports it
 * (getsockname(), a client's getpeername(), the sender of a datagram reply), is path itself,
 * except when path's directory cannot be read or its lock stays taken for a second (see
 * sock.c): then a temporary name in that directory, renamed into place.
 * Returns 0 and sets *out; -ENAMETOOLONG if path does not fit sun_path; -EADDRINUSE if a server
 * answers on path; -ENOTSOCK if path exists and is not a socket (file, directory, symlink);
 * -EINVAL for an empty path or a bad config; any other -errno from the system calls
 * (-EACCES when the existing socket cannot be probed). Touches nothing on failure.
 * UDS_KIND_TCP: path is the numeric IPv4 or IPv6 address to listen on (with cfg->tcp_port;
 * SO_REUSEADDR); -EINVAL if it is not one, -EADDRINUSE if the port is taken. */
int uds_server_new(uds_server **out, const char *path, const uds_config *cfg);

/* Closes every connection and the master socket without events, removes the socket file if it
 * is still the one this server made (same device and inode), frees s. NULL is a no-op. */
void uds_server_free(uds_server *s);

/* Runs one loop turn: frees what the last batch finished with, flushes the replies queued since
 * the last call (one send per connection), then waits up to timeout_ms (-1: no limit) for
 * readiness and fills ev[0..cap) with events.
 * Returns the number of events (possibly 0: timeout, uds_wakeup(), or a signal interrupted the
 * wait, so that the caller can run its signal handlers), or -errno if the wait failed. */
int uds_poll(uds_server *s, uds_event *ev, int cap, int timeout_ms);

/* uds_poll(), then fills b for the events it returned. Returns as uds_poll(). */
int uds_poll_batch(uds_server *s, uds_event *ev, int cap, int timeout_ms, uds_batch *b);

/* For a batch that was one message (b->one_len >= 0): uds_reply() of the len bytes at reply to
 * it (b->ev[0], as that batch left it; len < 0: no reply), written to the socket at once if
 * nothing waits before it, b->reply_rc set to what uds_reply() returned (0 for no reply); then
 * uds_poll_batch(s, b->ev, b->cap, timeout_ms, b), which does not wait if the reply failed. A
 * server answering one request at a time thus crosses into C once per request, and its reply
 * leaves first. Returns as uds_poll(). */
int uds_reply_poll_batch(uds_server *s, const char *reply, int64_t len, int timeout_ms,
                         uds_batch *b);

/* uds_reply_poll_batch(b->srv, reply, len, b->timeout_ms, b), b->n set to what it returned,
 * and the usual outcome in the return value, so that the caller reads nothing else: the batch
 * is one message, its reply (if any) was queued, and the message is packed. Then returns its
 * length if it came from the same connection as the last one message (returned, or left in
 * b->one_len with -1), the usual case, else (slot + 1) << UDS_ONE_SHIFT | length; either way
 * that connection becomes the last. Python keeps either in an int of one digit (for slots under 2^17),
 * without an allocation for a length under 257. Else -1: b->n, b->reply_rc, b->one_len (and
 * b->one_slot, the last connection's slot) tell the rest. With b->interrupt set, or
 * b->draining and no connection live, the reply is queued but nothing polled: -1 with b->n
 * 0. The whole turn of a client with one request at a time, and the caller's checks between
 * turns, in one call with three arguments (cffi converts each argument, and a shorter
 * argument tuple costs less). */
int64_t uds_serve_one(uds_batch *b, const char *reply, int64_t len);

/* Queues the replies to the events ev[first .. first + n) of the last batch in one call: reply
 * i has lens[i] bytes (so at most 32767; larger ones go through uds_reply()), -1 for none, and
 * they lie back to back in data. Each goes to its event's connection as uds_reply() would send
 * it; rcs[i] gets uds_reply()'s result (0 for none). Returns how many failed. */
int uds_reply_batch(uds_server *s, const uds_event *ev, int first, int n, const char *data,
                    const int16_t *lens, int *rcs);

/* Queues payload as one framed message to connection (slot, id); it leaves at the next
 * uds_poll(). Returns 0; -ENOTCONN if that connection is finished or its socket failed;
 * -ENOBUFS if its unsent output would exceed max_output even after a write attempt: the
 * connection is then closed (UDS_CLOSE_SLOW_CONSUMER); -EINVAL / -EMSGSIZE as
 * uds_frame_check(); -ENOMEM. */
int uds_send(uds_server *s, int slot, uint64_t id, const char *data, size_t len);

/* uds_send() for a reply to a request: the same, except that a reply never makes -ENOBUFS.
 * Reading from a client stops while its output is at the high-water mark, so replies can take
 * its output past max_output only by what one turn's requests are owed; they are kept, and the
 * client is then disconnected as a slow consumer only if it takes none of its output for
 * flush_timeout_ms (counted again from each write that makes progress). Pushes (uds_send())
 * stay bounded by max_output. */
int uds_reply(uds_server *s, int slot, uint64_t id, const char *data, size_t len);

/* uds_send() with descriptors: fds[0..nfds) are duplicated now (the caller keeps its own)
 * and sent with the message's first byte (SCM_RIGHTS). Returns as uds_send(), and -EINVAL
 * for nfds outside 0..UDS_MAX_FDS, or for descriptors with a message of no bytes at all on
 * a stream (Linux cannot send them without data); -EBADF for a descriptor that is not open. */
int uds_send_fds(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                 const int *fds, int nfds);

/* Closes connection (slot, id): nothing more is read or delivered from it, what is queued for
 * it is flushed (bounded by flush_timeout_ms), then a CLOSED event carries reason (the first
 * reason given, if it was already closing). Returns 0; -ENOTCONN if it is already finished. */
int uds_close(uds_server *s, int slot, uint64_t id, int reason);

/* Points the connection's counters at *stats (copying the counts so far); the core writes
 * there until the connection's CLOSED event and never touches it afterwards.
 * Returns 0 or -ENOTCONN. */
int uds_conn_set_stats(uds_server *s, int slot, uint64_t id, uds_stats *stats);

/* Starts a graceful shutdown: removes the socket file (if still ours) and closes the master
 * socket, stops reading, delivers the messages already received, flushes replies (each
 * connection bounded by flush_timeout_ms) and closes every connection, each with a CLOSED
 * event from uds_poll(). Returns the number of connections still to close. */
int uds_shutdown(uds_server *s);

/* uds_shutdown(), except that the connections are handed back to the caller instead of being
 * closed, for another server to serve them on (pyuds moves the clients of a worker it replaces
 * to the workers that replace it): the socket file goes and no more clients are accepted
 * (those handed over on a UDS_ADOPT_HANDOFF socket before are still admitted, and handed back
 * in turn). Each connection is read only up to the end of the frame it has begun, never into
 * the next one (what its client sends after that stays in the socket's receive queue: the
 * server stops reading it), its complete frames are delivered, and once it is idle as
 * uds_conn_detach() says, it leaves without being closed: its CLOSED event has reason
 * UDS_CLOSE_MOVED and hands out its socket (nfds 1, fds[0]; the caller's from then on, to pass
 * on or close). One that is not idle within flush_timeout_ms is closed as uds_shutdown()
 * closes it (UDS_CLOSE_SHUTDOWN, a frame begun dropped, output still unsent then given up);
 * one its client ends, or the caller closes, closes as it would have.
 * Returns the number of connections still to hand back or close; -EOPNOTSUPP for a DGRAM or
 * TCP server (whose connections no server of this API takes over). After uds_shutdown() (or
 * a first uds_retire()) it changes nothing and returns as uds_shutdown(). */
int uds_retire(uds_server *s);

/* Takes connection (slot, id) out of the server without closing its socket, and returns that
 * socket (>= 0, non-blocking, close-on-exec), the caller's from then on: to close, or to hand
 * to another server (UDS_ADOPT_HANDOFF), which admits it as a new client. Only an idle
 * connection can leave: none of its input read and not yet delivered (no frame begun, none
 * held back, no descriptors waiting), the turn that delivered its last message over (call
 * this from a later batch, once its replies are queued), no UDS_HOLD_OPEN, its output all
 * written to the socket. What its client sent that the server did not read stays in the
 * socket's receive queue and goes with it (a server reading with no limit may have read the
 * start of a next frame: uds_retire() keeps reads to frame boundaries). No CLOSED event comes
 * for it; it counts as closed with UDS_CLOSE_MOVED, and its slot may be reused from the next
 * uds_poll() on.
 * Returns the socket; -ENOTCONN if the connection is finished or closing, or stopped reading
 * for good (end-of-file, refused input); -EBUSY if it is not idle; -EOPNOTSUPP for a DGRAM or
 * TCP server. */
int uds_conn_detach(uds_server *s, int slot, uint64_t id);

/* Connections accepted and not yet reported closed. */
int uds_live(const uds_server *s);

/* Copies the server's counters to *out. Safe from any thread while s exists. */
void uds_server_stats_get(const uds_server *s, uds_server_stats *out);

/* Makes a uds_poll() in progress (or the next one) return. Thread-safe and
 * async-signal-safe. Returns 0 or -errno. */
int uds_wakeup(uds_server *s);

/* The write end of the wakeup pipe, non-blocking: writing a byte to it has the effect of
 * uds_wakeup() (fit for Python's signal.set_wakeup_fd). */
int uds_wakeup_fd(const uds_server *s);

/* The master socket's descriptor, or -1 once it is closed. */
int uds_listen_fd(const uds_server *s);

/* For a caller that waits in an event loop of its own (asyncio's add_reader) instead of in
 * uds_poll(): the epoll descriptor uds_poll() waits on. It is readable when a uds_poll() with
 * timeout 0 would find something (a ready socket, a wakeup); the caller must also poll when
 * uds_timeout() says. */
int uds_epoll_fd(const uds_server *s);

/* For that caller: how long it may wait on uds_epoll_fd() before it must call uds_poll()
 * again. 0 if work waits that no readiness will announce (frames of a connection just
 * released by uds_hold(), output queued since the last poll, a connection closed since);
 * else the milliseconds until the next deadline (idle, frame and flush timeouts, accepting
 * again, DGRAM retries); -1 if there is none. */
int uds_timeout(uds_server *s);

/* What the caller holds a connection to (uds_hold()), or'ed. */
#define UDS_HOLD_READ 1 /* neither read nor deliver its messages: the kernel keeps what it
                         * sends (a caller with as many of its requests in hand as it allows) */
#define UDS_HOLD_OPEN 2 /* replies to it are still owed: it is not finished (on end-of-file,
                         * close or shutdown) until released; its flush deadline still counts */

/* Sets what the caller holds connection (slot, id) to: UDS_HOLD_* or'ed, 0 for nothing.
 * Releasing UDS_HOLD_READ makes frames it already holds come with the next uds_poll(), new
 * bytes or not (uds_timeout() is 0 then). Returns 0; -ENOTCONN if it is finished; -EINVAL
 * for other bits; -EOPNOTSUPP for a DGRAM server (one socket for every peer: it cannot stop
 * reading one of them). */
int uds_hold(uds_server *s, int slot, uint64_t id, int hold);

/* Writes the address of connection or peer (slot, id) to name as uds_server_address() does:
 * for a connection, the address its client bound (length 0 if none); for a DGRAM peer, its
 * address; for TCP, the client's (the one its PROXY header named, with proxy_protocol).
 * Returns 0, -ENOTCONN, or -errno. */
int uds_peer_address(uds_server *s, int slot, uint64_t id, char *name, size_t *len);

/* Writes the master socket's address to name (room for 110 bytes), as uds_server_new() takes
 * it: a path, or '@' and the abstract name (which may hold NUL bytes, hence *len); for TCP,
 * "HOST:PORT" with an IPv6 host in brackets ("127.0.0.1:8000", "[::1]:8000"). Returns 0 or
 * -errno. */
int uds_server_address(const uds_server *s, char *name, size_t *len);

/* cffi-end */

#endif /* UDS_H */
