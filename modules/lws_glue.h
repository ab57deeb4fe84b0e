/*
 * lws_glue.h: what the modules built on libwebsockets (k8s_exec, ws) share:
 * the URL taken apart, the lws context kept for the next call with the same
 * TLS material, the client connection's setup, the wait bounded by a
 * deadline and Ctrl-C, the handshake's failure put in words, and closing.
 * Header-only, as module.h: each module is a shared object of its own.
 *
 * A module's per-connection state starts with a wsc_conn, so the shared
 * parts find it through lws_wsi_user(); its callback hands the reasons it
 * does not handle itself to wsc_event().
 *
 * TLS options (fields of the options table at index 1, as runbook.k8s's
 * connect takes them): ca_data|ca_file, cert_data|cert_file,
 * key_data|key_file, tls_server_name, insecure.
 */
#ifndef RB_LWS_GLUE_H
#define RB_LWS_GLUE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libwebsockets.h>
#include <lauxlib.h>
#include <lua.h>

#include "module.h"

#define WSC_TICK_US (50 * LWS_US_PER_MS)

typedef struct {
    lws_sorted_usec_list_t tick;  /* wakes lws_service up to check the deadline and Ctrl-C */
    int ticking;
    struct lws *wsi;
    int done;                     /* the connection closed, or failed */
    int status;                   /* the HTTP status of a refused handshake */
    char error[256];              /* why the connection failed, when it did */
} wsc_conn;

/* The lws context (its TLS setup costs some 200 ms), kept in a module's
 * upvalue for the next connection with the same TLS options, with the one
 * protocol it serves (lws reads the table for as long as the context lives). */
typedef struct {
    struct lws_context *ctx;
    struct lws_protocols protocols[2];
    char *key;                 /* the options it was made for */
    size_t key_len;
} wsc_cache;

static inline void wsc_cache_free(wsc_cache *c) {
    if (c->ctx) lws_context_destroy(c->ctx);
    c->ctx = NULL;
    if (c->key) memset(c->key, 0, c->key_len);
    free(c->key);
    c->key = NULL;
}

/* Pushes the module table of `funcs`, each with the module's empty cache as
 * its upvalue: a userdata of class `mt` whose finalizer `gc` frees it (each
 * module its own: a class's __gc must live in the module that made it). */
static inline int wsc_open_module(lua_State *L, const luaL_Reg *funcs, const char *mt, lua_CFunction gc) {
    lua_newtable(L);
    wsc_cache *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    rb_class(L, mt, NULL, gc);
    lua_setmetatable(L, -2);
    luaL_setfuncs(L, funcs, 1);
    return 1;
}

typedef struct {
    char host[256];
    int port, tls;
    const char *path;   /* inside the URL string: "/..." or "" */
} wsc_url;

/* "https://host:port/path" (or http, ws, wss) from field `field` of the
 * options; a bad one raises naming the field. */
static inline void wsc_parse_url(lua_State *L, const char *field, const char *url, wsc_url *u) {
    static const struct { const char *scheme; int tls; } schemes[] = {
        {"https://", 1}, {"wss://", 1}, {"http://", 0}, {"ws://", 0}};
    const char *p = NULL;
    for (size_t i = 0; i < sizeof schemes / sizeof *schemes && !p; i++)
        if (strncmp(url, schemes[i].scheme, strlen(schemes[i].scheme)) == 0)
            p = url + strlen(schemes[i].scheme), u->tls = schemes[i].tls;
    if (!p) luaL_argerror(L, 1, lua_pushfstring(L, "%s must be a ws://, wss://, http:// or https:// URL", field));
    size_t n = strcspn(p, "/?#");
    u->path = p + n;
    if (memchr(p, '@', n)) luaL_argerror(L, 1, lua_pushfstring(L, "%s: credentials in the URL are not supported", field));
    const char *colon = NULL;
    if (*p == '[') {   /* [v6]:port */
        const char *close = memchr(p, ']', n);
        if (!close) luaL_argerror(L, 1, lua_pushfstring(L, "%s: bad IPv6 address", field));
        colon = close[1] == ':' ? close + 1 : NULL;
        p++;
        n = (size_t)(close - p);
    } else {
        colon = memchr(p, ':', n);
        if (colon) n = (size_t)(colon - p);
    }
    if (n == 0 || n >= sizeof u->host) luaL_argerror(L, 1, lua_pushfstring(L, "%s: bad host", field));
    memcpy(u->host, p, n);
    u->host[n] = '\0';
    u->port = colon ? atoi(colon + 1) : (u->tls ? 443 : 80);
    if (u->port <= 0 || u->port > 65535) luaL_argerror(L, 1, lua_pushfstring(L, "%s: bad port", field));
}

static inline void wsc_set_tls(lua_State *L, struct lws_context_creation_info *ci) {
    size_t len;
    const char *v;
    if ((v = opt_string(L, 1, "ca_data", &len, NULL))) ci->client_ssl_ca_mem = v, ci->client_ssl_ca_mem_len = (unsigned)len;
    ci->client_ssl_ca_filepath = opt_string(L, 1, "ca_file", NULL, NULL);
    if ((v = opt_string(L, 1, "cert_data", &len, NULL))) ci->client_ssl_cert_mem = v, ci->client_ssl_cert_mem_len = (unsigned)len;
    ci->client_ssl_cert_filepath = opt_string(L, 1, "cert_file", NULL, NULL);
    if ((v = opt_string(L, 1, "key_data", &len, NULL))) ci->client_ssl_key_mem = v, ci->client_ssl_key_mem_len = (unsigned)len;
    ci->client_ssl_private_key_filepath = opt_string(L, 1, "key_file", NULL, NULL);
}

/* The cached context when the options ask for the same TLS setup, else a
 * new one whose protocol `name` is served by `callback` with a receive
 * buffer of `rx` bytes; NULL when lws cannot make it. */
static inline struct lws_context *wsc_context(lua_State *L, wsc_cache *c, int tls, const char *name,
                                              lws_callback_function *callback, size_t rx) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, tls ? 's' : '-');
    static const char *const fields[] = {"ca_data", "ca_file", "cert_data", "cert_file", "key_data", "key_file"};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
        size_t len;
        const char *v = opt_string(L, 1, fields[i], &len, "");
        luaL_addlstring(&b, v, len);
        luaL_addchar(&b, '\0');
    }
    luaL_addchar(&b, opt_bool(L, 1, "insecure") ? '1' : '0');
    luaL_pushresult(&b);
    size_t len;
    const char *key = lua_tolstring(L, -1, &len);
    if (c->ctx && c->key_len == len && memcmp(c->key, key, len) == 0) {
        lua_pop(L, 1);
        return c->ctx;
    }
    wsc_cache_free(c);
    if (!(c->key = malloc(len))) return NULL;
    memcpy(c->key, key, len);
    c->key_len = len;
    lua_pop(L, 1);

    struct lws_context_creation_info ci;
    memset(&ci, 0, sizeof ci);
    ci.port = CONTEXT_PORT_NO_LISTEN;
    memset(c->protocols, 0, sizeof c->protocols);
    c->protocols[0].name = name;
    c->protocols[0].callback = callback;
    c->protocols[0].rx_buffer_size = rx;
    ci.protocols = c->protocols;
    ci.gid = -1;
    ci.uid = -1;
    if (tls) {
        ci.options = LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
        wsc_set_tls(L, &ci);
    }
    lws_set_log_level(0, NULL);
    return c->ctx = lws_create_context(&ci);
}

/* Starts connecting conn (the first member of the module's state `user`) to
 * u's host with `path`, offering the subprotocols `protocol` (NULL: none);
 * the options at index 1 give tls_server_name and insecure. 0 when lws
 * refused at once (conn->error may say why). */
static inline int wsc_start(lua_State *L, wsc_conn *conn, struct lws_context *ctx, const wsc_url *u, const char *path,
                          const char *protocol, const char *local_protocol) {
    const char *sni = opt_string(L, 1, "tls_server_name", NULL, NULL);
    struct lws_client_connect_info cc;
    memset(&cc, 0, sizeof cc);
    cc.context = ctx;
    cc.address = u->host;
    cc.port = u->port;
    cc.path = path;
    cc.host = sni ? sni : u->host;
    cc.origin = cc.host;
    cc.ssl_connection = u->tls ? LCCSCF_USE_SSL : 0;
    if (u->tls && opt_bool(L, 1, "insecure"))
        cc.ssl_connection |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK | LCCSCF_ALLOW_INSECURE;
    cc.alpn = "http/1.1";
    cc.protocol = protocol;
    cc.local_protocol_name = local_protocol;
    cc.userdata = conn;
    cc.pwsi = &conn->wsi;
    return lws_client_connect_via_info(&cc) != NULL || conn->done;
}

static inline void wsc_tick(lws_sorted_usec_list_t *sul) {
    (void)sul;
}

/* Services ctx until `until` becomes true or the connection ends (0), the
 * deadline passes ("timeout") or Ctrl-C comes ("interrupted"). */
static inline const char *wsc_wait(wsc_conn *conn, struct lws_context *ctx, double deadline, const int *until) {
    while (!conn->done && !(until && *until)) {
        if (rb_interrupted()) return "interrupted";
        if (rb_now() > deadline) return "timeout";
        /* lws_service waits for the next scheduled event (its timeout
         * argument is ignored): a tick bounds the wait. */
        lws_sul_schedule(ctx, 0, &conn->tick, wsc_tick, WSC_TICK_US);
        conn->ticking = 1;
        lws_service(ctx, 0);
    }
    return NULL;
}

/* Closes the connection now (the callbacks for it run before this returns). */
static inline void wsc_close(wsc_conn *conn) {
    if (conn->ticking) lws_sul_cancel(&conn->tick);
    conn->ticking = 0;
    if (conn->wsi) lws_set_timeout(conn->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_SYNC);
    conn->wsi = NULL;
}

/* The reasons every client handles alike: a failed connection or handshake
 * (its HTTP status kept, and put in words) and the close. */
static inline void wsc_event(wsc_conn *conn, struct lws *wsi, enum lws_callback_reasons reason, const void *in) {
    switch (reason) {
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
        const char *why = in ? in : "connection failed";
        unsigned status = wsi ? lws_http_client_http_response(wsi) : 0;
        if (status && status != 101) {
            conn->status = (int)status;
            snprintf(conn->error, sizeof conn->error, "handshake rejected: HTTP %u", status);
        } else if (strcmp(why, "Unable to connect") == 0) {   /* lws's words for a failed connect(2) */
            snprintf(conn->error, sizeof conn->error, "connection refused or host unreachable");
        } else {
            snprintf(conn->error, sizeof conn->error, "%s", why);
        }
        conn->done = 1;
        conn->wsi = NULL;
        break;
    }
    case LWS_CALLBACK_CLIENT_CLOSED:
        conn->done = 1;
        conn->wsi = NULL;
        break;
    default:
        break;
    }
}

#endif
