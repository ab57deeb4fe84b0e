/*
 * main.c: the runbook executable. It makes a Lua state, gives the stdlib its
 * private host library, points require at stdlib/ and lib/, and hands the
 * command line to the Lua CLI (stdlib/runbook/cli.lua), whose return value is
 * the exit status. Everything runs under a protected call with a traceback.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <lauxlib.h>
#include <lualib.h>
#include "host.h"

#define EXIT_LOAD 3   /* runbook.exit: the runbook (here: the host's own Lua) cannot be loaded */

/* The directory holding stdlib/ and lib/: next to the executable in a build
 * tree, else ../share/runbook and ../lib/runbook after `make install`. */
static void find_roots(char *stdlib, char *libdir, size_t size)
{
    char exe[PATH_MAX - 64];   /* room for the suffixes below */
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        snprintf(stdlib, size, "stdlib");
        snprintf(libdir, size, "lib");
        return;
    }
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    *slash = '\0';
    snprintf(stdlib, size, "%s/stdlib/runbook/cli.lua", exe);
    if (access(stdlib, R_OK) == 0) {
        snprintf(stdlib, size, "%s/stdlib", exe);
        snprintf(libdir, size, "%s/lib", exe);
    } else {
        snprintf(stdlib, size, "%s/../share/runbook/stdlib", exe);
        snprintf(libdir, size, "%s/../lib/runbook", exe);
    }
}

static void set_path(lua_State *L, const char *field, const char *mine)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, field);
    lua_pushfstring(L, "%s;%s", mine, lua_tostring(L, -1));
    lua_setfield(L, -3, field);
    lua_pop(L, 2);
}

/* Read the open file `fd` of `size` bytes whole onto the stack; false on a read error. */
static int push_file(lua_State *L, int fd, size_t size)
{
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, size);
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, p + got, size - got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return 0;
        }
        got += (size_t)n;
    }
    luaL_pushresultsize(&b, got);
    return 1;
}

/*
 * A searcher for the stdlib precompiled by `make` (lib/lua/<name>.luac):
 * loading bytecode instead of parsing the source takes most of start-up's
 * cost away. A compiled file older than its source is ignored, so an edited
 * stdlib file is never shadowed by a stale build. The file is opened once and
 * read whole (luaL_loadfilex opens a binary chunk twice).
 * Upvalues: the stdlib directory and the compiled directory.
 */
static int compiled_searcher(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const char *mod = luaL_gsub(L, name, ".", "/");
    const char *src = lua_pushfstring(L, "%s/%s.lua", lua_tostring(L, lua_upvalueindex(1)), mod);
    const char *bc = lua_pushfstring(L, "%s/%s.luac", lua_tostring(L, lua_upvalueindex(2)), mod);
    struct stat s_src, s_bc;
    int fd = open(bc, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &s_bc) != 0 || (stat(src, &s_src) == 0 && s_src.st_mtime > s_bc.st_mtime)) {
        if (fd >= 0) close(fd);
        lua_pushfstring(L, "no compiled stdlib file '%s'", bc);
        return 1;
    }
    int read_ok = push_file(L, fd, (size_t)s_bc.st_size);
    close(fd);
    if (!read_ok)
        return luaL_error(L, "error loading module '%s' from '%s':\n\tcannot read it", name, bc);
    const char *chunkname = lua_pushfstring(L, "@%s", bc);
    size_t len;
    const char *code = lua_tolstring(L, -2, &len);
    if (luaL_loadbufferx(L, code, len, chunkname, "b") != LUA_OK)
        return luaL_error(L, "error loading module '%s' from '%s':\n\t%s", name, bc, lua_tostring(L, -1));
    lua_pushstring(L, bc);
    return 2;
}

/* Put compiled_searcher right after the preload searcher. */
static void add_compiled_searcher(lua_State *L, const char *stdlib, const char *libdir)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers");
    lua_pushstring(L, stdlib);
    lua_pushfstring(L, "%s/lua", libdir);
    lua_pushcclosure(L, compiled_searcher, 2);
    for (lua_Integer i = (lua_Integer)luaL_len(L, -2); i >= 2; i--) {
        lua_rawgeti(L, -2, i);
        lua_rawseti(L, -3, i + 1);
    }
    lua_rawseti(L, -2, 2);
    lua_pop(L, 2);
}

static int msghandler(lua_State *L)
{
    if (!lua_isstring(L, 1) && luaL_callmeta(L, 1, "__tostring"))
        lua_replace(L, 1);
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

/*
 * C modules stay loaded until the process exits. Lua unloads them when the
 * state closes, and with them libpq, libcurl, OpenSSL and librdkafka, whose
 * threads and process-wide state may outlive the state by a moment (once
 * librdkafka was unmapped, LeakSanitizer took its globals for leaks). The
 * finalizer of loadlib.c's table of loaded libraries, "_CLIBS", is what
 * unloads them.
 */
static void keep_c_libraries(lua_State *L)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, "_CLIBS");
    if (lua_getmetatable(L, -1)) {
        lua_pushnil(L);
        lua_setfield(L, -2, "__gc");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static int pmain(lua_State *L)
{
    int argc = (int)lua_tointeger(L, 1);
    char **argv = lua_touserdata(L, 2);
    char stdlib[PATH_MAX], libdir[PATH_MAX];

    rb_secret_register_env();
    luaL_openlibs(L);
    rb_guard_stdlib(L);
    keep_c_libraries(L);
    luaL_requiref(L, "runbook.host", luaopen_runbook_host, 0);
    find_roots(stdlib, libdir, sizeof stdlib);
    lua_pushstring(L, stdlib);
    lua_setfield(L, -2, "stdlib_dir");   /* shipped runbooks live beside it */
    lua_pop(L, 1);
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua", stdlib, stdlib);
    set_path(L, "path", lua_tostring(L, -1));
    lua_pushfstring(L, "%s/?.so", libdir);
    set_path(L, "cpath", lua_tostring(L, -1));
    lua_pop(L, 2);
    add_compiled_searcher(L, stdlib, libdir);

    lua_getglobal(L, "require");
    lua_pushliteral(L, "runbook.cli");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "main");
    lua_createtable(L, argc, 0);
    for (int i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_call(L, 1, 1);
    return 1;
}

int main(int argc, char **argv)
{
    lua_State *L = luaL_newstate();
    if (!L) {
        fputs("runbook: cannot create Lua state: not enough memory\n", stderr);
        return EXIT_LOAD;
    }
    lua_pushcfunction(L, msghandler);
    lua_pushcfunction(L, pmain);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = lua_pcall(L, 2, 1, 1);
    int code;
    if (status != LUA_OK) {
        const char *msg = lua_pushfstring(L, "runbook: internal error: %s\n", lua_tostring(L, -1));
        rb_write_redacted(stderr, msg, strlen(msg));
        code = EXIT_LOAD;
    } else {
        code = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
    }
    fflush(stdout);
    rb_watchdog_stop();
    lua_close(L);
    return code;
}
