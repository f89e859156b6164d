/*
 * sock_tcp.c - TCP sockets: the listening socket, the options of an accepted connection, and
 * internet addresses as text ("127.0.0.1:8000", "[::1]:8000"), which is how the API names
 * them. Everything else about a TCP connection is a stream's, in conn*.c.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* host (a numeric IPv4 or IPv6 address) and port as a socket address. */
static int make_inet(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (port < 0 || port > 65535)
        return -EINVAL;
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        return 0;
    }
    return -EINVAL; /* names are resolved by the caller: the core never blocks on DNS */
}

int uds_sock_listen_tcp(const char *host, int port, int backlog, int *fdp)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int rc = make_inet(host, port, &ss, &len);
    if (rc < 0 || backlog < 1)
        return rc < 0 ? rc : -EINVAL;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* A restarted server must not wait out the TIME_WAIT of its predecessor's connections to
     * bind its port again. (Unlike SO_REUSEPORT it never lets two live servers share one.) */
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
        bind(fd, (const struct sockaddr *)&ss, len) < 0 || listen(fd, backlog) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    *fdp = fd;
    return 0;
}

int uds_sock_tcp_options(int fd, int nodelay, int keepalive_s)
{
    int on = 1;
    /* Replies are written whole, one send per connection and turn: Nagle's algorithm would
     * only hold the next one back until the client acknowledged the last. */
    if (nodelay && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) < 0)
        return -errno;
    if (keepalive_s <= 0)
        return 0;
    int interval = keepalive_s / 3 > 0 ? keepalive_s / 3 : 1, count = 3;
    if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keepalive_s, sizeof keepalive_s) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count) < 0)
        return -errno;
    return 0;
}

int uds_sock_inet_format(const struct sockaddr *sa, char *name, size_t *len)
{
    char host[INET6_ADDRSTRLEN];
    unsigned port;
    int n;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in4->sin_addr, host, sizeof host);
        port = ntohs(in4->sin_port);
        n = snprintf(name, UDS_INET_NAME_MAX, "%s:%u", host, port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        port = ntohs(in6->sin6_port);
        n = snprintf(name, UDS_INET_NAME_MAX, "[%s]:%u", host, port);
    } else {
        return -EAFNOSUPPORT;
    }
    *len = (size_t)n;
    return 0;
}

void uds_sock_proxy_addr(const uds_proxy_info *info, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (info->family == 4) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
        in4->sin_family = AF_INET;
        memcpy(&in4->sin_addr, info->src, 4);
        in4->sin_port = htons(info->src_port);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, info->src, 16);
        in6->sin6_port = htons(info->src_port);
    }
}
