/*
 * module.h: what the C modules share besides the host's API (runbook.h):
 * reading the options table a function takes ({timeout = 5, url = "..."}),
 * the module table of a backend with a connection class, and the two
 * endings of a gated effect other than success (a skip, a failure), written
 * once so every module reports them alike. A module's
 * timeout raises rb_error with code "timeout", retryable.
 * Header-only: each module is a shared object of its own.
 *
 * Each opt_* reads field `field` of the table at stack index `t`, giving `dflt`
 * when the table or the field is missing; a value of the wrong type raises
 * luaL_argerror naming the field. A string stays valid while the table is
 * referenced.
 */
#ifndef RUNBOOK_MODULE_H
#define RUNBOOK_MODULE_H

#include <string.h>
#include "runbook.h"

static inline const char *opt_string(lua_State *L, int t, const char *field, size_t *len, const char *dflt)
{
    if (len) *len = dflt ? strlen(dflt) : 0;
    if (lua_isnoneornil(L, t)) return dflt;
    lua_getfield(L, t, field);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return dflt; }
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, t, lua_pushfstring(L, "%s must be a string", field));
    const char *s = lua_tolstring(L, -1, len);
    lua_pop(L, 1);
    return s;
}

static inline double opt_number(lua_State *L, int t, const char *field, double dflt)
{
    if (lua_isnoneornil(L, t)) return dflt;
    lua_getfield(L, t, field);
    int isnum = lua_isnumber(L, -1), isnil = lua_isnil(L, -1);
    double v = isnum ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    if (!isnil && !isnum) luaL_argerror(L, t, lua_pushfstring(L, "%s must be a number", field));
    return v;
}

/* A duration in seconds: a positive number (as `dflt` must be). */
static inline double opt_seconds(lua_State *L, int t, const char *field, double dflt)
{
    double v = opt_number(L, t, field, dflt);
    if (!(v > 0)) luaL_argerror(L, t, lua_pushfstring(L, "%s must be a positive number of seconds", field));
    return v;
}
static inline int opt_bool(lua_State *L, int t, const char *field)
{
    if (lua_isnoneornil(L, t)) return 0;
    lua_getfield(L, t, field);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The result every module gives for an effect a dry run skipped,
 * {skipped = true}, which a module may add to. */
static inline void push_skipped(lua_State *L)
{
    lua_createtable(L, 0, 4);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "skipped");
}

/*
 * The gate answered RB_SKIP for e (a dry run the backend cannot simulate):
 * report it and push {skipped = true}. Ask rb_gate right before the effect
 * and end with this at once:
 *     if ((d = rb_gate(L, &e)) == RB_SKIP) return gate_skipped(L, &e);
 */
static inline int gate_skipped(lua_State *L, const rb_effect *e)
{
    lua_pushnil(L);
    rb_gate_done(L, e, RB_SKIP, 1);
    push_skipped(L);
    return 1;
}

/*
 * The module table of a backend with one connection class (pg, redis): the
 * functions `funcs`, and `methods`, the class's method table, which the Lua
 * library extends. The class `conn_mt` is registered with `methods`, the
 * finalizer `fin` and `tostring` as __tostring; it stays below the module.
 */
static inline int open_conn_module(lua_State *L, const luaL_Reg *funcs, const char *conn_mt,
                                   const luaL_Reg *methods, lua_CFunction fin, lua_CFunction tostring)
{
    rb_class(L, conn_mt, methods, fin);
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
    lua_newtable(L);
    luaL_setfuncs(L, funcs, 0);
    lua_getfield(L, -2, "__index");
    lua_setfield(L, -2, "methods");
    return 1;
}

/*
 * Effect e, which the gate let through (decision d), failed: report it with
 * msg, the message of the error the module raises next, as its result.
 */
static inline void gate_failed(lua_State *L, const rb_effect *e, rb_decision d, const char *msg)
{
    lua_pushstring(L, msg);
    rb_gate_done(L, e, d, 0);
}

/* Field `field` of the table on top of the stack, set to a string (nil for NULL), an integer or a boolean. */
static inline void set_string(lua_State *L, const char *field, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, field);
}

static inline void set_integer(lua_State *L, const char *field, lua_Integer v)
{
    lua_pushinteger(L, v);
    lua_setfield(L, -2, field);
}

static inline void set_boolean(lua_State *L, const char *field, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, field);
}

#endif
