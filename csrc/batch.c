/*
 * batch.c - the whole-batch calls, shaped for pyuds's Python loop: uds_poll_batch() describes a
 * batch of small messages so that Python makes all their bytes objects in one call, and
 * uds_reply_batch() takes all their replies in one call, a run of them per connection;
 * uds_reply_poll_batch() answers a batch of one message and polls again in one call.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <string.h>

/* Writes the layout item of a payload of len bytes (at most UDS_PACK_MAX) at p; returns its end. */
static char *layout_item(char *p, size_t len)
{
    char digits[UDS_LAYOUT_ITEM_MAX];
    int k = 0;
    do {
        digits[k++] = (char)('0' + len % 10);
        len /= 10;
    } while (len > 0);
    while (k > 0)
        *p++ = digits[--k];
    *p++ = 's';
    return p;
}

int uds_poll_batch(uds_server *s, uds_event *ev, int cap, int timeout_ms, uds_batch *b)
{
    int n = uds_poll(s, ev, cap, timeout_ms);
    size_t used = 0;
    char *item = b->layout;
    int all = 1, fds = 0, runs = 0;
    for (int i = 0; i < n; i++) {
        size_t len = ev[i].len;
        int message = ev[i].type == UDS_EV_MESSAGE;
        fds |= message && ev[i].nfds > 0;
        if (!all)
            continue;
        if (!message || ev[i].nfds > 0 || ev[i].slot < 0 || len > UDS_PACK_MAX || b->pack_cap - used < len) {
            all = 0;
            continue;
        }
        if (len > 0)
            memcpy(b->pack + used, ev[i].data, len);
        used += len;
        item = layout_item(item, len);
        /* A new run when the connection changes (by id as well: a slot is reused). */
        if (runs == 0 || b->run_slot[runs - 1] != ev[i].slot || ev[i - 1].id != ev[i].id)
            b->run_slot[runs++] = ev[i].slot;
        b->run_end[runs - 1] = (uint32_t)i + 1;
    }
    b->pack_used = (int64_t)used;
    b->layout_len = item - b->layout;
    b->runs = runs;
    b->all_packed = all;
    b->any_fds = fds;
    b->one_len = n == 1 && all ? (int64_t)ev[0].len : -1;
    b->one_slot = n == 1 && all ? ev[0].slot : -1;
    return n;
}

/* Queues the reply to the last batch's one message (b->ev[0]), written at once if nothing waits
 * before it; b->reply_rc gets what that returned (0 for none: len < 0). */
static void reply_one(uds_server *s, uds_batch *b, const char *reply, int64_t len)
{
    const uds_event *e = &b->ev[0];
    b->reply_rc = len < 0 ? 0 : s->kind->send(s, e->slot, e->id, reply, (size_t)len, NULL, 0, UDS_SEND_NOW);
}

int uds_reply_poll_batch(uds_server *s, const char *reply, int64_t len, int timeout_ms,
                         uds_batch *b)
{
    reply_one(s, b, reply, len);
    /* A reply that failed is the caller's to act on (its client may be owed a close): no wait. */
    return uds_poll_batch(s, b->ev, b->cap, b->reply_rc < 0 ? 0 : timeout_ms, b);
}

_Static_assert(UDS_PACK_MAX < 1 << UDS_ONE_SHIFT, "a packed length fits below the slot");

int64_t uds_serve_one(uds_batch *b, const char *reply, int64_t len)
{
    uds_server *s = b->srv;
    if (s == NULL) { /* the caller let go of its server */
        b->n = -EBADF;
        b->one_len = -1;
        b->reply_rc = 0;
        return -1;
    }
    if (__atomic_load_n(&b->interrupt, __ATOMIC_ACQUIRE) || (b->draining && s->live <= 0)) {
        reply_one(s, b, reply, len);
        b->n = 0;
        b->one_len = -1;
        return -1;
    }
    b->n = uds_reply_poll_batch(s, reply, len, b->timeout_ms, b);
    if (b->one_len < 0)
        return -1;
    const uds_event *e = &b->ev[0];
    int same = e->slot == b->last_slot && e->id == b->last_id;
    b->last_slot = e->slot;
    b->last_id = e->id;
    if (b->reply_rc != 0)
        return -1;
    return same ? b->one_len : (int64_t)(e->slot + 1) << UDS_ONE_SHIFT | b->one_len;
}

int uds_reply_batch(uds_server *s, const uds_event *ev, int first, int n, const char *data,
                    const int16_t *lens, int *rcs)
{
    int failed = 0;
    ev += first;
    /* The replies to one connection's run of events go in one call. */
    for (int i = 0, j; i < n; i = j) {
        size_t run_bytes = 0;
        for (j = i; j < n && ev[j].slot == ev[i].slot && ev[j].id == ev[i].id; j++)
            run_bytes += lens[j] < 0 ? 0 : (size_t)lens[j];
        failed += s->kind->reply_run(s, ev[i].slot, ev[i].id, data, lens + i, j - i, rcs + i);
        data += run_bytes;
    }
    return failed;
}
