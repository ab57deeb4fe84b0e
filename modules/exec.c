/*
 * exec.c: run a process from an argv list, with env, stdin, cwd, a timeout
 * that kills the whole process group, and captured stdout/stderr.
 *
 *   run(opts) -> {status, signal, stdout, stderr, duration} | {skipped=true,...}
 *     opts.argv      array of strings (no shell; stdlib/exec.lua builds sh -c)
 *     opts.env       table of NAME=value added to (or replacing) the environment;
 *                    values of names like *PASSWORD*, *TOKEN*, *KEY* are secrets
 *     opts.clear_env true: the child sees only opts.env
 *     opts.stdin     string written to the child's stdin (else /dev/null)
 *     opts.cwd       working directory of the child
 *     opts.timeout   seconds; bounded by the step's remaining time
 *     opts.read      true: the command only reads, so it bypasses the gate
 *
 * The child runs in its own process group so a timeout or an interrupt
 * reaches everything it started, not just the direct child.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <poll.h>
#include <stdio.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "module.h"

#define PROC_MT "runbook.exec.proc"
#define DEFAULT_TIMEOUT 3600.0 /* without a step deadline; pg_dump can be slow */
#define KILL_GRACE 2.0         /* seconds between SIGTERM and SIGKILL */
#define SUMMARY_MAX 200

extern char **environ;

/* Which signal interrupted the host, so the child gets the same one. */
static int interrupt_signal(void) {
    int sig = rb_last_signal();
    return sig == SIGINT || sig == SIGTERM ? sig : SIGTERM;
}

static int exec_run(lua_State *L);

static const luaL_Reg exec_funcs[] = {
    {"run", exec_run},
    {NULL, NULL}
};

/* A growing byte buffer owned by a proc, freed by its finalizer. */
typedef struct {
    char *data;
    size_t len, cap;
} buffer;

/* One running child. Created closed (pid 0, fds -1) so the finalizer can
 * run at any point, including after an error unwinds mid-setup. */
typedef struct {
    pid_t pid;          /* also the process group id; 0 once reaped */
    int in, out, err;   /* parent ends of the pipes, -1 when closed */
    int errpipe;        /* reports a failed chdir/exec from the child */
    int wstatus;
    buffer bout, berr;
    const char *stdin_data;
    size_t stdin_len, stdin_off;
} proc;

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Idempotent: serves __gc and __close. A child still running when its
 * handle dies is killed with its group: nothing outlives the call. */
static void proc_release(proc *p) {
    close_fd(&p->in);
    close_fd(&p->out);
    close_fd(&p->err);
    close_fd(&p->errpipe);
    if (p->pid > 0) {
        kill(-p->pid, SIGKILL);
        while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR) {}
        p->pid = 0;
    }
    free(p->bout.data);
    free(p->berr.data);
    p->bout = p->berr = (buffer){0};
}

static int proc_close(lua_State *L) {
    proc_release(luaL_checkudata(L, 1, PROC_MT));
    return 0;
}

static proc *new_proc(lua_State *L) {
    proc *p = lua_newuserdatauv(L, sizeof *p, 0);
    memset(p, 0, sizeof *p);
    p->in = p->out = p->err = p->errpipe = -1;
    rb_class(L, PROC_MT, NULL, proc_close);
    lua_setmetatable(L, -2);
    return p;
}

static int buffer_add(buffer *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 8192;
        while (cap < b->len + n) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* ---- arguments ---------------------------------------------------------- */

/* The strings the child needs live in an anchor table at `anchor` so the
 * collector keeps them while we hold raw pointers into them. */
static const char *anchored(lua_State *L, int anchor) {
    const char *s = lua_tostring(L, -1);
    lua_rawseti(L, anchor, (lua_Integer)luaL_len(L, anchor) + 1);
    return s;
}

static const char **check_argv(lua_State *L, int anchor) {
    if (lua_getfield(L, 1, "argv") != LUA_TTABLE)
        luaL_argerror(L, 1, "argv must be a list of strings");
    lua_Integer n = luaL_len(L, -1);
    if (n < 1) luaL_argerror(L, 1, "argv is empty");
    const char **argv = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof *argv, 0);
    lua_rawseti(L, anchor, (lua_Integer)luaL_len(L, anchor) + 1);
    for (lua_Integer i = 1; i <= n; i++) {
        int t = lua_geti(L, -1, i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_argerror(L, 1, lua_pushfstring(L, "argv[%d] must be a string", (int)i));
        lua_tostring(L, -1); /* numbers become strings in place */
        argv[i - 1] = anchored(L, anchor);
    }
    argv[n] = NULL;
    lua_pop(L, 1);
    return argv;
}

static int env_overridden(lua_State *L, const char *entry) {
    const char *eq = strchr(entry, '=');
    if (!eq) return 0;
    lua_pushlstring(L, entry, (size_t)(eq - entry));
    int found = lua_gettable(L, -2) != LUA_TNIL;
    lua_pop(L, 1);
    return found;
}

/* PGPASSWORD, REDIS_PASSWORD, API_TOKEN...: values passed this way are
 * credentials, and a command may echo them on stderr into a failure. */
static int secret_name(const char *name) {
    static const char *const marks[] = {"PASS", "TOKEN", "SECRET", "KEY", "CREDENTIAL", NULL};
    for (const char *const *m = marks; *m; m++)
        if (strcasestr(name, *m)) return 1;
    return 0;
}

/* Returns NULL when the child should inherit our environment unchanged. */
static const char **build_env(lua_State *L, int anchor, const char **path) {
    *path = getenv("PATH");
    int t = lua_getfield(L, 1, "env");
    if (t == LUA_TNIL) { lua_pop(L, 1); return NULL; }
    if (t != LUA_TTABLE) luaL_argerror(L, 1, "env must be a table");
    lua_getfield(L, 1, "clear_env");
    int clear = lua_toboolean(L, -1), n = 0;
    lua_pop(L, 1);
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) n++;
    for (char **e = environ; !clear && *e; e++) n++;
    const char **env = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof *env, 0);
    lua_rawseti(L, anchor, (lua_Integer)luaL_len(L, anchor) + 1);
    int i = 0;
    for (char **e = environ; !clear && *e; e++)
        if (!env_overridden(L, *e)) env[i++] = *e;
    if (clear) *path = NULL;
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING ||
            (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
            luaL_argerror(L, 1, "env must map names to strings");
        const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
        if (secret_name(k)) rb_secret_register(L, v, strlen(v));
        lua_pushfstring(L, "%s=%s", k, v);
        env[i++] = anchored(L, anchor);
        if (strcmp(k, "PATH") == 0) *path = v;
    }
    env[i] = NULL;
    lua_pop(L, 1);
    return env;
}

/* execve needs a path; search PATH here, before fork, so the child only
 * makes async-signal-safe calls and "not found" is a clear error. */
static const char *resolve(lua_State *L, const char *cmd, const char *path) {
    if (strchr(cmd, '/')) return cmd;
    if (!path) path = "/usr/local/bin:/usr/bin:/bin";
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        if (end == p) lua_pushfstring(L, "./%s", cmd);
        else lua_pushfstring(L, "%s/%s", lua_pushlstring(L, p, (size_t)(end - p)), cmd);
        const char *full = lua_tostring(L, -1);
        struct stat st;
        if (access(full, X_OK) == 0 && stat(full, &st) == 0 && S_ISREG(st.st_mode))
            return full; /* left on the stack, anchored by it */
        lua_pop(L, end == p ? 1 : 2);
        if (!*end) return NULL;
        p = end;
    }
}

/* ---- gate summary ------------------------------------------------------- */

static void push_quoted(luaL_Buffer *b, const char *s) {
    if (*s && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_-+=.,/:@%^") == strlen(s)) {
        luaL_addstring(b, s);
        return;
    }
    luaL_addchar(b, '\'');
    for (; *s; s++) {
        if (*s == '\'') luaL_addstring(b, "'\\''");
        else luaL_addchar(b, *s);
    }
    luaL_addchar(b, '\'');
}

/* "run pg_dump -Fc 'my db'", shell-quoted so it can be pasted, truncated. */
static const char *push_summary(lua_State *L, const char **argv) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "run");
    for (; *argv; argv++) {
        luaL_addchar(&b, ' ');
        push_quoted(&b, *argv);
    }
    luaL_pushresult(&b);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    if (len > SUMMARY_MAX) {
        lua_pushfstring(L, "%s...", lua_pushlstring(L, s, SUMMARY_MAX - 3));
        lua_replace(L, -3);
        lua_pop(L, 1);
    }
    return lua_tostring(L, -1);
}

/* ---- spawning ----------------------------------------------------------- */

/* In the child: only async-signal-safe calls until execve. The child dies
 * with the host, even a SIGKILLed one (its group is killed on every other
 * way out): an effect never goes on after the run that journaled it. */
static void child(const char *file, const char **argv, const char **env,
                  const char *cwd, int in, int out, int err, int errpipe, pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);   /* the host died before prctl */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Ignored dispositions survive exec; the child gets the defaults. */
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGQUIT, SIG_DFL);
    setpgid(0, 0);
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    char stage = 'c';
    if (!cwd || chdir(cwd) == 0) {
        stage = 'x';
        execve(file, (char *const *)argv, (char *const *)(env ? env : (const char **)environ));
    }
    int e = errno;
    if (write(errpipe, &stage, 1) == 1 && write(errpipe, &e, sizeof e)) {}
    _exit(127);
}

static int spawn(proc *p, const char *file, const char **argv, const char **env,
                 const char *cwd, int has_stdin) {
    int in[2] = {-1, -1}, out[2], err[2], ep[2];
    if (has_stdin) {
        if (pipe2(in, O_CLOEXEC) < 0) return -1;
    } else if ((in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        return -1;
    }
    if (pipe2(out, O_CLOEXEC) < 0) goto fail_in;
    if (pipe2(err, O_CLOEXEC) < 0) goto fail_out;
    if (pipe2(ep, O_CLOEXEC) < 0) goto fail_err;
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) child(file, argv, env, cwd, in[0], out[1], err[1], ep[1], parent);
    int saved = errno;
    close(in[0]); close(out[1]); close(err[1]); close(ep[1]);
    if (pid < 0) {
        close_fd(&in[1]); close(out[0]); close(err[0]); close(ep[0]);
        errno = saved;
        return -1;
    }
    setpgid(pid, pid); /* also in the parent: no race with an early kill */
    p->pid = pid;
    p->in = in[1]; p->out = out[0]; p->err = err[0]; p->errpipe = ep[0];
    if (p->in >= 0) fcntl(p->in, F_SETFL, O_NONBLOCK);
    return 0;
fail_err: close(err[0]); close(err[1]);
fail_out: close(out[0]); close(out[1]);
fail_in:  close_fd(&in[0]); close_fd(&in[1]);
    return -1;
}

/* Nonzero when the child could not start; *stage and *e say why. */
static int start_failed(proc *p, char *stage, int *e) {
    ssize_t n;
    while ((n = read(p->errpipe, stage, 1)) < 0 && errno == EINTR) {}
    if (n == 1 && read(p->errpipe, e, sizeof *e) < 0) *e = 0;
    close_fd(&p->errpipe);
    return n == 1;
}

/* ---- the wait loop ------------------------------------------------------ */

static int reap(proc *p, int options) {
    if (p->pid <= 0) return 1;
    pid_t r;
    while ((r = waitpid(p->pid, &p->wstatus, options)) < 0 && errno == EINTR) {}
    if (r == p->pid || (r < 0 && errno == ECHILD)) {
        p->pid = -p->pid; /* reaped, but keep the group id for kill_group */
        return 1;
    }
    return 0;
}

static void group_kill(proc *p, int sig) {
    pid_t pg = p->pid < 0 ? -p->pid : p->pid;
    if (pg > 0) kill(-pg, sig);
}

/* Whether a process of group pg is still running. Orphans reparented to an
 * init that does not reap (common in containers) stay zombies in the group,
 * so kill(-pg, 0) alone would wait out the whole grace period for nothing. */
static int group_alive(pid_t pg) {
    if (kill(-pg, 0) < 0 && errno == ESRCH) return 0;
    DIR *d = opendir("/proc");
    if (!d) return 1;
    int alive = 0;
    struct dirent *de;
    while (!alive && (de = readdir(d))) {
        char path[64], buf[512];
        if (de->d_name[0] < '0' || de->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%d/stat", atoi(de->d_name));
        FILE *f = fopen(path, "re");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        char *rp = strrchr(buf, ')'), state;
        int ppid, pgrp;
        if (rp && sscanf(rp + 1, " %c %d %d", &state, &ppid, &pgrp) == 3)
            alive = pgrp == pg && state != 'Z';
    }
    closedir(d);
    return alive;
}

/* SIGTERM (or the forwarded signal), a grace period, then SIGKILL for any
 * member of the group still alive. */
static void terminate(proc *p, int sig) {
    pid_t pg = p->pid < 0 ? -p->pid : p->pid;
    group_kill(p, sig);
    double until = rb_now() + KILL_GRACE;
    while (rb_now() < until) {
        reap(p, WNOHANG);
        /* when we are PID 1, orphans of the group are ours to reap */
        while (waitpid(-pg, NULL, WNOHANG) > 0) {}
        if (!group_alive(pg)) break;
        poll(NULL, 0, 20);
    }
    group_kill(p, SIGKILL);
    reap(p, 0);
    close_fd(&p->out);
    close_fd(&p->err);
}

static void drain(int *fd, buffer *b, int *oom) {
    char chunk[65536];
    ssize_t n = read(*fd, chunk, sizeof chunk);
    if (n > 0) {
        if (buffer_add(b, chunk, (size_t)n) < 0) *oom = 1;
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        close_fd(fd);
    }
}

static void feed(proc *p) {
    ssize_t n = write(p->in, p->stdin_data + p->stdin_off, p->stdin_len - p->stdin_off);
    if (n > 0) p->stdin_off += (size_t)n;
    else if (n < 0 && errno != EINTR && errno != EAGAIN) close_fd(&p->in); /* EPIPE: it stopped reading */
    if (p->in >= 0 && p->stdin_off == p->stdin_len) close_fd(&p->in);
}

enum outcome { DONE, TIMED_OUT, INTERRUPTED, OUT_OF_MEMORY };

/* Poll in short slices so a deadline or an interrupt is noticed promptly;
 * done once the child is reaped and both output pipes reached EOF. */
static enum outcome wait_child(proc *p, double deadline) {
    int oom = 0, idle_ms = 1;
    while (!oom) {
        int piped = p->out >= 0 || p->err >= 0;
        if (!piped && reap(p, WNOHANG)) return DONE;
        if (rb_interrupted()) return INTERRUPTED;
        double left = deadline - rb_now();
        if (left <= 0) return TIMED_OUT;
        struct pollfd fds[3] = {{p->out, POLLIN, 0}, {p->err, POLLIN, 0}, {p->in, POLLOUT, 0}};
        /* With the pipes closed only the exit is left: it usually follows
         * at once, so wake soon, then back off. */
        int ms = piped ? 100 : idle_ms;
        if (!piped && idle_ms < 100) idle_ms *= 2;
        if (left < ms / 1000.0) ms = (int)(left * 1000) + 1;
        if (poll(fds, 3, ms) <= 0) continue;
        if (fds[0].revents) drain(&p->out, &p->bout, &oom);
        if (fds[1].revents) drain(&p->err, &p->berr, &oom);
        if (fds[2].revents) feed(p);
    }
    return OUT_OF_MEMORY;
}

/* ---- results ------------------------------------------------------------ */

static void push_result(lua_State *L, proc *p, double started) {
    lua_createtable(L, 0, 5);
    int st = p->wstatus;
    if (WIFSIGNALED(st)) {
        lua_pushinteger(L, 128 + WTERMSIG(st)); /* the shell's convention */
        lua_setfield(L, -2, "status");
        lua_pushinteger(L, WTERMSIG(st));
        lua_setfield(L, -2, "signal");
    } else {
        lua_pushinteger(L, WEXITSTATUS(st));
        lua_setfield(L, -2, "status");
    }
    lua_pushlstring(L, p->bout.data ? p->bout.data : "", p->bout.len);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, p->berr.data ? p->berr.data : "", p->berr.len);
    lua_setfield(L, -2, "stderr");
    lua_pushnumber(L, rb_now() - started);
    lua_setfield(L, -2, "duration");
}

/* A skipped run's result ({skipped = true}) gets an empty output. */
static void add_empty_output(lua_State *L) {
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "status");
    lua_pushliteral(L, "");
    lua_setfield(L, -2, "stdout");
    lua_pushliteral(L, "");
    lua_setfield(L, -2, "stderr");
}

/* Close out a gated effect as failed, then raise. Never returns. */
static int fail(lua_State *L, const rb_effect *e, rb_decision d, const char *code,
                int retryable, const char *msg) {
    if (e) gate_failed(L, e, d, msg);
    return rb_error(L, "exec", "run", code, retryable, "%s", msg);
}

static const char *start_error(lua_State *L, const char *cmd, const char *cwd, char stage, int e) {
    if (stage == 'c') return lua_pushfstring(L, "%s: cannot chdir to %s: %s", cmd, cwd, strerror(e));
    return lua_pushfstring(L, "%s: cannot execute: %s", cmd, strerror(e));
}

/* The pipes' far ends may close while we write stdin; a SIGPIPE must not
 * kill the host, so it is ignored for the duration of one run. */
static int run_child(lua_State *L, proc *p, double deadline, const char *cmd,
                     const rb_effect *e, rb_decision d) {
    struct sigaction ign = {0}, old;
    ign.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ign, &old);
    enum outcome o = wait_child(p, deadline);
    if (o == TIMED_OUT || o == OUT_OF_MEMORY) terminate(p, SIGTERM);
    if (o == INTERRUPTED) terminate(p, interrupt_signal());
    sigaction(SIGPIPE, &old, NULL);
    if (o == TIMED_OUT)
        return fail(L, e, d, "timeout", 1, lua_pushfstring(L, "%s: timed out, process group killed", cmd));
    if (o == INTERRUPTED)
        return fail(L, e, d, "interrupted", 0, lua_pushfstring(L, "%s: interrupted", cmd));
    if (o == OUT_OF_MEMORY)
        return fail(L, e, d, "out_of_memory", 0, lua_pushfstring(L, "%s: output too large", cmd));
    return 0;
}

static int exec_run(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_newtable(L); /* 2: anchor */
    const char *path, *cwd = opt_string(L, 1, "cwd", NULL, NULL);
    const char **argv = check_argv(L, 2);
    const char **env = build_env(L, 2, &path);
    size_t stdin_len = 0;
    const char *stdin_data = opt_string(L, 1, "stdin", &stdin_len, NULL);
    double timeout = opt_number(L, 1, "timeout", DEFAULT_TIMEOUT);
    if (timeout <= 0) luaL_argerror(L, 1, "timeout must be positive");
    double left = rb_remaining(L, DEFAULT_TIMEOUT);
    lua_getfield(L, 1, "read");
    int is_read = lua_toboolean(L, -1);
    lua_pop(L, 1);

    rb_effect e = {"exec", "run", argv[0], push_summary(L, argv), 0};
    rb_decision d = RB_PERFORM;
    if (!is_read && (d = rb_gate(L, &e)) == RB_SKIP) {
        gate_skipped(L, &e);
        add_empty_output(L);
        return 1;
    }
    const rb_effect *ge = is_read ? NULL : &e;
    const char *file = resolve(L, argv[0], path);
    if (!file) return fail(L, ge, d, "not_found", 0, lua_pushfstring(L, "%s: command not found", argv[0]));

    proc *p = new_proc(L);
    p->stdin_data = stdin_data;
    p->stdin_len = stdin_len;
    double started = rb_now();
    if (spawn(p, file, argv, env, cwd, stdin_data != NULL) < 0)
        return fail(L, ge, d, "spawn_failed", 1, lua_pushfstring(L, "%s: cannot start: %s", argv[0], strerror(errno)));
    char stage;
    int err = 0;
    if (start_failed(p, &stage, &err)) {
        reap(p, 0);
        p->pid = 0;
        return fail(L, ge, d, stage == 'c' ? "bad_cwd" : "exec_failed", 0, start_error(L, argv[0], cwd, stage, err));
    }
    run_child(L, p, started + (timeout < left ? timeout : left), argv[0], ge, d);
    p->pid = 0;
    push_result(L, p, started);
    proc_release(p); /* free the buffers now rather than at the next GC */
    if (ge) {
        lua_getfield(L, -1, "status");
        int ok = lua_tointeger(L, -1) == 0;
        lua_pop(L, 1);
        if (WIFSIGNALED(p->wstatus)) lua_pushfstring(L, "killed by signal %d", WTERMSIG(p->wstatus));
        else lua_pushfstring(L, "exit %d", WEXITSTATUS(p->wstatus));
        rb_gate_done(L, ge, d, ok);
    }
    return 1;
}

int luaopen_runbook_exec(lua_State *L) {
    luaL_newlib(L, exec_funcs);
    return 1;
}
