/*
 * proxy.c - the PROXY protocol header (HAProxy's, versions 1 and 2), which a load balancer in
 * front of a TCP server sends before anything else to name the client it connected for.
 * A pure function over a buffer, like the decoders of framing.c.
 *
 * The header is trusted only where the server asked for it: whoever can connect can write
 * one. So the parser is strict: a byte that cannot belong to a valid header refuses the
 * connection as soon as it arrives, a v1 line longer than the protocol's 107 bytes is refused
 * without waiting for its end, and a v2 header is taken only with the version, command and
 * lengths the specification allows.
 */
#define _GNU_SOURCE
#include "uds.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#define V1_MAX 107 /* "PROXY TCP6 <39> <39> 65535 65535\r\n", the longest line allowed */
#define V2_FIXED 16 /* signature (12), version and command, family, length (2) */

static const char v1_sig[] = "PROXY ";
static const char v2_sig[12] = {'\r', '\n', '\r', '\n', '\0', '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};

/* 1 if the first n bytes of buf match the first n of sig. */
static int prefix_matches(const char *buf, size_t n, const char *sig)
{
    return memcmp(buf, sig, n) == 0;
}

/* A decimal port without leading zeros (the specification's form), 0..65535, from text[0..n).
 * Returns 0 and sets *port, or -1. */
static int parse_port(const char *text, size_t n, uint16_t *port)
{
    if (n == 0 || n > 5 || (text[0] == '0' && n > 1))
        return -1;
    unsigned long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        v = v * 10 + (unsigned long)(text[i] - '0');
    }
    if (v > 65535)
        return -1;
    *port = (uint16_t)v;
    return 0;
}

/* An address of the family (4 or 6) from text[0..n) into 16 bytes at out. */
static int parse_addr(int family, const char *text, size_t n, uint8_t *out)
{
    char tmp[48];
    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, text, n);
    tmp[n] = '\0';
    return inet_pton(family == 4 ? AF_INET : AF_INET6, tmp, out) == 1 ? 0 : -1;
}

/* The fields of a complete v1 line (CR LF excluded), after "PROXY ". */
static int parse_v1_fields(const char *p, size_t n, uds_proxy_info *out)
{
    const char *field[5];
    size_t flen[5];
    int k = 0;
    size_t start = 0;
    if (n >= 7 && memcmp(p, "UNKNOWN", 7) == 0 && (n == 7 || p[7] == ' ')) {
        out->family = 0; /* the rest is to be ignored, says the specification */
        return 0;
    }
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != ' ')
            continue;
        if (k == 5 || i == start)
            return -1; /* a sixth field, or two spaces in a row */
        field[k] = p + start;
        flen[k++] = i - start;
        start = i + 1;
    }
    if (k != 5 || flen[0] != 4 || memcmp(field[0], "TCP", 3) != 0 ||
        (field[0][3] != '4' && field[0][3] != '6'))
        return -1;
    out->family = field[0][3] - '0';
    if (parse_addr(out->family, field[1], flen[1], out->src) < 0 ||
        parse_addr(out->family, field[2], flen[2], out->dst) < 0 ||
        parse_port(field[3], flen[3], &out->src_port) < 0 ||
        parse_port(field[4], flen[4], &out->dst_port) < 0)
        return -1;
    return 0;
}

/* v1: "PROXY " then fields of printable ASCII separated by single spaces, then CR LF. */
static ssize_t parse_v1(const char *buf, size_t len, uds_proxy_info *out)
{
    size_t sig = sizeof v1_sig - 1;
    /* The CR comes at V1_MAX - 2 at the latest. */
    for (size_t i = sig; i < len && i < V1_MAX - 1; i++) {
        char ch = buf[i];
        if (ch == '\r') {
            if (i + 1 == len)
                return 0;
            if (buf[i + 1] != '\n' || parse_v1_fields(buf + sig, i - sig, out) < 0)
                return -EPROTO;
            out->version = 1;
            return (ssize_t)(i + 2);
        }
        if (ch < ' ' || ch > '~')
            return -EPROTO; /* (a lone '\n' too) */
    }
    return len >= V1_MAX - 1 ? -EPROTO : 0;
}

/* The bytes a v2 header of family fam (a PROXY command's) must hold after its fixed part, or
 * -1 for a family refused: datagram transports (this is a stream) and unknown values. */
static long v2_family_need(unsigned fam)
{
    switch (fam) {
    case 0x00: return 0;   /* unspecified */
    case 0x11: return 12;  /* TCP over IPv4: two addresses, two ports */
    case 0x21: return 36;  /* TCP over IPv6 */
    case 0x31: return 216; /* a Unix stream: two paths */
    default: return -1;
    }
}

/* v2: the signature, version 2 with command LOCAL (0) or PROXY (1), the family and transport,
 * the length of what follows (addresses, then TLVs, which are skipped). Each byte is judged
 * as soon as it is in. */
static ssize_t parse_v2(const unsigned char *buf, size_t len, uds_proxy_info *out)
{
    unsigned ver_cmd = len > 12 ? buf[12] : 0x20, cmd = ver_cmd & 0xF;
    if ((ver_cmd >> 4) != 2 || cmd > 1)
        return -EPROTO;
    /* LOCAL (a balancer's own connection, such as a health check): the family means nothing
     * and the connection's own endpoints stand. */
    long need = len > 13 && cmd == 1 ? v2_family_need(buf[13]) : 0;
    if (need < 0)
        return -EPROTO;
    if (len < V2_FIXED)
        return 0;
    size_t body = ((size_t)buf[14] << 8) | buf[15];
    if (body < (size_t)need)
        return -EPROTO;
    if (len < V2_FIXED + body)
        return 0;
    out->version = 2;
    out->family = 0;
    if (cmd == 1 && (buf[13] == 0x11 || buf[13] == 0x21)) {
        const unsigned char *a = buf + V2_FIXED;
        size_t alen = buf[13] == 0x11 ? 4 : 16;
        out->family = buf[13] == 0x11 ? 4 : 6;
        memcpy(out->src, a, alen);
        memcpy(out->dst, a + alen, alen);
        out->src_port = (uint16_t)((a[2 * alen] << 8) | a[2 * alen + 1]);
        out->dst_port = (uint16_t)((a[2 * alen + 2] << 8) | a[2 * alen + 3]);
    }
    return (ssize_t)(V2_FIXED + body);
}

ssize_t uds_proxy_parse(const char *buf, size_t len, uds_proxy_info *out)
{
    memset(out, 0, sizeof *out);
    if (len == 0)
        return 0;
    const char *sig = buf[0] == 'P' ? v1_sig : v2_sig;
    size_t sig_len = buf[0] == 'P' ? sizeof v1_sig - 1 : sizeof v2_sig;
    if (!prefix_matches(buf, len < sig_len ? len : sig_len, sig))
        return -EPROTO;
    if (len < sig_len)
        return 0;
    if (sig == v1_sig)
        return parse_v1(buf, len, out);
    return parse_v2((const unsigned char *)buf, len, out);
}
