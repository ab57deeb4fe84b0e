/*
 * watchdog.c: the bound on runbook code that Lua cannot catch. The count
 * hook (gate.c) stops Lua code at its deadline, but not code stuck inside C
 * (a long pattern match) or an error handler that loops while hooks are off.
 * While runbook code runs, a thread watches its deadline: once the deadline
 * and a grace have passed (or a grace after SIGINT/SIGTERM), it appends the
 * lines the engine prepared to the run's journal, says what happened on
 * stderr and ends the process, so the run can be resumed.
 */
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

#define POLL 0.1   /* seconds: how late the watchdog may be */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;    /* signalled to stop the thread */
static pthread_t thread;
static int started, stopping;
static double fire_at;         /* 0: nothing to watch */
static char *journal, *lines, *message;
static int exit_code;

static void write_all(int fd, const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* Called with the lock held; never returns. */
static void fire(int sig)
{
    if (sig) {
        static const char msg[] = "\nrunbook: the step did not stop after the signal; exiting now\n";
        write_all(2, msg);
        _exit(128 + sig);
    }
    int fd = journal ? open(journal, O_WRONLY | O_APPEND | O_CLOEXEC) : -1;
    if (fd >= 0) {
        write_all(fd, lines);
        fsync(fd);
    }
    if (isatty(2))
        write_all(2, "\n");   /* below the terminal view's status line */
    write_all(2, message);
    _exit(exit_code);
}

static void *watch(void *arg)
{
    double signalled = 0;
    (void)arg;
    pthread_mutex_lock(&lock);
    while (!stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)(POLL * 1e9);
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(&wake, &lock, &ts);
        double now = rb_now();
        if (fire_at == 0 || !rb_interrupted())
            signalled = 0;
        else if (signalled == 0)
            signalled = now;
        if (fire_at > 0 && now > fire_at)
            fire(0);
        if (signalled > 0 && now > signalled + RB_WATCHDOG_GRACE)
            fire(rb_last_signal());
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

/* Started with the first deadline. The thread takes no signals: they
 * interrupt the main thread's calls. Called with the lock held. */
static void start(void)
{
    sigset_t all, old;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&wake, &ca);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    started = pthread_create(&thread, NULL, watch, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Stop and join the thread, so nothing of it outlives the process's end. */
void rb_watchdog_stop(void)
{
    pthread_mutex_lock(&lock);
    stopping = 1;
    int joinable = started;
    if (started) pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    if (joinable) pthread_join(thread, NULL);
}

static char *field(lua_State *L, int t, const char *key)
{
    lua_getfield(L, t, key);
    const char *s = lua_tostring(L, -1);
    char *copy = s ? strdup(s) : NULL;
    lua_pop(L, 1);
    return copy;
}

/*
 * Watch the deadline `deadline` (monotonic seconds) for the table at index t:
 * {journal = path, lines = text to append, message = text for stderr,
 * exit = status}; 0 and no table stop watching.
 */
void rb_watchdog(lua_State *L, double deadline, int t)
{
    pthread_mutex_lock(&lock);
    free(journal);
    free(lines);
    free(message);
    journal = lines = message = NULL;
    fire_at = 0;
    if (deadline > 0 && t) {
        journal = field(L, t, "journal");
        lines = field(L, t, "lines");
        message = field(L, t, "message");
        lua_getfield(L, t, "exit");
        exit_code = (int)luaL_optinteger(L, -1, 1);
        lua_pop(L, 1);
        if (!lines) lines = strdup("");
        if (!message) message = strdup("runbook: the watchdog ended the run\n");
        fire_at = deadline + RB_WATCHDOG_GRACE;
        if (!started)
            start();
    }
    pthread_mutex_unlock(&lock);
}
