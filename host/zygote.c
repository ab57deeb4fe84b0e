/*
 * zygote.c: `runbook serve`'s pre-loaded child (docs/design.md, "runbook
 * serve: the zygote"). Exec'ing `runbook` for each run cost ~6-11 ms of CPU
 * before its run_start (the dynamic loader, a Lua state, the stdlib), and
 * back-to-back alerts queued on that. Instead serve starts one `runbook serve
 * --zygote` that has done all of it once, and each run is forked from it:
 *
 *   zygote --fork--> intermediate --fork--> run, waiting   (the intermediate exits)
 *   serve --(request on the socket)--> run: answers its pid, becomes the run
 *   zygote: the run took a request --fork--> ... the next waiting run
 *
 * The intermediate exits at once, so the run is reparented to serve, which is
 * the child subreaper (PR_SET_CHILD_SUBREAPER): serve reaps it with waitpid
 * and reads its exit status exactly as it did for a child it exec'd. The run
 * returns from host.zygote_wait() in the CLI, which runs its command line as
 * `runbook ARGS...` would: same fds (stdin the params, stdout and stderr the
 * log), same environment (the zygote's, which is serve's, plus the request's
 * entries), its command line shown by ps (set over the zygote's).
 *
 * Fork-safety: the zygote has no thread (checked before it waits), loads no
 * C module but cjson and lfs, and the run reseeds Lua's random generator
 * (cli.lua); OpenSSL, libcurl and the rest load in the run, after the fork.
 *
 * Wire: one SOCK_SEQPACKET socket, descriptor 3 in the zygote. A request is
 * "NARGS NENV\n", the log path, the args (without argv[0]) and the
 * environment entries, each NUL-terminated, then the run's standard input
 * (the rest of the message). The answer is "pid N" or "error MESSAGE".
 */
#define _GNU_SOURCE   /* program_invocation_name */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

#define ZYGOTE_FD 3
#define MAX_REQUEST (128 * 1024)   /* a run's input is at most 60000 bytes (serve.lua) */
#define ANSWER_WAIT 10000          /* ms serve waits for the zygote's answer */

extern char **environ;

/* ---- serve's side ------------------------------------------------------ */

static int zfd = -1;        /* serve's end of the socket; -1: no zygote */
static pid_t zpid;
static char *zbin;          /* the executable the zygote is */

/* The zygote is gone or stuck: runs are exec'd from now on (serve.lua). */
static void forget(const char *why)
{
    char line[256];
    snprintf(line, sizeof line, "runbook: serve: the zygote (pid %d) %s; runs are exec'd from now on\n", (int)zpid, why);
    rb_write_redacted(stderr, line, strlen(line));
    close(zfd);
    zfd = -1;
}

/* zygote_start(argv): start argv (runbook serve --zygote) with descriptor 3
 * its end of the socket, and become the subreaper of what it forks -> pid. */
static int h_zygote_start(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    int n = (int)luaL_len(L, 1);
    char **argv = lua_newuserdatauv(L, sizeof *argv * (size_t)(n + 1), 0);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 1, i + 1);
        argv[i] = (char *)luaL_checkstring(L, -1);   /* kept alive by the table */
        lua_pop(L, 1);
    }
    argv[n] = NULL;
    luaL_argcheck(L, n > 0 && zfd < 0, 1, "expected the zygote's command line, once");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        return rb_error(L, "serve", "zygote", "spawn", 0, "socketpair: %s", strerror(errno));
    if (sv[1] == ZYGOTE_FD) {   /* dup2 onto itself would keep close-on-exec */
        int moved = fcntl(sv[1], F_DUPFD_CLOEXEC, ZYGOTE_FD + 1);
        close(sv[1]);
        sv[1] = moved;
    }
    int rc = sv[1] < 0 ? errno : prctl(PR_SET_CHILD_SUBREAPER, 1) != 0 ? errno : 0;
    if (rc == 0) {
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, sv[1], ZYGOTE_FD);
        rc = posix_spawn(&zpid, argv[0], &fa, NULL, argv, environ);
        posix_spawn_file_actions_destroy(&fa);
    }
    if (sv[1] >= 0) close(sv[1]);
    if (rc != 0) {
        close(sv[0]);
        return rb_error(L, "serve", "zygote", "spawn", 0, "cannot start %s: %s", argv[0], strerror(rc));
    }
    free(zbin);
    zbin = strdup(argv[0]);
    zfd = sv[0];
    lua_pushinteger(L, zpid);
    return 1;
}

/* Append s and its NUL to the request being built; 0 when it does not fit. */
static int put(char *buf, size_t *at, const char *s, size_t len)
{
    if (*at + len + 1 > MAX_REQUEST) return 0;
    memcpy(buf + *at, s, len);
    *at += len;
    buf[(*at)++] = '\0';
    return 1;
}

/* zygote_spawn(argv, log, env, input): the run argv[1..] forked from the
 * zygote, as httpd.spawn would start it -> pid; nil when there is no zygote
 * for argv[1] (the caller exec's it itself). Raises when the zygote answered
 * that it could not, or did not answer. */
static int h_zygote_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *log = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    size_t input_len = 0;
    const char *input = luaL_optlstring(L, 4, "", &input_len);
    lua_rawgeti(L, 1, 1);
    const char *bin = lua_tostring(L, -1);
    if (zfd < 0 || !bin || strcmp(bin, zbin) != 0) {
        lua_pushnil(L);
        return 1;
    }
    int nargs = (int)luaL_len(L, 1) - 1, nenv = (int)luaL_len(L, 3);
    static char *buf;   /* serve's only: in the zygote's .bss, own_pages would copy it for every run */
    if (!buf && !(buf = malloc(MAX_REQUEST)))
        return rb_error(L, "serve", "spawn", "spawn", 0, "out of memory");
    size_t at = (size_t)snprintf(buf, MAX_REQUEST, "%d %d\n", nargs, nenv);
    int fits = put(buf, &at, log, strlen(log));
    for (int t = 1; t <= 3; t += 2) {
        for (int i = t == 1 ? 2 : 1, n = t == 1 ? nargs + 1 : nenv; fits && i <= n; i++) {
            lua_rawgeti(L, t, i);
            size_t len;
            const char *s = luaL_checklstring(L, -1, &len);
            fits = put(buf, &at, s, len);
            lua_pop(L, 1);
        }
    }
    if (!fits || at + input_len > MAX_REQUEST)
        return rb_error(L, "serve", "spawn", "spawn", 0, "the run's command line and input exceed %d bytes", MAX_REQUEST);
    memcpy(buf + at, input, input_len);
    at += input_len;
    if (send(zfd, buf, at, MSG_NOSIGNAL) < 0) {
        forget(strerror(errno));
        lua_pushnil(L);
        return 1;
    }
    struct pollfd p = { zfd, POLLIN, 0 };
    int ready;
    while ((ready = poll(&p, 1, ANSWER_WAIT)) < 0 && errno == EINTR) {}
    char answer[512];
    ssize_t got = ready > 0 ? recv(zfd, answer, sizeof answer - 1, 0) : -1;
    if (got <= 0) {
        if (ready == 0) kill(zpid, SIGKILL);   /* so it cannot start the run later */
        forget(ready == 0 ? "did not answer within 10 s" : "ended");
        return rb_error(L, "serve", "spawn", "spawn", 0, "the zygote did not start the run");
    }
    answer[got] = '\0';
    int pid;
    if (sscanf(answer, "pid %d", &pid) == 1) {
        lua_pushinteger(L, pid);
        return 1;
    }
    return rb_error(L, "serve", "spawn", "spawn", 0, "%s", strncmp(answer, "error ", 6) == 0 ? answer + 6 : answer);
}

/* ---- the zygote's side ------------------------------------------------- */

static void answer(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
static void answer(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    send(ZYGOTE_FD, line, n < (int)sizeof line ? (size_t)n : sizeof line - 1, MSG_NOSIGNAL);
}

/* The process title: the room from argv[0] to the end of the environment
 * strings, which ps shows (Linux reads past argv's end when its last byte is
 * not NUL), as setproctitle does. */
static char *title;
static size_t title_room;

/* Fields 20 (threads) and 48-51 (argv's and the environment's addresses) of /proc/self/stat. */
static int read_stat(long *threads, unsigned long addr[4])
{
    char buf[2048];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');   /* field 2, the name, may hold spaces */
    if (!p) return 0;
    int field = 2;
    addr[0] = addr[1] = addr[2] = addr[3] = 0;
    for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
        field++;
        if (field == 20) *threads = strtol(tok, NULL, 10);
        if (field >= 48 && field <= 51) addr[field - 48] = strtoul(tok, NULL, 10);
    }
    return field >= 51;
}

/* Move the environment's strings to the heap, so the title may take their room.
 * Kept here as well (volatile: never read, but stored), so a leak checker finds
 * them once a run's putenv has replaced an entry or environ itself. */
static char **volatile env_array, **volatile env_strings, *volatile invocation;
static void title_init(unsigned long addr[4])
{
    unsigned long arg_start = addr[0], arg_end = addr[1], env_start = addr[2], env_end = addr[3];
    if (!arg_start || arg_end <= arg_start) return;
    int n = 0;
    while (environ[n]) n++;
    char **env = calloc((size_t)n + 1, sizeof *env), **strings = calloc((size_t)n + 1, sizeof *strings);
    env_array = env, env_strings = strings;
    if (!env || !strings) return;
    for (int i = 0; i < n; i++)
        if (!(env[i] = strings[i] = strdup(environ[i]))) return;
    if (!(invocation = strdup(program_invocation_name))) return;
    environ = env;
    program_invocation_name = invocation;   /* it pointed at argv[0] */
    title = (char *)arg_start;
    title_room = (env_start == arg_end && env_end > env_start ? env_end : arg_end) - arg_start;
    if (title_room > 4096) title_room = 4096;   /* Linux shows one page of it */
}

/* ps shows the run as `runbook ARGS...`, as if it had been exec'd so (cut to the room there is). */
static void title_set(char *const args[], int nargs)
{
    if (!title) return;
    size_t at = 0;
    for (int i = -1; i < nargs && at + 1 < title_room; i++) {
        const char *s = i < 0 ? program_invocation_name : args[i];
        if (i >= 0) title[at++] = ' ';
        for (; *s && at + 1 < title_room; s++) title[at++] = *s;
    }
    memset(title + at, 0, title_room - at);
}

/* In the run: its descriptors, its environment, its title; its args pushed. */
static int become_run(lua_State *L, char **args, int nargs, char **env, int nenv, int in, int logfd)
{
    dup2(in, 0);
    dup2(logfd, 1);
    dup2(logfd, 2);
    close(in);
    close(logfd);
    close(ZYGOTE_FD);
    for (int i = 0; i < nenv; i++) putenv(strdup(env[i]));
    title_set(args, nargs);
    lua_createtable(L, nargs, 0);
    for (int i = 0; i < nargs; i++) {
        lua_pushstring(L, args[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* The run's standard input: a pipe holding `input`, or /dev/null when there is none. */
static int input_fd(const char *input, size_t len)
{
    if (len == 0) return open("/dev/null", O_RDONLY | O_CLOEXEC);
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return -1;
    int ok = write(p[1], input, len) == (ssize_t)len;   /* it fits the pipe: at most 60000 bytes */
    close(p[1]);
    if (!ok) close(p[0]);
    return ok ? p[0] : -1;
}

#define OWN_MAX (16 << 20)   /* larger is a reservation (AddressSanitizer's shadow), not the run's data */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23   /* Linux 5.14 */
#endif

/* Copy now, while waiting, every private page the run inherited writable (the
 * Lua heap, the stacks, the libraries' data): it writes to most of them,
 * lua_close to nearly all, and each copy-on-write fault taken one at a time
 * on the way to run_start costs far more (in this VM, 25 us a page against
 * 8) than one madvise over them all. A kernel without it just faults later. */
static void own_pages(void)
{
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end;
        char perms[5];
        if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) == 3 && strcmp(perms, "rw-p") == 0
            && end - start <= OWN_MAX)
            madvise((void *)start, end - start, MADV_POPULATE_WRITE);
    }
    fclose(f);
}

/* In the waiting run: take the next request from serve and become that run
 * (its args pushed), or push nil once serve has gone. Closing `taken` tells
 * the zygote to fork the next one. */
static int take_request(lua_State *L, int taken)
{
    static char *buf;   /* the run's args and environment point into it for good */
    ssize_t n;
    own_pages();
    buf = malloc(MAX_REQUEST + 1);   /* after own_pages: only what a request fills is touched */
    if (!buf) _exit(1);
    char *waiting[] = { "serve", "--zygote", "(the next run, waiting)" };
    title_set(waiting, 3);
    while ((n = recv(ZYGOTE_FD, buf, MAX_REQUEST, MSG_TRUNC)) < 0 && errno == EINTR) {}
    close(taken);
    if (n <= 0) {
        lua_pushnil(L);
        return 1;
    }
    /* The header, then nargs + nenv + 1 strings, then the input. */
    int nargs, nenv, used, i;
    char *strings[1024], *p, *end = buf + (n <= MAX_REQUEST ? n : 0);
    *end = '\0';
    if (sscanf(buf, "%d %d\n%n", &nargs, &nenv, &used) != 2 || nargs < 1 || nenv < 0 || nargs + nenv >= 1024) {
        answer("error malformed request");
        _exit(0);
    }
    for (i = 0, p = buf + used; i <= nargs + nenv && p < end; i++) {
        char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul) break;
        strings[i] = p;
        p = nul + 1;
    }
    if (i <= nargs + nenv) {
        answer("error malformed request");
        _exit(0);
    }
    int logfd = open(strings[0], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (logfd < 0) {
        answer("error cannot open %s: %s", strings[0], strerror(errno));
        _exit(0);
    }
    int in = input_fd(p, (size_t)(end - p));
    if (in < 0) {
        answer("error cannot fill the run's input: %s", strerror(errno));
        _exit(0);
    }
    answer("pid %d", (int)getpid());
    return become_run(L, strings + 1, nargs, strings + 1 + nargs, nenv, in, logfd);
}

/* zygote_wait(): keep one run forked ahead, waiting for serve's next request
 * (so a request meets a process already made), and fork the next once it
 * took one. Returns only in a run, with its args, or nil once serve has gone
 * (nil and why when it cannot be a zygote). */
static int h_zygote_wait(lua_State *L)
{
    int type;
    socklen_t tl = sizeof type;
    lua_pushnil(L);
    if (getsockopt(ZYGOTE_FD, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_SEQPACKET) {
        lua_pushliteral(L, "serve --zygote is runbook serve's own child: it takes runs from serve on descriptor 3");
        return 2;
    }
    long threads = 0;
    unsigned long addr[4];
    if (!read_stat(&threads, addr) || threads != 1) {
        lua_pushfstring(L, "serve --zygote: %d threads before the first fork, expected 1", (int)threads);
        return 2;
    }
    lua_pop(L, 1);
    title_init(addr);
    for (;;) {
        int taken[2];
        if (pipe2(taken, O_CLOEXEC) != 0) {
            lua_pushnil(L);
            lua_pushfstring(L, "serve --zygote: pipe: %s", strerror(errno));
            return 2;
        }
        pid_t mid = fork();
        if (mid == 0) {   /* the intermediate: its child is reparented to serve when it exits */
            pid_t pid = fork();
            if (pid == 0) {
                close(taken[0]);
                return take_request(L, taken[1]);
            }
            _exit(pid < 0);
        }
        close(taken[1]);
        int status = 1;
        while (mid > 0 && waitpid(mid, &status, 0) < 0 && errno == EINTR) {}
        if (status != 0) {   /* no run forked: try again in a while */
            close(taken[0]);
            usleep(100000);
            continue;
        }
        /* Until the run took a request (or ended): then the next. Serve gone: the end. */
        struct pollfd p[2] = { { taken[0], POLLIN, 0 }, { ZYGOTE_FD, 0, 0 } };
        while (poll(p, 2, -1) < 0 && errno == EINTR) {}
        close(taken[0]);
        if (p[1].revents) {
            lua_pushnil(L);
            return 1;
        }
    }
}

const luaL_Reg rb_zygote_funcs[] = {
    { "zygote_start", h_zygote_start },
    { "zygote_spawn", h_zygote_spawn },
    { "zygote_wait", h_zygote_wait },
    { NULL, NULL }
};
