/*
 * server.c - a server's life (made, shut down, freed) and the API the caller drives it with.
 * What a call does for the connections or peers of the server's socket kind is in that kind's
 * table of operations (conn_server.c, dgram_server.c): this file never asks which kind it is.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* What each UDS_KIND_* is made of. */
static const struct kind_spec {
    const uds_kind_ops *ops;
    int sock_type;
    int packets;       /* connections are SEQPACKET: a packet is a message */
    int needs_idle;    /* idle_timeout_ms must be set (DGRAM: peers must be forgotten) */
    int inet;          /* TCP: an internet socket */
} kinds[] = {
    [UDS_KIND_STREAM] = {&uds_conn_kind, SOCK_STREAM, 0, 0, 0},
    [UDS_KIND_SEQPACKET] = {&uds_conn_kind, SOCK_SEQPACKET, 1, 0, 0},
    [UDS_KIND_DGRAM] = {&uds_dgram_kind, SOCK_DGRAM, 0, 1, 0},
    [UDS_KIND_TCP] = {&uds_conn_kind, SOCK_STREAM, 0, 0, 1},
};

/* ---- a turn, and the caller's requests -------------------------------------------------------- */

int uds_poll(uds_server *s, uds_event *ev, int cap, int timeout_ms)
{
    if (cap < 1)
        return -EINVAL;
    s->turn++;
    s->fd_out_n = 0; /* the descriptors handed out last turn are the caller's now */
    return s->kind->poll(s, ev, cap, timeout_ms);
}

int uds_send(uds_server *s, int slot, uint64_t id, const char *data, size_t len)
{
    return s->kind->send(s, slot, id, data, len, NULL, 0, UDS_SEND_PUSH);
}

int uds_reply(uds_server *s, int slot, uint64_t id, const char *data, size_t len)
{
    return s->kind->send(s, slot, id, data, len, NULL, 0, UDS_SEND_REPLY);
}

int uds_send_fds(uds_server *s, int slot, uint64_t id, const char *data, size_t len,
                 const int *fds, int nfds)
{
    if (nfds < 0 || nfds > UDS_MAX_FDS)
        return -EINVAL;
    return s->kind->send(s, slot, id, data, len, fds, nfds, UDS_SEND_PUSH);
}

int uds_close(uds_server *s, int slot, uint64_t id, int reason)
{
    return s->kind->close(s, slot, id, reason);
}

int uds_conn_set_stats(uds_server *s, int slot, uint64_t id, uds_stats *stats)
{
    uds_stats **at = s->kind->stats(s, slot, id);
    if (at == NULL)
        return -ENOTCONN;
    *stats = **at;
    *at = stats;
    return 0;
}

int uds_peer_address(uds_server *s, int slot, uint64_t id, char *name, size_t *len)
{
    return s->kind->peer_address(s, slot, id, name, len);
}

int uds_live(const uds_server *s) { return s->live; }

void uds_server_stats_get(const uds_server *s, uds_server_stats *out)
{
    const uint64_t *from = (const uint64_t *)&s->stats;
    uint64_t *to = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        to[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
}

int uds_wakeup(uds_server *s) { return uds_poller_wake(&s->poller); }

int uds_wakeup_fd(const uds_server *s) { return s->poller.wake_wr; }

int uds_listen_fd(const uds_server *s) { return s->listen_fd; }

int uds_epoll_fd(const uds_server *s) { return s->poller.ep; }

int uds_timeout(uds_server *s)
{
    uds_clock_update(&s->now_ms);
    return s->kind->timeout(s);
}

int uds_hold(uds_server *s, int slot, uint64_t id, int hold)
{
    if (hold & ~(UDS_HOLD_READ | UDS_HOLD_OPEN))
        return -EINVAL;
    return s->kind->hold(s, slot, id, hold);
}

int uds_server_address(const uds_server *s, char *name, size_t *len)
{
    if (s->listen_fd < 0)
        return -EBADF;
    return uds_sock_name(s->listen_fd, 0, name, len);
}

/* ---- life ------------------------------------------------------------------------------------ */

/* No more clients: the socket file goes (if still ours) and the master socket leaves epoll.
 * The file is removed while the socket is still bound (libuv does the same): as long as we
 * answer, no other server takes the file for stale and replaces it, so the inode check cannot
 * race with it. */
static void stop_listening(uds_server *s)
{
    if (s->listen_fd < 0)
        return;
    if (s->path[0] != '\0')
        uds_sock_unlink_if_same(s->path, s->file_dev, s->file_ino);
    uds_poller_del(&s->poller, s->listen_fd); /* (already out while accepting is paused) */
}

static void close_master(uds_server *s)
{
    if (s->listen_fd < 0)
        return;
    if (!s->shutting_down)
        stop_listening(s); /* (else done by uds_shutdown() already) */
    if (s->saved_flags >= 0)
        fcntl(s->listen_fd, F_SETFL, s->saved_flags); /* the owner's socket, as it was */
    close(s->listen_fd);
    s->listen_fd = -1;
}

int uds_shutdown(uds_server *s)
{
    if (!s->shutting_down) {
        s->shutting_down = 1;
        uds_clock_update(&s->now_ms);
        stop_listening(s);
        if (!s->kind->shutdown(s))
            close_master(s);
    }
    return uds_live(s);
}

int uds_retire(uds_server *s)
{
    if (!s->shutting_down) {
        int rc = s->kind->retire(s);
        if (rc < 0)
            return rc;
    }
    return uds_shutdown(s);
}

int uds_conn_detach(uds_server *s, int slot, uint64_t id)
{
    return s->kind->detach(s, slot, id);
}

/* The fields that belong to TCP are set for TCP only, and the Unix-only ones left empty. */
static int valid_tcp_config(const uds_config *cfg)
{
    if (cfg->kind != UDS_KIND_TCP)
        return cfg->tcp_port == 0 && cfg->tcp_nodelay == 0 && cfg->tcp_keepalive_s == 0 &&
               cfg->proxy_protocol == 0;
    return cfg->tcp_port >= 0 && cfg->tcp_port <= 65535 && cfg->tcp_keepalive_s >= 0 &&
           cfg->tcp_keepalive_s <= 32767 && cfg->mode == 0 && cfg->n_allow_uid == 0 &&
           cfg->n_allow_gid == 0;
}

static int valid_config(const uds_config *cfg)
{
    return uds_frame_check(cfg->framing, "", 0) == 0 && cfg->max_message >= 1 &&
           cfg->max_message <= 0xFFFFFFFFu && cfg->flush_timeout_ms >= 0 &&
           cfg->max_connections >= 0 && cfg->idle_timeout_ms >= 0 && cfg->frame_timeout_ms >= 0 &&
           cfg->max_fds >= 0 && cfg->max_fds <= UDS_MAX_FDS && cfg->busy_poll_us >= 0 &&
           cfg->busy_poll_us <= 1000000 && cfg->kind >= 0 &&
           cfg->kind < (int)(sizeof kinds / sizeof kinds[0]) &&
           (!kinds[cfg->kind].needs_idle || cfg->idle_timeout_ms >= 1) && valid_tcp_config(cfg) &&
           cfg->adopt >= 0 && cfg->adopt <= UDS_ADOPT_HANDOFF &&
           (cfg->adopt != UDS_ADOPT_HANDOFF ||
            (kinds[cfg->kind].ops == &uds_conn_kind && !kinds[cfg->kind].inet));
}

/* The master socket: made and bound at path, or adopted (a listener, or the socket clients are
 * handed over on); then SO_PASSCRED where needed. */
static int open_master(uds_server *s, const char *path)
{
    const uds_config *cfg = &s->cfg;
    int rc;
    if (cfg->adopt == UDS_ADOPT_HANDOFF)
        rc = uds_sock_adopt_handoff(cfg->adopt_fd, &s->listen_fd, &s->saved_flags);
    else if (cfg->adopt)
        rc = uds_sock_adopt(cfg->adopt_fd, s->sock_type, s->inet, cfg->backlog, &s->listen_fd,
                            &s->saved_flags);
    else if (s->inet)
        rc = uds_sock_listen_tcp(path, cfg->tcp_port, cfg->backlog, &s->listen_fd);
    else
        rc = uds_sock_listen(path, s->sock_type, cfg->mode, cfg->backlog, &s->listen_fd,
                             &s->file_dev, &s->file_ino);
    if (rc < 0)
        return rc;
    /* SEQPACKET: every packet then comes with its sender's credentials, which is how a packet
     * of no bytes tells itself apart from end-of-file (accepted sockets inherit it; handed-over
     * ones get it as they are admitted). DGRAM: every datagram's sender, for the uid/gid policy
     * and the caller. */
    int on = 1;
    if (s->sock_type != SOCK_STREAM && cfg->adopt != UDS_ADOPT_HANDOFF &&
        setsockopt(s->listen_fd, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) < 0)
        return -errno;
    return uds_poller_add(&s->poller, s->listen_fd, UDS_POLL_IN);
}

/* Everything but the master socket. */
static int setup(uds_server *s, const char *path, const uds_config *cfg)
{
    const struct kind_spec *k = &kinds[cfg->kind];
    s->kind = k->ops;
    s->sock_type = k->sock_type;
    s->packets = k->packets;
    s->inet = k->inet;
    if (s->inet)
        s->cfg.max_fds = 0; /* reads with recv(): no control data on TCP */
    if (s->packets)
        s->cfg.framing = UDS_FRAMING_U32; /* how packets are kept in buffers (see conn_read.c) */
    s->next_id = 1;
    s->accept_backoff_ms = UDS_ACCEPT_BACKOFF_MIN;
    s->retry_backoff_ms = UDS_RETRY_MIN_MS;
    s->high_water = UDS_HIGH_WATER_MAX;
    if (cfg->max_output > 0 && cfg->max_output / 2 < s->high_water)
        s->high_water = cfg->max_output / 2 > 0 ? cfg->max_output / 2 : 1;
    if (!cfg->adopt && !s->inet && path[0] != '@')
        strcpy(s->path, path); /* a file of ours, to remove at the end */
    int rc = uds_policy_init(&s->policy, cfg->allow_uid, cfg->n_allow_uid, cfg->allow_gid,
                             cfg->n_allow_gid);
    if (rc < 0)
        return rc;
    s->cfg.allow_uid = s->policy.uids;
    s->cfg.allow_gid = s->policy.gids;
    /* Descriptors go out with messages (max_fds), and with connections handed back (a Unix
     * socket's, see uds_retire()). */
    int fds_out = s->cfg.max_fds > 0 || (k->ops == &uds_conn_kind && !k->inet);
    if ((s->arena = malloc(UDS_ARENA_SIZE)) == NULL ||
        (fds_out && (s->fd_out = malloc(UDS_FD_OUT_MAX * sizeof *s->fd_out)) == NULL))
        return -ENOMEM;
    return uds_poller_open(&s->poller);
}

int uds_server_new(uds_server **out, const char *path, const uds_config *cfg)
{
    if (!valid_config(cfg))
        return -EINVAL;
    if (!cfg->adopt && cfg->kind != UDS_KIND_TCP && path[0] != '@' &&
        strlen(path) >= sizeof ((uds_server *)0)->path)
        return -ENAMETOOLONG;
    uds_server *s = calloc(1, sizeof *s);
    if (s == NULL)
        return -ENOMEM;
    s->cfg = *cfg;
    s->kind = kinds[cfg->kind].ops;
    s->listen_fd = s->saved_flags = -1;
    s->poller.ep = s->poller.wake_rd = s->poller.wake_wr = -1;
    int rc = setup(s, path, cfg);
    /* The socket file comes last: once it exists, clients may connect. */
    if (rc == 0)
        rc = open_master(s, path);
    if (rc < 0) {
        uds_server_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void uds_server_free(uds_server *s)
{
    if (s == NULL)
        return;
    close_master(s);
    s->kind->free(s);
    uds_policy_free(&s->policy);
    free(s->fd_out);
    uds_scratch_free(&s->scratch);
    uds_pool_free(&s->pool);
    free(s->arena);
    uds_poller_close(&s->poller);
    free(s);
}
