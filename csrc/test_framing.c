/*
 * test_framing.c - the decoders and the PROXY header parser against inputs that end exactly at
 * a page the process may not read (picohttpparser's trick): reading one byte past the input
 * crashes the test.
 */
#define _GNU_SOURCE
#include "uds.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char *page;     /* two pages; the second one is PROT_NONE */
static size_t pagesz;


/* Copies input to the very end of the readable page and decodes it there. */
static ssize_t decode_guarded(int framing, const char *input, size_t len, size_t max,
                              size_t *off, size_t *plen)
{
    char *at = page + pagesz - len;
    memcpy(at, input, len);
    size_t scan = 0;
    return uds_frame_next(framing, at, len, max, &scan, off, plen);
}

/* Every prefix of a complete frame is incomplete; the whole of it is one frame. */
static void every_prefix(int framing, const char *frame, size_t len, size_t max,
                         size_t want_off, size_t want_len)
{
    size_t off, plen;
    for (size_t cut = 0; cut < len; cut++)
        CHECK(decode_guarded(framing, frame, cut, max, &off, &plen) == 0);
    CHECK(decode_guarded(framing, frame, len, max, &off, &plen) == (ssize_t)len);
    CHECK(off == want_off && plen == want_len);
}

/* uds_proxy_parse() of input placed at the end of the readable page. */
static ssize_t proxy_guarded(const char *input, size_t len, uds_proxy_info *info)
{
    char *at = page + pagesz - len;
    memcpy(at, input, len);
    return uds_proxy_parse(at, len, info);
}

/* header[0..len) followed by what comes after it: every prefix of the header needs more bytes,
 * the whole of it (with or without the bytes after) is a header of len bytes. */
static void proxy_every_split(const char *header, size_t len, uds_proxy_info *info)
{
    char buf[512];
    memcpy(buf, header, len);
    memcpy(buf + len, "\0\0\0\5hello", 9); /* the first frame, right behind it */
    for (size_t cut = 0; cut < len; cut++)
        CHECK(proxy_guarded(buf, cut, info) == 0);
    CHECK(proxy_guarded(buf, len + 9, info) == (ssize_t)len);
    CHECK(proxy_guarded(buf, len, info) == (ssize_t)len);
}

/* A malformed header is refused once the byte that makes it so is in, never before. */
static void proxy_refused_at(const char *input, size_t len, size_t bad_at)
{
    uds_proxy_info info;
    for (size_t cut = 0; cut <= bad_at && cut < len; cut++)
        CHECK(proxy_guarded(input, cut, &info) == 0);
    for (size_t cut = bad_at + 1; cut <= len; cut++)
        CHECK(proxy_guarded(input, cut, &info) == -EPROTO);
}

static void test_proxy(void)
{
    uds_proxy_info info;
    static const char v1[] = "PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n";
    proxy_every_split(v1, sizeof v1 - 1, &info);
    CHECK(info.version == 1 && info.family == 4 && info.src_port == 56324 && info.dst_port == 443);
    CHECK(memcmp(info.src, "\xc0\xa8\0\1", 4) == 0 && memcmp(info.dst, "\x0a\0\0\2", 4) == 0);

    static const char v1_6[] = "PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
    proxy_every_split(v1_6, sizeof v1_6 - 1, &info);
    CHECK(info.family == 6 && info.src_port == 65535 && info.dst_port == 0);
    CHECK(memcmp(info.src, "\x20\x01\x0d\xb8", 4) == 0 && info.src[15] == 1 && info.dst[15] == 1);

    static const char unknown[] = "PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    proxy_every_split(unknown, sizeof unknown - 1, &info);
    CHECK(info.version == 1 && info.family == 0);
    proxy_every_split("PROXY UNKNOWN\r\n", 15, &info);
    CHECK(info.family == 0);

    /* v2: PROXY over TCP/IPv4, 127.0.0.1:40000 -> 127.0.0.2:8000, with a TLV to skip. */
    static const char v2[] = "\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x11"
                             "\x7f\0\0\1\x7f\0\0\2\x9c\x40\x1f\x40" "\x04\0\2ab";
    proxy_every_split(v2, sizeof v2 - 1, &info);
    CHECK(info.version == 2 && info.family == 4 && info.src_port == 40000 && info.dst_port == 8000);
    CHECK(memcmp(info.src, "\x7f\0\0\1", 4) == 0 && memcmp(info.dst, "\x7f\0\0\2", 4) == 0);

    char v2_6[16 + 36] = "\r\n\r\n\0\r\nQUIT\n\x21\x21\0\x24";
    v2_6[16 + 15] = 1;            /* src ::1 */
    v2_6[16 + 32] = (char)0x12;   /* src port 0x1234 */
    v2_6[16 + 33] = (char)0x34;
    proxy_every_split(v2_6, sizeof v2_6, &info);
    CHECK(info.family == 6 && info.src[15] == 1 && info.src_port == 0x1234 && info.dst_port == 0);

    /* LOCAL (a balancer's own health check): no address; its family means nothing. */
    proxy_every_split("\r\n\r\n\0\r\nQUIT\n\x20\x00\0\0", 16, &info);
    CHECK(info.version == 2 && info.family == 0);
    proxy_every_split("\r\n\r\n\0\r\nQUIT\n\x20\x12\0\0", 16, &info);
    CHECK(info.family == 0);

    /* Malformed: refused at the first byte that makes them so. */
    proxy_refused_at("GET / HTTP/1.0\r\n", 16, 0);
    proxy_refused_at("\0\0\0\5hello", 9, 0);                       /* a frame, no header */
    proxy_refused_at("PROXY\tTCP4", 10, 5);
    proxy_refused_at("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31, 30);    /* LF without CR */
    proxy_refused_at("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r", 32, 31);
    proxy_refused_at("PROXY TCP4 1.2.3.4\x80", 19, 18);
    const char *bad_lines[] = {
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",      /* six fields */
        "PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",       /* two spaces */
        "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",       /* a leading zero */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",    /* no such port */
        "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",      /* no such address */
        "PROXY TCP4 ::1 ::1 1 2\r\n",                /* IPv6 as TCP4 */
        "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY \r\n",
    };
    for (size_t i = 0; i < sizeof bad_lines / sizeof bad_lines[0]; i++) {
        size_t n = strlen(bad_lines[i]);
        proxy_refused_at(bad_lines[i], n, n - 1); /* known bad only once the line is whole */
    }
    char longline[200] = "PROXY UNKNOWN ";
    memset(longline + 14, 'x', sizeof longline - 14);
    proxy_refused_at(longline, sizeof longline, 105); /* no CR where it must be, at the latest */

    char v2bad[sizeof v2];
    memcpy(v2bad, v2, sizeof v2);
    v2bad[12] = 0x11; /* version 1 in a v2 header */
    proxy_refused_at(v2bad, sizeof v2 - 1, 12);
    v2bad[12] = 0x22; /* command 2 */
    proxy_refused_at(v2bad, sizeof v2 - 1, 12);
    v2bad[12] = 0x21;
    v2bad[13] = 0x12; /* UDP over IPv4: a datagram's header on a stream */
    proxy_refused_at(v2bad, sizeof v2 - 1, 13);
    v2bad[13] = 0x11;
    v2bad[15] = 11;   /* too short for two IPv4 addresses and ports */
    proxy_refused_at(v2bad, sizeof v2 - 1, 15);
    memcpy(v2bad, v2, sizeof v2);
    v2bad[7] = 'q';   /* not the signature */
    proxy_refused_at(v2bad, sizeof v2 - 1, 7);
}

int main(void)
{
    pagesz = (size_t)sysconf(_SC_PAGESIZE);
    page = mmap(NULL, 2 * pagesz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED || mprotect(page + pagesz, pagesz, PROT_NONE) != 0) {
        perror("mmap");
        return 2;
    }
    size_t off, plen;

    /* u32 */
    every_prefix(UDS_FRAMING_U32, "\0\0\0\5hello", 9, 16, 4, 5);
    every_prefix(UDS_FRAMING_U32, "\0\0\0\0", 4, 16, 4, 0);          /* zero-length */
    every_prefix(UDS_FRAMING_U32, "\0\0\0\3abc", 7, 3, 4, 3);         /* exactly max */
    CHECK(decode_guarded(UDS_FRAMING_U32, "\0\0\0\4", 4, 3, &off, &plen) == -EMSGSIZE);
    CHECK(decode_guarded(UDS_FRAMING_U32, "\xff\xff\xff\xff", 4, 16, &off, &plen) == -EMSGSIZE);
    CHECK(decode_guarded(UDS_FRAMING_U32, "\0\0\0\2ab\0\0", 8, 16, &off, &plen) == 6);

    /* line */
    every_prefix(UDS_FRAMING_LINE, "hello\n", 6, 16, 0, 5);
    every_prefix(UDS_FRAMING_LINE, "\n", 1, 16, 0, 0);                /* zero-length */
    every_prefix(UDS_FRAMING_LINE, "ab\r\n", 4, 16, 0, 3);            /* '\r' is the user's */
    every_prefix(UDS_FRAMING_LINE, "abc\n", 4, 3, 0, 3);              /* exactly max */
    CHECK(decode_guarded(UDS_FRAMING_LINE, "abcd", 4, 3, &off, &plen) == -EMSGSIZE);
    CHECK(decode_guarded(UDS_FRAMING_LINE, "abcd\n", 5, 3, &off, &plen) == -EMSGSIZE);
    CHECK(decode_guarded(UDS_FRAMING_LINE, "abc", 3, 3, &off, &plen) == 0);
    {
        /* The scan hint: a line fed in pieces is found, and the hint never passes the data. */
        const char *line = "0123456789\n";
        char *at = page + pagesz - 11;
        memcpy(at, line, 11);
        size_t scan = 0;
        for (size_t len = 0; len < 11; len++) {
            CHECK(uds_frame_next(UDS_FRAMING_LINE, at, len, 64, &scan, &off, &plen) == 0);
            CHECK(scan == len);
        }
        CHECK(uds_frame_next(UDS_FRAMING_LINE, at, 11, 64, &scan, &off, &plen) == 11);
        CHECK(plen == 10);
    }

    /* raw */
    CHECK(decode_guarded(UDS_FRAMING_RAW, "", 0, 16, &off, &plen) == 0);
    CHECK(decode_guarded(UDS_FRAMING_RAW, "abc", 3, 16, &off, &plen) == 3 && plen == 3);
    CHECK(decode_guarded(UDS_FRAMING_RAW, "abcdef", 6, 4, &off, &plen) == 4 && plen == 4);

    /* what a frame in progress still lacks */
    CHECK(uds_frame_missing(UDS_FRAMING_U32, "\0\0\1\0ab", 6, 1024) == 4 + 256 - 6);
    CHECK(uds_frame_missing(UDS_FRAMING_U32, "\0\0\0\2ab", 6, 1024) == 0);      /* complete */
    CHECK(uds_frame_missing(UDS_FRAMING_U32, "\0\0", 2, 1024) == 0);             /* unknown yet */
    CHECK(uds_frame_missing(UDS_FRAMING_U32, "\xff\xff\xff\xff", 4, 1024) == 0); /* refused */
    CHECK(uds_frame_missing(UDS_FRAMING_LINE, "abc", 3, 1024) == 0);

    /* unknown framing */
    CHECK(decode_guarded(99, "abc", 3, 16, &off, &plen) == -EINVAL);

    /* encoding */
    unsigned char hdr[4];
    int trailer;
    CHECK(uds_frame_header(UDS_FRAMING_U32, 0x01020304, hdr, &trailer) == 4 && trailer == 0);
    CHECK(hdr[0] == 1 && hdr[1] == 2 && hdr[2] == 3 && hdr[3] == 4);
    CHECK(uds_frame_header(UDS_FRAMING_LINE, 5, hdr, &trailer) == 0 && trailer == 1);
    CHECK(uds_frame_header(UDS_FRAMING_RAW, 5, hdr, &trailer) == 0 && trailer == 0);
    CHECK(uds_frame_check(UDS_FRAMING_LINE, "a\nb", 3) == -EINVAL);
    CHECK(uds_frame_check(UDS_FRAMING_LINE, "a\rb", 3) == 0);
    if (sizeof(size_t) > 4) {
        CHECK(uds_frame_header(UDS_FRAMING_U32, (size_t)0xFFFFFFFFu + 1, hdr, &trailer) ==
              -EMSGSIZE);
        CHECK(uds_frame_check(UDS_FRAMING_U32, "", (size_t)0xFFFFFFFFu + 1) == -EMSGSIZE);
    }

    test_proxy();

    return check_done("test_framing");
}
