/*
 * plan.c: a run held to its plan (docs/design.md, "Plans and approvals").
 *
 * `runbook apply` hands the plan's effects to plan_load once, before the
 * runbook's code runs, and the engine names the step each attempt runs
 * (plan_step). From then on the gate asks rb_plan_check before it journals
 * and performs an effect: it must be the next effect the plan holds for that
 * step, with the same module, op, target and summary. The plan lives in the
 * registry and this file, which no runbook reaches. A difference is kept:
 * rb_check_stop raises it again, so a runbook that catches the error with
 * pcall performs nothing more, and the engine ends the run with exit 77.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

#define RB_PLAN "runbook.plan"
#define RB_PLAN_RECORDER "runbook.plan_recorder"
#define RB_PLAN_OWN "runbook.plan_own"   /* the run's own effects: "module op target" -> true */

static int loaded;
static char *step;             /* the step whose attempt runs; NULL between steps */
static lua_Integer checked;    /* effects checked in this attempt */
static char *drift;            /* the first difference, once found */

static const char *const FIELDS[] = { "module", "op", "target", "summary" };

/* "k8s scale todo/deployment/web: scale to 3 replicas" */
static void push_effect(lua_State *L, const char *const v[4])
{
    lua_pushfstring(L, "%s %s %s: %s", v[0], v[1], v[2], v[3]);
}

static void raise_drift(lua_State *L)
{
    rb_error(L, "runbook", "apply", "drift", 0, "%s", drift);
}

static void set_drift(lua_State *L, const char *msg)
{
    drift = strdup(msg);
    if (!drift) luaL_error(L, "out of memory");
    raise_drift(L);
}

/* The run's own effects: its Lease, taken, renewed as time passes and
 * released around the steps. The host names them (plan_own) before they
 * happen; they are journaled but neither planned nor held to the plan.
 * A runbook cannot reach plan_own. */
static int run_own(lua_State *L, const rb_effect *e)
{
    if (!e->module || !e->op || !e->target) return 0;
    if (lua_getfield(L, LUA_REGISTRYINDEX, RB_PLAN_OWN) != LUA_TTABLE) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pushfstring(L, "%s %s %s", e->module, e->op, e->target);
    int own = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 2);
    return own;
}

void rb_plan_check(lua_State *L, const rb_effect *e)
{
    if (!loaded || run_own(L, e)) return;
    if (drift) raise_drift(L);
    int top = lua_gettop(L);
    const char *now[4], *want[4];
    const char *given[4] = { e->module, e->op, e->target, e->summary };
    for (int i = 0; i < 4; i++) {
        rb_push_redacted(L, given[i] ? given[i] : "", given[i] ? strlen(given[i]) : 0);
        now[i] = lua_tostring(L, -1);   /* kept on the stack until the end */
    }
    lua_getfield(L, LUA_REGISTRYINDEX, RB_PLAN);
    lua_getfield(L, -1, step ? step : "");
    checked++;
    int planned = lua_istable(L, -1) && lua_rawgeti(L, -1, checked) == LUA_TTABLE;
    int same = planned;
    for (int i = 0; i < 4 && planned; i++) {
        lua_getfield(L, top + 7, FIELDS[i]);   /* the planned effect */
        want[i] = lua_isstring(L, -1) ? lua_tostring(L, -1) : "";
        same = same && !strcmp(want[i], now[i]);
    }
    if (same) {
        lua_settop(L, top);
        return;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    if (!step) {
        luaL_addstring(&b, "an effect outside any step is not in the plan:\n    now:     ");
    } else if (!planned) {
        lua_pushfstring(L, "effect %d of step '%s' is not in the plan:\n    now:     ", (int)checked, step);
        luaL_addvalue(&b);
    } else {
        lua_pushfstring(L, "effect %d of step '%s' differs from the plan:\n    planned: ", (int)checked, step);
        luaL_addvalue(&b);
        push_effect(L, want);
        luaL_addvalue(&b);
        luaL_addstring(&b, "\n    now:     ");
    }
    push_effect(L, now);
    luaL_addvalue(&b);
    luaL_addstring(&b, "\n    nothing was performed; make a new plan with runbook plan");
    luaL_pushresult(&b);
    set_drift(L, lua_tostring(L, -1));
}

/* In a dry run, `runbook plan` records what the gate is asked, as it will be
 * asked under apply: before the write, in the same words. */
void rb_plan_record(lua_State *L, const rb_effect *e)
{
    if (run_own(L, e)) return;
    if (lua_getfield(L, LUA_REGISTRYINDEX, RB_PLAN_RECORDER) != LUA_TFUNCTION) {
        lua_pop(L, 1);
        return;
    }
    const char *given[4] = { e->module, e->op, e->target, e->summary };
    lua_createtable(L, 0, 5);
    for (int i = 0; i < 4; i++) {
        rb_push_redacted(L, given[i] ? given[i] : "", given[i] ? strlen(given[i]) : 0);
        lua_setfield(L, -2, FIELDS[i]);
    }
    if (step) {
        lua_pushstring(L, step);
        lua_setfield(L, -2, "step");
    }
    lua_call(L, 1, 0);
}

void rb_plan_check_stop(lua_State *L)
{
    if (drift) raise_drift(L);
}

/* plan_load({[step] = {{module, op, target, summary}...}}): once per process. */
static int h_plan_load(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    if (loaded) return luaL_error(L, "a plan is already loaded");
    lua_settop(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, RB_PLAN);
    loaded = 1;
    return 0;
}

/* plan_record(fn|nil): fn({step, module, op, target, summary}) for each
 * effect the gate is asked about in a dry run. */
static int h_plan_record(lua_State *L)
{
    if (!lua_isnil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, RB_PLAN_RECORDER);
    return 0;
}

/* plan_step(name|nil): an attempt of step `name` starts (nil: it ended). */
static int h_plan_step(lua_State *L)
{
    const char *name = luaL_optstring(L, 1, NULL);
    free(step);
    step = name ? strdup(name) : NULL;
    if (name && !step) return luaL_error(L, "out of memory");
    checked = 0;
    return 0;
}

/* plan_own(module, op, target): an effect of the run's own, which plans and applies leave out. */
static int h_plan_own(lua_State *L)
{
    const char *m = luaL_checkstring(L, 1), *op = luaL_checkstring(L, 2), *target = luaL_checkstring(L, 3);
    if (lua_getfield(L, LUA_REGISTRYINDEX, RB_PLAN_OWN) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, RB_PLAN_OWN);
    }
    lua_pushfstring(L, "%s %s %s", m, op, target);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    return 0;
}

/* plan_drift() -> the difference that stopped the run, or nil. */
static int h_plan_drift(lua_State *L)
{
    if (drift) lua_pushstring(L, drift);
    else lua_pushnil(L);
    return 1;
}

/* plan_write(path, text) -> true | nil, message: a plan file, written whole
 * (a temporary file renamed over it) and 0600, in any mode: the host's own
 * file, after the dry run's code has finished. */
static int h_plan_write(lua_State *L)
{
    size_t len;
    const char *path = luaL_checkstring(L, 1), *text = luaL_checklstring(L, 2, &len);
    const char *tmp = lua_pushfstring(L, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int ok = fd >= 0 && write(fd, text, len) == (ssize_t)len && fsync(fd) == 0;
    int e = errno;
    if (fd >= 0 && close(fd) < 0 && ok) ok = 0, e = errno;
    if (ok && rename(tmp, path) < 0) ok = 0, e = errno;
    if (ok) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (fd >= 0) unlink(tmp);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot write %s: %s", path, strerror(e));
    return 2;
}

const luaL_Reg rb_plan_funcs[] = {
    { "plan_write", h_plan_write },
    { "plan_load", h_plan_load },
    { "plan_record", h_plan_record },
    { "plan_step", h_plan_step },
    { "plan_drift", h_plan_drift },
    { "plan_own", h_plan_own },
    { NULL, NULL }
};
