/*
 * redis.c: Redis over hiredis.
 *
 *   connect(url, opts) -> conn        redis://[user:password@]host[:port][/db]
 *     opts.connect_timeout  seconds (default 10), never beyond the step's deadline
 *     opts.timeout          seconds per command (default 30), bounded by the step
 *   set_null(null)                    the sentinel for nil inside arrays (from redis.lua)
 *   methods                           the conn methods table (redis.lua adds to it)
 *   pipeline(conn, cmds)              conn:pipeline, kept apart from the methods
 *                                     table, whose pipeline redis.lua replaces
 *
 *   conn:command(name, args...) -> reply    any command; writes go through the gate
 *   conn:pipeline({{name, args...}, ...}) -> {replies}   one round trip
 *   conn:is_write(name, args...) -> boolean  the gate's classification (below)
 *   conn:close()                            also __close and __gc
 *
 * Replies convert: bulk and status strings to strings, integers to integers,
 * arrays to tables (nil inside them as the null sentinel), nil to nil; error
 * replies raise with the error's first word as the code ("WRONGTYPE").
 *
 * Commands are classified by the server's own metadata (see
 * "classification" below). A dry run reports writes and does not send them
 * (Redis has no rollback).
 *
 * rediss:// is TLS (OpenSSL): the server's certificate is verified against
 * opts.ca_file, else the system's store (SSL_CERT_FILE / SSL_CERT_DIR), and
 * must name the host (or its IP address). Debian's hiredis (0.14) has no TLS,
 * so the connection is this file's own socket, plain or TLS, with hiredis
 * formatting the commands (redisFormatCommandArgv) and parsing the replies
 * (redisReader): one code path for both. Every send, read and handshake waits
 * at most the step's remaining time. A connection that failed (timeout,
 * server gone) is reopened on the next command.
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <lua.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "module.h"
#include "net.h"

#define CONN_MT "runbook.redis.conn"
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_TIMEOUT 30.0
#define REG_NULL "runbook.redis.null"
#define MAX_ARGS 1000000

typedef struct {
    int fd;                  /* -1 while not connected */
    SSL *ssl;                /* rediss:// only */
    SSL_CTX *tls;            /* rediss://: kept for reconnects */
    redisReader *reader;
    redisReply *reply;       /* being converted; freed by the next call or the finalizer */
    const char **argv;       /* scratch for one command */
    size_t *argvlen;
    int argcap;
    char *out;               /* formatted commands waiting to be sent */
    size_t outlen, outcap;
    char *host, *user, *password, *ca_file;
    int port, db, use_tls;
    double connect_timeout, timeout;
    double limit;            /* seconds the exchange in progress was given */
    int connecting;          /* that exchange opens the connection */
    const char *err_code;    /* the last I/O failure: code and message */
    char err[256];
    int closed;
} conn;

/* ---- handle ------------------------------------------------------------- */

static void scratch_free(conn *c) {
    if (c->reply) freeReplyObject(c->reply);
    c->reply = NULL;
}

static void drop_connection(conn *c) {
    if (c->ssl) SSL_free(c->ssl);
    if (c->fd >= 0) close(c->fd);
    if (c->reader) redisReaderFree(c->reader);
    c->ssl = NULL, c->fd = -1, c->reader = NULL, c->outlen = 0;
}

/* Idempotent: serves __gc, __close and close(). */
static int conn_close(lua_State *L) {
    conn *c = luaL_checkudata(L, 1, CONN_MT);
    scratch_free(c);
    drop_connection(c);
    if (c->tls) SSL_CTX_free(c->tls);
    free(c->argv), free(c->argvlen), free(c->out), free(c->host), free(c->user), free(c->password), free(c->ca_file);
    c->argv = NULL, c->argvlen = NULL, c->out = NULL, c->host = c->user = c->password = c->ca_file = NULL;
    c->tls = NULL, c->argcap = 0, c->outcap = 0;
    c->closed = 1;
    return 0;
}

static conn *check_conn(lua_State *L, int i) {
    conn *c = luaL_checkudata(L, i, CONN_MT);
    if (c->closed) luaL_error(L, "redis connection is closed");
    scratch_free(c);
    c->outlen = 0; /* nothing left over from a call an error cut short */
    return c;
}

/* ---- errors ------------------------------------------------------------- */

/* Records an I/O failure (code and message) for raise_io; returns the message. */
static const char *fail(conn *c, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    c->err_code = code;
    return c->err;
}

/* A wait that ended without the socket being ready; `what` was awaited
 * (NULL: the TCP connect itself). */
static const char *wait_failed(conn *c, const char *what) {
    if (rb_interrupted()) return fail(c, "interrupted", "%s: interrupted", what ? what : "connecting");
    if (c->connecting)
        return fail(c, "timeout", "connect to %s:%d timed out after %.3gs%s%s%s", c->host, c->port, c->limit,
                    what ? " (" : "", what ? what : "", what ? ")" : "");
    return fail(c, "timeout", "%s: timed out after %.3gs", what, c->limit);
}

/* OpenSSL's reason for a failed TLS call, with the certificate check's when it failed. */
static const char *tls_failed(conn *c, const char *what, int ret) {
    long v = c->ssl ? SSL_get_verify_result(c->ssl) : X509_V_OK;
    if (v != X509_V_OK)
        return fail(c, "tls_verify", "%s: certificate verify failed: %s", what, X509_verify_cert_error_string(v));
    unsigned long e = ERR_get_error();
    if (e) {
        char buf[200];
        ERR_error_string_n(e, buf, sizeof buf);
        ERR_clear_error();
        return fail(c, "tls_error", "%s: %s", what, buf);
    }
    if (ret == 0 || errno == 0) return fail(c, "connection_closed", "%s: the server closed the connection", what);
    return fail(c, "io_error", "%s: %s", what, strerror(errno));
}

/* The connection is dropped (the next command reopens it), then the failure raised. */
static int raise_io(lua_State *L, conn *c, const char *op) {
    const char *code = c->err_code ? c->err_code : "io_error";
    int retryable = strcmp(code, "tls_verify") && strcmp(code, "tls_error") && strcmp(code, "protocol_error") &&
                    strcmp(code, "interrupted");
    if (!strncmp(c->err, "connect to ", 11)) lua_pushstring(L, c->err); /* names the server already */
    else lua_pushfstring(L, "%s://%s:%d: %s", c->use_tls ? "rediss" : "redis", c->host, c->port, c->err);
    drop_connection(c);
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

/* redis[s]://[user[:password]@]host[:port][/db]; returns an error message or NULL. */
static const char *parse_url(lua_State *L, conn *c, const char *url) {
    c->use_tls = strncmp(url, "rediss://", 9) == 0;
    if (!c->use_tls && strncmp(url, "redis://", 8) != 0)
        return "expected a redis://[user:password@]host[:port][/db] or rediss:// (TLS) URL";
    const char *p = url + (c->use_tls ? 9 : 8), *end = p + strcspn(p, "/?#");
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

/* ---- transport: a socket, TLS or not, hiredis's writer and reader -------- */

/* Appends one command in RESP to the send buffer. */
static void format_command(lua_State *L, conn *c, int argc, const char **argv, const size_t *lens) {
    char *cmd;
    int n = redisFormatCommandArgv(&cmd, argc, argv, lens);
    if (n < 0) luaL_error(L, "out of memory");
    if (c->outlen + (size_t)n > c->outcap) {
        size_t cap = c->outcap ? c->outcap : 4096;
        while (cap < c->outlen + (size_t)n) cap *= 2;
        char *o = realloc(c->out, cap);
        if (!o) free(cmd), luaL_error(L, "out of memory");
        c->out = o, c->outcap = cap;
    }
    memcpy(c->out + c->outlen, cmd, (size_t)n);
    c->outlen += (size_t)n;
    free(cmd);
}

/* Sends the send buffer; NULL or why not. A peer that went away is an error,
 * never a SIGPIPE (ignored while OpenSSL writes; MSG_NOSIGNAL otherwise). */
static const char *flush_out(conn *c, double end) {
    size_t off = 0;
    const char *why = NULL;
    struct sigaction ign = {0}, old;
    ign.sa_handler = SIG_IGN;
    if (c->ssl) sigaction(SIGPIPE, &ign, &old);
    while (off < c->outlen && !why) {
        short want = POLLOUT;
        if (c->ssl) {
            ERR_clear_error();
            size_t chunk = c->outlen - off < 1 << 30 ? c->outlen - off : 1 << 30;
            int r = SSL_write(c->ssl, c->out + off, (int)chunk);
            if (r > 0) { off += (size_t)r; continue; }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) want = POLLIN;
            else if (e != SSL_ERROR_WANT_WRITE) { why = tls_failed(c, "sending", r); break; }
        } else {
            ssize_t r = send(c->fd, c->out + off, c->outlen - off, MSG_NOSIGNAL);
            if (r > 0) { off += (size_t)r; continue; }
            if (r < 0 && errno != EAGAIN && errno != EINTR) {
                why = fail(c, errno == EPIPE || errno == ECONNRESET ? "connection_closed" : "io_error", "sending: %s",
                           strerror(errno));
                break;
            }
        }
        if (!net_wait(c->fd, want, end)) why = wait_failed(c, "sending");
    }
    if (c->ssl) sigaction(SIGPIPE, &old, NULL);
    c->outlen = 0;
    return why;
}

/* Reads what the server sent into the reader; NULL or why not. */
static const char *read_more(conn *c, double end) {
    char buf[16384];
    for (;;) {
        short want = POLLIN;
        if (c->ssl) {
            ERR_clear_error();
            int r = SSL_read(c->ssl, buf, sizeof buf);
            if (r > 0) return redisReaderFeed(c->reader, buf, (size_t)r), NULL;
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_ZERO_RETURN) return fail(c, "connection_closed", "reading: the server closed the connection");
            if (e == SSL_ERROR_WANT_WRITE) want = POLLOUT;
            else if (e != SSL_ERROR_WANT_READ) return tls_failed(c, "reading", r);
        } else {
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r > 0) return redisReaderFeed(c->reader, buf, (size_t)r), NULL;
            if (r == 0) return fail(c, "connection_closed", "reading: the server closed the connection");
            if (errno != EAGAIN && errno != EINTR)
                return fail(c, errno == ECONNRESET ? "connection_closed" : "io_error", "reading: %s", strerror(errno));
        }
        if (!net_wait(c->fd, want, end)) return wait_failed(c, "waiting for the reply");
    }
}

/* The next reply into c->reply; NULL or why not. */
static const char *read_reply(conn *c, double end) {
    for (;;) {
        void *r = NULL;
        if (redisReaderGetReply(c->reader, &r) != REDIS_OK)
            return fail(c, "protocol_error", "reading: %s", c->reader->errstr);
        if (r) return c->reply = r, NULL;
        const char *why = read_more(c, end);
        if (why) return why;
    }
}

/* The deadline for one exchange: the command timeout, bounded by the step. */
static double deadline(lua_State *L, conn *c, double secs, int connecting) {
    c->limit = rb_remaining(L, secs);
    c->connecting = connecting;
    return rb_now() + c->limit;
}

/* The TLS handshake on the connected socket, verifying the server's
 * certificate and that it names the host; NULL or why not. */
static const char *tls_handshake(conn *c, double end) {
    if (!c->tls) {
        if (!(c->tls = SSL_CTX_new(TLS_client_method()))) return tls_failed(c, "TLS setup", -1);
        SSL_CTX_set_min_proto_version(c->tls, TLS1_2_VERSION);
        SSL_CTX_set_verify(c->tls, SSL_VERIFY_PEER, NULL);
        int ok = c->ca_file ? SSL_CTX_load_verify_locations(c->tls, c->ca_file, NULL)
                            : SSL_CTX_set_default_verify_paths(c->tls);
        if (ok != 1) {
            const char *why = tls_failed(c, c->ca_file ? c->ca_file : "the system's CA certificates", -1);
            SSL_CTX_free(c->tls);
            c->tls = NULL;
            return why;
        }
    }
    if (!(c->ssl = SSL_new(c->tls)) || !SSL_set_fd(c->ssl, c->fd)) return tls_failed(c, "TLS setup", -1);
    unsigned char ip[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, c->host, ip) == 1 || inet_pton(AF_INET6, c->host, ip) == 1) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), c->host);
    } else {
        SSL_set_tlsext_host_name(c->ssl, c->host);
        SSL_set1_host(c->ssl, c->host);
    }
    for (;;) {
        ERR_clear_error();
        int r = SSL_connect(c->ssl);
        if (r == 1) return NULL;
        int e = SSL_get_error(c->ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) return tls_failed(c, "TLS handshake", r);
        if (!net_wait(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, end)) return wait_failed(c, "TLS handshake");
    }
}

/* One command during connection setup; raises on failure. */
static void setup_command(lua_State *L, conn *c, int argc, const char **argv, double end) {
    size_t lens[3];
    for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
    scratch_free(c);
    format_command(L, c, argc, argv, lens);
    if (flush_out(c, end) || read_reply(c, end)) raise_io(L, c, "connect");
    if (c->reply->type == REDIS_REPLY_ERROR) {
        lua_pushstring(L, c->reply->str);
        drop_connection(c);
        raise_reply(L, "connect", argv[0], lua_tostring(L, -1));
    }
    scratch_free(c);
}

/* Opens (or reopens) the connection: TCP, TLS for rediss://, AUTH, SELECT, a client name. */
static void open_connection(lua_State *L, conn *c) {
    double end = deadline(L, c, c->connect_timeout, 1);
    char port[8];
    snprintf(port, sizeof port, "%d", c->port);
    const char *why = NULL;
    c->fd = net_connect(c->host, port, end, &why);
    if (c->fd < 0) {
        if (strstr(why, "timed out")) wait_failed(c, NULL);
        else fail(c, strstr(why, "refused") ? "connection_refused" : !strcmp(why, "interrupted") ? "interrupted"
                  : "io_error", "connecting: %s", why);
        raise_io(L, c, "connect");
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    if (!(c->reader = redisReaderCreate())) luaL_error(L, "out of memory");
    if (c->use_tls && tls_handshake(c, end)) raise_io(L, c, "connect");
    if (c->password) {
        const char *argv[3] = { "AUTH", c->user ? c->user : c->password, c->password };
        setup_command(L, c, c->user ? 3 : 2, argv, end);
    }
    if (c->db) {
        char db[16];
        snprintf(db, sizeof db, "%d", c->db);
        const char *argv[2] = { "SELECT", db };
        setup_command(L, c, 2, argv, end);
    }
    const char *argv[3] = { "CLIENT", "SETNAME", "runbook" };
    setup_command(L, c, 3, argv, end);
}

static int redis_connect(lua_State *L) {
    const char *url = luaL_checkstring(L, 1);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    conn *c = lua_newuserdatauv(L, sizeof *c, 1);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, CONN_MT);
    lua_newtable(L);   /* what the server said about each command */
    lua_setiuservalue(L, -2, 1);
    c->fd = -1;
    c->connect_timeout = opt_seconds(L, 2, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    c->timeout = opt_seconds(L, 2, "timeout", DEFAULT_TIMEOUT);
    if (!lua_isnoneornil(L, 2) && lua_getfield(L, 2, "ca_file") != LUA_TNIL) {
        if (!(c->ca_file = strdup(luaL_checkstring(L, -1)))) return luaL_error(L, "out of memory");
    }
    register_raw_password(L, url);
    const char *bad = parse_url(L, c, url);
    if (bad) return rb_error(L, "redis", "connect", "invalid_url", 0, "%s: %s", url, bad);
    lua_settop(L, 3);
    open_connection(L, c);
    return 1;
}

/* Reopens the connection if a failure dropped it. */
static void ready(lua_State *L, conn *c) {
    if (c->fd < 0) open_connection(L, c);
}

/* ---- classification -----------------------------------------------------
 *
 * The server says what a command does: COMMAND INFO reports its flags, and
 * for a container (ACL, CLIENT, CONFIG, OBJECT, SCRIPT...) each subcommand's.
 * A command or subcommand flagged readonly (and not write) is a read; so is
 * one of the introspection subcommands below, which Redis flags neither way
 * (ACL LOG only with a count: ACL LOG RESET clears it). Everything else is a
 * write: scripts (EVAL, FCALL; not EVAL_RO), MULTI and EXEC, PUBLISH, CLIENT
 * KILL, CONFIG SET, DEBUG, MODULE LOAD, SCRIPT FLUSH, and every command the
 * server does not know. The answers are cached per connection (its user
 * value), by lower-case name: "r" read, "w" write, "c" container.
 */

/* Reads Redis flags neither readonly nor write, by the server's own names. Sorted. */
static const char *const introspection[] = {
    "acl|cat", "acl|dryrun", "acl|getuser", "acl|help", "acl|list", "acl|log", "acl|users", "acl|whoami",
    "client|getname", "client|getredir", "client|help", "client|id", "client|info", "client|list",
    "client|trackinginfo", "cluster|countkeysinslot", "cluster|getkeysinslot", "cluster|help", "cluster|info",
    "cluster|keyslot", "cluster|links", "cluster|myid", "cluster|nodes", "cluster|replicas", "cluster|shards",
    "cluster|slaves", "cluster|slots", "command", "command|count", "command|docs", "command|getkeys",
    "command|getkeysandflags", "command|help", "command|info", "command|list", "config|get", "config|help", "echo",
    "function|dump", "function|help", "function|list", "function|stats", "info", "lastsave", "latency|doctor",
    "latency|graph", "latency|help", "latency|histogram", "latency|history", "latency|latest", "memory|doctor",
    "memory|help", "memory|malloc-stats", "memory|stats", "module|help", "module|list", "object|help", "ping",
    "pubsub|channels", "pubsub|help", "pubsub|numpat", "pubsub|numsub", "pubsub|shardchannels",
    "pubsub|shardnumsub", "role", "script|exists", "script|help", "slowlog|get", "slowlog|help", "slowlog|len",
    "time", "xgroup|help", "xinfo|help",
};

static int cmp_name(const void *a, const void *b) { return strcmp(a, *(const char *const *)b); }

/* "r" or "w" from one COMMAND INFO entry's flags. */
static const char *kind_of(const redisReply *info) {
    int ro = 0, rw = 0;
    if (info->type != REDIS_REPLY_ARRAY || info->elements < 3 || info->element[2]->type != REDIS_REPLY_ARRAY) return "w";
    const redisReply *flags = info->element[2];
    for (size_t i = 0; i < flags->elements; i++) {
        const char *f = flags->element[i]->str;
        if (!f) continue;
        ro |= strcmp(f, "readonly") == 0;
        rw |= strcmp(f, "write") == 0;
    }
    return ro && !rw ? "r" : "w";
}

/* Asks the server about `name` (lower case) and caches the answer in the
 * table at the top of the stack: "?" when the server does not know it. */
static void learn(lua_State *L, conn *c, const char *name) {
    ready(L, c);
    double end = deadline(L, c, c->timeout, 0);
    const char *argv[3] = { "COMMAND", "INFO", name };
    size_t lens[3] = { 7, 4, strlen(name) };
    scratch_free(c);
    c->outlen = 0;
    format_command(L, c, 3, argv, lens);
    if (flush_out(c, end) || read_reply(c, end)) raise_io(L, c, "command");
    const redisReply *r = c->reply;
    const redisReply *info = r->type == REDIS_REPLY_ARRAY && r->elements == 1 ? r->element[0] : NULL;
    if (!info || info->type != REDIS_REPLY_ARRAY) {
        lua_pushliteral(L, "?");
        lua_setfield(L, -2, name);
        scratch_free(c);
        return;
    }
    const redisReply *subs = info->elements > 9 ? info->element[9] : NULL;
    if (subs && subs->type == REDIS_REPLY_ARRAY && subs->elements > 0) {
        for (size_t i = 0; i < subs->elements; i++) {
            const redisReply *sub = subs->element[i];
            if (sub->type != REDIS_REPLY_ARRAY || sub->elements < 1 || !sub->element[0]->str) continue;
            lua_pushstring(L, kind_of(sub));
            lua_setfield(L, -2, sub->element[0]->str);
        }
        lua_pushliteral(L, "c");
    } else {
        lua_pushstring(L, kind_of(info));
    }
    lua_setfield(L, -2, name);
    scratch_free(c);
}

static const char *push_lower(lua_State *L, const char *s, size_t len) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < len; i++) luaL_addchar(&b, (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]));
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

/* Whether the command in c->argv[0..argc) writes, as the server describes it.
 * The connection is at stack index 1. */
static int is_write(lua_State *L, conn *c, int argc) {
    int top = lua_gettop(L);
    const char *name = push_lower(L, c->argv[0], c->argvlen[0]);
    if (strlen(name) != c->argvlen[0] || strchr(name, '|')) return lua_settop(L, top), 1;
    lua_getiuservalue(L, 1, 1);
    if (lua_getfield(L, -1, name) == LUA_TNIL) {
        lua_pop(L, 1);
        learn(L, c, name);
        lua_getfield(L, -1, name);
    }
    const char *full = name, *kind = lua_tostring(L, -1);
    if (kind[0] == 'c' && argc > 1) {
        lua_pushfstring(L, "%s|", name);
        push_lower(L, c->argv[1], c->argvlen[1]);
        lua_concat(L, 2);
        full = lua_tostring(L, -1);
        lua_getfield(L, -3, full);
        kind = lua_isstring(L, -1) ? lua_tostring(L, -1) : "?";
    }
    int read = kind[0] == 'r' ||
               (kind[0] != '?' && bsearch(full, introspection, sizeof introspection / sizeof *introspection,
                                          sizeof *introspection, cmp_name) &&
                (strcmp(full, "acl|log") != 0 || argc == 2 ||
                 (argc == 3 && strspn(c->argv[2], "0123456789") == c->argvlen[2] && c->argvlen[2] > 0)));
    lua_settop(L, top);
    return !read;
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

static int conn_command(lua_State *L) {
    conn *c = check_conn(L, 1);
    int argc = collect_args(L, c, 2, lua_gettop(L));
    int write = is_write(L, c, argc);
    rb_effect e;
    rb_decision d = RB_PERFORM;
    if (write) {
        e = effect_of(L, c, argc);
        if ((d = rb_gate(L, &e)) == RB_SKIP) return gate_skipped(L, &e);
    }
    ready(L, c);
    double end = deadline(L, c, c->timeout, 0);
    format_command(L, c, argc, c->argv, c->argvlen);
    if (flush_out(c, end) || read_reply(c, end)) {
        if (write) gate_failed(L, &e, d, c->err);
        lua_pushfstring(L, "%s: %s", c->argv[0], c->err);
        fail(c, c->err_code, "%s", lua_tostring(L, -1));
        return raise_io(L, c, "command");
    }
    if (c->reply->type == REDIS_REPLY_ERROR) {
        if (write) gate_failed(L, &e, d, c->reply->str);
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

/* Pipeline command i (of the table at index 2) into c->argv, its arguments
 * left on the stack; returns argc. */
static int pipeline_command(lua_State *L, conn *c, int i) {
    int base = lua_gettop(L);
    if (lua_rawgeti(L, 2, i) != LUA_TTABLE) luaL_error(L, "pipeline: command %d is not a table", i);
    int argc = (int)lua_rawlen(L, -1);
    luaL_checkstack(L, argc + 8, "too many arguments");
    for (int j = 1; j <= argc; j++) lua_rawgeti(L, base + 1, j);
    return collect_args(L, c, base + 2, lua_gettop(L));
}

/* pipeline({{cmd, args...}, ...}): writes a dry run skips come back as
 * {skipped = true}; every reply is read before the first error is raised,
 * so the connection stays in step. The writes' intents are made durable
 * together before anything is sent, and their outcomes journaled once every
 * reply is in: a pipeline cut off in between leaves them unknown. */
static int conn_pipeline(lua_State *L) {
    conn *c = check_conn(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    int n = (int)lua_rawlen(L, 2);
    lua_createtable(L, n, 0);                       /* 3: results */
    char *sent = lua_newuserdatauv(L, (size_t)n + 1, 0); /* 4: 'r' read, 'w' write, 'e' failed write, 0 skipped */
    lua_Integer *seq = lua_newuserdatauv(L, sizeof *seq * ((size_t)n + 1), 0); /* 5: each write's intent */
    ready(L, c);
    /* classify every command first: asking the server must not interleave with the batch */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 1; i <= n; i++) {
            int base = lua_gettop(L);
            int argc = pipeline_command(L, c, i);
            if (pass == 0) {
                sent[i] = is_write(L, c, argc) ? 'w' : 'r';
            } else {
                if (sent[i] == 'w') {
                    rb_effect e = effect_of(L, c, argc);
                    rb_decision d = rb_gate_deferred(L, &e);
                    if (d == RB_PERFORM) {
                        seq[i] = rb_gate_seq();
                    } else {
                        lua_pushnil(L);
                        rb_gate_done(L, &e, d, 1);
                        sent[i] = 0;
                    }
                }
                if (sent[i]) format_command(L, c, argc, c->argv, c->argvlen);
            }
            lua_settop(L, base);
        }
    }
    rb_journal_flush(L);
    double end = deadline(L, c, c->timeout, 0);
    if (c->outlen && flush_out(c, end)) return raise_io(L, c, "pipeline");
    int first_error = 0;
    lua_pushnil(L); /* 6: the first error reply's text */
    for (int i = 1; i <= n; i++) {
        if (!sent[i]) {
            push_skipped(L);
            lua_rawseti(L, 3, i);
            continue;
        }
        if (read_reply(c, end)) return raise_io(L, c, "pipeline");
        if (c->reply->type == REDIS_REPLY_ERROR) {
            if (sent[i] == 'w') sent[i] = 'e';
            if (!first_error) {
                first_error = i;
                lua_pushstring(L, c->reply->str);
                lua_replace(L, 6);
            }
        }
        push_reply(L, c->reply, 0);
        lua_rawseti(L, 3, i);
        scratch_free(c);
    }
    for (int i = 1; i <= n; i++) {
        if (sent[i] != 'w' && sent[i] != 'e') continue;
        int base = lua_gettop(L);
        rb_effect e = effect_of(L, c, pipeline_command(L, c, i));
        lua_rawgeti(L, 3, i);
        rb_gate_done_seq(L, &e, sent[i] == 'w', seq[i]);
        lua_settop(L, base);
    }
    if (first_error) {
        const char *which = lua_pushfstring(L, "command %d", first_error);
        return raise_reply(L, "pipeline", which, lua_tostring(L, 6));
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

/* conn:is_write(name, args...): the gate's classification of a command. */
static int conn_is_write(lua_State *L) {
    conn *c = check_conn(L, 1);
    lua_pushboolean(L, is_write(L, c, collect_args(L, c, 2, lua_gettop(L))));
    return 1;
}

static const luaL_Reg conn_methods[] = {
    {"command", conn_command},
    {"pipeline", conn_pipeline},
    {"is_write", conn_is_write},
    {"close", conn_close},
    {NULL, NULL}
};

static const luaL_Reg redis_funcs[] = {
    {"connect", redis_connect},
    {"set_null", redis_set_null},
    {"pipeline", conn_pipeline},
    {NULL, NULL}
};

int luaopen_runbook_redis(lua_State *L) {
    return open_conn_module(L, redis_funcs, CONN_MT, conn_methods, conn_close, conn_tostring);
}
