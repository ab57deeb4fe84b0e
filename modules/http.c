/*
 * http.c: HTTP requests over libcurl.
 *
 *   request(opts) -> {status, headers, body} | {skipped=true}
 *     opts.method           "GET" (default), "HEAD", "POST", "PUT", "PATCH", "DELETE", ...
 *     opts.url              required; a password in it is registered as a secret;
 *                           a fragment (#...) is refused, since it is never sent
 *     opts.path             {segment, ...}: appended to the URL's path, each
 *                           escaped whole ("a/b?" is one segment); "." and ".." refused
 *     opts.query            {name = value}: appended to the URL's query, escaped
 *     opts.headers          {name = value}; an Authorization value is a secret
 *     opts.body             string; refused on GET and HEAD
 *     opts.timeout          seconds for the whole request; bounded by the step
 *     opts.connect_timeout  seconds to connect (default 10, never above timeout)
 *     opts.cafile           CA bundle to verify the server with
 *     opts.cert, opts.key   client certificate and key files (PEM)
 *     opts.cert_pem, opts.key_pem  the same as PEM text (the key is a secret)
 *     opts.insecure         true: no TLS verification
 *     opts.follow           true: follow redirects (off by default)
 *     opts.effect           {module, op, target, summary}: how the gate names a
 *                           write (for stdlib wrappers: "dapr publish ...")
 *   report(opts) -> {status, headers, body}: request's options, for the host's
 *     own report after a run (run metrics to a Pushgateway); asks no gate
 *   check_all(urls, opts) -> {{status, latency, content_type, body, error, code, retryable}, ...}
 *     GETs every URL at once over the multi interface, opts.concurrency at a
 *     time (default 50); opts.timeout, connect_timeout, headers and the TLS
 *     options as for request. Failures are results, not errors; results
 *     come in the order of urls. Bodies are kept up to 64 KiB.
 *   smtp_send(opts) -> {ok=true} | {skipped=true}
 *     opts.url              "smtp://host:port" or "smtps://..."; a password in it is a secret
 *     opts.from, opts.to    the envelope: an address and a list of addresses
 *     opts.message          the whole message, headers and body, CRLF line ends
 *     opts.username, opts.password, opts.starttls ("try" | "required"),
 *     opts.timeout, connect_timeout, cafile, insecure, effect: as above
 *
 * Response header names are lower-cased; repeated headers are joined with
 * ", ". Non-2xx statuses are returned, not raised; transport failures raise
 * with curl's reason as the code ("couldnt_connect"; "timeout" for a timeout, as in every module).
 *
 * The gate: http_request classifies the method itself right before the
 * transfer: GET and HEAD are reads, every other method is a write and asks
 * rb_gate(), and in a dry run a write is skipped. Nothing else in opts can
 * turn a write into a read or a read into a write: a body on a GET or HEAD
 * (curl would send it as a POST) is refused, and so are headers that ask a
 * server to treat a read as another method (X-HTTP-Method-Override) or to
 * expect a body (Content-Length, Transfer-Encoding).
 *
 * One CURL easy handle serves every request, so connections are kept alive
 * and reused; curl_easy_reset before each request clears options but keeps
 * the connection cache.
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>

#include "module.h"
#include "curl_glue.h"

#define CLIENT_MT "runbook.http.client"
#define BATCH_MT "runbook.http.batch"
#define DEFAULT_CONCURRENCY 50
#define CHECK_BODY_MAX 65536
#define DEFAULT_TIMEOUT 30.0
#define DEFAULT_CONNECT_TIMEOUT 10.0

static int http_request(lua_State *L);
static int http_report(lua_State *L);
static int http_check_all(lua_State *L);
static int http_smtp_send(lua_State *L);

static const luaL_Reg http_funcs[] = {
    {"request", http_request},
    {"report", http_report},
    {"check_all", http_check_all},
    {"smtp_send", http_smtp_send},
    {NULL, NULL}
};

/* The module's state, the upvalue of every function. Per-request scratch
 * (header list, buffers) lives here too so an error raised mid-request
 * cannot leak it: the next request or the finalizer frees it. */
typedef struct {
    CURL *curl;
    CURLU *url;
    struct curl_slist *headers, *pins;   /* pins: the host's addresses, looked up (curl_pin_host) */
    buffer body, head;
    char errbuf[CURL_ERROR_SIZE];
    curl_limits limits;   /* of the transfer in progress */
    const char *upload;   /* the SMTP message being sent: read from here */
    size_t upload_left;
} client;

static void scratch_free(client *c) {
    curl_url_cleanup(c->url);
    c->url = NULL;
    curl_slist_free_all(c->headers);
    curl_slist_free_all(c->pins);
    c->headers = c->pins = NULL;
    buffer_free(&c->body);
    buffer_free(&c->head);
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

/* A new status line starts a new header block (after a 100 Continue or a
 * followed redirect): only the final response's headers are returned. */
static size_t on_header(char *ptr, size_t size, size_t n, void *ud) {
    buffer *b = ud;
    if (size * n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) b->len = 0;
    return buffer_add(b, ptr, size * n);
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

/* Headers that would make a GET or HEAD mean something else to a server:
 * another method (as many frameworks honour), or a body to come. */
static const char *const read_changers[] = {
    "x-http-method-override", "x-http-method", "x-method-override", "content-length", "transfer-encoding", NULL
};

static void check_read_header(lua_State *L, const char *name) {
    for (int i = 0; read_changers[i]; i++)
        if (!strcasecmp(name, read_changers[i]))
            luaL_argerror(L, 1, lua_pushfstring(L, "a GET or HEAD cannot carry a %s header", name));
}

/* opts.headers (opts at index 1) appended to *list; read: the request is a
 * GET or HEAD. */
static void append_headers(lua_State *L, struct curl_slist **list, int read) {
    /* curl would otherwise wait for a 100 Continue on large bodies */
    struct curl_slist *first = curl_slist_append(*list, "Expect:");
    if (!first) luaL_error(L, "out of memory");
    *list = first;
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
        if (read) check_read_header(L, k);
        register_auth(L, k, v);
        /* "Name;" is curl's way to send a header with an empty value */
        const char *line = *v ? lua_pushfstring(L, "%s: %s", k, v) : lua_pushfstring(L, "%s;", k);
        struct curl_slist *n = curl_slist_append(*list, line);
        lua_pop(L, 1);
        if (!n) luaL_error(L, "out of memory");
        *list = n;
    }
    lua_pop(L, 1);
}

static void set_headers(lua_State *L, client *c, int read) {
    append_headers(L, &c->headers, read);
    curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, c->headers);
}

/* GET and HEAD never have a body here (http_request refuses one). */
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

static curl_limits set_timeouts(lua_State *L, CURL *h) {
    double total = opt_seconds(L, 1, "timeout", DEFAULT_TIMEOUT);
    double left = rb_remaining(L, DEFAULT_TIMEOUT);
    if (left < total) total = left;
    return curl_set_limits(h, total, opt_seconds(L, 1, "connect_timeout", DEFAULT_CONNECT_TIMEOUT));
}

/* A client certificate or key given as PEM text (a kubeconfig's *-data),
 * handed to curl from memory: no temporary file holds the key. */
static void set_blob(lua_State *L, CURL *h, const char *field, CURLoption opt, int secret) {
    size_t len = 0;
    const char *pem = opt_string(L, 1, field, &len, NULL);
    if (!pem) return;
    if (secret) rb_secret_register(L, pem, len);
    struct curl_blob blob = {(void *)pem, len, CURL_BLOB_COPY};
    curl_easy_setopt(h, opt, &blob);
    curl_easy_setopt(h, opt == CURLOPT_SSLCERT_BLOB ? CURLOPT_SSLCERTTYPE : CURLOPT_SSLKEYTYPE, "PEM");
}

static void set_tls(lua_State *L, CURL *h) {
    const char *cafile = opt_string(L, 1, "cafile", NULL, NULL);
    if (cafile) curl_easy_setopt(h, CURLOPT_CAINFO, cafile);
    const char *cert = opt_string(L, 1, "cert", NULL, NULL), *key = opt_string(L, 1, "key", NULL, NULL);
    if (cert) curl_easy_setopt(h, CURLOPT_SSLCERT, cert);
    if (key) curl_easy_setopt(h, CURLOPT_SSLKEY, key);
    set_blob(L, h, "cert_pem", CURLOPT_SSLCERT_BLOB, 0);
    set_blob(L, h, "key_pem", CURLOPT_SSLKEY_BLOB, 1);
    long verify = !opt_bool(L, 1, "insecure");
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, verify);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
}

static void set_common(client *c) {
    CURL *h = c->curl;
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_CURLU, c->url);
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

/* Every method but GET and HEAD is a write, OPTIONS and unknown ones too. */
static int is_read(const char *method) {
    return !strcmp(method, "GET") || !strcmp(method, "HEAD");
}

static const char *check_method(lua_State *L) {
    const char *m = opt_string(L, 1, "method", NULL, NULL);
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

/* opts.effect = {module, op, target, summary}: stdlib wrappers name their
 * writes in their own words. The strings stay referenced by opts. */
static void effect_override(lua_State *L, rb_effect *e) {
    int t = lua_getfield(L, 1, "effect");
    if (t == LUA_TTABLE) {
        static const char *const fields[] = {"module", "op", "target", "summary"};
        const char **slots[] = {&e->module, &e->op, &e->target, &e->summary};
        for (int i = 0; i < 4; i++) {
            if (lua_getfield(L, -1, fields[i]) == LUA_TSTRING) *slots[i] = lua_tostring(L, -1);
            else if (!lua_isnil(L, -1))
                luaL_argerror(L, 1, lua_pushfstring(L, "effect.%s must be a string", fields[i]));
            lua_pop(L, 1);
        }
    } else if (t != LUA_TNIL) {
        luaL_argerror(L, 1, "effect must be a table");
    }
    lua_pop(L, 1);
}

/* opts.path's segments appended to u's path, each escaped whole. */
static void append_path(lua_State *L, CURLU *u) {
    if (lua_getfield(L, 1, "path") == LUA_TNIL) { lua_pop(L, 1); return; }
    if (!lua_istable(L, -1)) luaL_argerror(L, 1, "path must be a list of segments");
    int t = lua_gettop(L);
    char *base = NULL;
    if (curl_url_get(u, CURLUPART_PATH, &base, 0) != CURLUE_OK) luaL_error(L, "out of memory");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t blen = strlen(base);
    luaL_addlstring(&b, base, blen && base[blen - 1] == '/' ? blen - 1 : blen);
    curl_free(base);
    for (lua_Integer i = 1, n = luaL_len(L, t); i <= n; i++) {
        size_t len;
        if (lua_rawgeti(L, t, i) != LUA_TSTRING) luaL_argerror(L, 1, "path must list segments as strings");
        const char *seg = lua_tolstring(L, -1, &len);
        if (!strcmp(seg, ".") || !strcmp(seg, ".."))
            luaL_argerror(L, 1, "a path segment cannot be . or ..");
        char *e = curl_easy_escape(NULL, seg, (int)len);
        lua_pop(L, 1);
        if (!e) luaL_error(L, "out of memory");
        luaL_addchar(&b, '/');
        luaL_addstring(&b, e);
        curl_free(e);
    }
    luaL_pushresult(&b);
    if (curl_url_set(u, CURLUPART_PATH, lua_tostring(L, -1), 0) != CURLUE_OK) luaL_error(L, "out of memory");
    lua_pop(L, 2);
}

/* opts.url with opts.path and opts.query, into c->url. Pushes the URL
 * with its password replaced, for the gate and messages. */
static const char *build_url(lua_State *L, client *c, const char *method) {
    const char *url = opt_string(L, 1, "url", NULL, NULL);
    if (!url) luaL_argerror(L, 1, "url is required");
    const char *safe = push_safe_url(L, url);
    CURLU *u = c->url = curl_url();
    if (!u) luaL_error(L, "out of memory");
    CURLUcode rc = curl_url_set(u, CURLUPART_URL, url, 0);
    if (rc != CURLUE_OK)
        rb_error(L, "http", method, "url_malformat", 0, "%s %s: not a URL: %s", method, safe, curl_url_strerror(rc));
    char *frag = NULL;
    if (curl_url_get(u, CURLUPART_FRAGMENT, &frag, 0) == CURLUE_OK) {
        curl_free(frag);
        rb_error(L, "http", method, "url_malformat", 0,
                 "%s %s: the URL has a fragment (#...), which is never sent", method, safe);
    }
    append_path(L, u);
    if (lua_getfield(L, 1, "query") != LUA_TNIL && (!lua_istable(L, -1) || !url_add_query(L, u, lua_gettop(L))))
        luaL_argerror(L, 1, "query must map names to strings");
    lua_pop(L, 1);
    char *full = NULL;
    if (curl_url_get(u, CURLUPART_URL, &full, 0) != CURLUE_OK) luaL_error(L, "out of memory");
    lua_pushstring(L, full); /* the URL as it will be sent */
    curl_free(full);
    push_safe_url(L, lua_tostring(L, -1));
    lua_replace(L, -3); /* over the one given */
    lua_pop(L, 1);
    return lua_tostring(L, -1);
}

static void push_summary(lua_State *L, const char *method, const char *safe_url, size_t len) {
    lua_pushfstring(L, "%s %s (%d bytes)", method, safe_url, (int)len);
}

static int raise_failed(lua_State *L, client *c, const char *code, int retryable, const char *why, const char *method,
                        const char *safe_url, const rb_effect *e, rb_decision d) {
    const char *msg = lua_pushfstring(L, "%s %s: %s", method, safe_url, why);
    scratch_free(c);
    if (e) gate_failed(L, e, d, msg);
    return rb_error(L, "http", method, code, retryable, "%s", msg);
}

static int raise_transport(lua_State *L, client *c, CURLcode rc, const char *method,
                           const char *safe_url, const rb_effect *e, rb_decision d) {
    const char *code;
    int retryable;
    curl_reason(rc, &code, &retryable);
    if (c->body.oom || c->head.oom) code = "out_of_memory", retryable = 0;
    return raise_failed(L, c, code, retryable, curl_why(L, c->curl, rc, c->errbuf, c->limits), method, safe_url, e, d);
}

/* A request; `gated`: a write asks the gate (every request a runbook makes). */
static int perform(lua_State *L, int gated) {
    client *c = check_client(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *method = check_method(L);
    int read = is_read(method);
    size_t len = 0;
    const char *body = opt_string(L, 1, "body", &len, NULL);
    if (body && read) luaL_argerror(L, 1, lua_pushfstring(L, "a %s cannot carry a body", method));
    scratch_free(c);
    const char *safe_url = build_url(L, c, method);

    set_common(c);
    set_headers(L, c, read);
    set_method(c->curl, method, body, len);
    c->limits = set_timeouts(L, c->curl);
    set_tls(L, c->curl);
    if (opt_bool(L, 1, "follow")) {
        curl_easy_setopt(c->curl, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(c->curl, CURLOPT_MAXREDIRS, 10L);
    }

    rb_effect e = {"http", method, safe_url, NULL, 0};
    rb_decision d = RB_PERFORM;
    if (!gated) read = 1;   /* the host's report: nothing to gate or account for */
    if (!read) {
        push_summary(L, method, safe_url, len);
        e.summary = lua_tostring(L, -1);
        effect_override(L, &e);
        if ((d = rb_gate(L, &e)) == RB_SKIP) {
            scratch_free(c);
            return gate_skipped(L, &e);
        }
    }
    const char *code, *why = curl_pin_host(L, c->curl, c->url, c->limits.connect, &c->pins, &code);
    if (why) return raise_failed(L, c, code, 1, why, method, safe_url, read ? NULL : &e, d);
    CURLcode rc = curl_easy_perform(c->curl);
    if (rc != CURLE_OK) return raise_transport(L, c, rc, method, safe_url, read ? NULL : &e, d);
    push_response(L, c);
    scratch_free(c);
    if (!read) {
        lua_getfield(L, -1, "status");
        int status = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_pushfstring(L, "HTTP %d", status);
        rb_gate_done(L, &e, d, status < 400);
    }
    return 1;
}

static int http_request(lua_State *L) { return perform(L, 1); }

/* report(opts): a request of the host's own after a run (its metrics to a
 * Pushgateway), as the journal is written: no effect of the runbook, so it
 * asks no gate. Only host code reaches it (stdlib/runbook/metrics.lua);
 * runbooks get stdlib/http.lua, which never calls it. */
static int http_report(lua_State *L) { return perform(L, 0); }

/* ---- check_all: many GETs at once ---------------------------------------- */

/* One running transfer of a check_all batch: a slot, reused for the next
 * target once its result is out, so memory and sockets stay bounded by the
 * concurrency, not by the number of targets. */
typedef struct {
    CURL *easy;
    buffer body;
    char errbuf[CURL_ERROR_SIZE];
    curl_limits limits;
    int target; /* index in urls, from 0 */
} transfer;

/* A check_all call's handles, in a userdata so an error raised anywhere
 * (a bad option, out of memory) cannot leak them: the finalizer frees
 * whatever was acquired. */
typedef struct {
    CURLM *multi;
    struct curl_slist *headers;
    transfer *t; /* n slots */
    int n;
} batch;

/* Idempotent: serves __gc, and the explicit close at the end of a call. */
static int batch_close(lua_State *L) {
    batch *b = luaL_checkudata(L, 1, BATCH_MT);
    for (int i = 0; b->t && i < b->n; i++) {
        if (b->t[i].easy) {
            if (b->multi) curl_multi_remove_handle(b->multi, b->t[i].easy);
            curl_easy_cleanup(b->t[i].easy);
        }
        free(b->t[i].body.data);
    }
    free(b->t);
    b->t = NULL;
    b->n = 0;
    if (b->multi) curl_multi_cleanup(b->multi);
    b->multi = NULL;
    curl_slist_free_all(b->headers);
    b->headers = NULL;
    return 0;
}

static batch *new_batch(lua_State *L, int n) {
    batch *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    rb_class(L, BATCH_MT, NULL, batch_close);
    lua_setmetatable(L, -2);
    if (n > 0 && !(b->t = calloc((size_t)n, sizeof *b->t))) luaL_error(L, "out of memory");
    b->n = n;
    if (!(b->multi = curl_multi_init())) luaL_error(L, "cannot initialise libcurl");
    /* no more idle connections kept than transfers run at once: fds stay bounded */
    curl_multi_setopt(b->multi, CURLMOPT_MAXCONNECTS, (long)(n > 0 ? n : 1));
    return b;
}

/* A health check needs the start of a body, not all of it: the rest is
 * read and dropped so the transfer still completes. */
static size_t on_check_body(char *ptr, size_t size, size_t n, void *ud) {
    buffer *b = ud;
    size_t len = size * n, keep = b->len < CHECK_BODY_MAX ? CHECK_BODY_MAX - b->len : 0;
    if (keep > len) keep = len;
    if (keep && buffer_add(b, ptr, keep) != keep) return 0;
    return len;
}

/* The URL at index i of opts.urls, checked. */
static const char *check_url(lua_State *L, int urls, int i) {
    lua_rawgeti(L, urls, i);
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, 1, lua_pushfstring(L, "urls[%d] must be a string", i));
    const char *url = lua_tostring(L, -1);
    lua_pop(L, 1); /* still referenced by urls */
    push_safe_url(L, url); /* registers a password in it */
    lua_pop(L, 1);
    return url;
}

/* Starts target i of urls in a free slot. */
static void start_transfer(lua_State *L, batch *b, transfer *t, int urls, int i) {
    lua_rawgeti(L, urls, i + 1);
    const char *url = lua_tostring(L, -1);
    lua_pop(L, 1); /* still referenced by urls */
    if (!t->easy && !(t->easy = curl_easy_init())) luaL_error(L, "cannot initialise libcurl");
    CURL *h = t->easy;
    curl_easy_reset(h);
    t->body.len = 0;
    t->body.oom = 0;
    t->errbuf[0] = 0;
    t->target = i;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, t->errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_check_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &t->body);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_USERAGENT, "runbook");
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, b->headers);
    curl_easy_setopt(h, CURLOPT_PRIVATE, (void *)t);
    t->limits = set_timeouts(L, h); /* per transfer: a queued one gets what is left of the step */
    set_tls(L, h);
    if (curl_multi_add_handle(b->multi, h) != CURLM_OK) luaL_error(L, "cannot start a transfer");
}

static void push_transfer_result(lua_State *L, transfer *t, CURLcode result) {
    lua_createtable(L, 0, 6);
    curl_off_t us = 0;
    curl_easy_getinfo(t->easy, CURLINFO_TOTAL_TIME_T, &us);
    lua_pushnumber(L, (double)us / 1e6);
    lua_setfield(L, -2, "latency");
    if (result == CURLE_OK) {
        long status = 0;
        char *ctype = NULL;
        curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(t->easy, CURLINFO_CONTENT_TYPE, &ctype);
        lua_pushinteger(L, status);
        lua_setfield(L, -2, "status");
        if (ctype) {
            lua_pushstring(L, ctype);
            lua_setfield(L, -2, "content_type");
        }
        lua_pushlstring(L, t->body.data ? t->body.data : "", t->body.len);
        lua_setfield(L, -2, "body");
        return;
    }
    const char *code;
    int retryable;
    curl_reason(result, &code, &retryable);
    if (t->body.oom) code = "out_of_memory", retryable = 0;
    lua_pushstring(L, code);
    lua_setfield(L, -2, "code");
    lua_pushboolean(L, retryable);
    lua_setfield(L, -2, "retryable");
    curl_why(L, t->easy, result, t->errbuf, t->limits);
    lua_setfield(L, -2, "error");
}

/* Moves each finished transfer's result into the results table (at index
 * `results`) and starts the next target in its slot; returns how many
 * transfers still run. */
static int reap(lua_State *L, batch *b, int results, int urls, int *next, int n, int active) {
    int left;
    CURLMsg *m;
    while ((m = curl_multi_info_read(b->multi, &left))) {
        if (m->msg != CURLMSG_DONE) continue;
        void *p = NULL;
        CURLcode result = m->data.result;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &p);
        transfer *t = p;
        push_transfer_result(L, t, result);
        lua_rawseti(L, results, t->target + 1);
        curl_multi_remove_handle(b->multi, t->easy);
        active--;
        if (*next < n) {
            start_transfer(L, b, t, urls, (*next)++);
            active++;
        }
    }
    return active;
}

static int http_check_all(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (lua_getfield(L, 1, "urls") != LUA_TTABLE) luaL_argerror(L, 1, "urls must be a list of URLs");
    int urls = lua_gettop(L);
    lua_Integer n = luaL_len(L, urls);
    if (n > 100000) luaL_argerror(L, 1, "too many urls");
    lua_Integer conc = DEFAULT_CONCURRENCY;
    if (lua_getfield(L, 1, "concurrency") != LUA_TNIL) {
        int isint;
        conc = lua_tointegerx(L, -1, &isint);
        if (!isint || conc < 1) luaL_argerror(L, 1, "concurrency must be a whole number >= 1");
    }
    lua_pop(L, 1);
    opt_seconds(L, 1, "timeout", DEFAULT_TIMEOUT); /* checked before anything starts */
    opt_seconds(L, 1, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    for (int i = 1; i <= n; i++) check_url(L, urls, i);

    int slots = (int)(conc < n ? conc : n);
    batch *b = new_batch(L, slots);
    int bidx = lua_gettop(L);
    append_headers(L, &b->headers, 1);
    lua_createtable(L, (int)n, 0);
    int results = lua_gettop(L);
    int next = 0, active = 0;
    for (; next < slots; next++, active++) start_transfer(L, b, &b->t[next], urls, next);
    while (active > 0) {
        int running;
        curl_multi_perform(b->multi, &running);
        active = reap(L, b, results, urls, &next, (int)n, active);
        if (rb_interrupted()) {
            lua_pushcfunction(L, batch_close);
            lua_pushvalue(L, bidx);
            lua_call(L, 1, 0);
            return rb_error(L, "http", "check_all", "interrupted", 0, "check_all: interrupted");
        }
        if (active > 0 && running > 0) curl_multi_poll(b->multi, NULL, 0, 100, NULL);
    }
    lua_pushcfunction(L, batch_close);
    lua_pushvalue(L, bidx);
    lua_call(L, 1, 0);
    return 1; /* results */
}

/* ---- smtp_send: one mail over libcurl's SMTP ---------------------------- */

static size_t on_upload(char *buf, size_t size, size_t n, void *ud) {
    client *c = ud;
    size_t len = size * n;
    if (len > c->upload_left) len = c->upload_left;
    memcpy(buf, c->upload, len);
    c->upload += len;
    c->upload_left -= len;
    return len;
}

/* opts.to: a list of addresses, as the envelope's recipients. */
static void set_recipients(lua_State *L, client *c) {
    if (lua_getfield(L, 1, "to") != LUA_TTABLE || luaL_len(L, -1) == 0)
        luaL_argerror(L, 1, "to must be a non-empty list of addresses");
    for (lua_Integer i = 1, n = luaL_len(L, -1); i <= n; i++) {
        if (lua_rawgeti(L, -1, i) != LUA_TSTRING) luaL_argerror(L, 1, "to must list addresses as strings");
        const char *a = lua_tostring(L, -1);
        if (strpbrk(a, "\r\n<>")) luaL_argerror(L, 1, "an address in to contains a newline or <>");
        struct curl_slist *l = curl_slist_append(c->headers, a);
        lua_pop(L, 1);
        if (!l) luaL_error(L, "out of memory");
        c->headers = l;
    }
    lua_pop(L, 1);
    curl_easy_setopt(c->curl, CURLOPT_MAIL_RCPT, c->headers);
}

static void set_smtp_auth(lua_State *L, client *c) {
    const char *user = opt_string(L, 1, "username", NULL, NULL), *pw = opt_string(L, 1, "password", NULL, NULL);
    if (user) curl_easy_setopt(c->curl, CURLOPT_USERNAME, user);
    if (pw) {
        rb_secret_register(L, pw, strlen(pw));
        curl_easy_setopt(c->curl, CURLOPT_PASSWORD, pw);
    }
    const char *tls = opt_string(L, 1, "starttls", NULL, NULL);
    if (tls && strcmp(tls, "try") && strcmp(tls, "required"))
        luaL_argerror(L, 1, "starttls must be \"try\" or \"required\"");
    if (tls) curl_easy_setopt(c->curl, CURLOPT_USE_SSL, *tls == 't' ? (long)CURLUSESSL_TRY : (long)CURLUSESSL_ALL);
}

static int http_smtp_send(lua_State *L) {
    client *c = check_client(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    const char *url = opt_string(L, 1, "url", NULL, NULL);
    if (!url) luaL_argerror(L, 1, "url is required (smtp://host:port)");
    const char *from = opt_string(L, 1, "from", NULL, NULL);
    if (!from || strpbrk(from, "\r\n<>")) luaL_argerror(L, 1, "from must be an address");
    size_t len = 0;
    const char *message = opt_string(L, 1, "message", &len, NULL);
    if (!message) luaL_argerror(L, 1, "message is required");
    const char *safe_url = push_safe_url(L, url);

    scratch_free(c);
    curl_easy_reset(c->curl);
    c->errbuf[0] = '\0';
    curl_easy_setopt(c->curl, CURLOPT_URL, url);
    curl_easy_setopt(c->curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
    curl_easy_setopt(c->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c->curl, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(c->curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c->curl, CURLOPT_XFERINFOFUNCTION, on_progress);
    lua_pushfstring(L, "<%s>", from);
    curl_easy_setopt(c->curl, CURLOPT_MAIL_FROM, lua_tostring(L, -1)); /* copied by curl */
    lua_pop(L, 1);
    set_recipients(L, c);
    set_smtp_auth(L, c);
    c->limits = set_timeouts(L, c->curl);
    set_tls(L, c->curl);
    c->upload = message;
    c->upload_left = len;
    curl_easy_setopt(c->curl, CURLOPT_READFUNCTION, on_upload);
    curl_easy_setopt(c->curl, CURLOPT_READDATA, c);
    curl_easy_setopt(c->curl, CURLOPT_UPLOAD, 1L);

    lua_pushfstring(L, "send mail from %s (%d bytes) via %s", from, (int)len, safe_url);
    rb_effect e = {"smtp", "send", safe_url, lua_tostring(L, -1), 0};
    effect_override(L, &e);
    rb_decision d = rb_gate(L, &e);
    if (d == RB_SKIP) {
        scratch_free(c);
        return gate_skipped(L, &e);
    }
    CURLcode rc = curl_easy_perform(c->curl);
    c->upload = NULL;
    if (rc != CURLE_OK) {
        long reply = 0;
        curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &reply);
        const char *code;
        int retryable;
        curl_reason(rc, &code, &retryable);
        const char *msg = lua_pushfstring(L, "mail via %s: %s%s", safe_url,
            curl_why(L, c->curl, rc, c->errbuf, c->limits),
            reply ? lua_pushfstring(L, " (server replied %d)", (int)reply) : "");
        scratch_free(c);
        gate_failed(L, &e, d, msg);
        return rb_error(L, "smtp", "send", code, retryable, "%s", msg);
    }
    scratch_free(c);
    lua_pushliteral(L, "sent");
    rb_gate_done(L, &e, d, 1);
    lua_createtable(L, 0, 1);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "ok");
    return 1;
}

/* Pushes the module state: the client created closed, then opened, so its
 * finalizer is safe whatever happens in between. */
static client *new_client(lua_State *L) {
    client *c = lua_newuserdatauv(L, sizeof *c, 0);
    memset(c, 0, sizeof *c);
    rb_class(L, CLIENT_MT, NULL, client_close);
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
