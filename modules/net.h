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

/* Connects a non-blocking socket before `end`; returns it, or -1 with *why set
 * ("cannot resolve", "connect timed out", strerror's text). */
static inline int net_connect(const char *host, const char *port, double end, const char **why) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0) return *why = "cannot resolve", -1;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        freeaddrinfo(ai);
        return *why = strerror(errno), -1;
    }
    int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    if (r != 0 && errno != EINPROGRESS) {
        *why = strerror(errno);
        close(fd);
        return -1;
    }
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (r != 0 && (!net_wait(fd, POLLOUT, end) || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) || soerr)) {
        *why = soerr ? strerror(soerr) : rb_interrupted() ? "interrupted" : "connect timed out";
        close(fd);
        return -1;
    }
    return fd;
}

#endif
