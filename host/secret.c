/*
 * secret.c: the registry of values that must never reach any output.
 *
 * A registered value is stored with the forms it takes once encoded: JSON
 * string escaping (cjson's, which writes / as \/, and the plain one),
 * percent-encoding (upper- and lower-case hex, and + for spaces), and base64
 * (padded, unpadded, URL-safe, and the characters it makes inside a longer
 * base64 text at each of the three byte alignments), plus those encodings of
 * the base64 forms (a Secret's data in JSON). Output is redacted on raw values
 * before any encoding (rb_push_redacted_value); the derived forms catch a value
 * that was encoded before it reached an output.
 *
 * Every output line passes through find_match, so patterns are indexed by
 * their first two bytes: a position whose pair starts no pattern costs one
 * bit test. Registration happens on the Lua thread only; library threads
 * (librdkafka's log callback) read under the lock, which registration holds
 * while it changes the index.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lauxlib.h>
#include <nettle/base64.h>
#include "host.h"

#define MIN_SECRET 4      /* shorter values would redact ordinary text */
#define MIN_B64_CORE 8    /* shorter pieces of a base64 text are too common to redact */
#define MAX_DEPTH 200     /* rb_push_redacted_value: deeper tables are replaced, not copied */

typedef struct { char *s; size_t len; } pattern;
typedef struct { uint32_t *idx; uint32_t n; } bucket;   /* longest pattern first */

static pattern *pats;
static uint32_t npats, cappats;
static bucket *buckets;                 /* 65536, by the pattern's first two bytes */
static uint8_t present[65536 / 8];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned pair(const char *s) { return (unsigned)(uint8_t)s[0] << 8 | (uint8_t)s[1]; }

static int known(const char *s, size_t len)
{
    if (!buckets) return 0;
    bucket *b = &buckets[pair(s)];
    for (uint32_t i = 0; i < b->n; i++)
        if (pats[b->idx[i]].len == len && memcmp(pats[b->idx[i]].s, s, len) == 0)
            return 1;
    return 0;
}

/* Add one pattern (a copy of s) to the index; out of memory, it is dropped. */
static void add_pattern(const char *s, size_t len)
{
    if (len < MIN_SECRET || known(s, len)) return;
    if (!buckets && !(buckets = calloc(65536, sizeof *buckets))) return;
    if (npats == cappats) {
        uint32_t cap = cappats ? cappats * 2 : 64;
        pattern *p = realloc(pats, cap * sizeof *p);
        if (!p) return;
        pats = p;
        cappats = cap;
    }
    bucket *b = &buckets[pair(s)];
    uint32_t *idx = realloc(b->idx, (b->n + 1) * sizeof *idx);
    char *copy = malloc(len);
    if (!idx || !copy) { free(copy); if (idx) b->idx = idx; return; }
    memcpy(copy, s, len);
    b->idx = idx;
    uint32_t at = b->n;
    while (at > 0 && pats[idx[at - 1]].len < len) { idx[at] = idx[at - 1]; at--; }
    idx[at] = npats;
    b->n++;
    pats[npats++] = (pattern){ copy, len };
    present[pair(s) >> 3] |= (uint8_t)(1u << (pair(s) & 7));
}

/* ---- derived forms ----------------------------------------------------- */

typedef struct { char *s; size_t len, cap; } text;

static void put(text *t, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = (t->len + n + 1) * 2;
        char *p = realloc(t->s, cap);
        if (!p) return;
        t->s = p;
        t->cap = cap;
    }
    memcpy(t->s + t->len, s, n);
    t->len += n;
}

/* JSON string escaping as lua-cjson writes it; slash = 0 for encoders that leave / alone. */
static void json_escape(text *t, const char *s, size_t len, int slash)
{
    for (size_t i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        char esc[8];
        const char *e = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '/' && slash ? "\\/" : c == '\n' ? "\\n"
            : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
        if (!e && (c < 0x20 || c == 0x7f)) { snprintf(esc, sizeof esc, "\\u%04x", c); e = esc; }
        if (e) put(t, e, strlen(e)); else put(t, s + i, 1);
    }
}

/* Percent-encoding of everything but RFC 3986's unreserved characters. */
static void url_escape(text *t, const char *s, size_t len, const char *hex, int plus)
{
    for (size_t i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("-._~", c))) {
            put(t, s + i, 1);
        } else if (c == ' ' && plus) {
            put(t, "+", 1);
        } else {
            char e[3] = { '%', hex[c >> 4], hex[c & 15] };
            put(t, e, 3);
        }
    }
}

/* A form as it is, JSON-escaped and percent-encoded. */
static void add_encodings(const char *s, size_t len)
{
    add_pattern(s, len);
    for (int v = 0; v < 5; v++) {
        text t = { 0 };
        if (v < 2) json_escape(&t, s, len, v == 0);
        else url_escape(&t, s, len, v == 3 ? "0123456789abcdef" : "0123456789ABCDEF", v == 4);
        if (t.s) add_pattern(t.s, t.len);
        free(t.s);
    }
}

static void add_urlsafe(char *b64, size_t len)
{
    add_encodings(b64, len);
    for (size_t i = 0; i < len; i++)
        b64[i] = b64[i] == '+' ? '-' : b64[i] == '/' ? '_' : b64[i];
    add_encodings(b64, len);
}

/*
 * The base64 forms: the value encoded alone (with and without padding), and,
 * for a value that starts k = 0, 1 or 2 bytes into a longer text, the
 * characters that depend on the value's bytes only.
 */
static void add_base64(const char *value, size_t len)
{
    size_t n = len + 2;
    uint8_t *in = malloc(n);
    char *out = malloc(BASE64_ENCODE_RAW_LENGTH(n) + 1);
    if (!in || !out) { free(in); free(out); return; }
    for (size_t k = 0; k < 3; k++) {
        memset(in, 0, k);
        memcpy(in + k, value, len);
        size_t bits = (k + len) * 8, pure = bits / 6;          /* characters of these bytes only */
        if (k == 0) {                                          /* the value alone, padded and not */
            base64_encode_raw(out, len, in);
            add_urlsafe(out, BASE64_ENCODE_RAW_LENGTH(len));
            base64_encode_raw(out, len, in);
            add_urlsafe(out, pure + (bits % 6 != 0));
        }
        base64_encode_raw(out, k + len, in);
        size_t skip = k == 0 ? 0 : k == 1 ? 2 : 3;             /* characters mixing in the bytes before */
        if (pure > skip && pure - skip >= MIN_B64_CORE) add_urlsafe(out + skip, pure - skip);
    }
    free(in);
    free(out);
}

void rb_secret_register(lua_State *L, const char *value, size_t len)
{
    (void)L;
    if (value == NULL || len < MIN_SECRET || known(value, len))
        return;
    pthread_mutex_lock(&lock);
    add_encodings(value, len);
    add_base64(value, len);
    pthread_mutex_unlock(&lock);
}

/* ---- matching ---------------------------------------------------------- */

/* The first registered form in s[0..len) (longest at its position), or NULL. */
static const char *find_match(const char *s, size_t len, size_t *mlen)
{
    if (npats == 0 || len < MIN_SECRET) return NULL;
    for (size_t i = 0; i + MIN_SECRET <= len; i++) {
        unsigned p = pair(s + i);
        if (!(present[p >> 3] & (1u << (p & 7)))) continue;
        bucket *b = &buckets[p];
        for (uint32_t j = 0; j < b->n; j++) {
            pattern *pt = &pats[b->idx[j]];
            if (pt->len <= len - i && memcmp(pt->s, s + i, pt->len) == 0) {
                *mlen = pt->len;
                return s + i;
            }
        }
    }
    return NULL;
}

/* Calls emit(piece) for s with each match replaced by "***". */
static void redact(const char *s, size_t len, void (*emit)(void *, const char *, size_t), void *arg)
{
    size_t m;
    const char *p;
    while ((p = find_match(s, len, &m)) != NULL) {
        emit(arg, s, (size_t)(p - s));
        emit(arg, "***", 3);
        len -= (size_t)(p - s) + m;
        s = p + m;
    }
    emit(arg, s, len);
}

static void to_buffer(void *b, const char *s, size_t n) { luaL_addlstring(b, s, n); }

void rb_push_redacted(lua_State *L, const char *s, size_t len)
{
    size_t m;
    if (!find_match(s, len, &m)) {
        lua_pushlstring(L, s, len);
        return;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    redact(s, len, to_buffer, &b);
    luaL_pushresult(&b);
}

static void to_file(void *f, const char *s, size_t n) { fwrite(s, 1, n, f); }

void rb_write_redacted(FILE *f, const char *s, size_t len)
{
    pthread_mutex_lock(&lock);
    redact(s, len, to_file, f);
    pthread_mutex_unlock(&lock);
    fflush(f);
}

/* Push a copy of the value at idx with every string in it (keys too) redacted. */
static void push_value(lua_State *L, int idx, int depth)
{
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len, m;
        const char *s = lua_tolstring(L, idx, &len);
        if (find_match(s, len, &m)) rb_push_redacted(L, s, len);
        else lua_pushvalue(L, idx);
        return;
    }
    if (lua_type(L, idx) != LUA_TTABLE) { lua_pushvalue(L, idx); return; }
    if (depth > MAX_DEPTH) { lua_pushliteral(L, "(nested too deep)"); return; }
    luaL_checkstack(L, 4, "redacting a nested value");
    lua_newtable(L);
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        push_value(L, -2, depth + 1);
        push_value(L, -2, depth + 1);
        lua_rawset(L, -5);
    }
    /* Keep cjson's array marks; not a finalizer, which would then run on the copy too. */
    if (lua_getmetatable(L, idx)) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, -2) == LUA_TNIL) { lua_pop(L, 1); lua_setmetatable(L, -2); }
        else lua_pop(L, 2);
    }
}

void rb_push_redacted_value(lua_State *L, int idx)
{
    if (npats == 0) lua_pushvalue(L, idx);
    else push_value(L, idx, 0);
}

/* ---- credentials in the environment ------------------------------------ */

static int unhex(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A credential as written in a URL and percent-decoded. */
static void register_encoded(const char *pw, size_t n)
{
    rb_secret_register(NULL, pw, n);
    text t = { 0 };
    for (size_t i = 0; i < n; i++) {
        if (pw[i] == '%' && i + 2 < n && unhex(pw[i + 1]) >= 0 && unhex(pw[i + 2]) >= 0) {
            char c = (char)(unhex(pw[i + 1]) << 4 | unhex(pw[i + 2]));
            put(&t, &c, 1);
            i += 2;
        } else {
            put(&t, pw + i, 1);
        }
    }
    if (t.s) rb_secret_register(NULL, t.s, t.len);
    free(t.s);
}

/* Every scheme://user:password@host in a list separated by commas or
 * spaces, and a password= in a URL's query (libpq takes one there). */
static void register_urls(const char *v)
{
    for (const char *p = strstr(v, "://"); p; p = strstr(p, "://")) {
        p += 3;
        size_t auth = strcspn(p, "/?#, ");
        const char *at = NULL;
        for (size_t i = 0; i < auth; i++) if (p[i] == '@') at = p + i;
        const char *colon = at ? memchr(p, ':', (size_t)(at - p)) : NULL;
        if (colon) register_encoded(colon + 1, (size_t)(at - colon - 1));
    }
    const char *query = strchr(v, '?');
    for (const char *p = query ? strstr(query, "password=") : NULL; p; p = strstr(p + 1, "password="))
        register_encoded(p + 9, strcspn(p + 9, "&#, "));
}

/* libpq's key=value form: password=secret or password='se cret'. */
static void register_conninfo_password(const char *v)
{
    for (const char *p = strstr(v, "password"); p; p = strstr(p + 1, "password")) {
        const char *q = p + 8;
        while (*q == ' ') q++;
        if (*q++ != '=') continue;
        while (*q == ' ') q++;
        text t = { 0 };
        if (*q == '\'') {
            for (q++; *q && *q != '\''; q++) {
                if (*q == '\\' && q[1]) q++;
                put(&t, q, 1);
            }
        } else {
            put(&t, q, strcspn(q, " "));
        }
        if (t.s) rb_secret_register(NULL, t.s, t.len);
        free(t.s);
    }
}

/*
 * The credentials the program reads from its environment, registered at
 * start-up so a runbook that prints a variable before connecting prints no
 * password: URLs' userinfo passwords, and tokens given whole.
 */
void rb_secret_register_env(void)
{
    static const char *const urls[] = { "DATABASE_URL", "REDIS_URL", "KAFKA_BROKERS",
        "PROMETHEUS_URL", "ALERTMANAGER_URL", "RUNBOOK_PUSHGATEWAY", "DAPR_HTTP_ENDPOINT", NULL };
    static const char *const whole[] = { "PGPASSWORD", "DAPR_API_TOKEN", NULL };   /* libpq, dapr.lua */
    for (int i = 0; urls[i]; i++) {
        const char *v = getenv(urls[i]);
        if (v) register_urls(v);
    }
    const char *db = getenv("DATABASE_URL");
    if (db && !strstr(db, "://")) register_conninfo_password(db);
    for (int i = 0; whole[i]; i++) {
        const char *v = getenv(whole[i]);
        if (v) rb_secret_register(NULL, v, strlen(v));
    }
}
