/*
 * curl_glue.h: what the modules built on libcurl (http, k8s) share: the
 * growable buffer a response is written into, the write and progress
 * callbacks, and libcurl's error codes as stable names for runbooks.
 */
#ifndef RB_CURL_GLUE_H
#define RB_CURL_GLUE_H

#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <arpa/inet.h>
#include <curl/curl.h>
#include "runbook.h"
#include "net.h"

typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} buffer;

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

static void buffer_free(buffer *b) {
    free(b->data);
    *b = (buffer){0};
}

/* CURLOPT_WRITEFUNCTION with a buffer as CURLOPT_WRITEDATA. */
static size_t on_body(char *ptr, size_t size, size_t n, void *ud) {
    return buffer_add(ud, ptr, size * n);
}

/* Ctrl-C aborts a transfer in progress rather than waiting for its timeout. */
static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)ud; (void)dt; (void)dn; (void)ut; (void)un;
    return rb_interrupted() != 0;
}

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
    {CURLE_OPERATION_TIMEDOUT, "timeout", 1},
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
    {CURLE_LOGIN_DENIED, "login_denied", 0},
    {CURLE_USE_SSL_FAILED, "use_ssl_failed", 0},
    {CURLE_READ_ERROR, "read_error", 0},
};

/* Appends the parameters of the table at index t ({name = value}) to u's
 * query, name and value each escaped whole: nothing in them can start
 * another parameter, end the query or begin a fragment. Returns 0 when an
 * entry is not a string or number (the caller names the argument). */
static int url_add_query(lua_State *L, CURLU *u, int t) {
    for (lua_pushnil(L); lua_next(L, t); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING || (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)) {
            lua_pop(L, 2);
            return 0;
        }
        size_t klen, vlen;
        const char *k = lua_tolstring(L, -2, &klen), *v = lua_tolstring(L, -1, &vlen);
        char *ek = curl_easy_escape(NULL, k, (int)klen), *ev = curl_easy_escape(NULL, v, (int)vlen);
        const char *param = ek && ev ? lua_pushfstring(L, "%s=%s", ek, ev) : NULL;
        curl_free(ek);
        curl_free(ev);
        if (!param || curl_url_set(u, CURLUPART_QUERY, param, CURLU_APPENDQUERY) != CURLUE_OK)
            luaL_error(L, "out of memory");
        lua_pop(L, 1);
    }
    return 1;
}

/* The deadlines a transfer was given, in seconds, for its messages. */
typedef struct { double connect, total; } curl_limits;

/* Sets h's timeouts: `total` for the whole transfer and `connect` (never
 * above total) for connecting, the TLS handshake included. */
static curl_limits curl_set_limits(CURL *h, double total, double connect) {
    curl_limits lim = { connect < total ? connect : total, total };
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(lim.total * 1000) + 1);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(lim.connect * 1000) + 1);
    return lim;
}

/* Why a transfer failed, pushed on the stack: a timeout in the words every
 * module uses ("connect to HOST:PORT timed out after Ns" while connecting,
 * "timed out after Ns" later), curl's own text otherwise. curl says
 * "Operation timed out" only once connected. */
static const char *curl_why(lua_State *L, CURL *h, CURLcode rc, const char *errbuf, curl_limits lim) {
    if (rc != CURLE_OPERATION_TIMEDOUT) return lua_pushstring(L, errbuf[0] ? errbuf : curl_easy_strerror(rc));
    char secs[32];
    if (!strncmp(errbuf, "Operation timed out", 19)) {
        snprintf(secs, sizeof secs, "%.3g", lim.total);
        return lua_pushfstring(L, "timed out after %ss", secs);
    }
    snprintf(secs, sizeof secs, "%.3g", lim.connect);
    char *url = NULL, *host = NULL, *port = NULL;
    CURLU *u = curl_url();
    curl_easy_getinfo(h, CURLINFO_EFFECTIVE_URL, &url);
    if (u && url && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK) {
        curl_url_get(u, CURLUPART_HOST, &host, 0);
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
    }
    const char *why = lua_pushfstring(L, "connect to %s:%s timed out after %ss", host ? host : "?", port ? port : "?", secs);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return why;
}

/* libcurl's resolver thread cannot be cut short: a transfer ends at its
 * connect timeout, and curl then waits for the lookup to end by itself (the
 * resolver's own timeouts, seconds per try and server). So the URL's host
 * name is looked up first within `secs` (net_resolve) and its addresses are
 * handed to curl (CURLOPT_RESOLVE, appended to *pins; "+": cached no longer
 * than curl's own lookups). Not through a proxy from the environment, which
 * looks the name up itself. NULL, or why not (pushed) and *code. */
static inline const char *curl_pin_host(lua_State *L, CURL *h, CURLU *u, double secs, struct curl_slist **pins,
                                        const char **code) {
    static const char *const proxies[] = { "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", NULL };
    for (int i = 0; proxies[i]; i++)
        if (getenv(proxies[i]) && *getenv(proxies[i])) return NULL;
    char *host = NULL, *port = NULL;
    const char *why = NULL, *failed;
    unsigned char addr[16];
    struct addrinfo *list;
    if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK || host[0] == '[' ||
        inet_pton(AF_INET, host, addr) == 1) {
        /* no name to look up: an address, or a URL curl will refuse itself */
    } else if (net_resolve(host, port, rb_now() + secs, &list, &failed) != 0) {
        char s[32];
        snprintf(s, sizeof s, "%.3g", secs);
        *code = strstr(failed, "timed out") ? "timeout" : strcmp(failed, "interrupted") ? "couldnt_resolve_host" : "interrupted";
        why = *code[0] == 't' ? lua_pushfstring(L, "connect to %s:%s timed out after %ss (the name lookup did not answer)",
                                                host, port, s)
                              : lua_pushfstring(L, "%s %s", failed, host);
    } else {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        luaL_addstring(&b, "+");
        luaL_addstring(&b, host);
        luaL_addchar(&b, ':');
        luaL_addstring(&b, port);
        luaL_addchar(&b, ':');
        int n = 0;
        for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
            char a[INET6_ADDRSTRLEN];
            const void *src = ai->ai_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                                                         : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
            if (!inet_ntop(ai->ai_family, src, a, sizeof a)) continue;
            if (n++) luaL_addchar(&b, ',');
            lua_pushfstring(L, ai->ai_family == AF_INET6 ? "[%s]" : "%s", a);
            luaL_addvalue(&b);
        }
        freeaddrinfo(list);
        luaL_pushresult(&b);
        struct curl_slist *l = n ? curl_slist_append(*pins, lua_tostring(L, -1)) : NULL;
        lua_pop(L, 1);
        if (l) *pins = l, curl_easy_setopt(h, CURLOPT_RESOLVE, l);
    }
    curl_free(host);
    curl_free(port);
    return why;
}

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

#endif
