/*
 * guard.c: the dry run holds in C for Lua's own standard library too. The
 * functions of io and os that change the world (io.open for writing,
 * io.output to a file, io.popen, os.execute, os.remove, os.rename,
 * os.tmpname) are wrapped once at start-up: in dry-run mode they raise
 * instead of acting. So Lua code that reaches them, fs.lua's perform or one
 * a replaced gate.effect calls, cannot write, whatever ran before it.
 * The journal and the run lock are written by durable.c, which calls
 * open(2) itself and is not affected.
 */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <lauxlib.h>
#include "host.h"

enum writes { ALWAYS, OPEN_MODE, OUTPUT_FILE };

/* Whether this call of the wrapped function would change anything. */
static int writes(lua_State *L, int kind)
{
    if (kind == OPEN_MODE) {
        const char *m = luaL_optstring(L, 2, "r");
        return strcmp(m, "r") != 0 && strcmp(m, "rb") != 0;
    }
    if (kind == OUTPUT_FILE)   /* io.output(name) opens name for writing */
        return lua_type(L, 1) == LUA_TSTRING;
    return 1;
}

/* Upvalues: the original function, its enum writes, its name. */
static int guarded(lua_State *L)
{
    if (rb_get_mode() != RB_MODE_RUN && writes(L, (int)lua_tointeger(L, lua_upvalueindex(2)))) {
        const char *name = lua_tostring(L, lua_upvalueindex(3));
        if (lua_type(L, 1) == LUA_TSTRING)
            return luaL_error(L, "%s(\"%s\"): refused: this is a dry run, which changes nothing", name, lua_tostring(L, 1));
        return luaL_error(L, "%s: refused: this is a dry run, which changes nothing", name);
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static void wrap(lua_State *L, const char *lib, const char *fn, int kind)
{
    lua_getglobal(L, lib);
    lua_getfield(L, -1, fn);
    lua_pushinteger(L, kind);
    lua_pushfstring(L, "%s.%s", lib, fn);
    lua_pushcclosure(L, guarded, 3);
    lua_setfield(L, -2, fn);
    lua_pop(L, 1);
}

/* Wrap the standard library's writers; call after luaL_openlibs. */
void rb_guard_stdlib(lua_State *L)
{
    wrap(L, "io", "open", OPEN_MODE);
    wrap(L, "io", "output", OUTPUT_FILE);
    wrap(L, "io", "popen", ALWAYS);
    wrap(L, "os", "execute", ALWAYS);
    wrap(L, "os", "remove", ALWAYS);
    wrap(L, "os", "rename", ALWAYS);
    wrap(L, "os", "tmpname", ALWAYS);
}

/* mkdir(path) -> true | nil, message: one directory (fs.mkdir walks the
 * parents), refused in a dry run like the writers above. */
static int h_mkdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    if (rb_get_mode() != RB_MODE_RUN)
        return luaL_error(L, "mkdir(\"%s\"): refused: this is a dry run, which changes nothing", path);
    if (mkdir(path, 0777) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(errno));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

const luaL_Reg rb_guard_funcs[] = {
    { "mkdir", h_mkdir },
    { NULL, NULL }
};
