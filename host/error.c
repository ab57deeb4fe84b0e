/*
 * error.c: the structured error every module raises on backend failure
 * (docs/design.md, principle 3): a table {message, module, op, code, retryable} whose
 * tostring is one clear line.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <lauxlib.h>
#include "host.h"

int rb_error(lua_State *L, const char *module, const char *op,
             const char *code, int retryable, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    lua_createtable(L, 0, 6);
    rb_push_redacted(L, msg, strlen(msg));
    lua_setfield(L, -2, "message");
    lua_pushstring(L, module);
    lua_setfield(L, -2, "module");
    lua_pushstring(L, op);
    lua_setfield(L, -2, "op");
    if (code) {
        lua_pushstring(L, code);
        lua_setfield(L, -2, "code");
    }
    lua_pushboolean(L, retryable);
    lua_setfield(L, -2, "retryable");
    luaL_setmetatable(L, RB_ERROR_MT);
    return lua_error(L);
}
