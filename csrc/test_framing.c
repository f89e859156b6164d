/*
 * test_framing.c - the decoders against inputs that end exactly at a page the process may not
 * read (picohttpparser's trick): reading one byte past the input crashes the test.
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

    return check_done("test_framing");
}
