/*
 * net.h: a TCP connection with a deadline, for the modules that speak a wire
 * protocol themselves (kafka's broker probe, redis). Every wait is cut into
 * slices so Ctrl-C (rb_interrupted) is seen within NET_SLICE_MS.
 */
#ifndef RUNBOOK_NET_H
#define RUNBOOK_NET_H

#include <errno.h>
#include <netdb.h>
#include <poll.h>
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

/* Connects to host:port before `end`, trying the name's addresses in turn
 * (localhost is often ::1 first while a server listens on 127.0.0.1 only);
 * returns the socket, or -1 with *why set ("cannot resolve", "connect timed
 * out", "interrupted", or the last address's strerror text). */
static inline int net_connect(const char *host, const char *port, double end, const char **why) {
    struct addrinfo hints = {0}, *list;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &list) != 0) return *why = "cannot resolve", -1;
    int fd = -1;
    for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
        fd = net_try(ai, end, why);
        if (fd >= 0 || rb_now() >= end || rb_interrupted()) break;
    }
    freeaddrinfo(list);
    return fd;
}

#endif
