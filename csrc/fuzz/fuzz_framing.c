/*
 * fuzz_framing.c - libFuzzer harness for the decoders. Input: framing, limit, a split point,
 * then the stream. Checks what the server relies on: a frame lies inside the buffer, its
 * payload inside the frame; u32 and line payloads have the shape their framing promises; and
 * cutting the stream in two pieces, the way bytes arrive, yields the same messages.
 */
#include "uds.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MSGS 4096

typedef struct { size_t off, len; } span;

/* Decodes buf[0..len) as the server does (frame after frame); returns how many frames, and
 * -1 if a frame was refused (the server would close the connection there). */
static int decode(int framing, const char *buf, size_t len, size_t max, span *out, size_t *used)
{
    size_t pos = 0, scan = 0;
    int n = 0;
    while (pos < len && n < MAX_MSGS) {
        size_t off = 0, plen = 0;
        ssize_t r = uds_frame_next(framing, buf + pos, len - pos, max, &scan, &off, &plen);
        if (r == 0)
            break;
        if (r < 0) {
            if (r != -EMSGSIZE)
                abort();
            *used = pos;
            return -1;
        }
        if ((size_t)r > len - pos || off + plen > (size_t)r || plen > max)
            abort();
        if (framing == UDS_FRAMING_LINE &&
            (memchr(buf + pos, '\n', plen) != NULL || buf[pos + (size_t)r - 1] != '\n'))
            abort();
        if (framing == UDS_FRAMING_U32 && (off != 4 || (size_t)r != 4 + plen))
            abort();
        out[n].off = pos + off;
        out[n].len = plen;
        n++;
        pos += (size_t)r;
        scan = 0;
    }
    *used = pos;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static span whole[MAX_MSGS], first[MAX_MSGS], rest[MAX_MSGS];
    if (size < 3)
        return 0;
    int framing = data[0] % 3;
    size_t max = 1 + (size_t)data[1] * 3;
    size_t len = size - 3;
    size_t cut = len ? data[2] % (len + 1) : 0;
    /* An exact-size copy: a read past the end is caught by AddressSanitizer. */
    char *buf = malloc(len ? len : 1);
    memcpy(buf, data + 3, len);

    size_t used_whole, used_first, used_rest;
    int n_whole = decode(framing, buf, len, max, whole, &used_whole);
    if (framing == UDS_FRAMING_RAW) {
        free(buf); /* raw: boundaries are wherever reads fall; nothing to compare */
        return 0;
    }
    /* The first piece alone, then what it left plus the rest. */
    char *piece = malloc(cut ? cut : 1);
    memcpy(piece, buf, cut);
    int n_first = decode(framing, piece, cut, max, first, &used_first);
    free(piece);
    if (n_first >= 0) {
        int n_rest = decode(framing, buf + used_first, len - used_first, max, rest, &used_rest);
        if ((n_whole < 0) != (n_rest < 0))
            abort();
        if (n_whole >= 0 && n_whole < MAX_MSGS && n_first + n_rest < MAX_MSGS) {
            if (n_first + n_rest != n_whole || used_first + used_rest != used_whole)
                abort();
            for (int i = 0; i < n_whole; i++) {
                span got = i < n_first ? first[i] : rest[i - n_first];
                if (i >= n_first)
                    got.off += used_first;
                if (got.off != whole[i].off || got.len != whole[i].len)
                    abort();
            }
        }
    } else if (n_whole >= 0) {
        abort(); /* a prefix refused what the whole accepted */
    }
    free(buf);
    return 0;
}
