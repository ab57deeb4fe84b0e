/*
 * k8s_exec.c: a command in a pod's container, over the API server's exec
 * protocol on a WebSocket (libwebsockets), as kubectl 1.30+ speaks it.
 * stdlib/k8s/exec.lua checks the pod and container first and reads the
 * exit status out of the status message.
 *
 *   run(opts) -> {stdout, stderr, status_message, protocol} | {skipped = true}
 *     opts.server      "https://host:port" (or http://)
 *     opts.namespace, opts.pod, opts.container   where the command runs
 *     opts.command     argv: an array of strings (no shell)
 *     opts.stdin       a string sent on the stdin channel, then closed (v5)
 *     opts.timeout     seconds; bounded by the step's remaining time
 *     opts.read        true: the command only reads, so it bypasses the gate
 * The exchange ends with the status message (then the connection is closed
 * without waiting for the server's close), or when the server closes.
 *     opts.ca_data|ca_file, cert_data|cert_file, key_data|key_file, token,
 *     opts.tls_server_name, opts.insecure   as runbook.k8s's connect takes them
 *
 * The protocol (channel.k8s.io): binary messages whose first byte is the
 * channel: 0 stdin, 1 stdout, 2 stderr, 3 the final status (a metav1.Status
 * as JSON), 255 (v5 only) "close this channel" from the client. The
 * subprotocols offered are v5.channel.k8s.io then v4.channel.k8s.io; with
 * v4 the end of stdin cannot be signalled, so stdin is sent and left open.
 *
 * The gate: unless opts.read, run() asks rb_gate() right before it connects,
 * with a summary it builds itself from the command, pod and container; in a
 * dry run nothing connects. The API server cannot dry-run an exec.
 *
 * Deadlines: the exchange ends at the timeout or on SIGINT/SIGTERM by
 * closing the connection, which ends the remote command's streams (the
 * sandbox's API server kills the command; a kubelet ends the exec session).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lws_glue.h"

#define SESSION_MT "runbook.k8s_exec.session"
#define CONTEXT_MT "runbook.k8s_exec.context"
#define DEFAULT_TIMEOUT 60.0
#define STDIN_CHUNK 32768
#define OUTPUT_MAX (1024u * 1024u * 1024u)   /* 1 GiB per stream: a runaway command, not a result */
#define SUMMARY_MAX 200

static int k8s_exec_run(lua_State *L);

static const luaL_Reg k8s_exec_funcs[] = {
    {"run", k8s_exec_run},
    {NULL, NULL}
};

typedef struct { char *data; size_t len, cap; } bytes;

static int context_gc(lua_State *L) {
    wsc_cache_free(luaL_checkudata(L, 1, CONTEXT_MT));
    return 0;
}

/* One exec: its connection and what came back. Created empty; the
 * finalizer frees the buffers, so an error raised anywhere leaks nothing.
 * The connection itself is always closed before run() returns or raises. */
typedef struct {
    wsc_conn conn;             /* first: lws_glue.h finds it through the wsi's user pointer */
    bytes out[4];              /* by channel: 1 stdout, 2 stderr, 3 status */
    int channel;               /* of the message being received */
    const char *stdin_data;    /* owned by opts, anchored on the stack */
    size_t stdin_len, stdin_sent;
    int stdin_closed;          /* the v5 close message went out (or is not needed) */
    int v5;
    int too_large;
    char auth[4096];           /* "Bearer ..." or "" */
    char protocol[32];         /* the subprotocol the server chose */
    unsigned char *tx;         /* LWS_PRE + 1 + STDIN_CHUNK */
} session;

static void session_free(session *s) {
    for (int i = 0; i < 4; i++) {
        free(s->out[i].data);
        s->out[i].data = NULL;
        s->out[i].len = s->out[i].cap = 0;
    }
    free(s->tx);
    s->tx = NULL;
    memset(s->auth, 0, sizeof s->auth);
}

static int session_gc(lua_State *L) {
    session_free(luaL_checkudata(L, 1, SESSION_MT));
    return 0;
}

static int append(session *s, bytes *b, const void *p, size_t n) {
    if (b->len + n > OUTPUT_MAX) { s->too_large = 1; return -1; }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) { s->too_large = 1; return -1; }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

/* Send the next piece of stdin, or the v5 close of the stdin channel. */
static int send_stdin(struct lws *wsi, session *s) {
    unsigned char *p = s->tx + LWS_PRE;
    size_t n;
    if (s->stdin_sent < s->stdin_len) {
        n = s->stdin_len - s->stdin_sent;
        if (n > STDIN_CHUNK) n = STDIN_CHUNK;
        p[0] = 0;
        memcpy(p + 1, s->stdin_data + s->stdin_sent, n);
        s->stdin_sent += n;
        n += 1;
    } else {
        p[0] = 255;     /* close channel 0 */
        p[1] = 0;
        n = 2;
        s->stdin_closed = 1;
    }
    if (lws_write(wsi, p, n, LWS_WRITE_BINARY) < (int)n) return -1;
    if (!s->stdin_closed) lws_callback_on_writable(wsi);
    return 0;
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len) {
    session *s = lws_wsi_user(wsi);
    (void)user;
    if (!s) return lws_callback_http_dummy(wsi, reason, user, in, len);
    switch (reason) {
    case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
        unsigned char **p = in, *end = *p + len;
        if (s->auth[0] && lws_add_http_header_by_name(wsi, (const unsigned char *)"authorization:",
                (const unsigned char *)s->auth, (int)strlen(s->auth), p, end))
            return -1;
        break;
    }
    case LWS_CALLBACK_CLIENT_FILTER_PRE_ESTABLISH:   /* the handshake's headers are still there */
        lws_hdr_copy(wsi, s->protocol, sizeof s->protocol, WSI_TOKEN_PROTOCOL);
        s->v5 = strcmp(s->protocol, "v5.channel.k8s.io") == 0;
        break;
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        if (s->stdin_data && !s->stdin_closed) lws_callback_on_writable(wsi);
        break;
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        if (s->stdin_data && !s->stdin_closed && !(s->stdin_sent == s->stdin_len && !s->v5))
            return send_stdin(wsi, s);
        break;
    case LWS_CALLBACK_CLIENT_RECEIVE: {
        const unsigned char *p = in;
        if (lws_is_first_fragment(wsi)) {
            if (len == 0) break;
            s->channel = p[0];
            p++, len--;
        }
        if (s->channel >= 1 && s->channel <= 3 && append(s, &s->out[s->channel], p, len) < 0) return -1;
        /* The status is the last message, as kubectl takes it: done without
         * waiting for the close handshake. */
        if (s->channel == 3 && lws_is_final_fragment(wsi)) s->conn.done = 1;
        break;
    }
    default:
        wsc_event(&s->conn, wsi, reason, in);
        break;
    }
    return 0;
}

/* ---- options ------------------------------------------------------------ */

/* Percent-encode all but RFC 3986's unreserved characters. */
static void add_escaped(luaL_Buffer *b, const char *s, size_t len) {
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("-._~", c))) {
            luaL_addchar(b, (char)c);
        } else {
            luaL_addchar(b, '%');
            luaL_addchar(b, hex[c >> 4]);
            luaL_addchar(b, hex[c & 15]);
        }
    }
}

static const char *required(lua_State *L, const char *field) {
    const char *v = opt_string(L, 1, field, NULL, NULL);
    if (!v || !*v) luaL_argerror(L, 1, lua_pushfstring(L, "%s is required", field));
    return v;
}

typedef struct { const char *s; size_t len; } arg;

/* The command's words, checked; they stay valid while opts holds the list. */
static arg *check_command(lua_State *L, int *argc) {
    if (lua_getfield(L, 1, "command") != LUA_TTABLE || luaL_len(L, -1) == 0)
        luaL_argerror(L, 1, "command must be a non-empty list of strings");
    lua_Integer n = luaL_len(L, -1);
    if (n > 10000) luaL_argerror(L, 1, "command has too many words");
    arg *argv = lua_newuserdatauv(L, sizeof *argv * (size_t)n, 0);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_geti(L, -2, i) != LUA_TSTRING)
            luaL_argerror(L, 1, lua_pushfstring(L, "command[%d] must be a string", (int)i));
        argv[i - 1].s = lua_tolstring(L, -1, &argv[i - 1].len);
        lua_pop(L, 1);
    }
    lua_remove(L, -2);   /* the list; the array stays as an anchor */
    *argc = (int)n;
    return argv;
}

/* The request path with its query. */
static void push_path(lua_State *L, const arg *argv, int argc, const char *ns, const char *pod,
                      const char *container, int has_stdin) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "/api/v1/namespaces/");
    add_escaped(&b, ns, strlen(ns));
    luaL_addstring(&b, "/pods/");
    add_escaped(&b, pod, strlen(pod));
    luaL_addstring(&b, "/exec?");
    for (int i = 0; i < argc; i++) {
        luaL_addstring(&b, "command=");
        add_escaped(&b, argv[i].s, argv[i].len);
        luaL_addchar(&b, '&');
    }
    luaL_addstring(&b, "container=");
    add_escaped(&b, container, strlen(container));
    luaL_addstring(&b, has_stdin ? "&stdin=true&stdout=true&stderr=true" : "&stdout=true&stderr=true");
    luaL_pushresult(&b);
}

/* The gate's summary, from the same words: run "sh -c ..." in pod ns/x container c. */
static void push_summary(lua_State *L, const arg *argv, int argc, const char *ns, const char *pod, const char *container) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t used = 0;
    for (int i = 0; i < argc && used < SUMMARY_MAX; i++) {
        size_t n = argv[i].len < SUMMARY_MAX - used ? argv[i].len : SUMMARY_MAX - used;
        if (i > 0) luaL_addchar(&b, ' ');
        luaL_addlstring(&b, argv[i].s, n);
        used += n + 1;
    }
    if (used >= SUMMARY_MAX) luaL_addstring(&b, "...");
    luaL_pushresult(&b);
    lua_pushfstring(L, "run \"%s\" in pod %s/%s container %s", lua_tostring(L, -1), ns, pod, container);
    lua_remove(L, -2);
}

/* ---- run ------------------------------------------------------------------ */

static int fail(lua_State *L, session *s, const rb_effect *e, rb_decision d, const char *code, int retryable,
                const char *msg) {
    wsc_close(&s->conn);
    if (e) gate_failed(L, e, d, msg);
    return rb_error(L, "k8s", "exec", code, retryable, "%s", msg);
}

static void push_result(lua_State *L, session *s) {
    lua_createtable(L, 0, 4);
    lua_pushlstring(L, s->out[1].data ? s->out[1].data : "", s->out[1].len);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, s->out[2].data ? s->out[2].data : "", s->out[2].len);
    lua_setfield(L, -2, "stderr");
    lua_pushlstring(L, s->out[3].data ? s->out[3].data : "", s->out[3].len);
    lua_setfield(L, -2, "status_message");
    lua_pushstring(L, s->protocol);
    lua_setfield(L, -2, "protocol");
}

static int k8s_exec_run(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *server = required(L, "server"), *ns = required(L, "namespace");
    const char *pod = required(L, "pod"), *container = required(L, "container");
    size_t stdin_len = 0;
    const char *stdin_data = opt_string(L, 1, "stdin", &stdin_len, NULL);
    const char *token = opt_string(L, 1, "token", NULL, NULL);
    if (token && (strlen(token) + 8 > sizeof ((session *)0)->auth || strpbrk(token, "\r\n")))
        luaL_argerror(L, 1, "token is too long or has a line break");
    double timeout = rb_remaining(L, opt_seconds(L, 1, "timeout", DEFAULT_TIMEOUT));
    int is_read = opt_bool(L, 1, "read");
    wsc_url u;
    wsc_parse_url(L, "server", server, &u);
    int argc;
    const arg *argv = check_command(L, &argc);                             /* 2 */
    push_path(L, argv, argc, ns, pod, container, stdin_data != NULL);      /* 3 */
    push_summary(L, argv, argc, ns, pod, container);                       /* 4 */
    const char *path = lua_tostring(L, 3);
    char target[512];
    snprintf(target, sizeof target, "%s/pod/%s", ns, pod);

    session *s = lua_newuserdatauv(L, sizeof *s, 0);   /* 5 */
    memset(s, 0, sizeof *s);
    rb_class(L, SESSION_MT, NULL, session_gc);
    lua_setmetatable(L, -2);
    s->stdin_data = stdin_data;
    s->stdin_len = stdin_len;
    if (token) snprintf(s->auth, sizeof s->auth, "Bearer %s", token);
    if (stdin_data && !(s->tx = malloc(LWS_PRE + 1 + STDIN_CHUNK))) return luaL_error(L, "out of memory");

    rb_effect e = {"k8s", "exec", target, lua_tostring(L, 4), 0};
    rb_decision d = RB_PERFORM;
    if (!is_read && (d = rb_gate(L, &e)) == RB_SKIP) return gate_skipped(L, &e);
    const rb_effect *ge = is_read ? NULL : &e;

    struct lws_context *ctx = wsc_context(L, lua_touserdata(L, lua_upvalueindex(1)), u.tls, "k8s-exec", callback, 65536);
    if (!ctx) return fail(L, s, ge, d, "tls", 0, "k8s exec: cannot set up the connection (TLS material?)");
    if (!wsc_start(L, &s->conn, ctx, &u, path, "v5.channel.k8s.io,v4.channel.k8s.io", "k8s-exec"))
        return fail(L, s, ge, d, "couldnt_connect", 1, lua_pushfstring(L, "k8s exec: cannot connect to %s", server));

    const char *why = wsc_wait(&s->conn, ctx, rb_now() + timeout, NULL);
    if (why && *why == 'i')
        return fail(L, s, ge, d, "interrupted", 0, lua_pushfstring(L, "k8s exec in pod %s/%s: interrupted", ns, pod));
    if (why)
        return fail(L, s, ge, d, "timeout", 1, lua_pushfstring(L, "k8s exec in pod %s/%s: timed out after %ss, connection closed",
                                                               ns, pod, lua_pushfstring(L, "%f", timeout)));
    if (s->too_large)
        return fail(L, s, ge, d, "out_of_memory", 0, lua_pushfstring(L, "k8s exec in pod %s/%s: output too large", ns, pod));
    if (s->conn.error[0])
        return fail(L, s, ge, d, "couldnt_connect", 1, lua_pushfstring(L, "k8s exec in pod %s/%s: %s", ns, pod, s->conn.error));
    wsc_close(&s->conn);
    push_result(L, s);
    if (ge) {
        int ok = s->out[3].data && strstr(s->out[3].data, "\"Success\"");
        lua_pushstring(L, ok ? "exit 0" : "failed");
        rb_gate_done(L, ge, d, ok);
    }
    session_free(s);
    return 1;
}

int luaopen_runbook_k8s_exec(lua_State *L) {
    return wsc_open_module(L, k8s_exec_funcs, CONTEXT_MT, context_gc);
}
