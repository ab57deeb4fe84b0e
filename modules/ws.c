/*
 * ws.c: a WebSocket endpoint probed (libwebsockets): the handshake, a ping
 * answered by a pong, and optionally one message sent and its reply read.
 * stdlib/http.lua's http.websocket wraps it.
 *
 *   probe(opts) -> {status = 101, protocol, connect, pong, reply, binary, skipped, latency}
 *     opts.url        ws://, wss:// (or http://, https://) host, port, path and query
 *     opts.timeout    seconds for the whole probe; bounded by the step's remaining time
 *     opts.protocol   the subprotocols offered, comma-separated (none by default)
 *     opts.ping       true: send a ping and wait for its pong (a control frame:
 *                     no application sees it, so it is a read)
 *     opts.send       a text message to send, through the gate; then the first
 *                     message that comes back is the reply (up to REPLY_MAX bytes)
 *     TLS: ca_data|ca_file, cert_data|cert_file, key_data|key_file,
 *     tls_server_name, insecure (lws_glue.h)
 *   connect, pong and latency are seconds: the handshake, the ping's round
 *   trip, the whole probe.
 *
 * The handshake is a GET and runs in a dry run too. A message is a write the
 * endpoint may act on (a chat message, a command), so send asks rb_gate()
 * once the handshake is done, right before the message is queued; in a dry
 * run it is not sent and the result has skipped = true.
 *
 * Failures raise (module "http", op "websocket"), the message naming the URL:
 * code "couldnt_connect" (refused, no route, TLS), the HTTP status as a
 * string ("503") when the server answers the upgrade with another status,
 * "timeout", "interrupted", "closed" when the server closes before the pong
 * or the reply.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lws_glue.h"

#define PROBE_MT "runbook.ws.probe"
#define CONTEXT_MT "runbook.ws.context"
#define DEFAULT_TIMEOUT 10.0
#define SEND_MAX (1024 * 1024)
#define REPLY_MAX 65536
#define PING_DATA "runbook"

static int ws_probe(lua_State *L);

static const luaL_Reg ws_funcs[] = {
    {"probe", ws_probe},
    {NULL, NULL}
};

static int context_gc(lua_State *L) {
    wsc_cache_free(luaL_checkudata(L, 1, CONTEXT_MT));
    return 0;
}

/* One probe: its connection and what came back, in a userdata whose
 * finalizer closes the connection should an error (the gate's, say) be
 * raised while it is open. */
typedef struct {
    wsc_conn conn;             /* first: lws_glue.h finds it through the wsi's user pointer */
    int established, want_ping, ponged, sent, replied, binary;
    double start, connected, pinged, pong;
    unsigned char *tx;         /* LWS_PRE + the message (a userdata on the stack), or NULL */
    size_t tx_len;
    char reply[REPLY_MAX];
    size_t reply_len;
    char protocol[64];
} probe;

static int probe_gc(lua_State *L) {
    wsc_close(&((probe *)luaL_checkudata(L, 1, PROBE_MT))->conn);
    return 0;
}

static int on_writable(struct lws *wsi, probe *p) {
    if (p->want_ping) {
        unsigned char buf[LWS_PRE + sizeof PING_DATA];
        memcpy(buf + LWS_PRE, PING_DATA, sizeof PING_DATA - 1);
        p->want_ping = 0;
        p->pinged = rb_now();
        if (lws_write(wsi, buf + LWS_PRE, sizeof PING_DATA - 1, LWS_WRITE_PING) < 0) return -1;
    } else if (p->tx && !p->sent) {
        if (lws_write(wsi, p->tx + LWS_PRE, p->tx_len, LWS_WRITE_TEXT) < (int)p->tx_len) return -1;
        p->sent = 1;
    }
    return 0;
}

/* The first message after ours, up to REPLY_MAX bytes (the rest dropped). */
static void on_receive(struct lws *wsi, probe *p, const void *in, size_t len) {
    if (!p->sent || p->replied) return;   /* a greeting before ours is not a reply */
    size_t keep = REPLY_MAX - p->reply_len < len ? REPLY_MAX - p->reply_len : len;
    memcpy(p->reply + p->reply_len, in, keep);
    p->reply_len += keep;
    p->binary = lws_frame_is_binary(wsi);
    if (lws_is_final_fragment(wsi) && !lws_remaining_packet_payload(wsi)) p->replied = 1;
}

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len) {
    probe *p = lws_wsi_user(wsi);
    (void)user;
    if (!p) return lws_callback_http_dummy(wsi, reason, user, in, len);
    switch (reason) {
    case LWS_CALLBACK_CLIENT_FILTER_PRE_ESTABLISH:   /* the handshake's headers are still there */
        lws_hdr_copy(wsi, p->protocol, sizeof p->protocol, WSI_TOKEN_PROTOCOL);
        break;
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
        p->established = 1;
        p->connected = rb_now();
        break;
    case LWS_CALLBACK_CLIENT_WRITEABLE:
        return on_writable(wsi, p);
    case LWS_CALLBACK_CLIENT_RECEIVE_PONG:
        if (!p->ponged && p->pinged > 0) p->ponged = 1, p->pong = rb_now();
        break;
    case LWS_CALLBACK_CLIENT_RECEIVE:
        on_receive(wsi, p, in, len);
        break;
    default:
        wsc_event(&p->conn, wsi, reason, in);
        break;
    }
    return 0;
}

/* ---- probe ---------------------------------------------------------------- */

typedef struct {
    lua_State *L;
    probe *p;
    const char *url;
    double timeout, deadline;
    const rb_effect *e;        /* the send, once the gate let it through */
    rb_decision d;
} run;

static int fail(run *r, const char *code, int retryable, const char *what) {
    lua_State *L = r->L;
    const char *msg = lua_pushfstring(L, "WebSocket %s: %s", r->url, what);
    wsc_close(&r->p->conn);
    if (r->e) gate_failed(L, r->e, r->d, msg);
    return rb_error(L, "http", "websocket", code, retryable, "%s", msg);
}

/* Services the connection until *until; raises when it ends first. */
static void wait_for(run *r, struct lws_context *ctx, const int *until, const char *waiting) {
    probe *p = r->p;
    const char *why = wsc_wait(&p->conn, ctx, r->deadline, until);
    lua_State *L = r->L;
    if (why && *why == 'i') fail(r, "interrupted", 0, "interrupted");
    if (why) {
        char secs[32];
        snprintf(secs, sizeof secs, "%g", r->timeout);
        fail(r, "timeout", 1, lua_pushfstring(L, "timed out after %ss %s", secs, waiting));
    }
    if (*until) return;
    if (p->conn.status) {
        int s = p->conn.status;
        fail(r, lua_pushfstring(L, "%d", s), s >= 500 || s == 429, p->conn.error);
    }
    if (p->conn.error[0]) fail(r, "couldnt_connect", 1, p->conn.error);
    fail(r, "closed", 1, lua_pushfstring(L, "the server closed the connection %s", waiting));
}

static void push_result(lua_State *L, probe *p, int skipped) {
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, 101);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, p->protocol);
    lua_setfield(L, -2, "protocol");
    lua_pushnumber(L, p->connected - p->start);
    lua_setfield(L, -2, "connect");
    if (p->ponged) {
        lua_pushnumber(L, p->pong - p->pinged);
        lua_setfield(L, -2, "pong");
    }
    if (p->replied) {
        lua_pushlstring(L, p->reply, p->reply_len);
        lua_setfield(L, -2, "reply");
        lua_pushboolean(L, p->binary);
        lua_setfield(L, -2, "binary");
    }
    if (skipped) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "skipped");
    }
    lua_pushnumber(L, rb_now() - p->start);
    lua_setfield(L, -2, "latency");
}

static int ws_probe(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *url = opt_string(L, 1, "url", NULL, NULL);
    if (!url || !*url) luaL_argerror(L, 1, "url is required");
    if (strpbrk(url, "\r\n")) luaL_argerror(L, 1, "url has a line break");
    if (strchr(url, '#')) luaL_argerror(L, 1, "url has a fragment (#...), which is never sent");
    wsc_url u;
    wsc_parse_url(L, "url", url, &u);
    lua_pushfstring(L, "%s%s", *u.path == '/' ? "" : "/", u.path);   /* 2: the request path */
    const char *protocol = opt_string(L, 1, "protocol", NULL, NULL);
    if (protocol && strpbrk(protocol, "\r\n")) luaL_argerror(L, 1, "protocol has a line break");
    size_t send_len = 0;
    const char *send = opt_string(L, 1, "send", &send_len, NULL);
    if (send_len > SEND_MAX) luaL_argerror(L, 1, "send is larger than 1 MiB");
    run r = {L, NULL, url, 0, 0, NULL, RB_PERFORM};
    r.timeout = rb_remaining(L, opt_seconds(L, 1, "timeout", DEFAULT_TIMEOUT));

    probe *p = lua_newuserdatauv(L, sizeof *p, 0);
    memset(p, 0, sizeof *p);
    rb_class(L, PROBE_MT, NULL, probe_gc);
    lua_setmetatable(L, -2);
    r.p = p;

    struct lws_context *ctx = wsc_context(L, lua_touserdata(L, lua_upvalueindex(1)), u.tls, "ws-probe", callback, REPLY_MAX);
    if (!ctx) return fail(&r, "tls", 0, "cannot set up the connection (TLS material?)");
    p->start = rb_now();
    r.deadline = p->start + r.timeout;
    if (!wsc_start(L, &p->conn, ctx, &u, lua_tostring(L, 2), protocol, "ws-probe"))
        return fail(&r, "couldnt_connect", 1, p->conn.error[0] ? p->conn.error : lua_pushfstring(L, "cannot resolve or reach %s", u.host));
    wait_for(&r, ctx, &p->established, "waiting for the handshake");

    if (opt_bool(L, 1, "ping")) {
        p->want_ping = 1;
        lws_callback_on_writable(p->conn.wsi);
        wait_for(&r, ctx, &p->ponged, "waiting for the pong");
    }
    int skipped = 0;
    if (send) {
        lua_pushfstring(L, "send a %d-byte message to %s", (int)send_len, url);
        rb_effect e = {"http", "websocket", url, lua_tostring(L, -1), 0};
        if ((r.d = rb_gate(L, &e)) == RB_SKIP) {
            lua_pushnil(L);
            rb_gate_done(L, &e, RB_SKIP, 1);
            skipped = 1;
        } else {
            r.e = &e;
            p->tx = lua_newuserdatauv(L, LWS_PRE + send_len + 1, 0);
            memcpy(p->tx + LWS_PRE, send, send_len);
            p->tx_len = send_len;
            lws_callback_on_writable(p->conn.wsi);
            wait_for(&r, ctx, &p->replied, "waiting for the reply");
            lua_pushfstring(L, "reply of %d bytes", (int)p->reply_len);
            rb_gate_done(L, &e, r.d, 1);
        }
    }
    wsc_close(&p->conn);
    push_result(L, p, skipped);
    return 1;
}

int luaopen_runbook_ws(lua_State *L) {
    return wsc_open_module(L, ws_funcs, CONTEXT_MT, context_gc);
}
