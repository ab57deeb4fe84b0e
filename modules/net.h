/*
 * net.h: a TCP connection with a deadline, for the modules that speak a wire
 * protocol themselves (kafka's broker probe, redis). Every wait is cut into
 * slices so Ctrl-C (rb_interrupted) is seen within NET_SLICE_MS. Its
 * includers define _GNU_SOURCE first (getaddrinfo_a).
 */
#ifndef RUNBOOK_NET_H
#define RUNBOOK_NET_H

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "runbook.h"

#define NET_SLICE_MS 100

/* Waits for `events` on fd until the monotonic time `end`; 0 on timeout or interrupt. */
static inline int net_wait(int fd, short events, double end) {
    for (;;) {
        int left = (int)((end - rb_now()) * 1000);
        if (left <= 0 || rb_interrupted()) return 0;
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, left < NET_SLICE_MS ? left : NET_SLICE_MS);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return 0;
    }
}

/* One address: a connected non-blocking socket, or -1 with *why set. */
static inline int net_try(const struct addrinfo *ai, double end, const char **why) {
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return *why = strerror(errno), -1;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) return fd;
    int err = errno, soerr = 0;
    socklen_t len = sizeof soerr;
    if (err == EINPROGRESS) {
        if (!net_wait(fd, POLLOUT, end)) err = 0; /* the deadline or an interrupt */
        else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) err = errno;
        else if ((err = soerr) == 0) return fd;
    }
    *why = err ? strerror(err) : rb_interrupted() ? "interrupted" : "connect timed out";
    close(fd);
    return -1;
}

/* A lookup of a name: the request glibc's resolver thread works on, with
 * its own copies of the name and the port. */
struct net_lookup {
    struct gaicb cb;
    struct addrinfo hints;
    struct net_lookup *next;
    char name[];
};

/* Lookups still running when their caller gave up: glibc's thread writes
 * to them when it is done, so they are kept (reachable, not leaked). */
static struct net_lookup *net_abandoned;

/* The addresses of host:port (TCP) before `end`: getaddrinfo_a, waited for
 * in slices so that Ctrl-C is seen. A resolver that never answers costs the
 * call's deadline, not the resolver's own timeouts (seconds per try, per
 * server). Returns 0 and *out (freeaddrinfo it), or -1 with *why set
 * ("cannot resolve", "name lookup timed out", "interrupted"). */
static inline int net_resolve(const char *host, const char *port, double end, struct addrinfo **out,
                              const char **why) {
    size_t hl = strlen(host) + 1, pl = strlen(port) + 1;
    struct net_lookup *q = calloc(1, sizeof *q + hl + pl);
    if (!q) return *why = "out of memory", -1;
    memcpy(q->name, host, hl);
    memcpy(q->name + hl, port, pl);
    q->hints.ai_socktype = SOCK_STREAM;
    q->cb = (struct gaicb){ .ar_name = q->name, .ar_service = q->name + hl, .ar_request = &q->hints };
    struct gaicb *list[] = { &q->cb };
    if (getaddrinfo_a(GAI_NOWAIT, list, 1, NULL) != 0) return free(q), *why = "cannot resolve", -1;
    int rc;
    while ((rc = gai_error(&q->cb)) == EAI_INPROGRESS) {
        double left = end - rb_now();
        if (left <= 0 || rb_interrupted()) break;
        if (left > NET_SLICE_MS / 1000.0) left = NET_SLICE_MS / 1000.0;
        const struct gaicb *wait[] = { &q->cb };
        gai_suspend(wait, 1, &(struct timespec){ 0, (long)(left * 1e9) });
    }
    if (rc == EAI_INPROGRESS) {
        int c = gai_cancel(&q->cb);
        if (c == EAI_ALLDONE) rc = gai_error(&q->cb);
        else {
            if (c == EAI_NOTCANCELED) q->next = net_abandoned, net_abandoned = q;
            else free(q);
            return *why = rb_interrupted() ? "interrupted" : "name lookup timed out", -1;
        }
    }
    *out = rc == 0 ? q->cb.ar_result : NULL;
    free(q);
    return rc == 0 ? 0 : (*why = "cannot resolve", -1);
}

/* Connects to host:port before `end`, trying the name's addresses in turn
 * (localhost is often ::1 first while a server listens on 127.0.0.1 only);
 * returns the socket, or -1 with *why set ("cannot resolve", "connect timed
 * out", "interrupted", or the last address's strerror text). */
static inline int net_connect(const char *host, const char *port, double end, const char **why) {
    struct addrinfo *list;
    if (net_resolve(host, port, end, &list, why) != 0) return -1;
    int fd = -1;
    for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
        fd = net_try(ai, end, why);
        if (fd >= 0 || rb_now() >= end || rb_interrupted()) break;
    }
    freeaddrinfo(list);
    return fd;
}

#endif
