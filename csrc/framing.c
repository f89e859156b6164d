/*
 * framing.c - pure functions that cut a byte stream into messages and frame replies.
 * No state, no allocation, no system call: easy to test at every split and to fuzz.
 */
#define _GNU_SOURCE
#include "uds.h"

#include <errno.h>
#include <string.h>

#define U32_HEADER 4

static size_t u32_length(const unsigned char *p)
{
    return ((size_t)p[0] << 24) | ((size_t)p[1] << 16) | ((size_t)p[2] << 8) | p[3];
}

static ssize_t next_u32(const unsigned char *p, size_t len, size_t max, size_t *off,
                        size_t *plen)
{
    if (len < U32_HEADER)
        return 0;
    size_t n = u32_length(p);
    /* Refuse before anything waits for the payload: a 0xFFFFFFFF header costs nothing. */
    if (n > max)
        return -EMSGSIZE;
    if (len - U32_HEADER < n)
        return 0;
    *off = U32_HEADER;
    *plen = n;
    return (ssize_t)(U32_HEADER + n);
}

static ssize_t next_line(const char *buf, size_t len, size_t max, size_t *scan, size_t *off,
                         size_t *plen)
{
    /* A payload of max bytes puts its '\n' at index max: look no further than that.
     * (Written so that max + 1 cannot overflow.) */
    size_t limit = len > max ? max + 1 : len;
    size_t from = *scan < limit ? *scan : limit;
    const char *nl = memchr(buf + from, '\n', limit - from);
    if (nl == NULL) {
        *scan = limit;
        return len > max ? -EMSGSIZE : 0;
    }
    *off = 0;
    *plen = (size_t)(nl - buf);
    return (ssize_t)(*plen + 1);
}

ssize_t uds_frame_next(int framing, const char *buf, size_t len, size_t max_payload,
                       size_t *scan, size_t *payload_off, size_t *payload_len)
{
    switch (framing) {
    case UDS_FRAMING_U32:
        return next_u32((const unsigned char *)buf, len, max_payload, payload_off, payload_len);
    case UDS_FRAMING_LINE:
        return next_line(buf, len, max_payload, scan, payload_off, payload_len);
    case UDS_FRAMING_RAW:
        if (len == 0)
            return 0;
        if (max_payload == 0)
            return -EMSGSIZE;
        *payload_off = 0;
        *payload_len = len < max_payload ? len : max_payload;
        return (ssize_t)*payload_len;
    default:
        return -EINVAL;
    }
}

size_t uds_frame_missing(int framing, const char *buf, size_t len, size_t max_payload)
{
    if (framing != UDS_FRAMING_U32 || len < U32_HEADER)
        return 0;
    size_t n = u32_length((const unsigned char *)buf);
    return (n > max_payload || U32_HEADER + n <= len) ? 0 : U32_HEADER + n - len;
}

int uds_frame_header(int framing, size_t len, unsigned char *hdr, int *trailer)
{
    *trailer = 0;
    switch (framing) {
    case UDS_FRAMING_U32:
        if (len > 0xFFFFFFFFu)
            return -EMSGSIZE;
        hdr[0] = (unsigned char)(len >> 24);
        hdr[1] = (unsigned char)(len >> 16);
        hdr[2] = (unsigned char)(len >> 8);
        hdr[3] = (unsigned char)len;
        return U32_HEADER;
    case UDS_FRAMING_LINE:
        *trailer = 1;
        return 0;
    case UDS_FRAMING_RAW:
        return 0;
    default:
        return -EINVAL;
    }
}

int uds_frame_check(int framing, const char *payload, size_t len)
{
    switch (framing) {
    case UDS_FRAMING_U32:
        return len > 0xFFFFFFFFu ? -EMSGSIZE : 0;
    case UDS_FRAMING_LINE:
        return len > 0 && memchr(payload, '\n', len) != NULL ? -EINVAL : 0;
    case UDS_FRAMING_RAW:
        return 0;
    default:
        return -EINVAL;
    }
}
