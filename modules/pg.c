/*
 * pg.c: PostgreSQL over libpq.
 *
 *   connect(conninfo, opts) -> conn      a libpq URL or "key=value" string
 *     opts.connect_timeout  seconds (default 10), never beyond the step's deadline
 *     opts.application_name (default "runbook" unless the conninfo names one)
 *     opts.numeric          "string" (default) or "number": how numeric columns convert
 *     opts.timeout          seconds one statement may take (default: the step's remaining time)
 *     opts.lock_timeout     seconds one statement may wait for a lock (default 30; false: no
 *                           limit but the statement's own), as the server's lock_timeout
 *   conninfo(s) -> {keyword = value}     parsed by libpq (for pg_dump's environment)
 *   set_json(encode, decode, null)       the codecs and the NULL sentinel (from pg.lua)
 *   classify(sql) -> "read"|"write"|"transaction", simulatable
 *   methods                              the conn methods table (pg.lua adds to it)
 *
 *   conn:query(sql, params...) -> rows   each row {column = value}; rows.columns
 *   conn:exec(sql, params...) -> n, how  affected rows; how = performed|simulated|skipped
 *   conn:query{sql, params..., write = true}   marks a statement as a write
 *     (a dry run's query result carries `simulated` and `affected` for a write)
 *   conn:copy_to(sql, path) -> {rows}    streams COPY ... TO STDOUT into a file
 *   conn:copy_from(path, table, opts) -> {rows}  streams a file into COPY table FROM STDIN
 *     opts: columns, format (csv|text|binary), header, delimiter, null; the
 *     statement is built here, never taken from the runbook
 *   conn:status() -> {transaction, server_version, database, user, host, port, pid}
 *   conn:close()                         also __close and __gc
 *
 * Values convert by type: integers and oids to integers, floats to numbers,
 * numeric to strings (or numbers), bool to booleans, json and jsonb decoded,
 * bytea to raw bytes, NULL to the null sentinel; everything else (timestamps,
 * arrays, intervals) stays PostgreSQL's text. Parameters are sent separately
 * from the SQL ($1, $2...), never interpolated.
 *
 * The gate: in a normal run statements are labelled from their text (SELECT,
 * SHOW, EXPLAIN... are reads, the rest writes) only to journal the writes. A
 * dry run does not trust the text: every statement runs in a transaction the
 * module opens and rolls back, after the server has said what it would touch;
 * see "the dry run" below.
 *
 * Every wait is bounded by the step's remaining time: the socket is polled
 * with a deadline and a late statement is cancelled on the server; the
 * server's statement_timeout is set from the same deadline. Lock waits have
 * a shorter bound of their own (lock_timeout): a row another session holds
 * is a stuck backend, not work in progress.
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>
#include <libpq-fe.h>
#include <lua.h>

#include "module.h"
#include "net.h"

#define CONN_MT "runbook.pg.conn"
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_TIMEOUT 3600.0   /* without a step deadline */
#define DEFAULT_LOCK_TIMEOUT 30.0
#define CANCEL_GRACE 5.0         /* seconds to wait for the server after a cancel */
#define SQL_SUMMARY_MAX 120
#define REG_JSON_ENCODE "runbook.pg.json_encode"
#define REG_JSON_DECODE "runbook.pg.json_decode"
#define REG_NULL "runbook.pg.null"
#define MAX_SETTINGS 100          /* SET statements a dry run replays */

/* Type OIDs from pg_type.h (server headers are not in libpq-dev). */
enum {
    BOOLOID = 16, BYTEAOID = 17, INT8OID = 20, INT2OID = 21, INT4OID = 23, OIDOID = 26,
    JSONOID = 114, FLOAT4OID = 700, FLOAT8OID = 701, NUMERICOID = 1700, JSONBOID = 3802
};

typedef struct {
    PGconn *pg;
    PGresult *res;       /* the result being converted; freed by the next call or the finalizer */
    FILE *file;          /* the file of a COPY in progress */
    char *tmp_path;      /* copy_to's temporary file, removed if the COPY fails */
    int numeric_number;
    int readonly;        /* the session's default_transaction_read_only: -1 unknown */
    double timeout_for;  /* the deadline statement_timeout was set for; 0 none, -1 unknown */
    int broken;          /* a statement was abandoned mid-way: reconnect before the next */
    int dry_tx;          /* dry run: the runbook's BEGIN opened the module's transaction */
    int check_ready;     /* dry run: CHECK_SQL is prepared on this session */
    int in_sim;          /* dry run: a statement's transaction (or savepoint) is open */
    double timeout;      /* cap on one statement's wait, within the step's remaining time */
    double lock_timeout; /* cap on one statement's wait for a lock; 0 none */
    int lock_set;        /* the session's lock_timeout is set */
} conn;

/* ---- handle ------------------------------------------------------------- */

static void scratch_free(conn *c) {
    if (c->res) PQclear(c->res);
    c->res = NULL;
    if (c->file) fclose(c->file);
    c->file = NULL;
    if (c->tmp_path) remove(c->tmp_path), free(c->tmp_path);
    c->tmp_path = NULL;
}

/* Idempotent: serves __gc, __close and close(). */
static int conn_close(lua_State *L) {
    conn *c = luaL_checkudata(L, 1, CONN_MT);
    scratch_free(c);
    if (c->pg) PQfinish(c->pg);
    c->pg = NULL;
    return 0;
}

static conn *check_conn(lua_State *L, int i) {
    conn *c = luaL_checkudata(L, i, CONN_MT);
    if (!c->pg) luaL_error(L, "pg connection is closed");
    scratch_free(c);
    return c;
}

/* "todo@127.0.0.1:5432/todo", for messages: never the password. */
static const char *push_where(lua_State *L, PGconn *pg) {
    return lua_pushfstring(L, "%s@%s:%s/%s", PQuser(pg), PQhost(pg), PQport(pg), PQdb(pg));
}

/* host:port/database, for messages about the server rather than the login. */
static const char *push_target(lua_State *L, PGconn *pg) {
    return lua_pushfstring(L, "%s:%s/%s", PQhost(pg), PQport(pg), PQdb(pg));
}

/* libpq's message, its lines joined into one. */
static const char *push_pq_message(lua_State *L, const char *msg) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (const char *p = msg; *p; p++) {
        if (*p == '\n') {
            while (p[1] == '\n' || p[1] == '\t' || p[1] == ' ') p++;
            if (p[1]) luaL_addstring(&b, "; ");
        } else {
            luaL_addchar(&b, *p);
        }
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

/* ---- waiting with a deadline -------------------------------------------- */

enum { WAIT_READY, WAIT_TIMEOUT, WAIT_INTERRUPTED };

static int wait_socket(PGconn *pg, int for_write, double deadline) {
    struct pollfd p = { PQsocket(pg), for_write ? POLLOUT : POLLIN, 0 };
    for (;;) {
        if (rb_interrupted()) return WAIT_INTERRUPTED;
        double left = deadline - rb_now();
        if (left <= 0) return WAIT_TIMEOUT;
        int ms = left > 0.05 ? 50 : (int)(left * 1000) + 1; /* re-check signals often */
        int n = poll(&p, 1, ms);
        if (n > 0) return WAIT_READY;
        if (n < 0 && errno != EINTR) return WAIT_READY; /* let libpq report it */
    }
}

/* ---- connecting --------------------------------------------------------- */

/* A URL's password as written (percent-encoded), registered before parsing
 * so that even a parse error cannot print it. */
static void register_raw_password(lua_State *L, const char *s) {
    const char *p = strstr(s, "://");
    if (!p) return;
    p += 3;
    const char *at = strchr(p, '@'), *slash = strchr(p, '/');
    if (!at || (slash && slash < at)) return;
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon) rb_secret_register(L, colon + 1, (size_t)(at - colon - 1));
}

static void register_passwords(lua_State *L, const char *conninfo) {
    register_raw_password(L, conninfo);
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    if (!opts) return;
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (o->val && strcmp(o->keyword, "password") == 0) rb_secret_register(L, o->val, strlen(o->val));
    PQconninfoFree(opts);
}

/* Drives PQconnectPoll (or PQresetPoll) to the end within the deadline. */
static int poll_connect(PGconn *pg, int reset, double deadline) {
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    for (;;) {
        if (st == PGRES_POLLING_OK) return WAIT_READY;
        if (st == PGRES_POLLING_FAILED) return WAIT_READY; /* PQstatus tells */
        int w = wait_socket(pg, st == PGRES_POLLING_WRITING, deadline);
        if (w != WAIT_READY) return w;
        st = reset ? PQresetPoll(pg) : PQconnectPoll(pg);
    }
}

static int raise_connect(lua_State *L, conn *c, int waited, double timeout) {
    const char *where = push_where(L, c->pg);
    if (waited == WAIT_TIMEOUT)
        return rb_error(L, "pg", "connect", "timeout", 1, "connect to %s:%s timed out after %.3gs (database %s, user %s)",
                        PQhost(c->pg), PQport(c->pg), timeout, PQdb(c->pg), PQuser(c->pg));
    if (waited == WAIT_INTERRUPTED)
        return rb_error(L, "pg", "connect", "interrupted", 0, "connecting to %s: interrupted", where);
    const char *why = push_pq_message(L, PQerrorMessage(c->pg));
    return rb_error(L, "pg", "connect", "08001", 1, "connecting to %s: %s", where, why);
}



static conn *new_conn(lua_State *L) {
    conn *c = lua_newuserdatauv(L, sizeof *c, 1);
    memset(c, 0, sizeof *c);
    c->readonly = -1;
    luaL_setmetatable(L, CONN_MT);
    lua_newtable(L);   /* a dry run's SET statements */
    lua_setiuservalue(L, -2, 1);
    return c;
}

/* Server notices ("table does not exist, skipping") are not errors; libpq
 * would print them on stderr, past the runbook's output and redaction. */
static void quiet(void *arg, const char *message) { (void)arg; (void)message; }

/* libpq's reading of a URL or key=value string; raises invalid_conninfo. */
static PQconninfoOption *parse_conninfo(lua_State *L, const char *conninfo, const char *op) {
    char *err = NULL;
    PQconninfoOption *parsed = PQconninfoParse(conninfo, &err);
    if (parsed) return parsed;
    lua_pushstring(L, err ? err : "out of memory");
    PQfreemem(err);
    rb_error(L, "pg", op, "invalid_conninfo", 0, "not a libpq connection string or URL: %s",
             push_pq_message(L, lua_tostring(L, -1)));
    return NULL;
}

static int pg_connect(lua_State *L) {
    const char *conninfo = luaL_checkstring(L, 1);
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    double timeout = opt_seconds(L, 2, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
    double stmt_timeout = opt_seconds(L, 2, "timeout", DEFAULT_TIMEOUT);
    int no_lock_timeout = !lua_isnoneornil(L, 2) && lua_getfield(L, 2, "lock_timeout") == LUA_TBOOLEAN &&
                          !lua_toboolean(L, -1);
    if (!lua_isnoneornil(L, 2)) lua_pop(L, 1);
    double lock_timeout = no_lock_timeout ? 0 : opt_seconds(L, 2, "lock_timeout", DEFAULT_LOCK_TIMEOUT);
    const char *app = opt_string(L, 2, "application_name", NULL, NULL);
    const char *numeric = opt_string(L, 2, "numeric", NULL, "string");
    if (strcmp(numeric, "string") != 0 && strcmp(numeric, "number") != 0)
        luaL_argerror(L, 2, "numeric must be \"string\" or \"number\"");
    register_passwords(L, conninfo);
    if (timeout > rb_remaining(L, timeout)) timeout = rb_remaining(L, timeout);
    double end = rb_now() + timeout;
    PQconninfoOption *parsed = parse_conninfo(L, conninfo, "connect");
    /* GSSAPI encryption is tried first by default, which initialises Kerberos
     * on every connect; runbooks opt in with gssencmode= like any client */
    int gss = getenv("PGGSSENCMODE") != NULL;
    const char *host = NULL, *port = NULL, *hostaddr = NULL;
    for (PQconninfoOption *o = parsed; o->keyword; o++) {
        if (o->val && strcmp(o->keyword, "gssencmode") == 0) gss = 1;
        if (strcmp(o->keyword, "host") == 0) host = o->val;
        if (strcmp(o->keyword, "port") == 0) port = o->val;
        if (strcmp(o->keyword, "hostaddr") == 0) hostaddr = o->val;
    }
    /* libpq looks a host name up with a plain getaddrinfo, which no
     * connect_timeout bounds: a name is looked up first within the deadline
     * (one host; sockets and given addresses need no lookup) */
    if (host && !hostaddr && host[0] != '/' && host[0] != '@' && !strchr(host, ',') && !(port && strchr(port, ','))) {
        struct addrinfo *list;
        const char *why;
        if (net_resolve(host, port && *port ? port : "5432", end, &list, &why) == 0) freeaddrinfo(list);
        else {
            lua_pushstring(L, host);
            PQconninfoFree(parsed);
            host = lua_tostring(L, -1);
            if (strstr(why, "timed out"))
                return rb_error(L, "pg", "connect", "timeout", 1, "connect to %s timed out after %.3gs: the name lookup did not answer",
                                host, timeout);
            return rb_error(L, "pg", "connect", strcmp(why, "interrupted") ? "08001" : "interrupted", 1,
                            "connecting to %s: %s", host, why);
        }
    }
    PQconninfoFree(parsed);

    conn *c = new_conn(L);
    c->numeric_number = numeric[0] == 'n';
    c->timeout = stmt_timeout;
    c->lock_timeout = lock_timeout;
    const char *keys[] = { "dbname", app ? "application_name" : "fallback_application_name",
                           gss ? NULL : "gssencmode", NULL };
    const char *vals[] = { conninfo, app ? app : "runbook", gss ? NULL : "disable", NULL };
    c->pg = PQconnectStartParams(keys, vals, 1);
    if (!c->pg) return luaL_error(L, "out of memory");
    int waited = PQstatus(c->pg) == CONNECTION_BAD ? WAIT_READY : poll_connect(c->pg, 0, end);
    if (waited != WAIT_READY || PQstatus(c->pg) != CONNECTION_OK) return raise_connect(L, c, waited, timeout);
    /* the password libpq actually used, which may come from PGPASSWORD or a passfile */
    const char *pw = PQpass(c->pg);
    if (pw) rb_secret_register(L, pw, strlen(pw));
    PQsetNoticeProcessor(c->pg, quiet, NULL);
    PQsetnonblocking(c->pg, 1);
    return 1;
}

/* After the server went away: one reconnect attempt before the next
 * statement, unless a transaction was open (its work is lost; say so). */
static void ensure_connected(lua_State *L, conn *c, const char *op) {
    if (PQstatus(c->pg) == CONNECTION_OK && !c->broken) return;
    c->broken = 0;
    double timeout = rb_remaining(L, DEFAULT_CONNECT_TIMEOUT);
    int waited = PQresetStart(c->pg) ? poll_connect(c->pg, 1, rb_now() + timeout) : WAIT_READY;
    c->readonly = -1;
    c->timeout_for = 0;
    c->lock_set = 0;
    c->dry_tx = c->check_ready = c->in_sim = 0;
    if (waited == WAIT_READY && PQstatus(c->pg) == CONNECTION_OK) {
        PQsetnonblocking(c->pg, 1);
        return;
    }
    const char *where = push_where(L, c->pg);
    if (waited == WAIT_TIMEOUT)
        rb_error(L, "pg", op, "timeout", 1, "reconnecting to %s: connect to %s:%s timed out after %.3gs", where,
                 PQhost(c->pg), PQport(c->pg), timeout);
    const char *why = push_pq_message(L, PQerrorMessage(c->pg));
    rb_error(L, "pg", op, "08006", 1, "connection to %s lost and reconnecting failed: %s", where, why);
}

/* ---- running a statement ------------------------------------------------ */

/* Sends everything queued, waiting for the socket as needed. */
static int flush_all(PGconn *pg, double deadline) {
    int f;
    while ((f = PQflush(pg)) == 1) {
        int w = wait_socket(pg, 1, deadline);
        if (w != WAIT_READY) return w;
        if (!PQconsumeInput(pg)) return WAIT_READY;
    }
    return WAIT_READY;
}

/* A statement's wait: its deadline, and why it ended early (the deadline or
 * Ctrl-C, after which the server was asked to cancel the statement). */
typedef struct { double deadline; int why; } waiter;

/* Waits until a result can be read without blocking; on the deadline or
 * Ctrl-C asks the server to cancel and waits briefly for that. Returns 0
 * when even the cancel went unanswered. */
static int wait_idle(PGconn *pg, waiter *w) {
    while (PQisBusy(pg)) {
        int r = wait_socket(pg, 0, w->deadline);
        if (r != WAIT_READY) {
            if (w->why != WAIT_READY) return 0;
            w->why = r;
            PGcancel *cancel = PQgetCancel(pg);
            char buf[256];
            if (cancel) PQcancel(cancel, buf, sizeof buf), PQfreeCancel(cancel);
            w->deadline = rb_now() + CANCEL_GRACE;
            continue;
        }
        if (!PQconsumeInput(pg)) return 1; /* PQgetResult reports the failure */
    }
    return 1;
}

static int retryable_state(const char *state) {
    return state && (strncmp(state, "08", 2) == 0 || strcmp(state, "40001") == 0 ||
                     strcmp(state, "40P01") == 0 || strcmp(state, "53300") == 0 ||
                     strcmp(state, "55P03") == 0 || strcmp(state, "57P01") == 0 ||
                     strcmp(state, "57P03") == 0);
}

/* The structured error for a failed result or a lost connection. */
static int raise_result(lua_State *L, conn *c, const char *op, int why, double deadline_secs) {
    if (why != WAIT_READY && PQisBusy(c->pg)) c->broken = 1; /* the cancel went unanswered */
    if (why == WAIT_TIMEOUT)
        return rb_error(L, "pg", op, "timeout", 1, "statement on %s timed out after %.3gs and was cancelled "
                        "(the step's time or the timeout ran out)", push_target(L, c->pg), deadline_secs);
    if (why == WAIT_INTERRUPTED)
        return rb_error(L, "pg", op, "interrupted", 0, "statement cancelled: interrupted");
    if (c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR) {
        const char *state = PQresultErrorField(c->res, PG_DIAG_SQLSTATE);
        const char *primary = PQresultErrorField(c->res, PG_DIAG_MESSAGE_PRIMARY);
        const char *detail = PQresultErrorField(c->res, PG_DIAG_MESSAGE_DETAIL);
        lua_pushfstring(L, "%s%s%s", primary ? primary : PQresultErrorMessage(c->res),
                        detail ? ": " : "", detail ? detail : "");
        const char *msg = push_pq_message(L, lua_tostring(L, -1));
        if (state && !strcmp(state, "55P03") && c->lock_timeout > 0 && primary && strstr(primary, "lock timeout"))
            return rb_error(L, "pg", op, state, 1, "waited %.3gs for a lock on %s (lock_timeout): %s", c->lock_timeout,
                            push_target(L, c->pg), msg);
        return rb_error(L, "pg", op, state ? state : "08006", retryable_state(state) || !state, "%s", msg);
    }
    const char *msg = push_pq_message(L, PQerrorMessage(c->pg));
    const char *code = PQstatus(c->pg) == CONNECTION_BAD ? "08006" : "pg_error";
    return rb_error(L, "pg", op, code, PQstatus(c->pg) == CONNECTION_BAD, "%s", *msg ? msg : "no result from server");
}

/* Reads every result of the statement just sent, up to the server's ready
 * signal: keeps the last one (or the first error) in c->res. COPY states the
 * caller did not ask for are ended. Returns 1 when a COPY was refused. */
static int collect(conn *c, waiter *w) {
    int copy = 0;
    for (;;) {
        if (!wait_idle(c->pg, w)) { c->broken = 1; return copy; }
        PGresult *r = PQgetResult(c->pg);
        if (!r) return copy;
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN) PQputCopyEnd(c->pg, "use copy_from for COPY ... FROM STDIN"), copy = 1;
        if (st == PGRES_COPY_OUT) {
            char *buf;
            copy = 1;
            PQsetnonblocking(c->pg, 0);
            while (PQgetCopyData(c->pg, &buf, 0) > 0) PQfreemem(buf);
            PQsetnonblocking(c->pg, 1);
        }
        if (c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR) { PQclear(r); continue; }
        if (c->res) PQclear(c->res);
        c->res = r;
    }
}

typedef struct { int why, copy; double secs; } outcome;

/* Waits for the results of what was just sent (`sent`: the PQsend* call
 * succeeded) without raising; c->res holds the result. */
static outcome finish(lua_State *L, conn *c, int sent) {
    outcome o = { WAIT_READY, 0, rb_remaining(L, c->timeout) };
    double deadline = rb_now() + o.secs;
    if (c->res) PQclear(c->res);
    c->res = NULL;
    if (!sent) return o;
    o.why = flush_all(c->pg, deadline);
    if (o.why != WAIT_READY) { c->broken = 1; return o; }
    waiter w = { deadline, WAIT_READY };
    o.copy = collect(c, &w);
    o.why = w.why;
    return o;
}

/* Runs one statement without raising; c->res holds its result. */
static outcome attempt(lua_State *L, conn *c, const char *sql, int n, const char *const *vals) {
    if (c->res) PQclear(c->res);
    c->res = NULL;
    return finish(L, c, PQsendQueryParams(c->pg, sql, n, NULL, vals, NULL, NULL, 0));
}

static int succeeded(conn *c, outcome o) {
    ExecStatusType st = c->res ? PQresultStatus(c->res) : PGRES_FATAL_ERROR;
    return o.why == WAIT_READY && !o.copy && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY);
}

static int raise_outcome(lua_State *L, conn *c, const char *op, outcome o) {
    if (o.copy && o.why == WAIT_READY && c->res && PQresultStatus(c->res) != PGRES_FATAL_ERROR)
        return rb_error(L, "pg", op, "wrong_call", 0, "COPY to or from the client needs copy_to or copy_from");
    return raise_result(L, c, op, o.why, o.secs);
}

/* Runs one statement; leaves a successful result in c->res or raises. */
static void run(lua_State *L, conn *c, const char *op, const char *sql, int n, const char *const *vals) {
    outcome o = attempt(L, c, sql, n, vals);
    if (!succeeded(c, o)) raise_outcome(L, c, op, o);
}

static void run_plain(lua_State *L, conn *c, const char *op, const char *sql) { run(L, c, op, sql, 0, NULL); }

/* The server's statement_timeout follows the step's deadline, as a second
 * line behind the client-side cancel; set once per step, not per statement.
 * lock_timeout is set with it, once per session. Inside a transaction the
 * settings may be rolled back, so they count as set only outside one. */
static void sync_statement_timeout(lua_State *L, conn *c) {
    double left = rb_remaining(L, 0);
    double deadline = left > 0 ? rb_now() + left : 0;
    if ((deadline == 0 ? c->timeout_for == 0 : fabs(deadline - c->timeout_for) < 1.0) && c->lock_set) return;
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT set_config('statement_timeout', '%ld', false), set_config('lock_timeout', '%ld', false)",
             deadline ? (long)(left * 1000) + 1000 : 0L, (long)(c->lock_timeout * 1000));
    run_plain(L, c, "query", sql);
    int idle = PQtransactionStatus(c->pg) == PQTRANS_IDLE;
    c->timeout_for = idle ? deadline : -1;
    c->lock_set = idle;
}

/* In a dry run the session is read-only: even a statement we took for a read
 * cannot write. Simulated writes open their own read-write transaction. */
static void sync_readonly(lua_State *L, conn *c, int dry) {
    if (c->readonly == dry || PQtransactionStatus(c->pg) != PQTRANS_IDLE) return;
    run_plain(L, c, "query", dry ? "SET default_transaction_read_only = on" : "SET default_transaction_read_only = off");
    c->readonly = dry;
}

/* ---- classifying statements --------------------------------------------- */

typedef enum { TOK_END, TOK_WORD, TOK_OTHER } tok_type;
typedef struct { tok_type type; const char *s; size_t len; } token;
typedef struct { const char *p; } lexer;

static int word_is(const token *t, const char *w) {
    return t->type == TOK_WORD && strlen(w) == t->len && strncasecmp(t->s, w, t->len) == 0;
}

static const char *skip_quoted(const char *p, char q, int backslash) {
    for (p++; *p; p++) {
        if (backslash && *p == '\\' && p[1]) { p++; continue; }
        if (*p == q) {
            if (p[1] == q) { p++; continue; }
            return p + 1;
        }
    }
    return p;
}

/* $tag$ ... $tag$ */
static const char *skip_dollar(const char *p) {
    const char *t = p + 1;
    while (*t == '_' || (*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') || (*t >= '0' && *t <= '9' && t > p + 1)) t++;
    if (*t != '$') return NULL;
    size_t taglen = (size_t)(t - p + 1);
    for (const char *q = t + 1; *q; q++)
        if (*q == '$' && strncmp(q, p, taglen) == 0) return q + taglen;
    return p + strlen(p);
}

static int ident_char(char ch) {
    return ch == '_' || ch == '$' || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || (unsigned char)ch >= 0x80;
}

/* Words (quoted identifiers count as words) and single punctuation; string
 * literals and comments are skipped. */
static token next_token(lexer *lx) {
    const char *p = lx->p;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f') p++;
        if (p[0] == '-' && p[1] == '-') { while (*p && *p != '\n') p++; continue; }
        if (p[0] == '/' && p[1] == '*') {
            int depth = 1;
            for (p += 2; *p && depth; p++) {
                if (p[0] == '/' && p[1] == '*') depth++, p++;
                else if (p[0] == '*' && p[1] == '/') depth--, p++;
            }
            continue;
        }
        if (*p == '\'') { p = skip_quoted(p, '\'', 0); continue; }
        if ((*p == 'E' || *p == 'e') && p[1] == '\'') { p = skip_quoted(p + 1, '\'', 1); continue; }
        if (*p == '$' && !(p[1] >= '0' && p[1] <= '9')) {
            const char *q = skip_dollar(p);
            if (q) { p = q; continue; }
        }
        break;
    }
    token t = { TOK_END, p, 0 };
    if (!*p) { lx->p = p; return t; }
    if (*p == '"') {
        const char *q = skip_quoted(p, '"', 0);
        t.type = TOK_WORD, t.s = p + 1, t.len = (size_t)(q - p) > 1 ? (size_t)(q - p - 2) : 0;
        lx->p = q;
        return t;
    }
    if (ident_char(*p) && !(*p >= '0' && *p <= '9') && *p != '$') {
        const char *q = p;
        while (ident_char(*q)) q++;
        t.type = TOK_WORD, t.len = (size_t)(q - p);
        lx->p = q;
        return t;
    }
    t.type = TOK_OTHER, t.len = 1;
    lx->p = p + 1;
    return t;
}

/* Functions whose effects a rolled-back transaction does not undo. */
static const char *const writing_functions[] = {
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_switch_wal",
    "pg_promote", "pg_create_restore_point", "nextval", "setval", "pg_drop_replication_slot",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot", "pg_replication_slot_advance",
    "pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters", "pg_stat_reset_slru", "pg_stat_reset_replication_slot",
    "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_log_backend_memory_contexts", "lo_unlink",
    "lo_import", "lo_export", "dblink_exec", "pg_file_write", "pg_backup_start", "pg_backup_stop",
    "pg_advisory_xact_lock", NULL
};

static int is_writing_function(const token *t) {
    for (const char *const *f = writing_functions; *f; f++)
        if (word_is(t, *f)) return 1;
    return 0;
}

typedef enum { SQL_READ, SQL_WRITE, SQL_TRANSACTION } sql_kind;

typedef struct {
    sql_kind kind;
    int simulatable;
    char table[128];  /* the table a DML statement acts on, when plain to see */
} sql_class;

/* Scans the rest of a statement: data-modifying words (for WITH and SELECT
 * INTO) and functions that write. */
static void scan_rest(lexer lx, sql_class *k, int dml_words, int select) {
    token prev = { TOK_OTHER, "", 0 }, t;
    int depth = 0;
    while ((t = next_token(&lx)).type != TOK_END) {
        if (t.type == TOK_OTHER) depth += *t.s == '(' ? 1 : *t.s == ')' ? -1 : 0;
        if (is_writing_function(&t)) { k->kind = SQL_WRITE; k->simulatable = 0; return; }
        if (dml_words && (word_is(&t, "INSERT") || word_is(&t, "DELETE") || word_is(&t, "MERGE") ||
                          (word_is(&t, "UPDATE") && !word_is(&prev, "FOR") && !word_is(&prev, "KEY"))))
            k->kind = SQL_WRITE;
        if (select && depth == 0 && word_is(&t, "INTO")) k->kind = SQL_WRITE; /* SELECT INTO creates a table */
        prev = t;
    }
}

/* The table name after DELETE FROM, UPDATE, INSERT INTO... kept as written. */
static void capture_table(lexer lx, sql_class *k) {
    token t = next_token(&lx);
    while (word_is(&t, "FROM") || word_is(&t, "INTO") || word_is(&t, "ONLY") || word_is(&t, "TABLE"))
        t = next_token(&lx);
    if (t.type != TOK_WORD) return;
    const char *start = t.s, *end = t.s + t.len;
    for (;;) {
        lexer save = lx;
        token dot = next_token(&lx);
        if (!(dot.type == TOK_OTHER && *dot.s == '.')) { lx = save; break; }
        token part = next_token(&lx);
        if (part.type != TOK_WORD) break;
        end = part.s + part.len;
    }
    size_t n = (size_t)(end - start) < sizeof k->table - 1 ? (size_t)(end - start) : sizeof k->table - 1;
    memcpy(k->table, start, n);
    k->table[n] = '\0';
}

static const char *const read_words[] = {
    "SHOW", "FETCH", "MOVE", "SET", "RESET", "LISTEN", "UNLISTEN", "DEALLOCATE", "CLOSE", "DECLARE", "DISCARD", NULL
};
static const char *const transaction_words[] = {
    "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", NULL
};

static int word_in(const token *t, const char *const *list) {
    for (; *list; list++)
        if (word_is(t, *list)) return 1;
    return 0;
}

/* Statements PostgreSQL refuses inside a transaction block. */
static int not_transactional(const token *t1, lexer lx) {
    if (word_is(t1, "VACUUM") || word_is(t1, "CHECKPOINT")) return 1;
    token t2 = next_token(&lx), t3 = next_token(&lx), t4 = next_token(&lx);
    if (word_is(t1, "CREATE") || word_is(t1, "DROP") || word_is(t1, "ALTER")) {
        if (word_is(&t2, "DATABASE") || word_is(&t2, "TABLESPACE") || word_is(&t2, "SUBSCRIPTION") ||
            word_is(&t2, "SYSTEM"))
            return !(word_is(t1, "ALTER") && word_is(&t2, "DATABASE"));
        if (word_is(&t2, "INDEX") && word_is(&t3, "CONCURRENTLY")) return 1;
        if (word_is(&t2, "UNIQUE") && word_is(&t3, "INDEX") && word_is(&t4, "CONCURRENTLY")) return 1;
    }
    if (word_is(t1, "REINDEX"))
        return word_is(&t2, "DATABASE") || word_is(&t2, "SYSTEM") || word_is(&t3, "CONCURRENTLY") ||
               word_is(&t2, "(");
    if (word_is(t1, "CLUSTER")) return t2.type == TOK_END;
    if ((word_is(t1, "COMMIT") || word_is(t1, "ROLLBACK")) && word_is(&t2, "PREPARED")) return 1;
    if (word_is(t1, "PREPARE") && word_is(&t2, "TRANSACTION")) return 1;
    return 0;
}

static sql_class classify(const char *sql) {
    sql_class k = { SQL_WRITE, 1, "" };
    lexer lx = { sql };
    token t = next_token(&lx);
    while (t.type == TOK_OTHER && *t.s == '(') t = next_token(&lx);
    if (word_is(&t, "SELECT") || word_is(&t, "VALUES") || word_is(&t, "TABLE")) {
        k.kind = SQL_READ;
        scan_rest(lx, &k, 0, word_is(&t, "SELECT"));
    } else if (word_is(&t, "WITH")) {
        k.kind = SQL_READ;
        scan_rest(lx, &k, 1, 1);
    } else if (word_is(&t, "EXPLAIN")) {
        /* a plan is a read; EXPLAIN ANALYZE runs the statement, so it is what the statement is */
        int analyze = 0;
        lexer save = lx;
        token o = next_token(&lx);
        if (o.type == TOK_OTHER && *o.s == '(') {
            while ((o = next_token(&lx)).type != TOK_END && !(o.type == TOK_OTHER && *o.s == ')'))
                analyze |= word_is(&o, "ANALYZE") || word_is(&o, "ANALYSE");
        } else {
            while (word_is(&o, "ANALYZE") || word_is(&o, "ANALYSE") || word_is(&o, "VERBOSE")) {
                analyze |= !word_is(&o, "VERBOSE");
                save = lx;
                o = next_token(&lx);
            }
            lx = save;
        }
        if (!analyze) { k.kind = SQL_READ; return k; }
        return classify(lx.p);
    } else if (word_in(&t, read_words)) {
        k.kind = SQL_READ;
    } else if (word_in(&t, transaction_words) && !not_transactional(&t, lx)) {
        k.kind = SQL_TRANSACTION;
    } else {
        k.simulatable = !not_transactional(&t, lx);
        if (word_is(&t, "DELETE") || word_is(&t, "UPDATE") || word_is(&t, "INSERT") || word_is(&t, "MERGE") ||
            word_is(&t, "TRUNCATE") || word_is(&t, "COPY"))
            capture_table(lx, &k);
        scan_rest(lx, &k, 0, 0);
        if (word_is(&t, "COPY")) {
            /* COPY ... TO 'file' writes on the server, outside any transaction's reach */
            lexer s = lx;
            token a, prev = t;
            while ((a = next_token(&s)).type != TOK_END) {
                if (word_is(&prev, "TO") && !word_is(&a, "STDOUT")) k.simulatable = 0;
                prev = a;
            }
        }
    }
    return k;
}

/* ---- parameters and rows ------------------------------------------------ */

static int is_null(lua_State *L, int i) {
    if (lua_isnoneornil(L, i)) return 1;
    if (lua_type(L, i) != LUA_TLIGHTUSERDATA) return 0;
    lua_getfield(L, LUA_REGISTRYINDEX, REG_NULL);
    int same = lua_rawequal(L, i, -1);
    lua_pop(L, 1);
    return same;
}

/* Text forms of the parameters at stack[first..last]; the strings stay
 * referenced from a table left on the stack. */
static const char **params(lua_State *L, int first, int last, int *n) {
    *n = last >= first ? last - first + 1 : 0;
    const char **vals = lua_newuserdatauv(L, sizeof(char *) * (size_t)(*n + 1), 0);
    lua_createtable(L, *n, 0);
    for (int i = 0; i < *n; i++) {
        int idx = first + i;
        vals[i] = NULL;
        if (is_null(L, idx)) continue;
        switch (lua_type(L, idx)) {
        case LUA_TBOOLEAN: lua_pushstring(L, lua_toboolean(L, idx) ? "true" : "false"); break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, idx)) lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, idx));
            else {
                double d = lua_tonumber(L, idx);
                char buf[64];
                if (isnan(d)) strcpy(buf, "NaN");
                else if (isinf(d)) strcpy(buf, d > 0 ? "Infinity" : "-Infinity");
                else snprintf(buf, sizeof buf, "%.17g", d);
                lua_pushstring(L, buf);
            }
            break;
        case LUA_TSTRING: {
            size_t len;
            const char *s = lua_tolstring(L, idx, &len);
            if (strlen(s) != len) luaL_error(L, "parameter $%d contains a NUL byte", i + 1);
            lua_pushvalue(L, idx);
            break;
        }
        case LUA_TTABLE:
            if (lua_getfield(L, LUA_REGISTRYINDEX, REG_JSON_ENCODE) != LUA_TFUNCTION)
                luaL_error(L, "parameter $%d: tables need the JSON encoder (load pg, not runbook.pg)", i + 1);
            lua_pushvalue(L, idx);
            lua_call(L, 1, 1);
            break;
        default:
            luaL_error(L, "parameter $%d: cannot send a %s to PostgreSQL", i + 1, luaL_typename(L, idx));
        }
        vals[i] = lua_tostring(L, -1);
        lua_rawseti(L, -2, i + 1);
    }
    return vals;
}

static void push_value(lua_State *L, conn *c, const PGresult *r, int row, int col) {
    if (PQgetisnull(r, row, col)) {
        lua_getfield(L, LUA_REGISTRYINDEX, REG_NULL);
        return;
    }
    const char *v = PQgetvalue(r, row, col);
    size_t len = (size_t)PQgetlength(r, row, col);
    switch (PQftype(r, col)) {
    case BOOLOID: lua_pushboolean(L, v[0] == 't'); return;
    case INT2OID: case INT4OID: case INT8OID: case OIDOID:
        if (lua_stringtonumber(L, v)) return;
        break;
    case FLOAT4OID: case FLOAT8OID:
        if (strcmp(v, "NaN") == 0) { lua_pushnumber(L, NAN); return; }
        if (strcmp(v, "Infinity") == 0) { lua_pushnumber(L, HUGE_VAL); return; }
        if (strcmp(v, "-Infinity") == 0) { lua_pushnumber(L, -HUGE_VAL); return; }
        lua_pushnumber(L, strtod(v, NULL));
        return;
    case NUMERICOID:
        if (c->numeric_number) { lua_pushnumber(L, strtod(v, NULL)); return; }
        break;
    case JSONOID: case JSONBOID:
        if (lua_getfield(L, LUA_REGISTRYINDEX, REG_JSON_DECODE) == LUA_TFUNCTION) {
            lua_pushlstring(L, v, len);
            lua_call(L, 1, 1);
            return;
        }
        lua_pop(L, 1);
        break;
    case BYTEAOID: {
        size_t n;
        unsigned char *raw = PQunescapeBytea((const unsigned char *)v, &n);
        if (raw) { lua_pushlstring(L, (const char *)raw, n); PQfreemem(raw); return; }
        break;
    }
    }
    lua_pushlstring(L, v, len);
}

static void push_rows(lua_State *L, conn *c) {
    const PGresult *r = c->res;
    int nrows = PQntuples(r), ncols = PQnfields(r);
    lua_createtable(L, nrows, 1);
    lua_createtable(L, ncols, 0);
    for (int j = 0; j < ncols; j++) {
        lua_pushstring(L, PQfname(r, j));
        lua_rawseti(L, -2, j + 1);
    }
    lua_setfield(L, -2, "columns");
    for (int i = 0; i < nrows; i++) {
        lua_createtable(L, 0, ncols);
        for (int j = 0; j < ncols; j++) {
            push_value(L, c, r, i, j);
            lua_setfield(L, -2, PQfname(r, j));
        }
        lua_rawseti(L, -2, i + 1);
    }
}

static lua_Integer affected(const PGresult *r) {
    const char *n = PQcmdTuples((PGresult *)r);
    return *n ? strtoll(n, NULL, 10) : 0;
}

/* ---- the gate ----------------------------------------------------------- */

/* "DELETE FROM x WHERE ...", whitespace collapsed and cut short. */
static const char *push_sql_summary(lua_State *L, const char *sql) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int space = 0;
    size_t n = 0;
    for (const char *p = sql; *p && n < SQL_SUMMARY_MAX; p++) {
        if (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') { space = n > 0; continue; }
        if (space) luaL_addchar(&b, ' '), n++, space = 0;
        luaL_addchar(&b, *p), n++;
    }
    if (n >= SQL_SUMMARY_MAX) luaL_addstring(&b, "...");
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

/* "delete 1234 rows from checkpoints", from the command tag. */
static const char *push_outcome(lua_State *L, const PGresult *r, const sql_class *k, const char *fallback) {
    const char *tag = PQcmdStatus((PGresult *)r);
    static const struct { const char *tag, *verb, *prep; } dml[] = {
        {"DELETE", "delete", "from"}, {"UPDATE", "update", "in"}, {"INSERT", "insert", "into"},
        {"MERGE", "merge", "into"}, {"COPY", "copy", "into"},
    };
    for (size_t i = 0; i < sizeof dml / sizeof *dml; i++) {
        size_t len = strlen(dml[i].tag);
        if (strncmp(tag, dml[i].tag, len) == 0 && tag[len] == ' ') {
            lua_Integer n = affected(r);
            if (k->table[0])
                return lua_pushfstring(L, "%s %I row%s %s %s", dml[i].verb, (LUAI_UACINT)n, n == 1 ? "" : "s",
                                       dml[i].prep, k->table);
            return lua_pushfstring(L, "%s %I row%s", dml[i].verb, (LUAI_UACINT)n, n == 1 ? "" : "s");
        }
    }
    return lua_pushstring(L, fallback);
}

/* A failed statement's message, as the gate records it. */
static void push_failure(lua_State *L, conn *c, outcome o) {
    lua_pushstring(L, c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR
                          ? PQresultErrorField(c->res, PG_DIAG_MESSAGE_PRIMARY)
                          : o.why == WAIT_TIMEOUT ? "timeout" : "failed");
}

/* A write through the gate: its description and the decision taken. */
typedef struct {
    rb_effect e;
    rb_decision d;
} gated;

/* ---- the dry run ---------------------------------------------------------
 *
 * In a dry run nothing a runbook sends runs outside a transaction this module
 * opens and always rolls back: BEGIN READ WRITE ... ROLLBACK, or a savepoint
 * inside the runbook's own BEGIN (which the module opened too, and ends with a
 * ROLLBACK whatever the runbook sends: COMMIT included). SET and RESET run in
 * that transaction, are remembered and replayed in every later one, so they
 * last for the runbook but never for the session.
 *
 * A rollback does not undo everything, so before a statement runs the server
 * says what it would touch: the statement becomes the body of a temporary
 * SQL-standard function (CREATE FUNCTION ... BEGIN ATOMIC), which PostgreSQL
 * parses and stores as a query tree. CHECK_SQL walks that tree and what it
 * leads to (views' rules, row security policies, partitions; for writes also
 * triggers, constraints, indexes, tables that cascade and the defaults an ON
 * DELETE SET DEFAULT sets; for inserts column defaults) and names the first
 * thing a rollback would not undo: a table's rewrite rule (for writes), a volatile
 * built-in function outside a short list of harmless ones (nextval,
 * pg_notify, pg_terminate_backend, set_config, lo_export, session advisory
 * locks...), a function whose body PostgreSQL cannot show (PL/pgSQL, C, every
 * extension's: dblink), or a foreign table. Such a statement is reported as
 * not simulated and never sent. Statements the probe cannot hold (utility
 * statements: COPY, DO, VACUUM, LISTEN, PREPARE, DECLARE, EXPLAIN, CREATE...)
 * are not simulated either, except SHOW, SET and RESET.
 */

/* Volatile built-ins whose effects end with the transaction or are reads. */
#define HARMLESS_VOLATILE \
    "'clock_timestamp', 'timeofday', 'random', 'setseed', 'gen_random_uuid', 'currval', 'lastval', " \
    "'current_query', 'pg_sleep', 'pg_sleep_for', 'pg_sleep_until', 'pg_advisory_xact_lock', " \
    "'pg_advisory_xact_lock_shared', 'pg_try_advisory_xact_lock', 'pg_try_advisory_xact_lock_shared', " \
    "'pg_lock_status', 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids', 'pg_database_size', " \
    "'pg_relation_size', 'pg_table_size', 'pg_indexes_size', 'pg_total_relation_size', 'pg_tablespace_size', " \
    "'pg_is_in_recovery', 'pg_is_wal_replay_paused', 'pg_get_wal_replay_pause_state', 'pg_current_wal_lsn', " \
    "'pg_current_wal_insert_lsn', 'pg_current_wal_flush_lsn', 'pg_last_wal_receive_lsn', " \
    "'pg_last_wal_replay_lsn', 'pg_last_xact_replay_timestamp', 'pg_last_committed_xact', " \
    "'pg_xact_commit_timestamp', 'pg_xact_status', 'txid_status', 'pg_sequence_last_value', " \
    "'pg_notification_queue_usage', 'pg_prepared_xact', 'pg_jit_available', 'pg_partition_tree', " \
    "'pg_partition_ancestors', 'pg_stat_have_stats', 'pg_stat_clear_snapshot', 'bernoulli', 'system', " \
    "'unique_key_recheck', 'suppress_redundant_updates_trigger', 'tsvector_update_trigger', " \
    "'tsvector_update_trigger_column', 'RI_FKey_check_ins', 'RI_FKey_check_upd', 'RI_FKey_cascade_del', " \
    "'RI_FKey_cascade_upd', 'RI_FKey_restrict_del', 'RI_FKey_restrict_upd', 'RI_FKey_setnull_del', " \
    "'RI_FKey_setnull_upd', 'RI_FKey_setdefault_del', 'RI_FKey_setdefault_upd', 'RI_FKey_noaction_del', " \
    "'RI_FKey_noaction_upd'"

/* The objects a stored query tree names: functions, operators, relations, types. */
#define REFS(tree) \
    "SELECT CASE m[1] WHEN 'relid' THEN 'r' WHEN 'opno' THEN 'o' WHEN 'opnos' THEN 'o' " \
    "WHEN 'resulttype' THEN 't' WHEN 'consttype' THEN 't' ELSE 'f' END::\"char\" AS k, x::oid AS o " \
    "FROM regexp_matches(" tree "::text, ':(funcid|opfuncid|aggfnoid|winfnoid|hashfuncid|negfuncid|tsmhandler" \
    "|opnos|opno|relid|resulttype|consttype) [(]?o?([ 0-9]+)', 'g') m, string_to_table(btrim(m[2]), ' ') x"

/* $1 'f' and the probe function, or 'r' and a table COPY writes into; $2
 * true when it writes (COPY). Returns why it cannot be simulated (NULL when
 * it can) and whether it writes. Prepared once per connection with the
 * search_path pinned to pg_catalog, so no runbook setting changes it. */
static const char CHECK_SQL[] =
    "WITH RECURSIVE start AS ("
    "  SELECT $1::\"char\" AS k, CASE $1 WHEN 'f' THEN to_regproc($2)::oid ELSE to_regclass($2)::oid END AS o"
    "), stmt AS ("
    "  SELECT $3 OR coalesce(b ~ ':commandType [2-5]', false) AS writes,"
    "         $3 OR coalesce(b ~ ':commandType [35]|[{]SETTODEFAULT', false) AS defaults"
    "  FROM start LEFT JOIN LATERAL (SELECT prosqlbody::text AS b FROM pg_proc"
    "                                WHERE start.k = 'f' AND oid = start.o) p ON true"
    "), reached(k, o) AS ("
    "  SELECT k, o FROM start"
    "  UNION"
    "  SELECT n.k, n.o FROM reached r, stmt, LATERAL ("
    "    SELECT x.k, x.o FROM pg_proc p, LATERAL (" REFS("p.prosqlbody") ") x WHERE r.k = 'f' AND p.oid = r.o"
    "    UNION ALL SELECT 'f', oprcode FROM pg_operator WHERE r.k = 'o' AND oid = r.o"
    "    UNION ALL SELECT 't', typbasetype FROM pg_type WHERE r.k = 't' AND oid = r.o AND typbasetype <> 0"
    "    UNION ALL SELECT x.k, x.o FROM pg_constraint c, LATERAL (" REFS("c.conbin") ") x"
    "      WHERE r.k = 't' AND c.contypid = r.o"
    "    UNION ALL SELECT x.k, x.o FROM pg_rewrite w, LATERAL (" REFS("w.ev_action") ") x"
    "      WHERE r.k = 'r' AND w.ev_class = r.o"
    "    UNION ALL SELECT x.k, x.o FROM pg_policy p, LATERAL (" REFS("p.polqual") " UNION ALL " REFS("p.polwithcheck") ") x"
    "      WHERE r.k = 'r' AND p.polrelid = r.o"
    "    UNION ALL SELECT 'r', inhrelid FROM pg_inherits WHERE r.k = 'r' AND inhparent = r.o"
    "    UNION ALL SELECT x.k, x.o FROM pg_attrdef d"
    "      JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum, LATERAL (" REFS("d.adbin") ") x"
    "      WHERE r.k = 'r' AND d.adrelid = r.o AND (stmt.defaults OR (stmt.writes AND a.attgenerated <> ''))"
    "    UNION ALL SELECT 'f', t.tgfoid FROM pg_trigger t WHERE stmt.writes AND r.k = 'r' AND t.tgrelid = r.o"
    "    UNION ALL SELECT x.k, x.o FROM pg_trigger t, LATERAL (" REFS("t.tgqual") ") x"
    "      WHERE stmt.writes AND r.k = 'r' AND t.tgrelid = r.o"
    "    UNION ALL SELECT x.k, x.o FROM pg_constraint c, LATERAL (" REFS("c.conbin") ") x"
    "      WHERE stmt.writes AND r.k = 'r' AND c.conrelid = r.o"
    "    UNION ALL SELECT 'r', conrelid FROM pg_constraint"
    "      WHERE stmt.writes AND r.k = 'r' AND confrelid = r.o AND contype = 'f'"
    "    UNION ALL SELECT x.k, x.o FROM pg_constraint c"
    "      JOIN pg_attrdef d ON d.adrelid = c.conrelid AND d.adnum = ANY (c.conkey), LATERAL (" REFS("d.adbin") ") x"
    "      WHERE stmt.writes AND r.k = 'r' AND c.confrelid = r.o AND c.contype = 'f'"
    "        AND 'd' IN (c.confdeltype, c.confupdtype)"
    "    UNION ALL SELECT 'x', w.oid FROM pg_rewrite w"
    "      WHERE stmt.writes AND r.k = 'r' AND w.ev_class = r.o AND w.ev_type <> '1'"
    "    UNION ALL SELECT x.k, x.o FROM pg_index i, LATERAL (" REFS("i.indexprs") " UNION ALL " REFS("i.indpred") ") x"
    "      WHERE stmt.writes AND r.k = 'r' AND i.indrelid = r.o"
    "  ) n"
    ")"
    "SELECT (SELECT CASE r.k WHEN 'f' THEN 'it calls ' || r.o::regprocedure::text"
    "                        WHEN 'x' THEN 'it fires the rule ' || w.rulename || ' on ' || w.ev_class::regclass::text"
    "                        ELSE 'it uses the foreign table ' || r.o::regclass::text END"
    "        FROM reached r"
    "        LEFT JOIN pg_proc p ON r.k = 'f' AND p.oid = r.o"
    "        LEFT JOIN pg_class c ON r.k = 'r' AND c.oid = r.o"
    "        LEFT JOIN pg_rewrite w ON r.k = 'x' AND w.oid = r.o"
    "        WHERE CASE WHEN p.oid >= 16384 THEN p.prosqlbody IS NULL"
    "                   ELSE p.provolatile = 'v' AND p.proname NOT IN (" HARMLESS_VOLATILE ") END"
    "           OR c.relkind = 'f' OR w.oid IS NOT NULL"
    "        LIMIT 1),"
    "       (SELECT writes FROM stmt)";

/* Ends the dry run's transaction (or savepoint) whatever state it is in; keeps c->res. */
static void sim_end(conn *c) {
    if (!c->in_sim) return;
    c->in_sim = 0;
    if (PQstatus(c->pg) != CONNECTION_OK || c->broken) return;
    PQsetnonblocking(c->pg, 0);
    PGresult *r = PQexec(c->pg, c->dry_tx ? "ROLLBACK TO SAVEPOINT runbook_dry_run; RELEASE SAVEPOINT runbook_dry_run"
                                          : "ROLLBACK");
    PQclear(r);
    PQsetnonblocking(c->pg, 1);
}

/* Runs one statement inside the dry run's transaction; on failure ends the
 * transaction and raises. */
static void sim_run(lua_State *L, conn *c, const char *op, const char *sql, int n, const char *const *vals) {
    outcome o = attempt(L, c, sql, n, vals);
    if (succeeded(c, o)) return;
    sim_end(c);
    raise_outcome(L, c, op, o);
}

/* The runbook's SET and RESET statements, replayed in each transaction (the
 * connection's user value). */
static void push_settings(lua_State *L) {
    lua_getiuservalue(L, 1, 1);
}

/* Sends a statement the module built, raising on failure (ending the
 * transaction). */
static void sim_send(lua_State *L, conn *c, const char *op, int sent) {
    outcome o = finish(L, c, sent);
    if (!succeeded(c, o)) sim_end(c), raise_outcome(L, c, op, o);
}

/* CHECK_SQL, prepared once per connection with the search_path pinned (a
 * prepared statement keeps the search_path it was prepared with). */
static void prepare_check(lua_State *L, conn *c, const char *op) {
    if (c->check_ready) return;
    sim_run(L, c, op, "SAVEPOINT runbook_check", 0, NULL);
    sim_run(L, c, op, "SET LOCAL search_path = pg_catalog, pg_temp", 0, NULL);
    sim_send(L, c, op, PQsendPrepare(c->pg, "runbook_dry_run_check", CHECK_SQL, 0, NULL));
    sim_run(L, c, op, "ROLLBACK TO SAVEPOINT runbook_check", 0, NULL);
    c->check_ready = 1;
}

/* Opens the transaction a dry-run statement runs in, with the runbook's
 * settings in force. */
static void sim_begin(lua_State *L, conn *c, const char *op) {
    run_plain(L, c, op, c->dry_tx ? "SAVEPOINT runbook_dry_run" : "BEGIN READ WRITE");
    c->in_sim = 1;
    sim_run(L, c, op, "SET LOCAL jit = off", 0, NULL);   /* compiling CHECK_SQL takes seconds */
    prepare_check(L, c, op);
    push_settings(L);
    for (lua_Integer i = 1; lua_rawgeti(L, -1, i) == LUA_TSTRING; i++) {
        sim_run(L, c, op, lua_tostring(L, -1), 0, NULL);
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
}

/* Parameter type names for the probe's signature, as the server infers them. */
static const char *push_param_types(lua_State *L, conn *c, const char *op, const char *sql, int n) {
    if (n == 0) return lua_pushliteral(L, "");
    sim_send(L, c, op, PQsendPrepare(c->pg, "", sql, n, NULL));
    sim_send(L, c, op, PQsendDescribePrepared(c->pg, ""));
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '{');
    for (int i = 0; i < PQnparams(c->res); i++) {
        if (i) luaL_addchar(&b, ',');
        lua_pushinteger(L, (lua_Integer)PQparamtype(c->res, i));
        luaL_addvalue(&b);
    }
    luaL_addchar(&b, '}');
    luaL_pushresult(&b);
    const char *oids[] = { lua_tostring(L, -1) };
    sim_run(L, c, op,
            "SELECT pg_catalog.string_agg(CASE t WHEN 705 THEN 'text' ELSE pg_catalog.format_type(t, NULL) END, ', '"
            " ORDER BY i) FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS u(t, i)", 1, oids);
    return lua_pushstring(L, PQgetisnull(c->res, 0, 0) ? "" : PQgetvalue(c->res, 0, 0));
}

/* Asks the server what `target` (the probe function, or a table for COPY)
 * would touch; returns why it cannot be simulated, NULL when it can, and
 * whether it writes. Raises (ending the transaction) when the check fails. */
static const char *server_check(lua_State *L, conn *c, const char *op, const char *kind, const char *target,
                                int writes, int *writes_out) {
    const char *vals[] = { kind, target, writes ? "true" : "false" };
    sim_send(L, c, op, PQsendQueryPrepared(c->pg, "runbook_dry_run_check", 3, vals, NULL, NULL, 0));
    *writes_out = PQgetvalue(c->res, 0, 1)[0] == 't';
    return PQgetisnull(c->res, 0, 0) ? NULL : lua_pushstring(L, PQgetvalue(c->res, 0, 0));
}

/* Records a write the dry run could not even try (its statement failed to
 * parse or the check failed), then raises its error. */
static int fail_dry(lua_State *L, conn *c, gated *g, const char *op, outcome o) {
    sim_end(c);
    if (g->e.summary) {
        g->e.can_simulate = 1;
        g->d = rb_gate(L, &g->e);
        push_failure(L, c, o);
        rb_gate_done(L, &g->e, g->d, 0);
    }
    return raise_outcome(L, c, op, o);
}

/* Why a utility statement is not simulated (its summary stays the statement). */
static const char CANNOT_CHECK[] = "PostgreSQL cannot say what it does before it runs";

/* Probes a statement: NULL and *writes when the server could check it, else
 * why not. Raises the statement's own errors (a misspelt column). */
static const char *probe(lua_State *L, conn *c, gated *g, const char *op, const char *sql, int n, int *writes) {
    const char *types = push_param_types(L, c, op, sql, n);
    const char *create = lua_pushfstring(L, "CREATE FUNCTION pg_temp.runbook_probe(%s) RETURNS void LANGUAGE sql "
                                            "BEGIN ATOMIC\n%s\n;\nEND", types, sql);
    outcome o = attempt(L, c, create, 0, NULL);
    if (!succeeded(c, o)) {
        const char *state = c->res ? PQresultErrorField(c->res, PG_DIAG_SQLSTATE) : NULL;
        if (o.why == WAIT_READY && state && strcmp(state, "0A000") == 0) return CANNOT_CHECK;
        if (o.why == WAIT_READY && state && strcmp(state, "42601") == 0) {
            /* a syntax error, or a statement a function body refuses (SELECT ... INTO): parsed alone, it tells */
            sim_end(c);
            o = finish(L, c, PQsendPrepare(c->pg, "", sql, n, NULL));
            if (succeeded(c, o)) return CANNOT_CHECK;
        }
        fail_dry(L, c, g, op, o);
    }
    return server_check(L, c, op, "f", "pg_temp.runbook_probe", 0, writes);
}

/* BEGIN, COMMIT and the like in a dry run: the module's transaction opens
 * and always rolls back; savepoints have nothing to undo. */
static void dry_transaction(lua_State *L, conn *c, const char *op, const char *sql) {
    lexer lx = { sql };
    token t = next_token(&lx), t2 = next_token(&lx);
    for (lexer rest = lx; t2.type != TOK_END;) {   /* one statement, as the extended protocol insists */
        token u = next_token(&rest);
        if (u.type == TOK_END) break;
        if (u.type == TOK_OTHER && *u.s == ';' && next_token(&(lexer){ rest.p }).type != TOK_END)
            rb_error(L, "pg", op, "42601", 0, "cannot insert multiple commands into a prepared statement");
    }
    if (word_is(&t, "BEGIN") || word_is(&t, "START")) {
        if (!c->dry_tx) run_plain(L, c, op, "BEGIN READ WRITE");
        c->dry_tx = 1;
    } else if (!word_is(&t, "SAVEPOINT") && !word_is(&t, "RELEASE") && !word_is(&t2, "TO")) {
        if (c->dry_tx) run_plain(L, c, op, "ROLLBACK");
        c->dry_tx = 0;
    }
    scratch_free(c);
}

/* SET and RESET, remembered for the transactions to come (RESET ALL forgets). */
static void remember_setting(lua_State *L, const char *sql) {
    lexer lx = { sql };
    token t = next_token(&lx), t2 = next_token(&lx);
    push_settings(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (word_is(&t, "RESET") && word_is(&t2, "ALL")) {
        for (; n > 0; n--) lua_pushnil(L), lua_rawseti(L, -2, n);
    } else {
        if (n >= MAX_SETTINGS) luaL_error(L, "pg: more than %d SET statements in one dry run", MAX_SETTINGS);
        lua_pushstring(L, sql);
        lua_rawseti(L, -2, n + 1);
    }
    lua_pop(L, 1);
}

/* A statement in a dry run (see above). Writes and statements that cannot
 * be simulated go through the gate; reads just run. */
static rb_decision dry_statement(lua_State *L, conn *c, const char *op, const char *sql, int n, const char **vals,
                                 const sql_class *k, int force_write) {
    if (k->kind == SQL_TRANSACTION) {
        dry_transaction(L, c, op, sql);
        return RB_SIMULATE;
    }
    gated g = { { "pg", op, PQdb(c->pg), NULL, 0 }, RB_SKIP };
    if (k->table[0]) g.e.target = lua_pushfstring(L, "%s.%s", PQdb(c->pg), k->table);
    const char *what = push_sql_summary(L, sql);
    if (k->kind == SQL_WRITE) g.e.summary = lua_pushfstring(L, "run: %s", what);
    lexer lx = { sql };
    token t = next_token(&lx);
    const char *why = force_write ? "marked write = true" : NULL;
    int writes = k->kind == SQL_WRITE;
    if (!why) {
        sim_begin(L, c, op);
        if (word_is(&t, "SHOW") || word_is(&t, "SET") || word_is(&t, "RESET")) {
            sim_run(L, c, op, sql, n, vals);
            sim_end(c);
            if (!word_is(&t, "SHOW")) remember_setting(L, sql);
            return word_is(&t, "SHOW") ? RB_PERFORM : RB_SIMULATE;
        }
        why = probe(L, c, &g, op, sql, n, &writes);
        if (!writes) g.e.summary = NULL;
    }
    if (writes || why) {
        int named = why && why != CANNOT_CHECK;   /* the server named what a rollback would not undo */
        g.e.summary = lua_pushfstring(L, "run: %s%s%s", what, named ? "; " : "", named ? why : "");
        g.e.can_simulate = why == NULL;
        g.d = rb_gate(L, &g.e);
    }
    if (why) {
        sim_end(c);
        scratch_free(c);
        lua_pushstring(L, why);
        rb_gate_done(L, &g.e, g.d, 1);
        return RB_SKIP;
    }
    outcome o = attempt(L, c, sql, n, vals);
    if (!succeeded(c, o)) fail_dry(L, c, &g, op, o);
    sim_end(c);
    if (!writes) return RB_PERFORM;
    g.e.summary = push_outcome(L, c->res, k, g.e.summary);
    lua_pushliteral(L, "rolled back");
    rb_gate_done(L, &g.e, g.d, 1);
    return RB_SIMULATE;
}

/* Runs `sql` with the parameters at stack[first..last], through the gate when
 * it writes. On success c->res holds the result (NULL when skipped). */
static rb_decision statement(lua_State *L, conn *c, const char *op, const char *sql, int first, int last,
                             int force_write) {
    ensure_connected(L, c, op);
    sql_class k = classify(sql);
    if (force_write && k.kind != SQL_WRITE) k.kind = SQL_WRITE, k.simulatable = 0;
    int dry = rb_dry_run();
    sync_readonly(L, c, dry);
    sync_statement_timeout(L, c);
    int n;
    const char **vals = params(L, first, last, &n);
    if (dry) return dry_statement(L, c, op, sql, n, vals, &k, force_write);
    if (k.kind != SQL_WRITE) {
        if (k.kind == SQL_TRANSACTION) rb_journal_flush(L);   /* a COMMIT: see deferred below */
        run(L, c, op, sql, n, vals);
        return RB_PERFORM;
    }
    gated g = { { "pg", op, PQdb(c->pg), NULL, 0 }, RB_PERFORM };
    if (k.table[0]) g.e.target = lua_pushfstring(L, "%s.%s", PQdb(c->pg), k.table);
    g.e.summary = lua_pushfstring(L, "run: %s", push_sql_summary(L, sql));
    /* Inside a transaction block, plain DML that calls no function a rollback
     * leaves done (one statement: the extended protocol takes no more) takes
     * place at the COMMIT, before which the block's intents are made durable
     * together. */
    lexer lx = { sql };
    token t = next_token(&lx);
    int at_commit = k.simulatable && PQtransactionStatus(c->pg) == PQTRANS_INTRANS &&
                    (word_is(&t, "INSERT") || word_is(&t, "UPDATE") || word_is(&t, "DELETE") || word_is(&t, "MERGE"));
    g.d = at_commit ? rb_gate_deferred(L, &g.e) : rb_gate(L, &g.e);
    outcome o = attempt(L, c, sql, n, vals);
    if (!succeeded(c, o)) {
        push_failure(L, c, o);
        rb_gate_done(L, &g.e, g.d, 0);
        raise_outcome(L, c, op, o);
    }
    g.e.summary = push_outcome(L, c->res, &k, g.e.summary);
    lua_pushstring(L, PQcmdStatus(c->res));
    rb_gate_done(L, &g.e, g.d, 1);
    return g.d;
}

/* (sql, params...) or ({sql, params..., write = true, n = count}); leaves
 * the SQL at index 2 and the parameters from index 3 to the top. */
static const char *statement_args(lua_State *L, int *force_write) {
    *force_write = 0;
    if (lua_type(L, 2) != LUA_TTABLE) return luaL_checkstring(L, 2);
    luaL_argcheck(L, lua_gettop(L) == 2, 3, "parameters go inside the table when the statement is one");
    lua_getfield(L, 2, "write");
    *force_write = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 2, "n");
    lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_rawlen(L, 2);
    lua_pop(L, 1);
    luaL_argcheck(L, n >= 1 && n < 10000, 2, "the statement table needs the SQL as its first item");
    luaL_checkstack(L, (int)n + 2, "too many parameters");
    for (lua_Integer i = 1; i <= n; i++) lua_rawgeti(L, 2, i);
    lua_remove(L, 2);
    luaL_argcheck(L, lua_type(L, 2) == LUA_TSTRING, 2, "the statement table needs the SQL as its first item");
    return lua_tostring(L, 2);
}

static const char *decision_word(rb_decision d) {
    return d == RB_PERFORM ? "performed" : d == RB_SIMULATE ? "simulated" : "skipped";
}

static int conn_query(lua_State *L) {
    conn *c = check_conn(L, 1);
    int force;
    const char *sql = statement_args(L, &force);
    rb_decision d = statement(L, c, "query", sql, 3, lua_gettop(L), force);
    if (d == RB_SKIP) {
        push_skipped(L);
        return 1;
    }
    push_rows(L, c);
    if (d == RB_SIMULATE) {
        lua_pushboolean(L, 1), lua_setfield(L, -2, "simulated");
        lua_pushinteger(L, affected(c->res)), lua_setfield(L, -2, "affected");
    }
    scratch_free(c);
    return 1;
}

static int conn_exec(lua_State *L) {
    conn *c = check_conn(L, 1);
    int force;
    const char *sql = statement_args(L, &force);
    rb_decision d = statement(L, c, "exec", sql, 3, lua_gettop(L), force);
    lua_pushinteger(L, d == RB_SKIP ? 0 : affected(c->res));
    lua_pushstring(L, decision_word(d));
    scratch_free(c);
    return 2;
}

/* ---- COPY --------------------------------------------------------------- */

/* Sends the COPY statement and waits for the server to switch to COPY mode;
 * returns 1 when it did, else 0 with the outcome in *o and c->res. */
static int start_copy(lua_State *L, conn *c, const char *sql, ExecStatusType want, double deadline, outcome *o) {
    o->secs = rb_remaining(L, c->timeout);
    o->why = WAIT_READY;
    o->copy = 0;
    if (!PQsendQueryParams(c->pg, sql, 0, NULL, NULL, NULL, NULL, 0)) return 0;   /* one statement */
    o->why = flush_all(c->pg, deadline);
    waiter w = { deadline, o->why };
    if (o->why != WAIT_READY || !wait_idle(c->pg, &w)) { c->broken = 1; return 0; }
    if ((o->why = w.why) != WAIT_READY) { collect(c, &w); return 0; }
    if (c->res) PQclear(c->res);   /* the SET or BEGIN sent before the COPY */
    c->res = PQgetResult(c->pg);
    if (c->res && PQresultStatus(c->res) == want) {
        PQclear(c->res);
        c->res = NULL;
        return 1;
    }
    collect(c, &w);
    o->copy = c->res && PQresultStatus(c->res) != PGRES_FATAL_ERROR; /* not a COPY of that direction */
    return 0;
}

/* The COPY's final result into c->res. */
static void finish_copy(conn *c, double deadline, outcome *o) {
    int why = flush_all(c->pg, deadline);
    waiter w = { deadline, WAIT_READY };
    if (why != WAIT_READY) c->broken = 1;
    else collect(c, &w), why = w.why;
    if (o->why == WAIT_READY) o->why = why;
}

/* Streams COPY ... TO STDOUT into c->file. */
static void copy_out(conn *c, double deadline, outcome *o) {
    for (;;) {
        char *buf;
        int n = PQgetCopyData(c->pg, &buf, 1);
        if (n > 0) {
            size_t w = fwrite(buf, 1, (size_t)n, c->file);
            PQfreemem(buf);
            if (w != (size_t)n) { o->why = -errno; break; }
        } else if (n == 0) {
            int w = wait_socket(c->pg, 0, deadline);
            if (w != WAIT_READY) { o->why = w; break; }
            if (!PQconsumeInput(c->pg)) break;
        } else {
            break;
        }
    }
    if (o->why != WAIT_READY) {
        /* stop the server sending: cancel, then the connection is reset before its next use */
        PGcancel *cancel = PQgetCancel(c->pg);
        char err[256];
        if (cancel) PQcancel(cancel, err, sizeof err), PQfreeCancel(cancel);
        c->broken = 1;
        return;
    }
    finish_copy(c, deadline, o);
}

/* Streams c->file into COPY ... FROM STDIN, never holding more than a chunk. */
static void copy_in(conn *c, double deadline, outcome *o) {
    char buf[65536];
    size_t n;
    const char *abort_why = NULL;
    while (!abort_why && (n = fread(buf, 1, sizeof buf, c->file)) > 0) {
        int r;
        while ((r = PQputCopyData(c->pg, buf, (int)n)) == 0) {
            int w = wait_socket(c->pg, 1, deadline);
            if (w != WAIT_READY) { o->why = w; abort_why = "cancelled: out of time"; break; }
        }
        if (r < 0) break;
    }
    if (!abort_why && ferror(c->file)) abort_why = "cannot read the input file", o->why = -EIO;
    while (PQputCopyEnd(c->pg, abort_why) == 0)
        if (wait_socket(c->pg, 1, deadline) != WAIT_READY) break;
    finish_copy(c, abort_why ? rb_now() + CANCEL_GRACE : deadline, o);
}

static int copy_succeeded(conn *c, const outcome *o) {
    return o->why == WAIT_READY && !o->copy && c->res && PQresultStatus(c->res) == PGRES_COMMAND_OK;
}

static int raise_copy(lua_State *L, conn *c, gated *g, const char *op, outcome o, const char *path) {
    if (g->d == RB_SIMULATE) sim_end(c);
    if (o.why < 0) {
        gate_failed(L, &g->e, g->d, strerror(-o.why));
        return rb_error(L, "pg", op, "io_error", 0, "%s: %s", path, strerror(-o.why));
    }
    if (o.copy) {
        gate_failed(L, &g->e, g->d, "wrong statement");
        return rb_error(L, "pg", op, "wrong_call", 0, "%s needs a COPY ... TO STDOUT statement", op);
    }
    push_failure(L, c, o);
    rb_gate_done(L, &g->e, g->d, 0);
    return raise_outcome(L, c, op, o);
}

static void push_copied(lua_State *L, conn *c) {
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, affected(c->res));
    lua_setfield(L, -2, "rows");
}

/* copy_to(sql, path): writing a local file, so a dry run skips it. */
static int conn_copy_to(lua_State *L) {
    conn *c = check_conn(L, 1);
    const char *sql = luaL_checkstring(L, 2), *path = luaL_checkstring(L, 3);
    ensure_connected(L, c, "copy_to");
    sync_readonly(L, c, rb_dry_run());
    sync_statement_timeout(L, c);
    gated g = { { "pg", "copy_to", path, NULL, 0 }, RB_PERFORM };
    g.e.summary = lua_pushfstring(L, "copy %s to %s", push_sql_summary(L, sql), path);
    if ((g.d = rb_gate(L, &g.e)) == RB_SKIP) return gate_skipped(L, &g.e);
    const char *tmp = lua_pushfstring(L, "%s.tmp-%d", path, (int)rb_now());
    scratch_free(c);   /* a COPY that raised before finishing left its file */
    if (!(c->tmp_path = strdup(tmp))) return luaL_error(L, "out of memory");
    if (!(c->file = fopen(tmp, "wb"))) {
        outcome o = { -errno, 0, 0 };
        free(c->tmp_path), c->tmp_path = NULL;
        return raise_copy(L, c, &g, "copy_to", o, path);
    }
    outcome o;
    double deadline = rb_now() + rb_remaining(L, c->timeout);
    if (start_copy(L, c, sql, PGRES_COPY_OUT, deadline, &o)) copy_out(c, deadline, &o);
    int closed = fclose(c->file);
    c->file = NULL;
    if (closed != 0 && o.why == WAIT_READY) o.why = -errno;
    if (copy_succeeded(c, &o) && rename(c->tmp_path, path) != 0) o.why = -errno;
    if (!copy_succeeded(c, &o)) return raise_copy(L, c, &g, "copy_to", o, path);
    free(c->tmp_path), c->tmp_path = NULL;
    g.e.summary = lua_pushfstring(L, "copy %I rows to %s", (LUAI_UACINT)affected(c->res), path);
    lua_pushstring(L, PQcmdStatus(c->res));
    rb_gate_done(L, &g.e, g.d, 1);
    push_copied(L, c);
    scratch_free(c);
    return 1;
}

/* A name, schema-qualified part by part ("public"."tasks"), quoted by libpq. */
static const char *push_quoted_name(lua_State *L, conn *c, int arg, const char *name) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (const char *p = name;;) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len >= 2 && p[0] == '"' && p[len - 1] == '"') p++, len -= 2;
        if (len == 0) luaL_argerror(L, arg, lua_pushfstring(L, "%s is not a valid name", name));
        char *q = PQescapeIdentifier(c->pg, p, len);
        if (!q) luaL_error(L, "out of memory");
        luaL_addstring(&b, q);
        PQfreemem(q);
        if (!dot) break;
        luaL_addchar(&b, '.');
        p = dot + 1;
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

static void add_literal(lua_State *L, conn *c, luaL_Buffer *b, const char *s) {
    char *q = PQescapeLiteral(c->pg, s, strlen(s));
    if (!q) luaL_error(L, "out of memory");
    lua_pushstring(L, q);
    PQfreemem(q);
    luaL_addvalue(b);
}

/* COPY <table> [(<columns>)] FROM STDIN WITH (...), from the table name and
 * opts {columns, format, header, delimiter, null}: built here, never taken
 * from a runbook, so no FROM PROGRAM or WHERE rides along. */
static const char *push_copy_from(lua_State *L, conn *c, const char *quoted_table) {
    static const char *const formats[] = { "csv", "text", "binary", NULL };
    int opts = lua_istable(L, 4) ? 4 : 0;
    const char *format = "csv", *delimiter = NULL, *null = NULL;
    int header = 1;
    if (opts) {
        lua_getfield(L, opts, "format");
        if (!lua_isnil(L, -1)) format = formats[luaL_checkoption(L, -1, NULL, formats)];
        lua_getfield(L, opts, "header");
        header = lua_isnil(L, -1) || lua_toboolean(L, -1);
        lua_getfield(L, opts, "delimiter");
        delimiter = lua_tostring(L, -1);
        lua_getfield(L, opts, "null");
        null = lua_tostring(L, -1);
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "COPY ");
    luaL_addstring(&b, quoted_table);
    if (opts && lua_getfield(L, opts, "columns") == LUA_TTABLE) {
        int cols = lua_gettop(L);
        for (lua_Integer i = 1; lua_rawgeti(L, cols, i) == LUA_TSTRING; i++) {
            luaL_addstring(&b, i == 1 ? " (" : ", ");
            luaL_addstring(&b, push_quoted_name(L, c, 4, lua_tostring(L, -1)));
            lua_pop(L, 2);
        }
        lua_pop(L, 1);
        if (lua_rawlen(L, cols) > 0) luaL_addchar(&b, ')');
    }
    luaL_addstring(&b, " FROM STDIN WITH (FORMAT ");
    luaL_addstring(&b, format);
    if (strcmp(format, "csv") == 0 && header) luaL_addstring(&b, ", HEADER");
    if (delimiter) luaL_addstring(&b, ", DELIMITER "), add_literal(L, c, &b, delimiter);
    if (null) luaL_addstring(&b, ", NULL "), add_literal(L, c, &b, null);
    luaL_addchar(&b, ')');
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

/* copy_from(path, table, opts): a write the dry run simulates (the rows go
 * in and are rolled back, which also checks the file parses) unless the
 * server's check of the table (defaults, triggers) says it cannot be. */
static int conn_copy_from(lua_State *L) {
    conn *c = check_conn(L, 1);
    const char *path = luaL_checkstring(L, 2), *table = luaL_checkstring(L, 3);
    if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TTABLE);
    ensure_connected(L, c, "copy_from");
    const char *quoted = push_quoted_name(L, c, 3, table);
    const char *sql = push_copy_from(L, c, quoted);
    scratch_free(c);   /* a COPY that raised before finishing left its file */
    if (!(c->file = fopen(path, "rb")))
        return rb_error(L, "pg", "copy_from", "io_error", 0, "%s: %s", path, strerror(errno));
    int dry = rb_dry_run();
    sync_readonly(L, c, dry);
    sync_statement_timeout(L, c);
    sql_class k = { SQL_WRITE, 1, "" };
    snprintf(k.table, sizeof k.table, "%s", table);
    gated g = { { "pg", "copy_from", table, NULL, 1 }, RB_PERFORM };
    const char *why = NULL;
    if (dry) {
        int writes;
        sim_begin(L, c, "copy_from");
        why = server_check(L, c, "copy_from", "r", quoted, 1, &writes);
        g.e.can_simulate = why == NULL;
    }
    g.e.summary = lua_pushfstring(L, "copy %s into %s%s%s", path, table, why ? "; " : "", why ? why : "");
    g.d = rb_gate(L, &g.e);
    if (g.d == RB_SKIP) {
        if (dry) sim_end(c);
        lua_pushstring(L, why);
        rb_gate_done(L, &g.e, g.d, 1);
        push_skipped(L);
        return 1;
    }
    outcome o;
    double deadline = rb_now() + rb_remaining(L, c->timeout);
    if (start_copy(L, c, sql, PGRES_COPY_IN, deadline, &o)) copy_in(c, deadline, &o);
    if (!copy_succeeded(c, &o)) return raise_copy(L, c, &g, "copy_from", o, path);
    if (g.d == RB_SIMULATE) sim_end(c);
    g.e.summary = push_outcome(L, c->res, &k, g.e.summary);
    if (g.d == RB_SIMULATE) lua_pushliteral(L, "rolled back");
    else lua_pushstring(L, PQcmdStatus(c->res));
    rb_gate_done(L, &g.e, g.d, 1);
    push_copied(L, c);
    scratch_free(c);
    return 1;
}

/* ---- the rest ----------------------------------------------------------- */

static int conn_status(lua_State *L) {
    conn *c = check_conn(L, 1);
    static const char *const tx[] = { "idle", "active", "in_transaction", "failed", "unknown" };
    PGTransactionStatusType ts = PQtransactionStatus(c->pg);
    lua_createtable(L, 0, 8);
    lua_pushstring(L, ts <= PQTRANS_UNKNOWN ? tx[ts] : "unknown");
    lua_setfield(L, -2, "transaction");
    lua_pushboolean(L, PQstatus(c->pg) == CONNECTION_OK);
    lua_setfield(L, -2, "connected");
    lua_pushinteger(L, PQserverVersion(c->pg));
    lua_setfield(L, -2, "server_version");
    lua_pushstring(L, PQdb(c->pg));
    lua_setfield(L, -2, "database");
    lua_pushstring(L, PQuser(c->pg));
    lua_setfield(L, -2, "user");
    lua_pushstring(L, PQhost(c->pg));
    lua_setfield(L, -2, "host");
    lua_pushstring(L, PQport(c->pg));
    lua_setfield(L, -2, "port");
    lua_pushinteger(L, PQbackendPID(c->pg));
    lua_setfield(L, -2, "pid");
    return 1;
}

static int conn_tostring(lua_State *L) {
    conn *c = luaL_checkudata(L, 1, CONN_MT);
    if (!c->pg) lua_pushliteral(L, "pg connection (closed)");
    else lua_pushfstring(L, "pg connection %s", push_where(L, c->pg));
    return 1;
}

/* conninfo(s) -> {keyword = value}: libpq's reading of a URL or key=value
 * string, so pg.lua can hand pg_dump its connection in the environment. */
static int pg_conninfo(lua_State *L) {
    const char *s = luaL_checkstring(L, 1);
    register_passwords(L, s);
    PQconninfoOption *opts = parse_conninfo(L, s, "conninfo");
    lua_newtable(L);
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val) continue;
        lua_pushstring(L, o->val);
        lua_setfield(L, -2, o->keyword);
    }
    PQconninfoFree(opts);
    return 1;
}

static int pg_set_json(lua_State *L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    luaL_checkany(L, 3);
    lua_settop(L, 3);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_NULL);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_JSON_DECODE);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_JSON_ENCODE);
    return 0;
}

static int pg_classify(lua_State *L) {
    sql_class k = classify(luaL_checkstring(L, 1));
    lua_pushstring(L, k.kind == SQL_READ ? "read" : k.kind == SQL_WRITE ? "write" : "transaction");
    lua_pushboolean(L, k.kind == SQL_WRITE && k.simulatable);
    return 2;
}

static const luaL_Reg conn_methods[] = {
    {"query", conn_query},
    {"exec", conn_exec},
    {"copy_to", conn_copy_to},
    {"copy_from", conn_copy_from},
    {"status", conn_status},
    {"close", conn_close},
    {NULL, NULL}
};

static const luaL_Reg pg_funcs[] = {
    {"connect", pg_connect},
    {"conninfo", pg_conninfo},
    {"set_json", pg_set_json},
    {"classify", pg_classify},
    {NULL, NULL}
};

int luaopen_runbook_pg(lua_State *L) {
    return open_conn_module(L, pg_funcs, CONN_MT, conn_methods, conn_close, conn_tostring);
}
