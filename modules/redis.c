/*
 * redis.c: Redis over hiredis.
 *
 *   connect(url, opts) -> conn        redis://[user:password@]host[:port][/db]
 *     opts.connect_timeout  seconds (default 10), never beyond the step's deadline
 *     opts.timeout          seconds per command (default 30), bounded by the step
 *   set_null(null)                    the sentinel for nil inside arrays (from redis.lua)
 *   is_write(name [, subcommand]) -> boolean   the gate's classification
 *   raise(op, code, retryable, message)
 *   methods                           the conn methods table (redis.lua adds to it)
 *
 *   conn:command(name, args...) -> reply    any command; writes go through the gate
 *   conn:pipeline({{name, args...}, ...}) -> {replies}   one round trip
 *   conn:close()                            also __close and __gc
 *
 * Replies convert: bulk and status strings to strings, integers to integers,
 * arrays to tables (nil inside them as the null sentinel), nil to nil; error
 * replies raise with the error's first word as the code ("WRONGTYPE").
 *
 * Commands are reads when they are in the table below; everything else,
 * including commands this table does not know, is a write. A dry run
 * reports writes and does not send them (Redis has no rollback).
 *
 * hiredis here is 0.14 (Debian 12), which has no TLS: rediss:// is refused
 * with a clear error. A connection that failed (timeout, server gone) is
 * reopened on the next command.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <lua.h>

#include "runbook.h"

#define CONN_MT "runbook.redis.conn"
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_TIMEOUT 30.0
#define REG_NULL "runbook.redis.null"
#define MAX_ARGS 1000000

typedef struct {
    redisContext *ctx;
    redisReply *reply;       /* being converted; freed by the next call or the finalizer */
    const char **argv;       /* scratch for one command */
    size_t *argvlen;
    int argcap;
    char *host, *user, *password;
    int port, db;
    double connect_timeout, timeout, timeout_set;
    int closed;
} conn;

/* ---- classification ----------------------------------------------------- */

/* Commands that never change data (Redis's "readonly" flag, plus the
 * connection and introspection commands). Sorted for bsearch. */
static const char *const read_commands[] = {
    "BITCOUNT", "BITFIELD_RO", "BITPOS", "DBSIZE", "DUMP", "ECHO", "EVALSHA_RO", "EVAL_RO", "EXISTS",
    "EXPIRETIME", "FCALL_RO", "GEODIST", "GEOHASH", "GEOPOS", "GEORADIUSBYMEMBER_RO", "GEORADIUS_RO",
    "GEOSEARCH", "GET", "GETBIT", "GETRANGE", "HELLO", "HEXISTS", "HGET", "HGETALL", "HKEYS", "HLEN", "HMGET",
    "HRANDFIELD", "HSCAN", "HSTRLEN", "HVALS", "INFO", "KEYS", "LASTSAVE", "LCS", "LINDEX", "LLEN", "LOLWUT",
    "LPOS", "LRANGE", "MGET", "PEXPIRETIME", "PFCOUNT", "PING", "PTTL", "PUBSUB", "RANDOMKEY", "ROLE", "SCAN",
    "SCARD", "SDIFF", "SINTER", "SINTERCARD", "SISMEMBER", "SMEMBERS", "SMISMEMBER", "SORT_RO", "SRANDMEMBER",
    "SSCAN", "STRLEN", "SUBSTR", "SUNION", "TIME", "TOUCH", "TTL", "TYPE", "XINFO", "XLEN", "XPENDING",
    "XRANGE", "XREAD", "XREVRANGE", "ZCARD", "ZCOUNT", "ZDIFF", "ZINTER", "ZINTERCARD", "ZLEXCOUNT", "ZMSCORE",
    "ZRANDMEMBER", "ZRANGE", "ZRANGEBYLEX", "ZRANGEBYSCORE", "ZRANK", "ZREVRANGE", "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCAN", "ZSCORE", "ZUNION",
};

/* Container commands whose subcommands decide: these subcommands read. */
static const struct { const char *cmd; const char *const *subs; } read_subcommands[] = {
    {"CONFIG", (const char *const[]){"GET", "HELP", NULL}},
    {"CLIENT", (const char *const[]){"LIST", "INFO", "GETNAME", "ID", "GETREDIR", "TRACKINGINFO", "HELP", NULL}},
    {"COMMAND", (const char *const[]){"", "COUNT", "DOCS", "GETKEYS", "GETKEYSANDFLAGS", "INFO", "LIST", "HELP", NULL}},
    {"MEMORY", (const char *const[]){"USAGE", "STATS", "DOCTOR", "MALLOC-STATS", "HELP", NULL}},
    {"OBJECT", (const char *const[]){"ENCODING", "FREQ", "IDLETIME", "REFCOUNT", "HELP", NULL}},
    {"SLOWLOG", (const char *const[]){"GET", "LEN", "HELP", NULL}},
    {"LATENCY", (const char *const[]){"LATEST", "HISTORY", "DOCTOR", "GRAPH", "HISTOGRAM", "HELP", NULL}},
    {"ACL", (const char *const[]){"WHOAMI", "LIST", "USERS", "GETUSER", "CAT", "LOG", "DRYRUN", "HELP", NULL}},
    {"CLUSTER", (const char *const[]){"INFO", "NODES", "SLOTS", "SHARDS", "MYID", "KEYSLOT", "COUNTKEYSINSLOT",
                                      "GETKEYSINSLOT", "LINKS", "HELP", NULL}},
    {"SCRIPT", (const char *const[]){"EXISTS", "HELP", NULL}},
    {"FUNCTION", (const char *const[]){"LIST", "DUMP", "STATS", "HELP", NULL}},
    {"MODULE", (const char *const[]){"LIST", "HELP", NULL}},
    {"XINFO", (const char *const[]){"STREAM", "GROUPS", "CONSUMERS", "HELP", NULL}},
};

static int cmp_name(const void *a, const void *b) { return strcasecmp(a, *(const char *const *)b); }

static int is_write(const char *cmd, const char *sub) {
    for (size_t i = 0; i < sizeof read_subcommands / sizeof *read_subcommands; i++) {
        if (strcasecmp(cmd, read_subcommands[i].cmd) != 0) continue;
        for (const char *const *s = read_subcommands[i].subs; *s; s++)
            if (strcasecmp(sub ? sub : "", *s) == 0) return 0;
        return 1;
    }
    return !bsearch(cmd, read_commands, sizeof read_commands / sizeof *read_commands, sizeof *read_commands, cmp_name);
}

/* ---- handle ------------------------------------------------------------- */

static void scratch_free(conn *c) {
    if (c->reply) freeReplyObject(c->reply);
    c->reply = NULL;
}

static void drop_context(conn *c) {
    if (c->ctx) redisFree(c->ctx);
    c->ctx = NULL;
}

/* Idempotent: serves __gc, __close and close(). */
static int conn_close(lua_State *L) {
    conn *c = luaL_checkudata(L, 1, CONN_MT);
    scratch_free(c);
    drop_context(c);
    free(c->argv), free(c->argvlen), free(c->host), free(c->user), free(c->password);
    c->argv = NULL, c->argvlen = NULL, c->host = c->user = c->password = NULL;
    c->argcap = 0;
    c->closed = 1;
    return 0;
}

static conn *check_conn(lua_State *L, int i) {
    conn *c = luaL_checkudata(L, i, CONN_MT);
    if (c->closed) luaL_error(L, "redis connection is closed");
    scratch_free(c);
    return c;
}

static struct timeval tv_of(double secs) {
    struct timeval tv = { (time_t)secs, (suseconds_t)((secs - (double)(time_t)secs) * 1e6) };
    return tv;
}

/* ---- errors ------------------------------------------------------------- */

static const char *io_code(const redisContext *ctx, int *retryable) {
    *retryable = 1;
    if (ctx->err == REDIS_ERR_EOF) return "connection_closed";
    if (ctx->err == REDIS_ERR_PROTOCOL) return *retryable = 0, "protocol_error";
    if (ctx->err == REDIS_ERR_OOM) return *retryable = 0, "out_of_memory";
    if (strstr(ctx->errstr, "temporarily unavailable") || strstr(ctx->errstr, "timed out")) return "timeout";
    if (strstr(ctx->errstr, "refused")) return "connection_refused";
    return "io_error";
}

/* A failed context is dropped (reopened by the next command), then raised. */
static int raise_io(lua_State *L, conn *c, const char *op, const char *what) {
    int retryable;
    const char *code = io_code(c->ctx, &retryable);
    lua_pushfstring(L, "%s: %s (%s:%d)", what, c->ctx->errstr, c->host, c->port);
    drop_context(c);
    return rb_error(L, "redis", op, code, retryable, "%s", lua_tostring(L, -1));
}

/* An error reply: its first word is the code (ERR, WRONGTYPE, NOAUTH, ...). */
static int raise_reply(lua_State *L, const char *op, const char *cmd, const char *err) {
    size_t n = strcspn(err, " ");
    lua_pushlstring(L, err, n);
    const char *code = lua_tostring(L, -1);
    int retryable = !strcmp(code, "LOADING") || !strcmp(code, "BUSY") || !strcmp(code, "TRYAGAIN") ||
                    !strcmp(code, "MASTERDOWN") || !strcmp(code, "CLUSTERDOWN");
    return rb_error(L, "redis", op, code, retryable, "%s: %s", cmd, err);
}

/* ---- connecting --------------------------------------------------------- */

static int hex(char ch) {
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

/* A URL part with %XX escapes decoded. */
static char *decode_part(const char *s, size_t n) {
    char *out = malloc(n + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
            *o++ = (char)(hex(s[i + 1]) * 16 + hex(s[i + 2]));
            i += 2;
        } else {
            *o++ = s[i];
        }
    }
    *o = '\0';
    return out;
}

/* The password as written in the URL, registered before anything can fail
 * and print the URL. */
static void register_raw_password(lua_State *L, const char *s) {
    const char *p = strstr(s, "://");
    if (!p) return;
    p += 3;
    const char *end = p + strcspn(p, "/?#"), *at = NULL;
    for (const char *q = p; q < end; q++) if (*q == '@') at = q;
    const char *colon = at ? memchr(p, ':', (size_t)(at - p)) : NULL;
    if (colon) rb_secret_register(L, colon + 1, (size_t)(at - colon - 1));
}

/* redis://[user[:password]@]host[:port][/db]; returns an error message or NULL. */
static const char *parse_url(lua_State *L, conn *c, const char *url) {
    if (strncmp(url, "rediss://", 9) == 0)
        return "rediss:// (TLS) is not supported: this build's hiredis (0.14) has no TLS; use a TLS tunnel such as stunnel";
    if (strncmp(url, "redis://", 8) != 0) return "expected a redis://[user:password@]host[:port][/db] URL";
    const char *p = url + 8, *end = p + strcspn(p, "/?#");
    const char *at = NULL;
    for (const char *q = p; q < end; q++) if (*q == '@') at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *uend = colon ? colon : at;
        if (uend > p) c->user = decode_part(p, (size_t)(uend - p));
        if (colon) {
            rb_secret_register(L, colon + 1, (size_t)(at - colon - 1));
            c->password = decode_part(colon + 1, (size_t)(at - colon - 1));
            if (c->password) rb_secret_register(L, c->password, strlen(c->password));
        }
        p = at + 1;
    }
    const char *colon = memchr(p, ':', (size_t)(end - p));
    const char *hend = colon ? colon : end;
    if (hend == p) return "the URL names no host";
    c->host = decode_part(p, (size_t)(hend - p));
    c->port = 6379;
    if (colon) {
        char *e;
        long port = strtol(colon + 1, &e, 10);
        if (e != end || port <= 0 || port > 65535) return "the URL's port is not a number from 1 to 65535";
        c->port = (int)port;
    }
    if (*end == '/' && end[1] && end[1] != '?') {
        char *e;
        long db = strtol(end + 1, &e, 10);
        if ((*e && *e != '?') || db < 0) return "the URL's database must be a number (redis://host/0)";
        c->db = (int)db;
    }
    return NULL;
}

static int ensure_args(conn *c, int n) {
    if (n <= c->argcap) return 1;
    int cap = n < 16 ? 16 : n * 2;
    const char **a = realloc(c->argv, sizeof *a * (size_t)cap);
    if (a) c->argv = a;
    size_t *l = a ? realloc(c->argvlen, sizeof *l * (size_t)cap) : NULL;
    if (!a || !l) return 0;
    c->argvlen = l;
    c->argcap = cap;
    return 1;
}

/* One command during connection setup; raises on failure. */
static void setup_command(lua_State *L, conn *c, int argc, const char **argv) {
    size_t lens[3];
    for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
    scratch_free(c);
    c->reply = redisCommandArgv(c->ctx, argc, argv, lens);
    if (!c->reply) raise_io(L, c, "connect", argv[0]);
    if (c->reply->type == REDIS_REPLY_ERROR) {
        lua_pushstring(L, c->reply->str);
        drop_context(c);
        raise_reply(L, "connect", argv[0], lua_tostring(L, -1));
    }
    scratch_free(c);
}

/* Opens (or reopens) the context: connect, AUTH, SELECT, a client name. */
static void open_context(lua_State *L, conn *c) {
    double t = rb_remaining(L, c->connect_timeout);
    c->ctx = redisConnectWithTimeout(c->host, c->port, tv_of(t));
    if (!c->ctx) luaL_error(L, "out of memory");
    if (c->ctx->err) {
        int retryable;
        const char *code = io_code(c->ctx, &retryable);
        lua_pushfstring(L, "connecting to %s:%d: %s", c->host, c->port, c->ctx->errstr);
        drop_context(c);
        rb_error(L, "redis", "connect", code, retryable, "%s", lua_tostring(L, -1));
    }
    c->timeout_set = t;
    redisSetTimeout(c->ctx, tv_of(t));
    redisEnableKeepAlive(c->ctx);
    if (c->password) {
        const char *argv[3] = { "AUTH", c->user ? c->user : c->password, c->password };
        setup_command(L, c, c->user ? 3 : 2, argv);
    }
    if (c->db) {
        char db[16];
        snprintf(db, sizeof db, "%d", c->db);
        const char *argv[2] = { "SELECT", db };
        setup_command(L, c, 2, argv);
    }
    const char *argv[3] = { "CLIENT", "SETNAME", "runbook" };
    setup_command(L, c, 3, argv);
}

static double opt_seconds(lua_State *L, int t, const char *field, double dflt) {
    if (lua_isnoneornil(L, t)) return dflt;
    lua_getfield(L, t, field);
    int isnum = lua_isnumber(L, -1), isnil = lua_isnil(L, -1);
    double v = isnum ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    if (!isnil && (!isnum || v <= 0))
        luaL_argerror(L, t, lua_pushfstring(L, "%s must be a positive number of seconds", field));
    return v;
}

static int redis_connect(lua_State *L) {
    const char *url = luaL_checkstring(L, 1);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    conn *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, CONN_MT);
    c->connect_timeout = opt_seconds(L, 2, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    c->timeout = opt_seconds(L, 2, "timeout", DEFAULT_TIMEOUT);
    register_raw_password(L, url);
    const char *bad = parse_url(L, c, url);
    if (bad) return rb_error(L, "redis", "connect", "invalid_url", 0, "%s: %s", url, bad);
    open_context(L, c);
    return 1;
}

/* The context for the next command, reopened if a failure dropped it, with
 * its socket timeout following the step's remaining time. */
static redisContext *ready(lua_State *L, conn *c) {
    if (!c->ctx) open_context(L, c);
    double t = rb_remaining(L, c->timeout);
    if (t < c->timeout_set - 0.05 || t > c->timeout_set + 0.5) {
        redisSetTimeout(c->ctx, tv_of(t));
        c->timeout_set = t;
    }
    return c->ctx;
}

/* ---- commands ----------------------------------------------------------- */

static void push_reply(lua_State *L, const redisReply *r, int top) {
    switch (r->type) {
    case REDIS_REPLY_STRING: case REDIS_REPLY_STATUS: lua_pushlstring(L, r->str, r->len); return;
    case REDIS_REPLY_INTEGER: lua_pushinteger(L, (lua_Integer)r->integer); return;
    case REDIS_REPLY_NIL:
        if (top) lua_pushnil(L);
        else lua_getfield(L, LUA_REGISTRYINDEX, REG_NULL);
        return;
    case REDIS_REPLY_ARRAY:
        luaL_checkstack(L, 4, "reply nested too deeply");
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_reply(L, r->element[i], 0);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        return;
    default: /* an error nested in an array (EXEC): kept as a table, not raised */
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        return;
    }
}

/* The command at stack[first..last] into c->argv; returns argc. */
static int collect_args(lua_State *L, conn *c, int first, int last) {
    int argc = last - first + 1;
    if (argc < 1) luaL_error(L, "redis: expected a command name");
    if (argc > MAX_ARGS || !ensure_args(c, argc)) luaL_error(L, "redis: too many arguments");
    for (int i = 0; i < argc; i++) {
        int t = lua_type(L, first + i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "redis: argument %d is a %s; commands take strings and numbers", i + 1,
                       luaL_typename(L, first + i));
        c->argv[i] = lua_tolstring(L, first + i, &c->argvlen[i]);
    }
    return argc;
}

/* "SET backend||task-1 (+1 arg)": the command and its key, never values. */
static const char *push_summary(lua_State *L, conn *c, int argc) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (const char *p = c->argv[0]; *p; p++) luaL_addchar(&b, (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p));
    if (argc > 1) {
        luaL_addchar(&b, ' ');
        luaL_addlstring(&b, c->argv[1], c->argvlen[1] > 100 ? 100 : c->argvlen[1]);
    }
    if (argc > 2) {
        lua_pushfstring(L, " (+%d arg%s)", argc - 2, argc - 2 == 1 ? "" : "s");
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

static rb_effect effect_of(lua_State *L, conn *c, int argc) {
    rb_effect e = { "redis", NULL, NULL, NULL, 0 };
    e.summary = push_summary(L, c, argc);
    e.op = lua_pushstring(L, c->argv[0]);
    e.target = argc > 1 ? lua_pushlstring(L, c->argv[1], c->argvlen[1]) : lua_pushfstring(L, "%s:%d/%d", c->host, c->port, c->db);
    return e;
}

static void push_skipped(lua_State *L) {
    lua_createtable(L, 0, 1);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "skipped");
}

static int conn_command(lua_State *L) {
    conn *c = check_conn(L, 1);
    int argc = collect_args(L, c, 2, lua_gettop(L));
    int write = is_write(c->argv[0], argc > 1 ? c->argv[1] : NULL);
    rb_effect e;
    rb_decision d = RB_PERFORM;
    if (write) {
        e = effect_of(L, c, argc);
        if ((d = rb_gate(L, &e)) == RB_SKIP) {
            lua_pushnil(L);
            rb_gate_done(L, &e, d, 1);
            push_skipped(L);
            return 1;
        }
    }
    redisContext *ctx = ready(L, c);
    c->reply = redisCommandArgv(ctx, argc, c->argv, c->argvlen);
    if (!c->reply) {
        if (write) lua_pushstring(L, ctx->errstr), rb_gate_done(L, &e, d, 0);
        return raise_io(L, c, "command", c->argv[0]);
    }
    if (c->reply->type == REDIS_REPLY_ERROR) {
        if (write) lua_pushstring(L, c->reply->str), rb_gate_done(L, &e, d, 0);
        return raise_reply(L, "command", c->argv[0], c->reply->str);
    }
    if (write) {
        if (c->reply->type == REDIS_REPLY_INTEGER) lua_pushfstring(L, "%I", (LUAI_UACINT)c->reply->integer);
        else if (c->reply->type == REDIS_REPLY_STATUS) lua_pushstring(L, c->reply->str);
        else lua_pushnil(L);
        rb_gate_done(L, &e, d, 1);
    }
    push_reply(L, c->reply, 1);
    scratch_free(c);
    return 1;
}

/* pipeline({{cmd, args...}, ...}): writes a dry run skips come back as
 * {skipped = true}; every reply is read before the first error is raised,
 * so the connection stays in step. */
static int conn_pipeline(lua_State *L) {
    conn *c = check_conn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    int n = (int)lua_rawlen(L, 2);
    lua_createtable(L, n, 0);                       /* 3: results */
    char *sent = lua_newuserdatauv(L, (size_t)n + 1, 0); /* 4: which were sent */
    redisContext *ctx = ready(L, c);
    int pending = 0;
    for (int i = 1; i <= n; i++) {
        int base = lua_gettop(L);
        if (lua_rawgeti(L, 2, i) != LUA_TTABLE) luaL_error(L, "pipeline: command %d is not a table", i);
        int argc = (int)lua_rawlen(L, -1);
        luaL_checkstack(L, argc + 8, "too many arguments");
        for (int j = 1; j <= argc; j++) lua_rawgeti(L, base + 1, j);
        argc = collect_args(L, c, base + 2, lua_gettop(L));
        sent[i] = 1;
        if (is_write(c->argv[0], argc > 1 ? c->argv[1] : NULL)) {
            rb_effect e = effect_of(L, c, argc);
            rb_decision d = rb_gate(L, &e);
            lua_pushnil(L);
            rb_gate_done(L, &e, d, 1);
            if (d == RB_SKIP) sent[i] = 0;
        }
        if (sent[i] && redisAppendCommandArgv(ctx, argc, c->argv, c->argvlen) != REDIS_OK)
            luaL_error(L, "out of memory");
        pending += sent[i];
        lua_settop(L, base);
    }
    int first_error = 0;
    lua_pushnil(L); /* 5: the first error reply's text */
    for (int i = 1; i <= n; i++) {
        if (!sent[i]) {
            push_skipped(L);
            lua_rawseti(L, 3, i);
            continue;
        }
        void *r = NULL;
        if (redisGetReply(ctx, &r) != REDIS_OK) return raise_io(L, c, "pipeline", "reading replies");
        c->reply = r;
        if (c->reply->type == REDIS_REPLY_ERROR && !first_error) {
            first_error = i;
            lua_pushstring(L, c->reply->str);
            lua_replace(L, 5);
        }
        push_reply(L, c->reply, 0);
        lua_rawseti(L, 3, i);
        scratch_free(c);
    }
    if (first_error) {
        const char *which = lua_pushfstring(L, "command %d", first_error);
        return raise_reply(L, "pipeline", which, lua_tostring(L, 5));
    }
    lua_pushvalue(L, 3);
    return 1;
}

static int conn_tostring(lua_State *L) {
    conn *c = luaL_checkudata(L, 1, CONN_MT);
    if (c->closed) lua_pushliteral(L, "redis connection (closed)");
    else lua_pushfstring(L, "redis connection %s:%d/%d", c->host, c->port, c->db);
    return 1;
}

static int redis_set_null(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_NULL);
    return 0;
}

static int redis_is_write(lua_State *L) {
    lua_pushboolean(L, is_write(luaL_checkstring(L, 1), luaL_optstring(L, 2, NULL)));
    return 1;
}

static int redis_raise(lua_State *L) {
    const char *op = luaL_checkstring(L, 1);
    const char *code = luaL_optstring(L, 2, NULL);
    int retryable = lua_toboolean(L, 3);
    const char *msg = luaL_checkstring(L, 4);
    return rb_error(L, "redis", op, code, retryable, "%s", msg);
}

static const luaL_Reg conn_methods[] = {
    {"command", conn_command},
    {"pipeline", conn_pipeline},
    {"close", conn_close},
    {NULL, NULL}
};

static const luaL_Reg redis_funcs[] = {
    {"connect", redis_connect},
    {"set_null", redis_set_null},
    {"is_write", redis_is_write},
    {"raise", redis_raise},
    {NULL, NULL}
};

int luaopen_runbook_redis(lua_State *L) {
    if (luaL_newmetatable(L, CONN_MT)) {
        lua_pushcfunction(L, conn_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, conn_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, conn_tostring);
        lua_setfield(L, -2, "__tostring");
        luaL_newlib(L, conn_methods);
        lua_setfield(L, -2, "__index");
    }
    luaL_newlib(L, redis_funcs);
    lua_getfield(L, -2, "__index");
    lua_setfield(L, -2, "methods");
    return 1;
}
