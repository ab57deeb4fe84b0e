/*
 * httpd.c: "runbook.httpd", the HTTP server of `runbook serve`, on
 * libmicrohttpd (HTTP parsing, connection timeouts and TLS are the
 * library's). One thread: MHD runs in external-select mode from
 * server:poll(seconds), and each complete request is answered there by the
 * Lua handler the server was made with. Bodies over max_body are answered
 * 413 without calling the handler; a connection idle for `timeout` seconds
 * (a request sent too slowly) is closed.
 *
 *   local s <close> = httpd.listen{host = "127.0.0.1", port = 0, max_body = 1048576,
 *     timeout = 10, tls_cert = PEM, tls_key = PEM,
 *     handler = function(req) return 200, "ok\n", "text/plain" end}
 *   s:port()      -- the port bound (port 0 picks a free one)
 *   s:poll(0.2)   -- serve for up to 0.2 s
 *   httpd.equal(a, b)   -- compare two strings in constant time (tokens)
 *   httpd.spawn(argv, log, env, input)  -- start a child (posix_spawn), input on stdin, stdout and stderr to log -> pid
 *   httpd.reap()  -- the children that ended since: {[pid] = exit status (128 + signal if killed)}
 *
 * req = {method, path, query = {k = v}, body, authorization, cookie}. The
 * handler returns status, body, content type and, optionally, a table of
 * more response headers ({["Set-Cookie"] = ...}). It runs protected: an
 * error is a 500 with no detail (it goes to stderr, redacted). A handler may
 * answer a stream (Server-Sent Events) by returning a function as the body: each call returns the next text, "" for nothing
 * yet (the connection waits, and the function is asked again at the next
 * poll, within 0.25 s), or nil at the end.
 */
#define _GNU_SOURCE   /* pipe2 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <microhttpd.h>
#include <lauxlib.h>
#include "runbook.h"

#define SERVER_MT "runbook.httpd.server"
#define STREAM_POLL 0.05   /* seconds a waiting stream waits before its function is asked again */

typedef struct stream stream;

typedef struct {
    struct MHD_Daemon *daemon;
    lua_State *L;      /* the state of the poll in progress */
    int handler;       /* registry ref */
    size_t max_body;
    int streams;       /* streamed responses open */
    stream *waiting;   /* their connections suspended until the next poll */
    char *tls_cert, *tls_key;   /* kept for the daemon's life */
} server;

/* A streamed response: the Lua function that makes it, and the text it gave
 * that did not fit MHD's buffer yet. */
struct stream {
    server *s;
    struct MHD_Connection *conn;
    int producer;      /* registry ref */
    char *text;
    size_t len, off;
    stream *next;      /* in s->waiting */
};

typedef struct {
    char *body;
    size_t len;
    int too_big;
} request;

static void log_error(const char *what, const char *msg)
{
    rb_write_redacted(stderr, what, strlen(what));
    rb_write_redacted(stderr, msg ? msg : "?", msg ? strlen(msg) : 1);
    rb_write_redacted(stderr, "\n", 1);
}

/* The handler's headers (a table at stack index idx, or nothing there) added to r. */
static void add_headers(lua_State *L, int idx, struct MHD_Response *r)
{
    if (!L || !lua_istable(L, idx)) return;
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING)
            MHD_add_response_header(r, lua_tostring(L, -2), lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

/* Answer with body; L (when not NULL) holds the handler's headers on top. */
static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *body, size_t len,
                               const char *type, lua_State *L)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type ? type : "text/plain; charset=utf-8");
    add_headers(L, -1, r);
    enum MHD_Result ok = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result push_query_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    (void)kind;
    lua_State *L = cls;
    lua_pushstring(L, value ? value : "");
    lua_setfield(L, -2, key);
    return MHD_YES;
}

static int push_request(lua_State *L)
{
    struct MHD_Connection *conn = lua_touserdata(L, 1);
    request *rq = lua_touserdata(L, 2);
    const char *method = lua_touserdata(L, 3), *url = lua_touserdata(L, 4);
    server *s = lua_touserdata(L, 5);
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler);
    lua_createtable(L, 0, 5);
    lua_newtable(L);
    MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, push_query_arg, L);
    lua_setfield(L, -2, "query");
    lua_pushstring(L, method);
    lua_setfield(L, -2, "method");
    lua_pushstring(L, url);
    lua_setfield(L, -2, "path");
    lua_pushlstring(L, rq->body ? rq->body : "", rq->len);
    lua_setfield(L, -2, "body");
    static const char *const headers[][2] = { { "Authorization", "authorization" }, { "Cookie", "cookie" } };
    for (size_t i = 0; i < sizeof headers / sizeof headers[0]; i++) {
        const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, headers[i][0]);
        if (v) {
            lua_pushstring(L, v);
            lua_setfield(L, -2, headers[i][1]);
        }
    }
    lua_call(L, 1, 4);
    return 4;
}

/* Calls the handler protected: returns its status, and its body, type and
 * headers on the stack (the caller pops the three). */
static unsigned call_handler(server *s, struct MHD_Connection *conn, request *rq, const char *method, const char *url)
{
    lua_State *L = s->L;
    lua_pushcfunction(L, push_request);
    lua_pushlightuserdata(L, conn);
    lua_pushlightuserdata(L, rq);
    lua_pushlightuserdata(L, (void *)method);
    lua_pushlightuserdata(L, (void *)url);
    lua_pushlightuserdata(L, s);
    if (lua_pcall(L, 5, 4, 0) != LUA_OK) {
        log_error("runbook: serve: handler error: ", lua_tostring(L, -1));
        lua_pop(L, 1);
        lua_pushliteral(L, "internal error\n");
        lua_pushnil(L);
        lua_pushnil(L);
        return 500;
    }
    int isnum;
    lua_Integer status = lua_tointegerx(L, -4, &isnum);
    lua_remove(L, -4);
    return isnum && status >= 100 && status <= 599 ? (unsigned)status : 500;
}

/* MHD asks for more of a stream: what its function left, else the function's next text. */
static ssize_t read_stream(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    stream *st = cls;
    if (st->off == st->len) {
        lua_State *L = st->s->L;
        lua_rawgeti(L, LUA_REGISTRYINDEX, st->producer);
        if (lua_pcall(L, 0, 1, 0) != LUA_OK) {
            log_error("runbook: serve: stream error: ", lua_tostring(L, -1));
            lua_pop(L, 1);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        size_t len;
        const char *text = lua_tolstring(L, -1, &len);
        if (!text) {
            lua_pop(L, 1);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        char *copy = len ? malloc(len) : NULL;
        if (len && copy) memcpy(copy, text, len);
        lua_pop(L, 1);
        if (len && !copy) return MHD_CONTENT_READER_END_WITH_ERROR;
        free(st->text);
        st->text = copy, st->len = len, st->off = 0;
        if (!len) {   /* nothing yet: rest until the next poll resumes it */
            MHD_suspend_connection(st->conn);
            st->next = st->s->waiting;
            st->s->waiting = st;
            return 0;
        }
    }
    size_t n = st->len - st->off < max ? st->len - st->off : max;
    memcpy(buf, st->text + st->off, n);
    st->off += n;
    return (ssize_t)n;
}

static void free_stream(void *cls)
{
    stream *st = cls;
    luaL_unref(st->s->L, LUA_REGISTRYINDEX, st->producer);
    st->s->streams--;
    free(st->text);
    free(st);
}

/* Answer with the stream the function under the type and headers on the stack makes. */
static enum MHD_Result respond_stream(server *s, struct MHD_Connection *conn, unsigned status, const char *type)
{
    stream *st = calloc(1, sizeof *st);
    if (!st) return MHD_NO;
    st->s = s, st->conn = conn;
    lua_pushvalue(s->L, -3);
    st->producer = luaL_ref(s->L, LUA_REGISTRYINDEX);
    s->streams++;
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, read_stream, st, free_stream);
    if (!r) {
        free_stream(st);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type ? type : "text/event-stream");
    MHD_add_response_header(r, "Cache-Control", "no-store");
    add_headers(s->L, -1, r);
    enum MHD_Result ok = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ok;
}

/* Let every waiting stream's function be asked again. */
static void resume_streams(server *s)
{
    for (stream *st = s->waiting, *next; st; st = next) {
        next = st->next;
        st->next = NULL;
        MHD_resume_connection(st->conn);
    }
    s->waiting = NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    server *s = cls;
    request *rq = *con_cls;
    if (!rq) {
        rq = calloc(1, sizeof *rq);
        *con_cls = rq;
        return rq ? MHD_YES : MHD_NO;
    }
    if (*upload_size) {
        if (!rq->too_big && rq->len + *upload_size <= s->max_body) {
            char *b = realloc(rq->body, rq->len + *upload_size);
            if (!b) return MHD_NO;
            memcpy(b + rq->len, upload, *upload_size);
            rq->body = b;
            rq->len += *upload_size;
        } else {
            rq->too_big = 1;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (rq->too_big) {
        static const char msg[] = "request body too large\n";
        return respond(conn, 413, msg, sizeof msg - 1, NULL, NULL);
    }
    unsigned status = call_handler(s, conn, rq, method, url);
    if (lua_isfunction(s->L, -3)) {
        enum MHD_Result ok = respond_stream(s, conn, status, lua_tostring(s->L, -2));
        lua_pop(s->L, 3);
        return ok;
    }
    size_t len;
    const char *body = lua_tolstring(s->L, -3, &len);
    enum MHD_Result ok = respond(conn, status, body ? body : "", body ? len : 0, lua_tostring(s->L, -2), s->L);
    lua_pop(s->L, 3);
    return ok;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode t)
{
    (void)cls, (void)conn, (void)t;
    request *rq = *con_cls;
    if (rq) free(rq->body);
    free(rq);
    *con_cls = NULL;
}

static server *check_server(lua_State *L)
{
    server *s = luaL_checkudata(L, 1, SERVER_MT);
    luaL_argcheck(L, s->daemon != NULL, 1, "server is closed");
    return s;
}

static int s_close(lua_State *L)
{
    server *s = luaL_checkudata(L, 1, SERVER_MT);
    s->L = L;   /* the streams' finalizers run in MHD_stop_daemon */
    if (s->daemon) {
        resume_streams(s);   /* MHD stops no daemon with connections suspended */
        MHD_stop_daemon(s->daemon);
    }
    s->daemon = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, s->handler);
    s->handler = LUA_NOREF;
    free(s->tls_cert);
    free(s->tls_key);
    s->tls_cert = s->tls_key = NULL;
    return 0;
}

static int s_port(lua_State *L)
{
    server *s = check_server(L);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    lua_pushinteger(L, info ? info->port : 0);
    return 1;
}

/* poll(seconds): wait for traffic up to `seconds`, then let MHD handle what came. */
static int s_poll(lua_State *L)
{
    server *s = check_server(L);
    double secs = rb_remaining(L, luaL_checknumber(L, 2));
    s->L = L;
    if (s->streams && secs > STREAM_POLL) secs = STREAM_POLL;
    resume_streams(s);
    fd_set rs, ws, es;
    FD_ZERO(&rs);
    FD_ZERO(&ws);
    FD_ZERO(&es);
    MHD_socket max = 0;
    if (MHD_get_fdset(s->daemon, &rs, &ws, &es, &max) != MHD_YES)
        return rb_error(L, "httpd", "poll", "fdset", 0, "cannot get the server's sockets");
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(s->daemon, &ms) == MHD_YES && ms / 1000.0 < secs) secs = ms / 1000.0;
    struct timeval tv = { (time_t)secs, (suseconds_t)((secs - (double)(time_t)secs) * 1e6) };
    select(max + 1, &rs, &ws, &es, &tv);   /* EINTR (a signal) returns early: the loop checks */
    MHD_run_from_select(s->daemon, &rs, &ws, &es);
    return 0;
}

/* A copy of the optional string field `name` of the table at 1, or NULL. */
static char *opt_copy(lua_State *L, const char *name)
{
    lua_getfield(L, 1, name);
    const char *v = luaL_optstring(L, -1, NULL);
    lua_pop(L, 1);
    return v ? strdup(v) : NULL;
}

/* listen{host, port, max_body, timeout, tls_cert, tls_key, handler} -> server */
static int h_listen(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "host");
    const char *host = luaL_optstring(L, -1, "127.0.0.1");
    lua_getfield(L, 1, "port");
    lua_Integer port = luaL_optinteger(L, -1, 0);
    lua_getfield(L, 1, "max_body");
    lua_Integer max_body = luaL_optinteger(L, -1, 1 << 20);
    lua_getfield(L, 1, "timeout");
    lua_Integer timeout = luaL_optinteger(L, -1, 10);
    lua_getfield(L, 1, "handler");
    luaL_argcheck(L, lua_isfunction(L, -1), 1, "handler must be a function");
    luaL_argcheck(L, port >= 0 && port <= 65535, 1, "port must be 0..65535");
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        return luaL_error(L, "listen: host must be an IPv4 address, got '%s'", host);
    server *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    s->handler = LUA_NOREF;
    luaL_setmetatable(L, SERVER_MT);
    lua_pushvalue(L, -2);
    s->handler = luaL_ref(L, LUA_REGISTRYINDEX);
    s->max_body = (size_t)max_body;
    s->tls_cert = opt_copy(L, "tls_cert");
    s->tls_key = opt_copy(L, "tls_key");
    unsigned flags = MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    struct MHD_OptionItem tls[] = {
        { MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert },
        { MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key },
        { MHD_OPTION_END, 0, NULL },
    };
    if (s->tls_cert || s->tls_key) {
        if (!s->tls_cert || !s->tls_key)
            return luaL_error(L, "listen: TLS needs both a certificate and a key");
        if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
            return luaL_error(L, "listen: this libmicrohttpd was built without TLS");
        flags |= MHD_USE_TLS;
    } else {
        tls[0].option = MHD_OPTION_END;
    }
    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
                                 MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)timeout,
                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned int)64,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
                                 MHD_OPTION_ARRAY, tls,
                                 MHD_OPTION_END);
    if (!s->daemon)
        return rb_error(L, "httpd", "listen", "listen", 0, "cannot listen on %s:%d%s", host, (int)port,
                        s->tls_cert ? " with TLS (is the certificate and key PEM, and the key unencrypted?)" : "");
    return 1;
}

/* equal(a, b): whether two strings are equal, in time that depends only on their lengths. */
static int h_equal(lua_State *L)
{
    size_t la, lb;
    const char *a = luaL_checklstring(L, 1, &la), *b = luaL_checklstring(L, 2, &lb);
    unsigned char diff = la != lb;
    for (size_t i = 0; i < la; i++) diff |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    lua_pushboolean(L, lb > 0 && diff == 0);
    return 1;
}

extern char **environ;

/* A NULL-terminated array of the strings of the table at idx, in a userdata on the stack. */
static char **push_strings(lua_State *L, int idx, int extra)
{
    int n = (int)luaL_len(L, idx);
    char **v = lua_newuserdatauv(L, sizeof *v * (size_t)(n + extra + 1), 0);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, idx, i + 1);
        v[i] = (char *)luaL_checkstring(L, -1);   /* kept alive by the table */
        lua_pop(L, 1);
    }
    v[n] = NULL;
    return v;
}

/* spawn(argv, log, env[, input]): argv[1] started with the environment and
 * `env` ({"K=V"...}, replacing the environment's own K), stdout and stderr appended to `log`, and on stdin
 * `input` (a pipe holding it: at most PIPE_INPUT bytes, so serve never waits
 * for the child to read) or else /dev/null; its pid. */
#define PIPE_INPUT 60000
static int h_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *log = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    size_t input_len = 0;
    const char *input = luaL_optlstring(L, 4, NULL, &input_len);
    luaL_argcheck(L, input_len <= PIPE_INPUT, 4, "input too long for a pipe");
    char **argv = push_strings(L, 1, 0);
    luaL_argcheck(L, argv[0] != NULL, 1, "argv is empty");
    int total = 0, n = 0;
    while (environ[total]) total++;
    char **extra = push_strings(L, 3, 0);
    char **envp = lua_newuserdatauv(L, sizeof *envp * (size_t)(total + luaL_len(L, 3) + 1), 0);
    for (int i = 0; i < total; i++) {   /* an entry of `env` replaces the environment's own */
        size_t name = strcspn(environ[i], "=") + 1;
        int replaced = 0;
        for (char **e = extra; *e && !replaced; e++) replaced = strncmp(*e, environ[i], name) == 0;
        if (!replaced) envp[n++] = environ[i];
    }
    for (char **e = extra; *e; e++) envp[n++] = *e;
    envp[n] = NULL;
    int in[2] = { -1, -1 };   /* filled before the child starts: it fits, and no write can meet a closed end */
    if (input && (pipe2(in, O_CLOEXEC) != 0 || write(in[1], input, input_len) != (ssize_t)input_len)) {
        int e = errno;
        if (in[0] >= 0) close(in[0]), close(in[1]);
        return rb_error(L, "httpd", "spawn", "spawn", 0, "cannot fill the child's input: %s", strerror(e));
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    if (input) posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    else posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    if (input) close(in[0]), close(in[1]);
    if (rc != 0) return rb_error(L, "httpd", "spawn", "spawn", 0, "cannot start %s: %s", argv[0], strerror(rc));
    lua_pushinteger(L, pid);
    return 1;
}

static int h_reap(lua_State *L)
{
    lua_newtable(L);
    pid_t pid;
    int status;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        lua_pushinteger(L, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        lua_rawseti(L, -2, pid);
    }
    return 1;
}

static const luaL_Reg server_methods[] = {
    { "poll", s_poll }, { "port", s_port }, { "close", s_close }, { NULL, NULL }
};

static const luaL_Reg funcs[] = {
    { "listen", h_listen }, { "equal", h_equal }, { "spawn", h_spawn }, { "reap", h_reap }, { NULL, NULL }
};

int luaopen_runbook_httpd(lua_State *L)
{
    if (luaL_newmetatable(L, SERVER_MT)) {
        luaL_newlib(L, server_methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, s_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, s_close);
        lua_setfield(L, -2, "__close");
    }
    lua_pop(L, 1);
    luaL_newlib(L, funcs);
    return 1;
}
