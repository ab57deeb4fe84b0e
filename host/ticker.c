/*
 * ticker.c: the live part of the terminal view. While a step runs, a thread
 * redraws one status line ("[2/7] Scale consumers ⠋ 12s") every quarter
 * second, so a step blocked in a long call (a rollout wait, a pg_dump) still
 * shows it is alive. Everything the terminal view prints goes through
 * host.term_write, which clears the status line first under the same lock, so
 * the two never interleave. Only used when standard output is a terminal.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

#define SHOW_AFTER 1.0   /* seconds: quick steps never flicker a status line */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t thread;
static int started;         /* the thread exists */
static int active;          /* a step is running: draw */
static int drawn;           /* a status line is on screen */
static char label[256];
static double since;
static char waiting[256];   /* what the step waits for, shown with the time left until `until` */
static double until;

static void write_all(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void clear_line(void)
{
    if (drawn) {
        write_all("\r\033[K", 4);
        drawn = 0;
    }
}

static void *tick(void *arg)
{
    static const char *const frames[] = { "⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏" };
    unsigned frame = 0;
    (void)arg;
    for (;;) {
        struct timespec ts = { 0, 250000000 };
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&lock);
        double elapsed = rb_now() - since;
        if (active && elapsed >= SHOW_AFTER) {
            char line[640];
            int n = snprintf(line, sizeof line, "\r\033[K%s %s %ds", label, frames[frame++ % 10], (int)elapsed);
            if (waiting[0]) {
                int left = until > rb_now() ? (int)(until - rb_now()) : 0;
                n += snprintf(line + n, sizeof line - (size_t)n, ": waiting for %s, %dm%02ds left", waiting,
                              left / 60, left % 60);
            }
            write_all(line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
            drawn = 1;
        }
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

/* ticker_start(label): show `label` with a spinner and elapsed time until ticker_stop. */
static int h_ticker_start(lua_State *L)
{
    const char *s = luaL_checkstring(L, 1);
    pthread_mutex_lock(&lock);
    snprintf(label, sizeof label, "%s", s);
    waiting[0] = '\0';
    since = rb_now();
    active = 1;
    if (!started && pthread_create(&thread, NULL, tick, NULL) == 0) {
        pthread_detach(thread);
        started = 1;
    }
    pthread_mutex_unlock(&lock);
    return 0;
}

static int h_ticker_stop(lua_State *L)
{
    (void)L;
    pthread_mutex_lock(&lock);
    active = 0;
    clear_line();
    pthread_mutex_unlock(&lock);
    return 0;
}

/* term_write(s): write redacted text to the terminal, below any status line. */
static int h_term_write(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    rb_push_redacted(L, s, len);
    s = lua_tolstring(L, -1, &len);
    fflush(stdout);
    pthread_mutex_lock(&lock);
    clear_line();
    write_all(s, len);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* ticker_wait(what, seconds_left): the running step waits for `what` (a
 * rollout, a condition) until seconds_left from now; "" when it no longer does. */
static int h_ticker_wait(lua_State *L)
{
    const char *what = luaL_checkstring(L, 1);
    double left = luaL_optnumber(L, 2, 0);
    pthread_mutex_lock(&lock);
    snprintf(waiting, sizeof waiting, "%s", what);
    until = rb_now() + left;
    pthread_mutex_unlock(&lock);
    return 0;
}

/* term_width(): the terminal's columns on standard output, or nil when it is none. */
static int h_term_width(lua_State *L)
{
    struct winsize ws;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) != 0 || ws.ws_col == 0)
        return 0;
    lua_pushinteger(L, ws.ws_col);
    return 1;
}

const luaL_Reg rb_ticker_funcs[] = {
    { "ticker_start", h_ticker_start },
    { "ticker_wait", h_ticker_wait },
    { "term_width", h_term_width },
    { "ticker_stop", h_ticker_stop },
    { "term_write", h_term_write },
    { NULL, NULL }
};
