/*
 * http.c: HTTP requests over libcurl.
 *
 *   request(opts) -> {status, headers, body} | {skipped=true}
 *     opts.method           "GET" (default), "HEAD", "POST", "PUT", "PATCH", "DELETE", ...
 *     opts.url              required; a password in it is registered as a secret
 *     opts.headers          {name = value}; an Authorization value is a secret
 *     opts.body             string
 *     opts.timeout          seconds for the whole request; bounded by the step
 *     opts.connect_timeout  seconds to connect (default 10, never above timeout)
 *     opts.cafile           CA bundle to verify the server with
 *     opts.insecure         true: no TLS verification
 *     opts.follow           true: follow redirects (off by default)
 *   raise(op, code, retryable, message)  the structured error, for http.lua
 *
 * Response header names are lower-cased; repeated headers are joined with
 * ", ". Non-2xx statuses are returned, not raised; transport failures raise
 * with curl's reason as the code ("couldnt_connect", "operation_timedout").
 *
 * One CURL easy handle serves every request, so connections are kept alive
 * and reused; curl_easy_reset before each request clears options but keeps
 * the connection cache.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>

#include "runbook.h"

#define CLIENT_MT "runbook.http.client"
#define DEFAULT_TIMEOUT 30.0
#define DEFAULT_CONNECT_TIMEOUT 10.0

static int http_request(lua_State *L);
static int http_raise(lua_State *L);

static const luaL_Reg http_funcs[] = {
    {"request", http_request},
    {"raise", http_raise},
    {NULL, NULL}
};

typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} buffer;

/* The module's state, the upvalue of every function. Per-request scratch
 * (header list, buffers) lives here too so an error raised mid-request
 * cannot leak it: the next request or the finalizer frees it. */
typedef struct {
    CURL *curl;
    struct curl_slist *headers;
    buffer body, head;
    char errbuf[CURL_ERROR_SIZE];
} client;

static void scratch_free(client *c) {
    curl_slist_free_all(c->headers);
    c->headers = NULL;
    free(c->body.data);
    free(c->head.data);
    c->body = c->head = (buffer){0};
}

/* Idempotent: serves __gc and __close. */
static int client_close(lua_State *L) {
    client *c = luaL_checkudata(L, 1, CLIENT_MT);
    scratch_free(c);
    if (c->curl) curl_easy_cleanup(c->curl);
    c->curl = NULL;
    return 0;
}

static client *check_client(lua_State *L) {
    client *c = luaL_checkudata(L, lua_upvalueindex(1), CLIENT_MT);
    if (!c->curl) luaL_error(L, "http client is closed");
    return c;
}

static size_t buffer_add(buffer *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 16384;
        while (cap < b->len + n) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) { b->oom = 1; return 0; } /* a short count makes curl abort */
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return n;
}

static size_t on_body(char *ptr, size_t size, size_t n, void *ud) {
    return buffer_add(ud, ptr, size * n);
}

/* A new status line starts a new header block (after a 100 Continue or a
 * followed redirect): only the final response's headers are returned. */
static size_t on_header(char *ptr, size_t size, size_t n, void *ud) {
    buffer *b = ud;
    if (size * n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) b->len = 0;
    return buffer_add(b, ptr, size * n);
}

/* Ctrl-C aborts a transfer in progress rather than waiting for its timeout. */
static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)ud; (void)dt; (void)dn; (void)ut; (void)un;
    return rb_interrupted() != 0;
}

/* ---- errors ------------------------------------------------------------- */

/* curl's enum names, lower-cased without CURLE_: stable codes for runbooks
 * to match on; curl_easy_strerror gives prose, not identifiers. */
static const struct { CURLcode code; const char *name; int retryable; } curl_codes[] = {
    {CURLE_UNSUPPORTED_PROTOCOL, "unsupported_protocol", 0},
    {CURLE_URL_MALFORMAT, "url_malformat", 0},
    {CURLE_COULDNT_RESOLVE_PROXY, "couldnt_resolve_proxy", 1},
    {CURLE_COULDNT_RESOLVE_HOST, "couldnt_resolve_host", 1},
    {CURLE_COULDNT_CONNECT, "couldnt_connect", 1},
    {CURLE_WEIRD_SERVER_REPLY, "weird_server_reply", 1},
    {CURLE_HTTP2, "http2", 1},
    {CURLE_PARTIAL_FILE, "partial_file", 1},
    {CURLE_OUT_OF_MEMORY, "out_of_memory", 0},
    {CURLE_OPERATION_TIMEDOUT, "operation_timedout", 1},
    {CURLE_SSL_CONNECT_ERROR, "ssl_connect_error", 1},
    {CURLE_TOO_MANY_REDIRECTS, "too_many_redirects", 0},
    {CURLE_GOT_NOTHING, "got_nothing", 1},
    {CURLE_SSL_ENGINE_NOTFOUND, "ssl_engine_notfound", 0},
    {CURLE_SEND_ERROR, "send_error", 1},
    {CURLE_RECV_ERROR, "recv_error", 1},
    {CURLE_SSL_CERTPROBLEM, "ssl_certproblem", 0},
    {CURLE_SSL_CIPHER, "ssl_cipher", 0},
    {CURLE_PEER_FAILED_VERIFICATION, "peer_failed_verification", 0},
    {CURLE_SSL_CACERT_BADFILE, "ssl_cacert_badfile", 0},
    {CURLE_WRITE_ERROR, "write_error", 0},
    {CURLE_ABORTED_BY_CALLBACK, "interrupted", 0},
};

static void curl_reason(CURLcode rc, const char **name, int *retryable) {
    for (size_t i = 0; i < sizeof curl_codes / sizeof *curl_codes; i++) {
        if (curl_codes[i].code == rc) {
            *name = curl_codes[i].name;
            *retryable = curl_codes[i].retryable;
            return;
        }
    }
    *name = "curl_error";
    *retryable = 0;
}

/* ---- request setup ------------------------------------------------------ */

/* Registers the URL's password as a secret and pushes the URL with it
 * replaced by "***", for the gate and for messages. */
static const char *push_safe_url(lua_State *L, const char *url) {
    CURLU *u = curl_url();
    char *pw = NULL, *safe = NULL;
    if (u && curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PASSWORD, &pw, CURLU_URLDECODE) == CURLUE_OK) {
        rb_secret_register(L, pw, strlen(pw));
        curl_free(pw);
        /* the raw form too: it is what appears inside the URL string */
        if (curl_url_get(u, CURLUPART_PASSWORD, &pw, 0) == CURLUE_OK) {
            rb_secret_register(L, pw, strlen(pw));
            curl_free(pw);
        }
        if (curl_url_set(u, CURLUPART_PASSWORD, "***", 0) == CURLUE_OK &&
            curl_url_get(u, CURLUPART_URL, &safe, 0) == CURLUE_OK) {
            lua_pushstring(L, safe);
            curl_free(safe);
            curl_url_cleanup(u);
            return lua_tostring(L, -1);
        }
    }
    curl_url_cleanup(u);
    lua_pushstring(L, url);
    return lua_tostring(L, -1);
}

/* An Authorization (or Proxy-Authorization) value is a secret, whole and
 * without its scheme word, since either may end up in output. */
static void register_auth(lua_State *L, const char *name, const char *value) {
    if (strcasecmp(name, "authorization") != 0 && strcasecmp(name, "proxy-authorization") != 0)
        return;
    rb_secret_register(L, value, strlen(value));
    const char *sp = strchr(value, ' ');
    if (sp) {
        while (*sp == ' ') sp++;
        rb_secret_register(L, sp, strlen(sp));
    }
}

static int set_headers(lua_State *L, client *c) {
    /* curl would otherwise wait for a 100 Continue on large bodies */
    c->headers = curl_slist_append(c->headers, "Expect:");
    int t = lua_getfield(L, 1, "headers");
    if (t == LUA_TNIL) lua_newtable(L), lua_replace(L, -2);
    else if (t != LUA_TTABLE) luaL_argerror(L, 1, "headers must be a table");
    for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING ||
            (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
            luaL_argerror(L, 1, "headers must map names to strings");
        const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
        if (strpbrk(k, ":\r\n") || strpbrk(v, "\r\n"))
            luaL_argerror(L, 1, "header names and values cannot contain newlines");
        register_auth(L, k, v);
        /* "Name;" is curl's way to send a header with an empty value */
        const char *line = *v ? lua_pushfstring(L, "%s: %s", k, v) : lua_pushfstring(L, "%s;", k);
        struct curl_slist *n = curl_slist_append(c->headers, line);
        lua_pop(L, 1);
        if (!n) return luaL_error(L, "out of memory");
        c->headers = n;
    }
    lua_pop(L, 1);
    return curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, c->headers);
}

static void set_method(CURL *h, const char *method, const char *body, size_t len) {
    if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
        return;
    }
    if (body || strcmp(method, "POST") == 0) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? body : "");
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
}

static double opt_number(lua_State *L, const char *field, double dflt) {
    lua_getfield(L, 1, field);
    int isnum = lua_isnumber(L, -1), isnil = lua_isnil(L, -1);
    double v = isnum ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    if (!isnil && !isnum) luaL_argerror(L, 1, lua_pushfstring(L, "%s must be a number", field));
    if (!isnil && v <= 0) luaL_argerror(L, 1, lua_pushfstring(L, "%s must be positive", field));
    return v;
}

static const char *opt_string(lua_State *L, const char *field, size_t *len) {
    lua_getfield(L, 1, field);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return NULL; }
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, 1, lua_pushfstring(L, "%s must be a string", field));
    const char *s = lua_tolstring(L, -1, len);
    lua_pop(L, 1); /* still referenced by opts */
    return s;
}

static int opt_bool(lua_State *L, const char *field) {
    lua_getfield(L, 1, field);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static void set_timeouts(lua_State *L, CURL *h) {
    double total = opt_number(L, "timeout", DEFAULT_TIMEOUT);
    double left = rb_remaining(L, DEFAULT_TIMEOUT);
    if (left < total) total = left;
    double conn = opt_number(L, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    if (conn > total) conn = total;
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(total * 1000) + 1);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(conn * 1000) + 1);
}

static void set_tls(lua_State *L, CURL *h) {
    const char *cafile = opt_string(L, "cafile", NULL);
    if (cafile) curl_easy_setopt(h, CURLOPT_CAINFO, cafile);
    long verify = !opt_bool(L, "insecure");
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, verify);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
}

static void set_common(client *c, const char *url) {
    CURL *h = c->curl;
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* timeouts without SIGALRM */
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &c->body);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &c->head);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_USERAGENT, "runbook");
    c->errbuf[0] = '\0';
}

/* ---- response ----------------------------------------------------------- */

static void push_headers(lua_State *L, const buffer *b) {
    lua_newtable(L);
    const char *p = b->data, *end = b->data + b->len;
    while (p && p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && memcmp(p, "HTTP/", 5) != 0) {
            luaL_Buffer name;
            luaL_buffinit(L, &name);
            for (const char *q = p; q < colon; q++) luaL_addchar(&name, (char)tolower((unsigned char)*q));
            luaL_pushresult(&name);
            const char *v = colon + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            lua_pushvalue(L, -1);
            if (lua_rawget(L, -3) == LUA_TSTRING) {
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v));
            }
            lua_rawset(L, -3);
        }
        p = eol + 1;
    }
}

static void push_response(lua_State *L, client *c) {
    long status = 0;
    curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
    push_headers(L, &c->head);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, c->body.data ? c->body.data : "", c->body.len);
    lua_setfield(L, -2, "body");
}

/* ---- the request -------------------------------------------------------- */

static int is_read(const char *method) {
    return !strcmp(method, "GET") || !strcmp(method, "HEAD") || !strcmp(method, "OPTIONS");
}

static const char *check_method(lua_State *L) {
    const char *m = opt_string(L, "method", NULL);
    if (!m) return "GET";
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (; *m; m++) {
        if (!isalpha((unsigned char)*m)) luaL_argerror(L, 1, "method must be a word such as \"GET\"");
        luaL_addchar(&b, (char)toupper((unsigned char)*m));
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1); /* stays on the stack */
}

static void push_summary(lua_State *L, const char *method, const char *safe_url, size_t len) {
    lua_pushfstring(L, "%s %s (%d bytes)", method, safe_url, (int)len);
}

static int raise_transport(lua_State *L, client *c, CURLcode rc, const char *method,
                           const char *safe_url, const rb_effect *e, rb_decision d) {
    const char *code;
    int retryable;
    curl_reason(rc, &code, &retryable);
    if (c->body.oom || c->head.oom) code = "out_of_memory", retryable = 0;
    const char *why = c->errbuf[0] ? c->errbuf : curl_easy_strerror(rc);
    const char *msg = lua_pushfstring(L, "%s %s: %s", method, safe_url, why);
    scratch_free(c);
    if (e) {
        lua_pushvalue(L, -1);
        rb_gate_done(L, e, d, 0);
    }
    return rb_error(L, "http", method, code, retryable, "%s", msg);
}

static int http_request(lua_State *L) {
    client *c = check_client(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *method = check_method(L);
    const char *url = opt_string(L, "url", NULL);
    if (!url) luaL_argerror(L, 1, "url is required");
    size_t len = 0;
    const char *body = opt_string(L, "body", &len);
    const char *safe_url = push_safe_url(L, url);

    scratch_free(c);
    set_common(c, url);
    set_headers(L, c);
    set_method(c->curl, method, body, len);
    set_timeouts(L, c->curl);
    set_tls(L, c->curl);
    if (opt_bool(L, "follow")) {
        curl_easy_setopt(c->curl, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(c->curl, CURLOPT_MAXREDIRS, 10L);
    }

    rb_effect e = {"http", method, safe_url, NULL, 0};
    rb_decision d = RB_PERFORM;
    const rb_effect *ge = NULL;
    if (!is_read(method)) {
        push_summary(L, method, safe_url, len);
        e.summary = lua_tostring(L, -1);
        ge = &e;
        if ((d = rb_gate(L, &e)) == RB_SKIP) {
            scratch_free(c);
            lua_pushnil(L);
            rb_gate_done(L, &e, d, 1);
            lua_createtable(L, 0, 1);
            lua_pushboolean(L, 1);
            lua_setfield(L, -2, "skipped");
            return 1;
        }
    }
    CURLcode rc = curl_easy_perform(c->curl);
    if (rc != CURLE_OK) return raise_transport(L, c, rc, method, safe_url, ge, d);
    push_response(L, c);
    scratch_free(c);
    if (ge) {
        lua_getfield(L, -1, "status");
        int status = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_pushfstring(L, "HTTP %d", status);
        rb_gate_done(L, ge, d, status < 400);
    }
    return 1;
}

/* raise(op, code, retryable, message): http.lua's structured errors (a
 * failed check) come from the same helper as the module's own. */
static int http_raise(lua_State *L) {
    const char *op = luaL_checkstring(L, 1);
    const char *code = luaL_optstring(L, 2, NULL);
    int retryable = lua_toboolean(L, 3);
    const char *msg = luaL_checkstring(L, 4);
    return rb_error(L, "http", op, code, retryable, "%s", msg);
}

/* Pushes the module state: the client created closed, then opened, so its
 * finalizer is safe whatever happens in between. */
static client *new_client(lua_State *L) {
    client *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    if (luaL_newmetatable(L, CLIENT_MT)) {
        lua_pushcfunction(L, client_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, client_close);
        lua_setfield(L, -2, "__close");
    }
    lua_setmetatable(L, -2);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(c->curl = curl_easy_init()))
        luaL_error(L, "cannot initialise libcurl");
    return c;
}

int luaopen_runbook_http(lua_State *L) {
    luaL_newlibtable(L, http_funcs);
    new_client(L);
    luaL_setfuncs(L, http_funcs, 1);
    return 1;
}
