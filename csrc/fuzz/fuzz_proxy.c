/*
 * fuzz_proxy.c - libFuzzer harness for the PROXY protocol header parser. Input: a split point,
 * then the bytes a connection begins with. Checks what the server relies on: a header lies
 * inside the buffer and names a family it knows; a prefix of a header or of valid beginnings
 * needs more bytes rather than being refused or taken; the answer does not depend on what
 * follows the header; and a refusal stands whatever comes after it (the server closes there).
 */
#include "uds.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Parses an exact-size copy of buf[0..len): a read past the end is caught by AddressSanitizer. */
static ssize_t parse_copy(const uint8_t *buf, size_t len, uds_proxy_info *info)
{
    char *copy = malloc(len ? len : 1);
    memcpy(copy, buf, len);
    ssize_t r = uds_proxy_parse(copy, len, info);
    free(copy);
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const uint8_t *buf = data + 1;
    size_t len = size - 1, cut = len ? data[0] % (len + 1) : 0;
    uds_proxy_info whole, part;
    ssize_t r = parse_copy(buf, len, &whole);
    if (r != 0 && r != -EPROTO && (r < 0 || (size_t)r > len))
        abort();
    if (r > 0 && whole.family != 0 && whole.family != 4 && whole.family != 6)
        abort();
    if (r > 0 && whole.version != 1 && whole.version != 2)
        abort();
    ssize_t p = parse_copy(buf, cut, &part);
    if (r > 0) {
        /* A prefix of the header needs more; the header alone, or with any bytes after it, is
         * the same header. */
        if (cut < (size_t)r ? p != 0 : p != r || memcmp(&part, &whole, sizeof part) != 0)
            abort();
    } else if (r == 0) {
        if (p != 0) /* valid beginnings are valid all the way */
            abort();
    } else if (p == -EPROTO) {
        /* refused already: more bytes never make it valid (checked by r itself) */
    } else if (p != 0) {
        abort();
    }
    return 0;
}
