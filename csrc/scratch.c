/*
 * scratch.c - the scratch area: where a packet or datagram that is longer than the room its
 * read has spills over, so that one recvmsg() takes it whole however long it is (up to the
 * limit). It is reserved once at the limit's size without committing memory, touched only as
 * far as a message reaches, and given back after a large one.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <sys/mman.h>

int uds_scratch_iov(uds_scratch *sc, size_t limit, struct iovec iov[2], char *at, size_t room)
{
    iov[0].iov_base = at;
    iov[0].iov_len = room < limit ? room : limit;
    if (room >= limit)
        return 1;
    if (sc->data == NULL) {
        void *p = mmap(NULL, limit, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return -ENOMEM;
        sc->data = p;
        sc->len = limit;
    }
    iov[1].iov_base = sc->data;
    iov[1].iov_len = limit - room;
    return 2;
}

void uds_scratch_used(uds_scratch *sc, size_t n)
{
    if (n > UDS_SCRATCH_KEEP)
        madvise(sc->data, sc->len, MADV_DONTNEED);
}

void uds_scratch_free(uds_scratch *sc)
{
    if (sc->data != NULL)
        munmap(sc->data, sc->len);
    sc->data = NULL;
    sc->len = 0;
}
