/*
 * k8s.c: the Kubernetes API over libcurl. Thin: TLS and auth set up once per
 * connection, requests and line streams with deadlines; stdlib/k8s.lua does
 * kubeconfig, discovery, verbs and errors.
 *
 *   connect(opts) -> conn
 *     opts.server            "https://host:port" (required)
 *     opts.ca_data|ca_file   PEM CA bundle to verify the server with
 *     opts.cert_data|cert_file, opts.key_data|key_file
 *                            client certificate and key (PEM); key data is a secret
 *     opts.token             bearer token (a secret)
 *     opts.tls_server_name   the name to send as SNI and verify, instead of the host
 *     opts.insecure          true: no TLS verification
 *     opts.connect_timeout   seconds to connect (default 10), never above a request's timeout
 *   conn:request{method, path, query, body, content_type, accept, timeout}
 *     -> status, body, content_type, retry_after
 *     path: "/api/v1/...", its segments escaped by the caller; query: {name = value},
 *     escaped here. A path with a query or fragment of its own is refused.
 *   conn:stream{path, query, accept, timeout} -> stream    (a GET read line by line: watch, log -f)
 *   stream:next(wait) -> line | nil, "wait" | "end" | "timeout"
 *   stream:status() -> the HTTP status (0 before the headers arrive)
 *   conn:set_token(token)    a rotated or refreshed credential
 *   conn:close(), stream:close()   also __close and __gc
 *   mark_empty_arrays(json) -> json, n   every [] outside strings becomes the
 *                          string "\u0000[]": lua-cjson 2.1 decodes [] and {}
 *                          alike, and an object read, changed and written back
 *                          must keep its empty lists lists (k8s.lua restores them)
 *
 * The gate: k8s.lua records every write with gate.effect, which needs the
 * object before and after to report a diff. This file makes the dry-run
 * guarantee independent of that: conn_request asks the gate itself, right
 * before the transfer, for any method but GET or HEAD, and unless it says
 * "perform" adds dryRun=All to the URL's query (the API server runs the
 * request without persisting); a write through a connect subresource
 * (proxy, exec, attach, portforward), which the API server cannot dry-run,
 * is refused. The URL is built with libcurl's
 * URL API from parts this file checks, so nothing in a path (a '#' that
 * would cut the added parameter off, a '?dryRun=All' of its own, an escaped
 * '/' or '..') can change what is sent; dryRun in a caller's query is
 * refused, since only the gate sets it. GET and HEAD never carry a body.
 *
 * One CURL easy handle per connection serves every request, so the TLS
 * connection is kept alive; streams get a handle of their own, since a watch
 * holds its connection open while the runbook keeps making requests.
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h (curl_glue.h) */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>

#include "module.h"
#include "curl_glue.h"

#define CONN_MT "runbook.k8s.conn"
#define STREAM_MT "runbook.k8s.stream"
#define DEFAULT_TIMEOUT 30.0
#define DEFAULT_CONNECT_TIMEOUT 10.0

static int k8s_connect(lua_State *L);
static int k8s_mark_empty_arrays(lua_State *L);

static const luaL_Reg k8s_funcs[] = {
    {"connect", k8s_connect},
    {"mark_empty_arrays", k8s_mark_empty_arrays},
    {NULL, NULL}
};

/* A connection's fixed configuration and its one handle. Per-request
 * scratch lives here too, so an error raised mid-request cannot leak it. */
typedef struct {
    CURL *curl;
    char *base;                    /* scheme://host:port requests go to */
    char *hostport;                /* the server as the user wrote it, for messages */
    char *auth;                    /* "Authorization: Bearer ..." or NULL */
    char *host_header;             /* "Host: ..." when tls_server_name is set */
    struct curl_slist *connect_to; /* tls_server_name: connect to the real host */
    char *ca_file, *cert_file, *key_file;
    buffer ca, cert, key;          /* PEM data */
    int insecure;
    double connect_timeout;
    curl_limits limits;            /* of the request in progress */
    curl_socket_t fd;              /* the socket of the last connection opened */
    /* scratch */
    CURLU *url;
    struct curl_slist *headers;
    buffer body;
    char ctype[128], retry_after[32];
    char errbuf[CURL_ERROR_SIZE];
} conn;

typedef struct {
    CURL *h;
    CURLM *m;
    CURLU *url;
    struct curl_slist *headers;
    buffer buf;
    size_t pos;                    /* start of the unread part of buf */
    int done;                      /* the transfer finished */
    CURLcode rc;
    curl_limits limits;
    char hostport[256];
    char errbuf[CURL_ERROR_SIZE];
} stream;

/* ---- small helpers ------------------------------------------------------ */

static char *dup_or_null(const char *s) {
    return s ? strdup(s) : NULL;
}

static double opt_timeout(lua_State *L, int t) {
    return rb_remaining(L, opt_seconds(L, t, "timeout", DEFAULT_TIMEOUT));
}

/* A header value: one line, so it cannot add headers of its own. */
static const char *opt_header(lua_State *L, int t, const char *field) {
    const char *v = opt_string(L, t, field, NULL, NULL);
    if (v && strpbrk(v, "\r\n")) luaL_argerror(L, t, lua_pushfstring(L, "%s cannot contain a line break", field));
    return v;
}

static struct curl_slist *add_header(lua_State *L, struct curl_slist *list, const char *line) {
    struct curl_slist *n = curl_slist_append(list, line);
    if (!n) luaL_error(L, "out of memory");
    return n;
}

/* ---- connection --------------------------------------------------------- */

static void conn_free(conn *c) {
    curl_url_cleanup(c->url);
    c->url = NULL;
    curl_slist_free_all(c->headers);
    c->headers = NULL;
    buffer_free(&c->body);
    if (c->curl) curl_easy_cleanup(c->curl);
    c->curl = NULL;
    curl_slist_free_all(c->connect_to);
    c->connect_to = NULL;
    free(c->base); free(c->hostport); free(c->auth); free(c->host_header);
    free(c->ca_file); free(c->cert_file); free(c->key_file);
    c->base = c->hostport = c->auth = c->host_header = NULL;
    c->ca_file = c->cert_file = c->key_file = NULL;
    if (c->key.data) memset(c->key.data, 0, c->key.len);
    buffer_free(&c->ca); buffer_free(&c->cert); buffer_free(&c->key);
}

/* Idempotent: serves __gc, __close and close. */
static int conn_close(lua_State *L) {
    conn_free(luaL_checkudata(L, 1, CONN_MT));
    return 0;
}

static conn *check_conn(lua_State *L, int i) {
    conn *c = luaL_checkudata(L, i, CONN_MT);
    if (!c->curl) luaL_error(L, "k8s connection is closed");
    return c;
}

static void set_blob(CURL *h, CURLoption opt, const buffer *b) {
    struct curl_blob blob = {b->data, b->len, CURL_BLOB_COPY};
    curl_easy_setopt(h, opt, &blob);
}

/*
 * Acknowledge the response's headers at once: a server that writes headers
 * and body in two writes without TCP_NODELAY (Python's http.server, as the
 * sandbox's API stand-in does) otherwise holds the body back until the
 * client's delayed ACK, 40 ms on every request of a reused connection.
 * Linux clears TCP_QUICKACK as it sees fit, so it is set when the headers
 * end; setting it also sends an ACK that is pending.
 */
static void quickack(curl_socket_t fd) {
#ifdef TCP_QUICKACK
    int one = 1;
    if (fd != CURL_SOCKET_BAD) setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
#else
    (void)fd;
#endif
}

/* Remembers the request connection's socket for quickack. */
static int on_socket(void *ud, curl_socket_t fd, curlsocktype purpose) {
    (void)purpose;
    *(curl_socket_t *)ud = fd;
    return CURL_SOCKOPT_OK;
}

/* Everything a handle needs to talk to this server, for requests and streams. */
static void configure(conn *c, CURL *h, char *errbuf) {
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_USERAGENT, "runbook");
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    if (c->ca.len) set_blob(h, CURLOPT_CAINFO_BLOB, &c->ca);
    else if (c->ca_file) curl_easy_setopt(h, CURLOPT_CAINFO, c->ca_file);
    if (c->cert.len) set_blob(h, CURLOPT_SSLCERT_BLOB, &c->cert);
    else if (c->cert_file) curl_easy_setopt(h, CURLOPT_SSLCERT, c->cert_file);
    if (c->key.len) set_blob(h, CURLOPT_SSLKEY_BLOB, &c->key);
    else if (c->key_file) curl_easy_setopt(h, CURLOPT_SSLKEY, c->key_file);
    curl_easy_setopt(h, CURLOPT_SSLCERTTYPE, "PEM");
    curl_easy_setopt(h, CURLOPT_SSLKEYTYPE, "PEM");
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, c->insecure ? 0L : 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, c->insecure ? 0L : 2L);
    if (c->connect_to) curl_easy_setopt(h, CURLOPT_CONNECT_TO, c->connect_to);
    errbuf[0] = '\0';
}

static struct curl_slist *common_headers(lua_State *L, conn *c, const char *accept) {
    struct curl_slist *l = add_header(L, NULL, "Expect:");
    if (c->auth) l = add_header(L, l, c->auth);
    if (c->host_header) l = add_header(L, l, c->host_header);
    if (accept) l = add_header(L, l, lua_pushfstring(L, "Accept: %s", accept)), lua_pop(L, 1);
    return l;
}

static void copy_data(lua_State *L, buffer *b, const char *s, size_t len) {
    if (!s) return;
    if (buffer_add(b, s, len) != len) luaL_error(L, "out of memory");
}

/*
 * tls_server_name: the URL names that host, so curl sends it as SNI and
 * verifies the certificate against it, while CONNECT_TO sends the packets
 * to the real server and the Host header names the real server too.
 */
static void set_server(lua_State *L, conn *c, const char *server, const char *tls_name) {
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL;
    if (!u || curl_url_set(u, CURLUPART_URL, server, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK) {
        curl_free(scheme); curl_free(host); curl_url_cleanup(u);
        luaL_argerror(L, 1, lua_pushfstring(L, "server %s is not a URL like https://host:6443", server));
    }
    lua_pushfstring(L, "%s:%s", host, port);
    c->hostport = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    /* a path prefix (a server behind a proxy at /k8s) is kept */
    char *path = NULL;
    curl_url_get(u, CURLUPART_PATH, &path, 0);
    size_t plen = path ? strlen(path) : 0;
    while (plen && path[plen - 1] == '/') path[--plen] = '\0';
    if (tls_name && *tls_name) {
        lua_pushfstring(L, "%s:%s:%s:%s", tls_name, port, host, port);
        c->connect_to = curl_slist_append(NULL, lua_tostring(L, -1));
        lua_pushfstring(L, "Host: %s:%s", host, port);
        c->host_header = strdup(lua_tostring(L, -1));
        lua_pop(L, 2);
    }
    lua_pushfstring(L, "%s://%s:%s%s", scheme, tls_name && *tls_name ? tls_name : host, port, path ? path : "");
    c->base = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    curl_free(path); curl_free(scheme); curl_free(host); curl_free(port);
    curl_url_cleanup(u);
}

static void set_auth(lua_State *L, conn *c, const char *token, size_t len) {
    free(c->auth);
    c->auth = NULL;
    if (!token || !len) return;
    if (memchr(token, '\n', len) || memchr(token, '\r', len))
        luaL_argerror(L, 1, "token cannot contain newlines");
    rb_secret_register(L, token, len);
    lua_pushfstring(L, "Authorization: Bearer %s", token);
    c->auth = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
}

static int k8s_connect(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *server = opt_string(L, 1, "server", NULL, NULL);
    if (!server) luaL_argerror(L, 1, "server is required");

    conn *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    c->fd = CURL_SOCKET_BAD;
    luaL_setmetatable(L, CONN_MT);
    if (!(c->curl = curl_easy_init())) return luaL_error(L, "cannot initialise libcurl");
    c->connect_timeout = opt_seconds(L, 1, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);

    set_server(L, c, server, opt_string(L, 1, "tls_server_name", NULL, NULL));
    size_t len = 0;
    const char *s;
    if ((s = opt_string(L, 1, "ca_data", &len, NULL))) copy_data(L, &c->ca, s, len);
    c->ca_file = dup_or_null(opt_string(L, 1, "ca_file", NULL, NULL));
    if ((s = opt_string(L, 1, "cert_data", &len, NULL))) copy_data(L, &c->cert, s, len);
    c->cert_file = dup_or_null(opt_string(L, 1, "cert_file", NULL, NULL));
    if ((s = opt_string(L, 1, "key_data", &len, NULL))) {
        rb_secret_register(L, s, len);
        copy_data(L, &c->key, s, len);
    }
    c->key_file = dup_or_null(opt_string(L, 1, "key_file", NULL, NULL));
    if ((s = opt_string(L, 1, "token", &len, NULL))) set_auth(L, c, s, len);
    lua_getfield(L, 1, "insecure");
    c->insecure = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return 1;
}

static int conn_set_token(lua_State *L) {
    conn *c = check_conn(L, 1);
    size_t len = 0;
    const char *t = luaL_optlstring(L, 2, NULL, &len);
    set_auth(L, c, t, len);
    return 0;
}

/* ---- requests ----------------------------------------------------------- */

/* Only Content-Type and Retry-After are needed; a new status line (after a
 * 100 Continue) starts over. */
static size_t on_header(char *ptr, size_t size, size_t n, void *ud) {
    conn *c = ud;
    size_t len = size * n;
    if (len >= 5 && memcmp(ptr, "HTTP/", 5) == 0) c->ctype[0] = c->retry_after[0] = '\0';
    if (len <= 2 && (ptr[0] == '\r' || ptr[0] == '\n')) quickack(c->fd);
    struct { const char *name; char *dst; size_t cap; } want[] = {
        {"content-type:", c->ctype, sizeof c->ctype},
        {"retry-after:", c->retry_after, sizeof c->retry_after},
    };
    for (size_t i = 0; i < 2; i++) {
        size_t nl = strlen(want[i].name);
        if (len > nl && strncasecmp(ptr, want[i].name, nl) == 0) {
            const char *v = ptr + nl, *e = ptr + len;
            while (v < e && (*v == ' ' || *v == '\t')) v++;
            while (e > v && (e[-1] == '\r' || e[-1] == '\n' || e[-1] == ' ')) e--;
            size_t vl = (size_t)(e - v) < want[i].cap - 1 ? (size_t)(e - v) : want[i].cap - 1;
            memcpy(want[i].dst, v, vl);
            want[i].dst[vl] = '\0';
        }
    }
    return len;
}

static int is_read(const char *method) {
    return !strcmp(method, "GET") || !strcmp(method, "HEAD");
}

static void check_method(lua_State *L, const char *m) {
    static const char *const ok[] = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", NULL};
    for (int i = 0; ok[i]; i++)
        if (!strcmp(m, ok[i])) return;
    luaL_argerror(L, 2, lua_pushfstring(L, "method %s is not one of GET, HEAD, POST, PUT, PATCH, DELETE", m));
}

/* A path is '/'-separated segments of the characters RFC 3986 allows in one,
 * with %XX escapes. Refused, as the API server decodes before it routes: a
 * '.' or '..' segment, an escaped '/', '?', '#', '%' or '\', and an escaped
 * letter, digit or "-._~", which never needs one ("prox%79" is "proxy").
 * Returns what is wrong, or NULL. */
static const char *path_problem(const char *path) {
    static const char allowed[] = "-._~!$&'()*+,;=:@/";
    if (path[0] != '/') return "it must start with /";
    for (const char *p = path; *p; p++) {
        if (*p == '?' || *p == '#')
            return "it carries a query or fragment of its own (give query parameters as query)";
        if (*p == '%') {
            unsigned hi, lo;
            if (sscanf(p + 1, "%1x%1x", &hi, &lo) != 2) return "it has a % that is not an escape";
            int ch = (int)(hi * 16 + lo);
            if (isalnum(ch) || strchr("-._~/?#%\\", ch))
                return "it escapes a character that needs no escape or that separates paths";
            p += 2;
        } else if (!isalnum((unsigned char)*p) && !strchr(allowed, *p)) {
            return "it has a character that must be escaped";
        }
        if (*p == '/') {
            size_t n = strcspn(p + 1, "/");
            if ((n == 1 && p[1] == '.') || (n == 2 && p[1] == '.' && p[2] == '.'))
                return "it has a . or .. segment";
        }
    }
    return NULL;
}

/* The URL of a request, built from the server's, the checked path and the
 * query table at index q (nil for none), plus dryRun=All when dry, into
 * *slot: its owner frees it whatever is raised here. */
static void build_url(lua_State *L, conn *c, CURLU **slot, const char *method, const char *path, int q, int dry) {
    const char *bad = path_problem(path);
    if (bad) rb_error(L, "k8s", method, "invalid_path", 0, "%s %s: %s", method, path, bad);
    if (!lua_isnil(L, q)) {
        if (!lua_istable(L, q)) luaL_argerror(L, 2, "query must be a table");
        int given = lua_getfield(L, q, "dryRun") != LUA_TNIL;
        lua_pop(L, 1);
        if (given)
            rb_error(L, "k8s", method, "invalid_query", 0,
                     "%s %s: dryRun is not a query parameter to give: a dry run adds it", method, path);
    }
    CURLU *u = *slot = curl_url();
    char *prefix = NULL;
    if (!u || curl_url_set(u, CURLUPART_URL, c->base, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PATH, &prefix, 0) != CURLUE_OK)
        luaL_error(L, "out of memory");
    /* the server's path prefix (a proxy's /k8s) keeps no trailing '/' but may be just "/" */
    lua_pushfstring(L, "%s%s", strcmp(prefix, "/") ? prefix : "", path);
    curl_free(prefix);
    if (curl_url_set(u, CURLUPART_PATH, lua_tostring(L, -1), 0) != CURLUE_OK) luaL_error(L, "out of memory");
    lua_pop(L, 1);
    if (!lua_isnil(L, q) && !url_add_query(L, u, q)) luaL_argerror(L, 2, "query must map names to strings");
    if (dry && curl_url_set(u, CURLUPART_QUERY, "dryRun=All", CURLU_APPENDQUERY) != CURLUE_OK)
        luaL_error(L, "out of memory");
}

/* Whether the path names a connect subresource (proxy, exec, attach,
 * portforward): the API server hands those on and ignores dryRun. Any
 * segment that is one of them counts, a pod named "exec" too: in a dry run
 * a false alarm is a clear error, a miss a real write. */
static int is_connect(const char *path) {
    static const char *const connect[] = {"proxy", "exec", "attach", "portforward", NULL};
    for (const char *p = path; (p = strchr(p, '/')); ) {
        p++;
        size_t n = strcspn(p, "/");
        for (int i = 0; connect[i]; i++)
            if (n == strlen(connect[i]) && !memcmp(p, connect[i], n)) return 1;
    }
    return 0;
}

/* The dry-run guarantee (see the top of the file): whether to send a
 * request as a server-side dry run. Asks the gate for every write. */
static int dry_run(lua_State *L, const char *method, const char *path) {
    if (is_read(method)) return 0;
    rb_effect e = {"k8s", method, path, "", 1};
    if (rb_gate(L, &e) == RB_PERFORM) return 0;
    if (is_connect(path))
        rb_error(L, "k8s", method, "dry_run", 0, "%s %s: a write through proxy, exec, attach or portforward "
                 "cannot be dry-run, so it is refused in a dry run", method, path);
    return 1;
}

static int raise_transport(lua_State *L, CURL *h, const char *hostport, CURLcode rc, int oom,
                           const char *errbuf, curl_limits lim, const char *method, const char *path) {
    const char *code;
    int retryable;
    curl_reason(rc, &code, &retryable);
    if (oom) code = "out_of_memory", retryable = 0;
    const char *why = curl_why(L, h, rc, errbuf, lim);
    if (rc == CURLE_ABORTED_BY_CALLBACK)
        return rb_error(L, "k8s", method, code, 0, "%s %s: interrupted", method, path);
    return rb_error(L, "k8s", method, code, retryable,
                    "%s %s: cannot reach the Kubernetes API server at %s: %s", method, path, hostport, why);
}

static int conn_request(lua_State *L) {
    conn *c = check_conn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    const char *method = opt_string(L, 2, "method", NULL, NULL);
    if (!method) method = "GET";
    check_method(L, method);
    const char *path = opt_string(L, 2, "path", NULL, NULL);
    if (!path) luaL_argerror(L, 2, "path is required");
    size_t blen = 0;
    const char *body = opt_string(L, 2, "body", &blen, NULL);
    if (body && is_read(method))
        rb_error(L, "k8s", method, "invalid_request", 0, "%s %s: a %s cannot carry a body", method, path, method);
    const char *ctype = opt_header(L, 2, "content_type");
    const char *accept = opt_header(L, 2, "accept");
    double timeout = opt_timeout(L, 2);
    lua_getfield(L, 2, "query");
    int dry = dry_run(L, method, path);

    CURL *h = c->curl;
    curl_slist_free_all(c->headers);
    c->headers = NULL;
    curl_url_cleanup(c->url);
    c->url = NULL;
    buffer_free(&c->body);
    build_url(L, c, &c->url, method, path, 3, dry);
    curl_easy_reset(h);
    configure(c, h, c->errbuf);
    c->limits = curl_set_limits(h, timeout, c->connect_timeout);
    curl_easy_setopt(h, CURLOPT_CURLU, c->url);
    c->headers = common_headers(L, c, accept ? accept : "application/json");
    if (ctype) c->headers = add_header(L, c->headers, lua_pushfstring(L, "Content-Type: %s", ctype));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &c->body);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, c);
    curl_easy_setopt(h, CURLOPT_SOCKOPTFUNCTION, on_socket);
    curl_easy_setopt(h, CURLOPT_SOCKOPTDATA, &c->fd);
    c->ctype[0] = c->retry_after[0] = '\0';
    if (!strcmp(method, "HEAD")) curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    else if (!is_read(method)) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? body : "");
    }
    if (strcmp(method, "GET") && strcmp(method, "POST")) curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);

    CURLcode rc = curl_easy_perform(h);
    curl_slist_free_all(c->headers);
    c->headers = NULL;
    if (rc != CURLE_OK) {
        int oom = c->body.oom;
        buffer_free(&c->body);
        return raise_transport(L, h, c->hostport, rc, oom, c->errbuf, c->limits, method, path);
    }
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    lua_pushinteger(L, status);
    lua_pushlstring(L, c->body.data ? c->body.data : "", c->body.len);
    buffer_free(&c->body);
    lua_pushstring(L, c->ctype);
    if (c->retry_after[0]) lua_pushstring(L, c->retry_after); else lua_pushnil(L);
    return 4;
}

/* ---- streams ------------------------------------------------------------ */

static void stream_free(stream *s) {
    if (s->m && s->h) curl_multi_remove_handle(s->m, s->h);
    if (s->h) curl_easy_cleanup(s->h);
    if (s->m) curl_multi_cleanup(s->m);
    curl_slist_free_all(s->headers);
    curl_url_cleanup(s->url);
    buffer_free(&s->buf);
    s->h = NULL;
    s->m = NULL;
    s->url = NULL;
    s->headers = NULL;
}

static int stream_close(lua_State *L) {
    stream_free(luaL_checkudata(L, 1, STREAM_MT));
    return 0;
}

static int conn_stream(lua_State *L) {
    conn *c = check_conn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    const char *path = opt_string(L, 2, "path", NULL, NULL);
    if (!path) luaL_argerror(L, 2, "path is required");
    const char *accept = opt_header(L, 2, "accept");
    double timeout = opt_timeout(L, 2);
    lua_getfield(L, 2, "query");

    stream *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    luaL_setmetatable(L, STREAM_MT);
    snprintf(s->hostport, sizeof s->hostport, "%s", c->hostport);
    if (!(s->h = curl_easy_init()) || !(s->m = curl_multi_init()))
        return luaL_error(L, "cannot initialise libcurl");
    build_url(L, c, &s->url, "GET", path, 3, 0);
    configure(c, s->h, s->errbuf);
    s->limits = curl_set_limits(s->h, timeout, c->connect_timeout);
    curl_easy_setopt(s->h, CURLOPT_CURLU, s->url);
    s->headers = common_headers(L, c, accept ? accept : "application/json");
    curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, s->headers);
    curl_easy_setopt(s->h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(s->h, CURLOPT_WRITEDATA, &s->buf);
    curl_multi_add_handle(s->m, s->h);
    return 1;
}

static stream *check_stream(lua_State *L) {
    return luaL_checkudata(L, 1, STREAM_MT);
}

/* Pushes the next complete line, or the unterminated tail once the transfer
 * is over; returns 0 when there is nothing to push. */
static int pop_line(lua_State *L, stream *s) {
    char *start = s->buf.data + s->pos;
    size_t avail = s->buf.len - s->pos;
    char *nl = avail ? memchr(start, '\n', avail) : NULL;
    if (!nl && !(s->done && avail)) return 0;
    size_t n = nl ? (size_t)(nl - start) : avail;
    lua_pushlstring(L, start, n);
    s->pos += nl ? n + 1 : n;
    if (s->pos == s->buf.len) s->pos = s->buf.len = 0; /* reuse the buffer */
    return 1;
}

static int stream_next(lua_State *L) {
    stream *s = check_stream(L);
    double wait = luaL_optnumber(L, 2, 1.0);
    if (!s->h) return luaL_error(L, "k8s stream is closed");
    double end = rb_now() + rb_remaining(L, wait);
    for (;;) {
        if (pop_line(L, s)) return 1;
        if (s->done) {
            lua_pushnil(L);
            if (s->rc == CURLE_OK) lua_pushliteral(L, "end");
            else if (s->rc == CURLE_OPERATION_TIMEDOUT) lua_pushliteral(L, "timeout");
            else return raise_transport(L, s->h, s->hostport, s->rc, s->buf.oom, s->errbuf, s->limits, "GET", "(stream)");
            return 2;
        }
        if (rb_interrupted()) return rb_error(L, "k8s", "watch", "interrupted", 0, "interrupted");
        double left = end - rb_now();
        if (left <= 0) {
            lua_pushnil(L);
            lua_pushliteral(L, "wait");
            return 2;
        }
        int running = 0;
        curl_multi_perform(s->m, &running);
        CURLMsg *msg;
        int queued;
        while ((msg = curl_multi_info_read(s->m, &queued)))
            if (msg->msg == CURLMSG_DONE) s->done = 1, s->rc = msg->data.result;
        if (!s->done && (s->buf.len == s->pos || !memchr(s->buf.data + s->pos, '\n', s->buf.len - s->pos))) {
            int ms = (int)(left * 1000) + 1;
            curl_multi_poll(s->m, NULL, 0, ms < 100 ? ms : 100, NULL); /* wake for Ctrl-C */
        }
    }
}

static int stream_status(lua_State *L) {
    stream *s = check_stream(L);
    long status = 0;
    if (s->h) curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &status);
    lua_pushinteger(L, status);
    return 1;
}

/* ---- JSON ----------------------------------------------------------------- */

static int k8s_mark_empty_arrays(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len), *end = s + len, *p = s;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int n = 0, in_string = 0;
    const char *copied = s;
    for (; p < end; p++) {
        if (in_string) {
            if (*p == '\\') p++;
            else if (*p == '"') in_string = 0;
            continue;
        }
        if (*p == '"') { in_string = 1; continue; }
        if (*p != '[') continue;
        const char *q = p + 1;
        while (q < end && (*q == ' ' || *q == '\n' || *q == '\r' || *q == '\t')) q++;
        if (q < end && *q == ']') {
            luaL_addlstring(&b, copied, (size_t)(p - copied));
            luaL_addstring(&b, "\"\\u0000[]\"");
            copied = q + 1;
            p = q;
            n++;
        }
    }
    if (n == 0) {
        lua_settop(L, 1);
        lua_pushinteger(L, 0);
        return 2;
    }
    luaL_addlstring(&b, copied, (size_t)(end - copied));
    luaL_pushresult(&b);
    lua_pushinteger(L, n);
    return 2;
}

/* ---- module ------------------------------------------------------------- */

static const luaL_Reg conn_methods[] = {
    {"request", conn_request},
    {"stream", conn_stream},
    {"set_token", conn_set_token},
    {"close", conn_close},
    {NULL, NULL}
};

static const luaL_Reg stream_methods[] = {
    {"next", stream_next},
    {"status", stream_status},
    {"close", stream_close},
    {NULL, NULL}
};

int luaopen_runbook_k8s(lua_State *L) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return luaL_error(L, "cannot initialise libcurl");
    rb_class(L, CONN_MT, conn_methods, conn_close);
    rb_class(L, STREAM_MT, stream_methods, stream_close);
    lua_pop(L, 2);
    luaL_newlib(L, k8s_funcs);
    return 1;
}
