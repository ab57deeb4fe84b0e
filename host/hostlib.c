/*
 * hostlib.c: "runbook.host", the private library the stdlib engine uses.
 * Runbooks never see it: their environment is built without it.
 */
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

static int h_now(lua_State *L) { lua_pushnumber(L, rb_now()); return 1; }

/* Wall-clock time with sub-second precision, for timestamps in output. */
static int h_wallclock(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
    return 1;
}

/* Sleep, waking early on a signal or the step deadline; returns false when cut short. */
static int h_sleep(lua_State *L)
{
    double secs = luaL_checknumber(L, 1);
    double end = rb_now() + secs;
    double dl = rb_get_deadline();
    int cut = 0;
    if (dl > 0 && dl < end) {
        end = dl;
        cut = 1;
    }
    for (;;) {
        double left = end - rb_now();
        if (rb_interrupted())
            rb_check_stop(L);
        if (left <= 0)
            break;
        if (left > 0.05) left = 0.05;   /* re-check signals often */
        struct timespec ts = { (time_t)left, (long)((left - (double)(time_t)left) * 1e9) };
        nanosleep(&ts, NULL);
    }
    if (cut)
        return rb_error(L, "runbook", "step", "timeout", 0, "step timed out");
    lua_pushboolean(L, 1);
    return 1;
}

/* absolute(path): `path` against the working directory (a leading "./" dropped);
 * in C so that a run needs no lfs for it. */
static int h_absolute(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    if (path[0] == '/') return 1;
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return luaL_error(L, "cannot read the working directory: %s", strerror(errno));
    if (strncmp(path, "./", 2) == 0) path += 2;
    lua_pushfstring(L, "%s/%s", cwd, path);
    return 1;
}

static int h_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
    return 1;
}

static int h_set_mode(lua_State *L)
{
    static const char *const names[] = { "run", "dry-run", NULL };
    rb_set_mode((rb_mode)luaL_checkoption(L, 1, NULL, names));
    return 0;
}

static int h_mode(lua_State *L)
{
    lua_pushstring(L, rb_get_mode() == RB_MODE_RUN ? "run" : "dry-run");
    return 1;
}

/* set_deadline(t [, watchdog]): absolute monotonic time, or nil/0 for none;
 * watchdog = {journal, lines, message, exit}: what the watchdog writes and
 * how it exits if runbook code is still running a grace after t. */
static int h_set_deadline(lua_State *L)
{
    double d = luaL_optnumber(L, 1, 0);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TTABLE);
    rb_set_deadline(L, d);
    rb_watchdog(L, d, lua_istable(L, 2) ? 2 : 0);
    return 0;
}

/* hook(co): the deadline hook on a coroutine a runbook creates. */
static int h_hook(lua_State *L)
{
    lua_State *co = lua_tothread(L, 1);
    luaL_argexpected(L, co != NULL, 1, "coroutine");
    rb_hook(co);
    return 0;
}

static int h_deadline(lua_State *L)
{
    double d = rb_get_deadline();
    if (d > 0) lua_pushnumber(L, d); else lua_pushnil(L);
    return 1;
}

static int h_secret(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    rb_secret_register(L, s, len);
    return 0;
}

static int h_redact(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    rb_push_redacted(L, s, len);
    return 1;
}

/* redact_value(v): a copy of v with every string in it redacted, keys too. */
static int h_redact_value(lua_State *L)
{
    luaL_checkany(L, 1);
    rb_push_redacted_value(L, 1);
    return 1;
}

/* set_effect_sink(outcomes [, intents]): the functions the gate reports
 * effects' outcomes and (before performing them) intents to, or nil. */
static int h_set_effect_sink(lua_State *L)
{
    for (int i = 1; i <= 2; i++)
        if (!lua_isnoneornil(L, i))
            luaL_checktype(L, i, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_setfield(L, LUA_REGISTRYINDEX, RB_INTENT_SINK);
    lua_setfield(L, LUA_REGISTRYINDEX, RB_EFFECT_SINK);
    return 0;
}

/*
 * gate(module, op, target, summary, can_simulate, whole) -> "perform"|"simulate"|"skip":
 * the same decision C modules get, for effects written in Lua (whole: see
 * rb_gate_library).
 */
static int h_gate(lua_State *L)
{
    rb_effect e = { luaL_checkstring(L, 1), luaL_checkstring(L, 2), luaL_checkstring(L, 3),
                    luaL_checkstring(L, 4), lua_toboolean(L, 5) };
    static const char *const names[] = { "perform", "simulate", "skip" };
    lua_pushstring(L, names[rb_gate_library(L, &e, lua_toboolean(L, 6))]);
    return 1;
}

/* gate_done(module, op, target, summary, decision, ok, result) */
static int h_gate_done(lua_State *L)
{
    static const char *const names[] = { "perform", "simulate", "skip", NULL };
    rb_effect e = { luaL_checkstring(L, 1), luaL_checkstring(L, 2), luaL_checkstring(L, 3),
                    luaL_checkstring(L, 4), 0 };
    rb_decision d = (rb_decision)luaL_checkoption(L, 5, NULL, names);
    int ok = lua_toboolean(L, 6);
    lua_settop(L, 7);
    rb_gate_done(L, &e, d, ok);
    return 0;
}

/* The raise function raiser(module) returns: raise {op =, code =, message =,
 * retryable =, ...} as module's structured error. The module is the
 * raiser's; retryable is false unless given; the message is redacted. */
static int h_raise_as(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_setfield(L, 1, "module");
    lua_pushboolean(L, lua_getfield(L, 1, "retryable") != LUA_TNIL && lua_toboolean(L, -1));
    lua_setfield(L, 1, "retryable");
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "message") == LUA_TSTRING) {
        size_t len;
        const char *m = lua_tolstring(L, -1, &len);
        rb_push_redacted(L, m, len);
        lua_setfield(L, 1, "message");
    }
    lua_pop(L, 1);
    luaL_setmetatable(L, RB_ERROR_MT);
    return lua_error(L);
}

/* raiser(module) -> raise: the one way a Lua library raises a structured
 * error (docs/design.md, "Errors"); each library names itself once:
 * local raise = host.raiser "pg". */
static int h_raiser(lua_State *L)
{
    luaL_checkstring(L, 1);
    lua_settop(L, 1);
    lua_pushcclosure(L, h_raise_as, 1);
    return 1;
}

/* Raise if the step's deadline passed or a signal arrived: the runbook
 * environment's pcall calls this after catching, so a timed-out step cannot
 * swallow its own timeout. */
static int h_check_deadline(lua_State *L)
{
    rb_check_stop(L);
    return 0;
}

static int h_interrupted(lua_State *L)
{
    int sig = rb_interrupted() ? rb_last_signal() : 0;
    if (sig) lua_pushinteger(L, sig); else lua_pushnil(L);
    return 1;
}

static int h_clear_interrupt(lua_State *L) { (void)L; rb_clear_interrupt(); return 0; }

static int h_signals(lua_State *L) { (void)L; rb_signals_install(); return 0; }

static int h_identity(lua_State *L)
{
    char host[256] = "unknown";
    gethostname(host, sizeof host - 1);
    struct passwd *pw = getpwuid(getuid());
    lua_createtable(L, 0, 3);
    lua_pushstring(L, pw ? pw->pw_name : "unknown");
    lua_setfield(L, -2, "user");
    lua_pushstring(L, host);
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, getpid());
    lua_setfield(L, -2, "pid");
    return 1;
}

/* Read one line from the terminal (stdin), nil at end of input. Interrupt-aware. */
static int h_read_line(lua_State *L)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n < 0 && errno == EINTR) {
            if (rb_interrupted())
                rb_check_stop(L);
            continue;
        }
        if (n <= 0) {
            if (luaL_bufflen(&b) == 0) { lua_pushnil(L); return 1; }
            break;
        }
        if (c == '\n')
            break;
        luaL_addchar(&b, c);
    }
    luaL_pushresult(&b);
    return 1;
}

static const luaL_Reg host_funcs[] = {
    { "now", h_now },
    { "wallclock", h_wallclock },
    { "sleep", h_sleep },
    { "isatty", h_isatty },
    { "absolute", h_absolute },
    { "set_mode", h_set_mode },
    { "mode", h_mode },
    { "set_deadline", h_set_deadline },
    { "deadline", h_deadline },
    { "hook", h_hook },
    { "secret", h_secret },
    { "redact", h_redact },
    { "redact_value", h_redact_value },
    { "set_effect_sink", h_set_effect_sink },
    { "gate", h_gate },
    { "gate_done", h_gate_done },
    { "raiser", h_raiser },
    { "interrupted", h_interrupted },
    { "check_deadline", h_check_deadline },
    { "clear_interrupt", h_clear_interrupt },
    { "install_signal_handlers", h_signals },
    { "identity", h_identity },
    { "read_line", h_read_line },
    { NULL, NULL }
};

/* The structured error's tostring: "module.op: message (code)". */
static int error_tostring(lua_State *L)
{
    lua_getfield(L, 1, "module");
    lua_getfield(L, 1, "op");
    lua_getfield(L, 1, "message");
    lua_getfield(L, 1, "code");
    const char *mod = lua_tostring(L, 2), *op = lua_tostring(L, 3);
    const char *msg = luaL_optstring(L, 4, "error"), *code = lua_tostring(L, 5);
    if (mod && op) lua_pushfstring(L, "%s.%s: %s", mod, op, msg);
    else if (mod) lua_pushfstring(L, "%s: %s", mod, msg);
    else lua_pushstring(L, msg);
    if (code && !strstr(msg, code))
        lua_pushfstring(L, "%s (%s)", lua_tostring(L, -1), code);
    return 1;
}

void rb_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction fin)
{
    if (!luaL_newmetatable(L, name)) return;
    if (methods) {
        lua_newtable(L);
        luaL_setfuncs(L, methods, 0);
        lua_setfield(L, -2, "__index");
    }
    lua_pushcfunction(L, fin);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, fin);
    lua_setfield(L, -2, "__close");
}

int luaopen_runbook_host(lua_State *L)
{
    if (luaL_newmetatable(L, RB_ERROR_MT)) {
        lua_pushcfunction(L, error_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "runbook.error");
        lua_setfield(L, -2, "__name");
    }
    luaL_newlib(L, host_funcs);
    luaL_setfuncs(L, rb_ticker_funcs, 0);
    luaL_setfuncs(L, rb_guard_funcs, 0);
    luaL_setfuncs(L, rb_plan_funcs, 0);
    luaL_setfuncs(L, rb_zygote_funcs, 0);
    rb_durable_open(L);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "error_mt");
    lua_pushnumber(L, RB_WATCHDOG_GRACE);
    lua_setfield(L, -2, "watchdog_grace");
    return 1;
}
