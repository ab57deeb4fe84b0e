/*
 * kafka.c: Kafka over librdkafka. One client per connection settings, reused
 * for the whole run; stdlib/kafka.lua builds lag, plans and summaries on it.
 *
 *   new(props) -> client            props: librdkafka properties (strings);
 *                                   passwords among them become secrets; those
 *                                   that run a program, load code or write a
 *                                   file are refused (see host_properties)
 *   probe(host, port, timeout, plaintext) -> true, apis | false, reason
 *                                   does a broker answer ApiVersions (or,
 *                                   when not plaintext, accept TCP)?
 *
 * On a plaintext listener metadata (of every topic), offsets and
 * group_offsets speak the protocol themselves, falling back to librdkafka
 * for anything but the plain case (see "over the wire" below).
 *
 * Client methods (timeout: seconds, always bounded by the step's deadline):
 *   metadata(timeout, topic)               brokers and every topic's (or one topic's) partitions
 *   offsets(list, timeout)                 ListOffsets for {topic, partition, offset}
 *                                          where offset is -2 earliest, -1 latest
 *                                          or a timestamp in ms; one request per leader
 *   group_offsets(requests, timeout)       OffsetFetch, one per {group, partitions|nil},
 *                                          all in flight together
 *   alter_group_offsets(group, list, timeout, summary)    gated; a dry run simulates
 *   describe_groups(names, timeout)  list_groups(timeout)
 *   describe_configs(topic, timeout)
 *   create_topic(name, partitions, rf, configs, timeout, summary)   gated; a dry run
 *   create_partitions(topic, total, timeout, summary)               validates only
 *   alter_configs(topic, configs, timeout, summary)
 *   produce(messages, timeout, summary, progress)   gated; waits for every delivery
 *   consume_start(list)  consume_poll(timeout)  consume_stop()
 *                                          reads assigned partitions without a group
 *   close()
 *
 * Failures raise rb_error with librdkafka's error name as the code
 * ("UNKNOWN_TOPIC_OR_PART"), "timeout" for a timeout as in every module;
 * per-partition and per-group errors
 * come back in the results as {code, message} for kafka.lua to judge.
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lauxlib.h>
#include <librdkafka/rdkafka.h>
#include <lua.h>

#include "module.h"
#include "net.h"

#define CLIENT_MT "runbook.kafka.client"
#define DEFAULT_TIMEOUT 30.0
#define POLL_SLICE_MS 100   /* how often waits look at Ctrl-C */

static int k_new(lua_State *L);
static int k_probe(lua_State *L);
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);
static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque);

static const luaL_Reg kafka_funcs[] = {
    {"new", k_new},
    {"probe", k_probe},
    {NULL, NULL}
};

/* One delivery report slot per message of a produce call. */
typedef struct {
    rd_kafka_resp_err_t err;
    int32_t partition;
    int64_t offset;
    int done;
} delivery;

/* Each handle is made on first use, so a run that only reads (lag,
 * watermarks) starts, connects and stops one librdkafka handle, not two. */
typedef struct {
    rd_kafka_t *rk;          /* producer handle: admin requests, produce */
    rd_kafka_t *consumer;    /* the reader: metadata, offsets, committed offsets, consume */
    rd_kafka_conf_t *conf;   /* the client's settings, both handles are made from; NULL once closed */
    rd_kafka_queue_t *queue; /* admin results, on rk */
    rd_kafka_queue_t *group_queue; /* OffsetFetch results, on the reader (see k_group_offsets) */
    int consuming;           /* the reader's queue serves consume_poll (rd_kafka_poll_set_consumer) */
    int plaintext;           /* security.protocol plaintext: committed offsets over the wire */
    int debug_protocol;      /* debug=protocol (or all): the wire requests are logged as librdkafka's are */
    int metadata_version;    /* the Metadata version the wire path asks (0: ask ApiVersions first) */
    delivery *deliveries;    /* the produce call in progress */
    size_t pending;
    double connect_timeout;  /* socket.connection.setup.timeout.ms, in seconds */
    char broker_error[256];  /* librdkafka's last error about reaching the cluster */
} client;

/* ---- errors ------------------------------------------------------------- */

static int is_retryable(rd_kafka_resp_err_t err) {
    switch (err) {
    case RD_KAFKA_RESP_ERR__TIMED_OUT: case RD_KAFKA_RESP_ERR__TRANSPORT:
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN: case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__WAIT_COORD: case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
    case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE: case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
    case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT: case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
    case RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS:
    case RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE: case RD_KAFKA_RESP_ERR_NOT_COORDINATOR:
    case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS: case RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS:
        return 1;
    default:
        return 0;
    }
}

/* The error's code: librdkafka's name, "timeout" for the client's timeouts. */
static const char *code_of(rd_kafka_resp_err_t err) {
    switch (err) {
    case RD_KAFKA_RESP_ERR__TIMED_OUT: case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
    case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
        return "timeout";
    default:
        return rd_kafka_err2name(err);
    }
}

/* Why the cluster could not be reached, from the errors librdkafka reported
 * since the last call that asked (served by rd_kafka_poll); "" when none. A
 * broker connection that was not up in time reads as every module says it. */
static const char *push_broker_trouble(lua_State *L, client *c) {
    if (c->rk) rd_kafka_poll(c->rk, 0);
    if (c->consumer && !c->consuming) rd_kafka_poll(c->consumer, 0);
    const char *e = c->broker_error, *slash = strchr(e, '/'), *why;
    if (slash && strstr(e, "Connection setup timed out")) {
        char secs[32];
        snprintf(secs, sizeof secs, "%.3g", c->connect_timeout);
        why = lua_pushfstring(L, "connect to %s timed out after %ss", lua_pushlstring(L, e, (size_t)(slash - e)), secs);
    } else {
        why = lua_pushstring(L, e);
    }
    c->broker_error[0] = '\0';
    return why;
}

/* A broker's or librdkafka's own timeout of a request, with the deadline it had. */
static const char *note_timeout(lua_State *L, rd_kafka_resp_err_t err, const char *msg, int ms) {
    if (err != RD_KAFKA_RESP_ERR__TIMED_OUT) return msg;
    char secs[32];
    snprintf(secs, sizeof secs, "%.3g", ms / 1000.0);
    return lua_pushfstring(L, "%s (timed out after %ss)", msg && *msg ? msg : rd_kafka_err2str(err), secs);
}

/* A failed call that had `ms` milliseconds (0: no deadline of its own). */
static int raise_err(lua_State *L, client *c, const char *op, rd_kafka_resp_err_t err, const char *what, int ms) {
    int unreachable = err == RD_KAFKA_RESP_ERR__TRANSPORT || err == RD_KAFKA_RESP_ERR__TIMED_OUT ||
                      err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN;
    const char *trouble = unreachable ? push_broker_trouble(L, c) : "";
    const char *why = ms > 0 ? note_timeout(L, err, rd_kafka_err2str(err), ms) : rd_kafka_err2str(err);
    return rb_error(L, "kafka", op, code_of(err), is_retryable(err), "%s: %s%s%s", what,
                    *trouble ? trouble : "", *trouble ? "; " : "", why);
}

/* Sets t.error = {code, message} for a failed partition, group or resource. */
static void set_error(lua_State *L, rd_kafka_resp_err_t err, const char *msg) {
    if (!err) return;
    lua_createtable(L, 0, 2);
    set_string(L, "code", code_of(err));
    set_string(L, "message", msg && *msg ? msg : rd_kafka_err2str(err));
    lua_setfield(L, -2, "error");
}

/* ---- the client --------------------------------------------------------- */

static void free_deliveries(client *c) {
    free(c->deliveries);
    c->deliveries = NULL;
    c->pending = 0;
}

/* Idempotent: serves __gc, __close and close(). Undelivered messages are
 * dropped rather than waited for: a finalizer must not block. */
static int client_close(lua_State *L) {
    client *c = luaL_checkudata(L, 1, CLIENT_MT);
    if (c->group_queue) rd_kafka_queue_destroy(c->group_queue);
    if (c->consumer) {
        rd_kafka_assign(c->consumer, NULL);
        rd_kafka_destroy_flags(c->consumer, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    }
    if (c->queue) rd_kafka_queue_destroy(c->queue);
    if (c->rk) {
        rd_kafka_purge(c->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(c->rk, 0);
        rd_kafka_destroy(c->rk);
    }
    if (c->conf) rd_kafka_conf_destroy(c->conf);
    free_deliveries(c);
    c->consumer = c->rk = NULL;
    c->queue = c->group_queue = NULL;
    c->conf = NULL;
    c->consuming = 0;
    return 0;
}

static client *check_client(lua_State *L) {
    client *c = luaL_checkudata(L, 1, CLIENT_MT);
    if (!c->conf) luaL_error(L, "kafka client is closed");
    return c;
}

/* A new handle of the client's settings, reporting errors to it. */
static rd_kafka_t *new_handle(lua_State *L, client *c, rd_kafka_type_t type, rd_kafka_conf_t *conf) {
    char err[512];
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_t *rk = rd_kafka_new(type, conf, err, sizeof err);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        rb_error(L, "kafka", "connect", "_INVALID_ARG", 0, "cannot create the client: %s", err);
    }
    return rk;
}

/* The client, with its producer handle made. */
static client *check_producer(lua_State *L) {
    client *c = check_client(L);
    if (c->rk) return c;
    rd_kafka_conf_t *conf = rd_kafka_conf_dup(c->conf);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    c->rk = new_handle(L, c, RD_KAFKA_PRODUCER, conf);
    c->queue = rd_kafka_queue_new(c->rk);
    return c;
}

/* The reader: a consumer handle that never joins its group nor commits.
 * librdkafka wants a group.id for assign() and, for the OffsetFetch of
 * committed offsets, a consumer group of the handle's own (see
 * k_group_offsets); a group that never joins or commits does not exist on
 * the broker. It connects to every broker at once (not sparse): lag asks all
 * of them, and a coordinator found already connected is asked at once
 * instead of being looked up again when its connection comes up. */
static rd_kafka_t *reader(lua_State *L, client *c) {
    if (c->consumer) return c->consumer;
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_dup(c->conf);
    rd_kafka_conf_set(conf, "group.id", "runbook-reader-no-commit", err, sizeof err);
    rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof err);
    rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", err, sizeof err);
    rd_kafka_conf_set(conf, "enable.partition.eof", "false", err, sizeof err);
    rd_kafka_conf_set(conf, "enable.sparse.connections", "false", err, sizeof err);
    c->consumer = new_handle(L, c, RD_KAFKA_CONSUMER, conf);
    return c->consumer;
}

static int timeout_ms(lua_State *L, int idx) {
    double t = luaL_optnumber(L, idx, DEFAULT_TIMEOUT);
    luaL_argcheck(L, t > 0, idx, "timeout must be positive");
    double left = rb_remaining(L, t);
    if (left < t) t = left;
    return (int)(t * 1000) + 1;
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    client *c = opaque;
    size_t i = (size_t)(uintptr_t)m->_private;
    if (!c || !c->deliveries || i == 0 || i > c->pending) return;
    delivery *d = &c->deliveries[i - 1];
    d->err = m->err;
    d->partition = m->partition;
    d->offset = m->offset;
    d->done = 1;
}

/* Keeps the error that says why; "N/N brokers are down" only follows one. */
static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque) {
    (void)rk;
    client *c = opaque;
    if (!c || (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN && c->broker_error[0])) return;
    snprintf(c->broker_error, sizeof c->broker_error, "%s", reason);
}

/* librdkafka's own log lines (from its threads) pass redaction on their way to stderr. */
static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk;
    int n = snprintf(NULL, 0, "runbook: kafka: %d|%s| %s\n", level, fac, buf);
    char *line = n > 0 ? malloc((size_t)n + 1) : NULL;
    if (!line) return;
    snprintf(line, (size_t)n + 1, "runbook: kafka: %d|%s| %s\n", level, fac, buf);
    rb_write_redacted(stderr, line, (size_t)n);
    free(line);
}

static int is_secret_property(const char *name) {
    return strstr(name, "password") || strstr(name, "secret") ||
           strcmp(name, "sasl.oauthbearer.config") == 0 || strcmp(name, "ssl.key.pem") == 0;
}

/*
 * librdkafka 2.0.2 properties (CONFIGURATION.md) that act on the host rather
 * than on the connection: a runbook, which may be running dry, never sets
 * them, and the gate has no say over what they do.
 *   sasl.kerberos.kinit.cmd     a shell command, run on client creation and
 *                               every relogin interval
 *   sasl.kerberos.min.time.before.relogin
 *                               forced to 0 below, which stops librdkafka
 *                               from running kinit at all, its default
 *                               command too (sasl.kerberos.keytab and
 *                               .principal are substituted into it unquoted,
 *                               so they are harmless only because it never
 *                               runs): a GSSAPI user runs kinit before the
 *                               run, and the ticket cache is used as it is
 *   plugin.library.paths        dlopen()s libraries
 *   ssl.engine.location, ssl.engine.id, ssl.providers
 *                               load OpenSSL engines and providers (code)
 *   offset.store.method, offset.store.path, offset.store.sync.interval.ms
 *                               the legacy file offset store writes files
 * Properties that only read a file (ssl.ca.location, ssl.key.location,
 * ssl.keystore.location) or reach the brokers or an OAuth token endpoint
 * stay allowed.
 */
static const char *const host_properties[] = {
    "sasl.kerberos.kinit.cmd",
    "sasl.kerberos.min.time.before.relogin", "plugin.library.paths",
    "ssl.engine.location", "ssl.engine.id", "ssl.providers",
    "offset.store.method", "offset.store.path", "offset.store.sync.interval.ms", NULL
};

static int is_host_property(const char *name) {
    if (!strncmp(name, "topic.", 6)) name += 6; /* librdkafka's prefix for a topic's default */
    for (int i = 0; host_properties[i]; i++)
        if (!strcmp(name, host_properties[i])) return 1;
    return 0;
}

/* Applies props {name = value} to conf; a bad one is the caller's mistake. */
static void apply_props(lua_State *L, rd_kafka_conf_t *conf) {
    char err[512];
    for (lua_pushnil(L); lua_next(L, 1); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1)) {
            rd_kafka_conf_destroy(conf);
            luaL_argerror(L, 1, "properties must map names to strings");
        }
        const char *k = lua_tostring(L, -2);
        if (is_host_property(k)) {
            rd_kafka_conf_destroy(conf);
            luaL_argerror(L, 1, lua_pushfstring(L, "property %s runs a program, loads code or writes files "
                                                   "on this host, so runbooks cannot set it", k));
        }
        size_t vlen;
        const char *v = lua_tolstring(L, -1, &vlen);
        if (is_secret_property(k)) rb_secret_register(L, v, vlen);
        if (rd_kafka_conf_set(conf, k, v, err, sizeof err) != RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            luaL_argerror(L, 1, lua_pushfstring(L, "property %s: %s", k, err));
        }
    }
}

/* new(props): the client is created closed, then opened, so its finalizer
 * is safe whatever fails in between. */
static int k_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    client *c = lua_newuserdatauv(L, sizeof *c, 1); /* 1: the last wire metadata */
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, CLIENT_MT);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[512];
    /* quiet unless asked: failures reach runbooks as errors, not log lines */
    rd_kafka_conf_set(conf, "log_level", "2", err, sizeof err);
    rd_kafka_conf_set(conf, "client.id", "runbook", err, sizeof err);
    rd_kafka_conf_set_log_cb(conf, on_log);
    apply_props(L, conf);
    rd_kafka_conf_set(conf, "sasl.kerberos.min.time.before.relogin", "0", err, sizeof err); /* no kinit */
    char ms[32];
    size_t len = sizeof ms;
    if (rd_kafka_conf_get(conf, "socket.connection.setup.timeout.ms", ms, &len) == RD_KAFKA_CONF_OK)
        c->connect_timeout = atof(ms) / 1000;
    char proto[32];
    len = sizeof proto;
    c->plaintext = rd_kafka_conf_get(conf, "security.protocol", proto, &len) == RD_KAFKA_CONF_OK &&
                   !strcasecmp(proto, "plaintext");
    char debug[512];
    len = sizeof debug;
    c->debug_protocol = rd_kafka_conf_get(conf, "debug", debug, &len) == RD_KAFKA_CONF_OK &&
                        (strstr(debug, "protocol") || strstr(debug, "all"));
    c->conf = conf;
    return 1;
}

/* ---- topic partition lists ---------------------------------------------- */

/* Reads {{topic=, partition=, offset=}...} at idx into a new list. */
static rd_kafka_topic_partition_list_t *check_partitions(lua_State *L, int idx, int need_offset) {
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)luaL_len(L, idx);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n > 0 ? n : 1);
    for (int i = 1; i <= n; i++) {
        const char *bad = NULL;
        if (lua_geti(L, idx, i) != LUA_TTABLE) {
            rd_kafka_topic_partition_list_destroy(l);
            luaL_argerror(L, idx, "partitions must be tables {topic=, partition=}");
        }
        lua_getfield(L, -1, "topic");
        lua_getfield(L, -2, "partition");
        lua_getfield(L, -3, "offset");
        int isint;
        lua_Integer p = lua_tointegerx(L, -2, &isint);
        lua_Integer off = lua_tointeger(L, -1);
        if (!bad && lua_type(L, -3) != LUA_TSTRING) bad = "each partition needs a topic name";
        if (!bad && (!isint || p < 0)) bad = "each partition needs a partition number >= 0";
        if (!bad && need_offset && !lua_isinteger(L, -1)) bad = "each partition needs an integer offset";
        if (bad) {
            rd_kafka_topic_partition_list_destroy(l);
            luaL_argerror(L, idx, bad);
        }
        rd_kafka_topic_partition_list_add(l, lua_tostring(L, -3), (int32_t)p)->offset = off;
        lua_pop(L, 4);
    }
    return l;
}

static void push_partitions(lua_State *L, const rd_kafka_topic_partition_list_t *l) {
    lua_createtable(L, l ? l->cnt : 0, 0);
    for (int i = 0; l && i < l->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &l->elems[i];
        lua_createtable(L, 0, 4);
        set_string(L, "topic", tp->topic);
        set_integer(L, "partition", tp->partition);
        set_integer(L, "offset", tp->offset);
        if (tp->metadata_size) {
            lua_pushlstring(L, tp->metadata, tp->metadata_size);
            lua_setfield(L, -2, "metadata");
        }
        set_error(L, tp->err, NULL);
        lua_rawseti(L, -2, i + 1);
    }
}

/* ---- metadata and offsets ----------------------------------------------- */

static void push_int_array(lua_State *L, const int32_t *a, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, a[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static void push_topic(lua_State *L, const rd_kafka_metadata_topic_t *t) {
    lua_createtable(L, 0, 3);
    set_string(L, "name", t->topic);
    set_error(L, t->err, NULL);
    lua_createtable(L, t->partition_cnt, 0);
    for (int p = 0; p < t->partition_cnt; p++) {
        const rd_kafka_metadata_partition_t *mp = &t->partitions[p];
        lua_createtable(L, 0, 5);
        set_integer(L, "partition", mp->id);
        set_integer(L, "leader", mp->leader);
        push_int_array(L, mp->replicas, mp->replica_cnt);
        lua_setfield(L, -2, "replicas");
        push_int_array(L, mp->isrs, mp->isr_cnt);
        lua_setfield(L, -2, "isr");
        set_error(L, mp->err, NULL);
        lua_rawseti(L, -2, p + 1);
    }
    lua_setfield(L, -2, "partitions");
}

static int wire_metadata(lua_State *L, client *c, int ms);

/* What is left of a deadline, in ms (at least 1): a call handed to librdkafka
 * after the wire path gave up keeps the call's deadline, not a new one. */
static int ms_left(double end) {
    double left = (end - rb_now()) * 1000;
    return left < 1 ? 1 : (int)left;
}
static int wire_offsets(lua_State *L, client *c, rd_kafka_topic_partition_list_t *l, int ms);

/* metadata(timeout, topic) -> {brokers = {{id, host, port}}, topics = {...}, answered_by}
 * Every topic, or only `topic` (which a cluster that auto-creates topics creates). */
static int k_metadata(lua_State *L) {
    client *c = check_client(L);
    int ms = timeout_ms(L, 2);
    const char *topic = luaL_optstring(L, 3, NULL);
    double end = rb_now() + ms / 1000.0;
    if (!topic && c->plaintext && wire_metadata(L, c, ms)) return 1;
    /* one topic's metadata is asked for as a producer would, which may create it */
    rd_kafka_t *rk = topic ? check_producer(L)->rk : reader(L, c);
    rd_kafka_topic_t *rkt = topic ? rd_kafka_topic_new(rk, topic, NULL) : NULL;
    const struct rd_kafka_metadata *md;
    rd_kafka_resp_err_t err = rd_kafka_metadata(rk, rkt == NULL, rkt, &md, ms_left(end));
    if (rkt) rd_kafka_topic_destroy(rkt);
    if (err) return raise_err(L, c, "metadata", err, "cannot read cluster metadata", ms);
    lua_createtable(L, 0, 3);
    lua_createtable(L, md->broker_cnt, 0);
    for (int i = 0; i < md->broker_cnt; i++) {
        lua_createtable(L, 0, 3);
        set_integer(L, "id", md->brokers[i].id);
        set_string(L, "host", md->brokers[i].host);
        set_integer(L, "port", md->brokers[i].port);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "brokers");
    lua_createtable(L, md->topic_cnt, 0);
    for (int i = 0; i < md->topic_cnt; i++) {
        push_topic(L, &md->topics[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "topics");
    set_integer(L, "answered_by", md->orig_broker_id);
    rd_kafka_metadata_destroy(md);
    return 1;
}

/* offsets(list, timeout): librdkafka groups the partitions by leader and
 * sends one ListOffsets per broker. */
static int k_offsets(lua_State *L) {
    client *c = check_client(L);
    rd_kafka_topic_partition_list_t *l = check_partitions(L, 2, 1);
    int ms = timeout_ms(L, 3);
    double end = rb_now() + ms / 1000.0;
    rd_kafka_resp_err_t err = c->plaintext && wire_offsets(L, c, l, ms)
                                  ? RD_KAFKA_RESP_ERR_NO_ERROR
                                  : rd_kafka_offsets_for_times(reader(L, c), l, ms_left(end));
    if (err && err != RD_KAFKA_RESP_ERR__PARTIAL) {
        /* per-partition errors are reported below; a whole-call failure raises */
        int any = 0;
        for (int i = 0; i < l->cnt; i++) any |= l->elems[i].err != 0;
        if (!any) {
            rd_kafka_topic_partition_list_destroy(l);
            return raise_err(L, c, "offsets", err, "cannot list offsets", ms);
        }
    }
    push_partitions(L, l);
    rd_kafka_topic_partition_list_destroy(l);
    return 1;
}

/* ---- admin requests ----------------------------------------------------- */

/* Waits for the next admin result on the client's queue. The request's own
 * timeout should answer first; the extra second only guards against a lost
 * reply. Returns NULL on timeout or interruption. */
static rd_kafka_event_t *queue_wait(rd_kafka_queue_t *q, int ms) {
    double end = rb_now() + ms / 1000.0 + 1.0;
    while (!rb_interrupted() && rb_now() < end) {
        rd_kafka_event_t *ev = rd_kafka_queue_poll(q, POLL_SLICE_MS);
        if (!ev) continue;
        if (rd_kafka_event_type(ev) != RD_KAFKA_EVENT_NONE) return ev;
        rd_kafka_event_destroy(ev);
    }
    return NULL;
}

static rd_kafka_event_t *admin_wait(client *c, int ms) { return queue_wait(c->queue, ms); }

/* Drops results of requests abandoned by a timeout, so they are not taken
 * for a later request's answer. */
static void queue_drain(rd_kafka_queue_t *q) {
    rd_kafka_event_t *ev;
    while ((ev = rd_kafka_queue_poll(q, 0))) rd_kafka_event_destroy(ev);
}

/* The options of an admin request, after the queue is drained of the results
 * of earlier requests that timed out. */
static rd_kafka_AdminOptions_t *admin_options(client *c, rd_kafka_admin_op_t op, int ms, int validate_only) {
    char err[256];
    queue_drain(c->queue);
    rd_kafka_AdminOptions_t *o = rd_kafka_AdminOptions_new(c->rk, op);
    rd_kafka_AdminOptions_set_request_timeout(o, ms, err, sizeof err);
    if (op == RD_KAFKA_ADMIN_OP_CREATETOPICS || op == RD_KAFKA_ADMIN_OP_CREATEPARTITIONS)
        rd_kafka_AdminOptions_set_operation_timeout(o, ms, err, sizeof err);
    if (validate_only) rd_kafka_AdminOptions_set_validate_only(o, 1, err, sizeof err);
    return o;
}

/* "timed out after Ns", with why the cluster could not be reached when librdkafka said. */
static const char *push_timed_out(lua_State *L, client *c, int ms) {
    char secs[32];
    snprintf(secs, sizeof secs, "%.3g", ms / 1000.0);
    const char *trouble = push_broker_trouble(L, c);
    return lua_pushfstring(L, "timed out after %ss%s%s", secs, *trouble ? ": " : "", trouble);
}

static int raise_wait(lua_State *L, client *c, const char *op, const char *what, int ms) {
    if (rb_interrupted()) return rb_error(L, "kafka", op, "interrupted", 0, "%s: interrupted", what);
    return rb_error(L, "kafka", op, "timeout", 1, "%s: %s", what, push_timed_out(L, c, ms));
}

/* Raises when the whole admin request failed (e.g. unsupported by the broker). */
static void check_event(lua_State *L, rd_kafka_event_t *ev, const char *op, const char *what, int ms) {
    rd_kafka_resp_err_t err = rd_kafka_event_error(ev);
    if (!err) return;
    const char *msg = note_timeout(L, err, lua_pushstring(L, rd_kafka_event_error_string(ev)), ms);
    rd_kafka_event_destroy(ev);
    rb_error(L, "kafka", op, code_of(err), is_retryable(err), "%s: %s", what, msg);
}

static void push_group_results(lua_State *L, const rd_kafka_group_result_t **gr, size_t n) {
    for (size_t i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        set_string(L, "group", rd_kafka_group_result_name(gr[i]));
        const rd_kafka_error_t *e = rd_kafka_group_result_error(gr[i]);
        if (e) set_error(L, rd_kafka_error_code(e), rd_kafka_error_string(e));
        push_partitions(L, rd_kafka_group_result_partitions(gr[i]));
        lua_setfield(L, -2, "partitions");
        /* keyed by name: results arrive in any order */
        lua_setfield(L, -2, rd_kafka_group_result_name(gr[i]));
    }
}

/* ---- committed offsets over the wire ------------------------------------ */

/*
 * librdkafka 2.0.2 takes one group per ListConsumerGroupOffsets and looks the
 * group's coordinator up again for most of them: lag over 200 groups sent
 * about 480 FindCoordinator requests, and its cost grew with them. On a
 * plaintext listener lag speaks the two requests itself: each group's
 * FindCoordinator pipelined on one connection, then every coordinator's
 * OffsetFetches pipelined on one connection to it, so N groups cost N of
 * each in two round trips, whatever N. FindCoordinator v1 and OffsetFetch v2
 * (null topics: every committed partition) are answered by every broker from
 * Kafka 0.11 to 4.x (4.0 removed only their v0). The batched forms
 * (FindCoordinator v4, OffsetFetch v8, Kafka 3.0) would need one request of
 * each per coordinator, but the sandbox's brokers (librdkafka's mock) answer
 * neither, so they are not used. TLS and SASL listeners go through librdkafka.
 */
#define API_OFFSET_FETCH 9
#define API_FIND_COORDINATOR 10

typedef struct { unsigned char *p; size_t len, cap; } wbuf;

static void wb_need(lua_State *L, wbuf *b, size_t n) {
    if (b->len + n <= b->cap) return;
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap < b->len + n) cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p) luaL_error(L, "out of memory");
    b->p = p, b->cap = cap;
}
static void wb_int(lua_State *L, wbuf *b, uint64_t v, int bytes) {
    wb_need(L, b, (size_t)bytes);
    for (int i = bytes - 1; i >= 0; i--) b->p[b->len++] = (unsigned char)(v >> (8 * i));
}
static void wb_str(lua_State *L, wbuf *b, const char *s, size_t n) {
    wb_int(L, b, n, 2);
    wb_need(L, b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}
/* Request header v1; the size in front is set by wb_end. Returns where the request starts. */
static size_t wb_begin(lua_State *L, wbuf *b, int api, int version, int32_t corr) {
    size_t at = b->len;
    wb_int(L, b, 0, 4);
    wb_int(L, b, (uint64_t)api, 2);
    wb_int(L, b, (uint64_t)version, 2);
    wb_int(L, b, (uint32_t)corr, 4);
    wb_str(L, b, "runbook", 7);
    return at;
}
static void wb_set32(wbuf *b, size_t at, uint32_t v) {
    for (int i = 0; i < 4; i++) b->p[at + (size_t)i] = (unsigned char)(v >> (8 * (3 - i)));
}
static void wb_end(wbuf *b, size_t at) { wb_set32(b, at, (uint32_t)(b->len - at - 4)); }

/* A bounds-checked reader of one response; `bad` once it ran past the end. */
typedef struct { const unsigned char *p, *end; int bad; } rd;

static uint64_t rd_int(rd *r, int bytes) {
    if (r->end - r->p < bytes) { r->bad = 1; r->p = r->end; return 0; }
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v = v << 8 | *r->p++;
    return v;
}
/* A (nullable) string: its bytes and length, -1 for null. */
static const char *rd_str(rd *r, int *len) {
    *len = (int16_t)rd_int(r, 2);
    if (*len < 0) return NULL;
    if (r->end - r->p < *len) { r->bad = 1; r->p = r->end; *len = -1; return NULL; }
    const char *s = (const char *)r->p;
    r->p += *len;
    return s;
}

/* One broker connection: requests to send, responses still due. */
typedef struct {
    char host[256], port[16];
    int fd, due;
    wbuf out, in;
    size_t sent;
    const char *why;    /* why it failed, NULL while it works */
} wconn;

typedef struct {
    const char *name;   /* referenced by the request table */
    int explicit;       /* partitions given (else every committed one) */
    int pending;        /* no result yet */
    int conn;           /* its coordinator's connection, -1 unknown */
} wgroup;

/* One call: its groups, connections (bootstrap brokers first) and results. */
typedef struct {
    wgroup *gs;
    wconn *cs;
    int n, nc, cap, nbootstrap, results;
    int log;            /* debug=protocol */
    int version;        /* Metadata's */
    rd_kafka_topic_partition_list_t *list;  /* ListOffsets': the partitions asked, */
    int64_t *offsets;   /* their answers, */
    int answered, failed;   /* how many, and whether one had an error */
    double setup_end;   /* connections are set up by then (0: by the call's end) */
} wcall;

/* Queues a request on w: its header and body are already in w->out. */
static void wire_queued(wcall *k, wconn *w, const char *what) {
    w->due++;
    if (!k->log) return;
    char line[512];
    int n = snprintf(line, sizeof line, "runbook: kafka: 7|SEND| wire %s:%s: Sent %sRequest\n", w->host, w->port, what);
    rb_write_redacted(stderr, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
}

static int wconn_find(lua_State *L, wcall *k, const char *host, int hlen, const char *port) {
    for (int i = 0; i < k->nc; i++)
        if ((int)strlen(k->cs[i].host) == hlen && !strncmp(k->cs[i].host, host, (size_t)hlen) &&
            !strcmp(k->cs[i].port, port))
            return i;
    if (k->nc == k->cap) {
        int cap = k->cap ? k->cap * 2 : 8;
        wconn *cs = realloc(k->cs, sizeof *cs * (size_t)cap);
        if (!cs) luaL_error(L, "out of memory");
        k->cs = cs, k->cap = cap;
    }
    wconn *w = &k->cs[k->nc];
    memset(w, 0, sizeof *w);
    snprintf(w->host, sizeof w->host, "%.*s", hlen, host);
    snprintf(w->port, sizeof w->port, "%s", port);
    w->fd = -1;
    return k->nc++;
}

static void wconn_fail(wconn *w, const char *why) {
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    w->why = why;
    w->due = 0;
}

typedef void (*frame_fn)(lua_State *L, wcall *k, int32_t corr, rd *r);

/* Sends every connection's requests and reads their responses, calling
 * on_frame for each, until none is due (1) or the deadline or an interrupt
 * (0). A connection that fails stops (its `why` says why); the others go on. */
static int wire_pump(lua_State *L, wcall *k, double end, frame_fn on_frame) {
    struct pollfd ps[k->nc];
    for (int i = 0; i < k->nc; i++) {
        if (k->cs[i].due && k->cs[i].fd < 0) {
            const char *why = NULL;
            double by = k->setup_end > 0 && k->setup_end < end ? k->setup_end : end;
            k->cs[i].fd = net_connect(k->cs[i].host, k->cs[i].port, by, &why);
            if (k->cs[i].fd < 0) wconn_fail(&k->cs[i], why);
        }
    }
    for (;;) {
        int live = 0;
        for (int i = 0; i < k->nc; i++) {
            wconn *w = &k->cs[i];
            ps[i] = (struct pollfd){w->due ? w->fd : -1, (short)(POLLIN | (w->sent < w->out.len ? POLLOUT : 0)), 0};
            live += w->due > 0;
        }
        if (!live) return 1;
        int left = (int)((end - rb_now()) * 1000);
        if (left <= 0 || rb_interrupted()) return 0;
        if (poll(ps, (nfds_t)k->nc, left < NET_SLICE_MS ? left : NET_SLICE_MS) < 0 && errno != EINTR) return 0;
        for (int i = 0; i < k->nc; i++) {
            wconn *w = &k->cs[i];
            if (!ps[i].revents || w->fd < 0) continue;
            if (ps[i].revents & POLLOUT) {
                ssize_t m = send(w->fd, w->out.p + w->sent, w->out.len - w->sent, MSG_NOSIGNAL);
                if (m < 0 && errno != EAGAIN && errno != EINTR) { wconn_fail(w, strerror(errno)); continue; }
                if (m > 0) w->sent += (size_t)m;
            }
            if (!(ps[i].revents & (POLLIN | POLLERR | POLLHUP))) continue;
            wb_need(L, &w->in, 65536);
            ssize_t m = recv(w->fd, w->in.p + w->in.len, w->in.cap - w->in.len, 0);
            if (m == 0) { wconn_fail(w, "connection closed by the broker"); continue; }
            if (m < 0) {
                if (errno != EAGAIN && errno != EINTR) wconn_fail(w, strerror(errno));
                continue;
            }
            w->in.len += (size_t)m;
            setsockopt(w->fd, IPPROTO_TCP, TCP_QUICKACK, &(int){1}, sizeof(int));
            size_t at = 0;
            while (w->due && w->in.len - at >= 8) {
                rd head = {w->in.p + at, w->in.p + at + 4, 0};
                uint32_t size = (uint32_t)rd_int(&head, 4);
                if (size < 4 || size > 64u << 20) { wconn_fail(w, "not a Kafka answer"); break; }
                if (w->in.len - at < 4 + (size_t)size) break;
                rd r = {w->in.p + at + 4, w->in.p + at + 4 + size, 0};
                int32_t corr = (int32_t)rd_int(&r, 4);
                if (corr >= 0 && corr < k->n) on_frame(L, k, corr, &r);
                w->due--;
                at += 4 + (size_t)size;
            }
            if (w->fd >= 0) {
                memmove(w->in.p, w->in.p + at, w->in.len - at);
                w->in.len -= at;
            }
        }
    }
}

/* Sets results[group] = {group, error}. */
static void group_error(lua_State *L, wcall *k, const wgroup *g, int err, const char *why) {
    lua_createtable(L, 0, 2);
    set_string(L, "group", g->name);
    set_error(L, (rd_kafka_resp_err_t)err, why);
    lua_setfield(L, k->results, g->name);
}

/* FindCoordinator v1 response: the coordinator's connection, or the group's
 * error (one that says the coordinator moves is kafka.lua's to retry). */
static void on_coordinator(lua_State *L, wcall *k, int32_t corr, rd *r) {
    wgroup *g = &k->gs[corr];
    int len;
    rd_int(r, 4); /* throttle time */
    int err = (int16_t)rd_int(r, 2);
    rd_str(r, &len);
    rd_int(r, 4); /* node id */
    const char *host = rd_str(r, &len);
    int port = (int)(int32_t)rd_int(r, 4);
    if (r->bad || !host) err = RD_KAFKA_RESP_ERR__BAD_MSG;
    if (err) {
        group_error(L, k, g, err, NULL);
        g->pending = 0;
        return;
    }
    char p[16];
    snprintf(p, sizeof p, "%d", port);
    g->conn = wconn_find(L, k, host, len, p);
}

/* OffsetFetch v2 response: results[group] = {group, partitions, error}. */
static void on_offsets(lua_State *L, wcall *k, int32_t corr, rd *r) {
    wgroup *g = &k->gs[corr];
    lua_createtable(L, 0, 3);
    set_string(L, "group", g->name);
    lua_newtable(L);
    int nt = (int)(int32_t)rd_int(r, 4), n = 0;
    for (int t = 0; t < nt && !r->bad; t++) {
        int tlen, mlen;
        const char *topic = rd_str(r, &tlen);
        int np = (int)(int32_t)rd_int(r, 4);
        for (int i = 0; i < np && !r->bad; i++) {
            int32_t partition = (int32_t)rd_int(r, 4);
            int64_t offset = (int64_t)rd_int(r, 8);
            const char *meta = rd_str(r, &mlen);
            int err = (int16_t)rd_int(r, 2);
            if (r->bad) break;
            lua_createtable(L, 0, 5);
            lua_pushlstring(L, topic ? topic : "", topic ? (size_t)tlen : 0);
            lua_setfield(L, -2, "topic");
            set_integer(L, "partition", partition);
            set_integer(L, "offset", offset);
            if (meta && mlen > 0) {
                lua_pushlstring(L, meta, (size_t)mlen);
                lua_setfield(L, -2, "metadata");
            }
            set_error(L, (rd_kafka_resp_err_t)err, NULL);
            lua_rawseti(L, -2, ++n);
        }
    }
    lua_setfield(L, -2, "partitions");
    int err = (int16_t)rd_int(r, 2);
    set_error(L, r->bad ? RD_KAFKA_RESP_ERR__BAD_MSG : (rd_kafka_resp_err_t)err, NULL);
    lua_setfield(L, k->results, g->name);
    g->pending = 0;
}

/* OffsetFetch v2 for request i: its partitions, a topic entry per run of
 * one topic (kafka.lua lists a topic's partitions together), or null: every
 * committed partition. */
static void offset_fetch(lua_State *L, wbuf *b, const wgroup *g, int i) {
    size_t at = wb_begin(L, b, API_OFFSET_FETCH, 2, i);
    wb_str(L, b, g->name, strlen(g->name));
    if (!g->explicit) {
        wb_int(L, b, 0xffffffffu, 4);
        wb_end(b, at);
        return;
    }
    lua_geti(L, 2, i + 1);
    lua_getfield(L, -1, "partitions");
    int parts = lua_gettop(L), n = (int)luaL_len(L, parts), topics = 0;
    size_t topics_at = b->len, count_at = 0;
    uint32_t count = 0;
    wb_int(L, b, 0, 4);
    lua_pushnil(L); /* the topic of the run */
    for (int j = 1; j <= n; j++) {
        lua_geti(L, parts, j);
        lua_getfield(L, -1, "topic");
        lua_getfield(L, -2, "partition");
        if (!lua_rawequal(L, -2, -4)) {
            if (topics++) wb_set32(b, count_at, count);
            size_t tl;
            const char *topic = lua_tolstring(L, -2, &tl);
            wb_str(L, b, topic, tl);
            count_at = b->len, count = 0;
            wb_int(L, b, 0, 4);
            lua_pushvalue(L, -2);
            lua_replace(L, -5);
        }
        wb_int(L, b, (uint32_t)lua_tointeger(L, -1), 4);
        count++;
        lua_pop(L, 3);
    }
    if (topics) wb_set32(b, count_at, count);
    wb_set32(b, topics_at, (uint32_t)topics);
    lua_pop(L, 3);
    wb_end(b, at);
}

/* Checks request i: {group = name, partitions = {{topic, partition}...} | nil}. */
static wgroup check_request(lua_State *L, int i) {
    lua_geti(L, 2, i);
    luaL_argcheck(L, lua_istable(L, -1), 2, "requests must be tables {group=, partitions=}");
    lua_getfield(L, -1, "group");
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "each request needs a group name");
    wgroup g = {lua_tostring(L, -1), 0, 1, -1};
    if (lua_getfield(L, -2, "partitions") == LUA_TTABLE) {
        g.explicit = 1;
        rd_kafka_topic_partition_list_destroy(check_partitions(L, lua_gettop(L), 0));
    }
    lua_pop(L, 3);
    return g;
}

/* The connections to bootstrap.servers ("h:p,PLAINTEXT://h:p,[::1]:p"). */
static void bootstrap_conns(lua_State *L, client *c, wcall *k) {
    char list[2048];
    size_t len = sizeof list;
    if (rd_kafka_conf_get(c->conf, "bootstrap.servers", list, &len) != RD_KAFKA_CONF_OK) list[0] = '\0';
    for (char *save, *tok = strtok_r(list, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        char *s = strstr(tok, "://") ? strstr(tok, "://") + 3 : tok, *colon = strrchr(s, ':');
        if (!colon) continue;
        *colon = '\0';
        if (*s == '[' && colon > s + 1 && colon[-1] == ']') s++, colon[-1] = '\0';
        wconn_find(L, k, s, (int)strlen(s), colon + 1);
    }
    k->nbootstrap = k->nc;
}

static int wire_close(lua_State *L) {
    wcall *k = lua_touserdata(L, 1);
    for (int i = 0; k->cs && i < k->nc; i++) {
        if (k->cs[i].fd >= 0) close(k->cs[i].fd);
        free(k->cs[i].out.p);
        free(k->cs[i].in.p);
    }
    free(k->cs);
    k->cs = NULL;
    k->nc = 0;
    return 0;
}

/* New call state on the stack (closed on any exit), then its results slot (nil). */
static wcall *wire_call(lua_State *L, client *c, int n) {
    wcall *k = lua_newuserdatauv(L, sizeof *k, 0);
    memset(k, 0, sizeof *k);
    k->n = n;
    k->log = c->debug_protocol;
    lua_newtable(L);
    lua_pushcfunction(L, wire_close);
    lua_setfield(L, -2, "__close");
    lua_setmetatable(L, -2);
    lua_toclose(L, -1);
    lua_pushnil(L);
    k->results = lua_gettop(L);
    return k;
}

/* group_offsets on a plaintext listener: requests at 2; pushes {[group] = result}.
 * One round: a group whose coordinator moves or cannot be reached gets that
 * error, which kafka.lua asks again. */
static int wire_group_offsets(lua_State *L, client *c, int ms) {
    int n = (int)luaL_len(L, 2);
    double end = rb_now() + ms / 1000.0;
    wcall *k = wire_call(L, c, n);
    k->gs = lua_newuserdatauv(L, sizeof *k->gs * (size_t)(n > 0 ? n : 1), 0);
    for (int i = 0; i < n; i++) k->gs[i] = check_request(L, i + 1);
    lua_createtable(L, 0, n);
    lua_replace(L, k->results);
    bootstrap_conns(L, c, k);
    /* 1. every group's coordinator, from the first bootstrap broker that answers */
    const char *why = "no bootstrap.servers";
    int ok = 1, asked = 0;
    for (int b = 0; b < k->nbootstrap && ok && !asked; b++) {
        wconn *w = &k->cs[b];
        for (int i = 0; i < n; i++) {
            size_t at = wb_begin(L, &w->out, API_FIND_COORDINATOR, 1, i);
            wb_str(L, &w->out, k->gs[i].name, strlen(k->gs[i].name));
            wb_int(L, &w->out, 0, 1);
            wb_end(&w->out, at);
            wire_queued(k, w, "FindCoordinator");
        }
        ok = wire_pump(L, k, end, on_coordinator);
        asked = !w->why;
        if (w->why) why = lua_pushfstring(L, "%s:%s: %s", w->host, w->port, w->why);
    }
    /* 2. each coordinator's groups, pipelined on one connection to it */
    for (int i = 0; ok && asked && i < n; i++) {
        wgroup *g = &k->gs[i];
        if (!g->pending) continue;
        offset_fetch(L, &k->cs[g->conn].out, g, i);
        wire_queued(k, &k->cs[g->conn], "OffsetFetch");
    }
    if (ok && asked) ok = wire_pump(L, k, end, on_offsets);
    if (!ok) return raise_wait(L, c, "lag", "reading committed offsets", ms);
    for (int i = 0; i < n; i++) {
        wgroup *g = &k->gs[i];
        if (!g->pending) continue;
        if (asked) why = lua_pushfstring(L, "coordinator %s:%s: %s", k->cs[g->conn].host, k->cs[g->conn].port,
                                         k->cs[g->conn].why ? k->cs[g->conn].why : "no answer");
        group_error(L, k, g, RD_KAFKA_RESP_ERR__TRANSPORT, why);
    }
    lua_pushvalue(L, k->results);
    return 1;
}

/* ---- metadata and watermarks over the wire ------------------------------ */

/*
 * Reads of metadata and offsets on a plaintext listener go over the wire too,
 * so a run that only reads (lag, watermarks) never starts librdkafka: its
 * threads, connections, SASL plugin loading and teardown were most of such a
 * run. Only the plain case is handled here: an ApiVersions exchange (once per
 * client) picks the Metadata version (the highest up to v8, the last before
 * the flexible encoding), and ListOffsets v1 goes to each partition's leader
 * from the last metadata read this way. Anything else (no bootstrap broker
 * answers, a partition without a leader or with an error, a leader that does
 * not answer) is handed to librdkafka, which retries and reports as before.
 */
#define API_LIST_OFFSETS 2
#define API_METADATA 3
#define API_VERSIONS 18

static void on_api_versions(lua_State *L, wcall *k, int32_t corr, rd *r) {
    (void)L, (void)corr;
    int err = (int16_t)rd_int(r, 2), n = (int)(int32_t)rd_int(r, 4);
    for (int i = 0; i < n && !r->bad && !err; i++) {
        int key = (int16_t)rd_int(r, 2), min = (int16_t)rd_int(r, 2), max = (int16_t)rd_int(r, 2);
        if (key == API_METADATA && !r->bad && min <= 8 && max >= 1) k->version = max < 8 ? max : 8;
    }
}

static void push_int32s(lua_State *L, rd *r) {
    int n = (int)(int32_t)rd_int(r, 4);
    lua_createtable(L, n > 0 && n < 4096 ? n : 0, 0);
    for (int i = 0; i < n && !r->bad; i++) {
        lua_pushinteger(L, (int32_t)rd_int(r, 4));
        lua_rawseti(L, -2, i + 1);
    }
}

static void push_rd_str(lua_State *L, rd *r) {
    int len;
    const char *s = rd_str(r, &len);
    lua_pushlstring(L, s ? s : "", s ? (size_t)len : 0);
}

/* Metadata v1..v8 response, as k_metadata pushes librdkafka's. */
static void on_metadata(lua_State *L, wcall *k, int32_t corr, rd *r) {
    (void)corr;
    int v = k->version, len;
    if (v >= 3) rd_int(r, 4); /* throttle time */
    lua_createtable(L, 0, 3);
    int nb = (int)(int32_t)rd_int(r, 4);
    lua_createtable(L, nb > 0 && nb < 4096 ? nb : 0, 0);
    for (int i = 0; i < nb && !r->bad; i++) {
        lua_createtable(L, 0, 3);
        set_integer(L, "id", (int32_t)rd_int(r, 4));
        push_rd_str(L, r);
        lua_setfield(L, -2, "host");
        set_integer(L, "port", (int32_t)rd_int(r, 4));
        if (v >= 1) rd_str(r, &len); /* rack */
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "brokers");
    if (v >= 2) rd_str(r, &len); /* cluster id */
    if (v >= 1) rd_int(r, 4);    /* controller id */
    int nt = (int)(int32_t)rd_int(r, 4);
    lua_createtable(L, nt > 0 && nt < 65536 ? nt : 0, 0);
    for (int t = 0; t < nt && !r->bad; t++) {
        lua_createtable(L, 0, 3);
        int terr = (int16_t)rd_int(r, 2);
        push_rd_str(L, r);
        lua_setfield(L, -2, "name");
        set_error(L, (rd_kafka_resp_err_t)terr, NULL);
        if (v >= 1) rd_int(r, 1); /* is internal */
        int np = (int)(int32_t)rd_int(r, 4);
        lua_createtable(L, np > 0 && np < 65536 ? np : 0, 0);
        for (int p = 0; p < np && !r->bad; p++) {
            lua_createtable(L, 0, 5);
            int perr = (int16_t)rd_int(r, 2);
            set_integer(L, "partition", (int32_t)rd_int(r, 4));
            set_integer(L, "leader", (int32_t)rd_int(r, 4));
            if (v >= 7) rd_int(r, 4); /* leader epoch */
            push_int32s(L, r);
            lua_setfield(L, -2, "replicas");
            push_int32s(L, r);
            lua_setfield(L, -2, "isr");
            if (v >= 5) {         /* offline replicas */
                push_int32s(L, r);
                lua_pop(L, 1);
            }
            set_error(L, (rd_kafka_resp_err_t)perr, NULL);
            lua_rawseti(L, -2, p + 1);
        }
        lua_setfield(L, -2, "partitions");
        if (v >= 8) rd_int(r, 4); /* topic authorized operations */
        lua_rawseti(L, -2, t + 1);
    }
    lua_setfield(L, -2, "topics");
    set_integer(L, "answered_by", -1);
    if (r->bad) lua_pop(L, 1);
    else lua_replace(L, k->results);
}

/* metadata of every topic: pushes it (and keeps it for wire_offsets), or
 * returns 0 for librdkafka to ask. */
static int wire_metadata(lua_State *L, client *c, int ms) {
    double end = rb_now() + ms / 1000.0;
    int top = lua_gettop(L);
    wcall *k = wire_call(L, c, 2);
    bootstrap_conns(L, c, k);
    k->version = c->metadata_version;
    /* A connection's setup (connect, ApiVersions) has the connect timeout, as librdkafka's has. */
    k->setup_end = c->connect_timeout > 0 ? rb_now() + c->connect_timeout : end;
    if (k->setup_end > end) k->setup_end = end;
    for (int b = 0; b < k->nbootstrap; b++) {
        wconn *w = &k->cs[b];
        if (!k->version) {
            wb_end(&w->out, wb_begin(L, &w->out, API_VERSIONS, 0, 0));
            wire_queued(k, w, "ApiVersion");
            if (!wire_pump(L, k, k->setup_end, on_api_versions) || w->why) continue;
            if (!k->version) break;   /* no Metadata version (1..8) this code reads */
        }
        size_t at = wb_begin(L, &w->out, API_METADATA, k->version, 1);
        wb_int(L, &w->out, 0xffffffffu, 4);                  /* every topic */
        if (k->version >= 4) wb_int(L, &w->out, 0, 1);       /* no auto-creation */
        if (k->version >= 8) wb_int(L, &w->out, 0, 2);       /* no authorized operations */
        wb_end(&w->out, at);
        wire_queued(k, w, "Metadata");
        if (!wire_pump(L, k, end, on_metadata) || w->why) continue;
        if (lua_isnil(L, k->results)) break;
        c->metadata_version = k->version;
        lua_pushvalue(L, k->results);
        lua_setiuservalue(L, 1, 1);
        lua_pushvalue(L, k->results);
        return 1;
    }
    /* No bootstrap broker was set up within the connect timeout: librdkafka
     * would fare no better in what is left, so that is the answer. */
    if (k->setup_end < end && (int)((k->setup_end - rb_now()) * 1000) <= 0 && !rb_interrupted()) {
        char secs[32];
        snprintf(secs, sizeof secs, "%.3g", c->connect_timeout);
        return rb_error(L, "kafka", "metadata", "timeout", 1, "cannot read cluster metadata: connect to %s:%s timed out after %ss",
                        k->cs[0].host, k->cs[0].port, secs);
    }
    lua_settop(L, top);
    return 0;
}

/* ListOffsets v1 response: offsets into the list; any error: the whole call to librdkafka. */
static void on_list_offsets(lua_State *L, wcall *k, int32_t corr, rd *r) {
    (void)L, (void)corr;
    rd_kafka_topic_partition_list_t *l = k->list;
    int nt = (int)(int32_t)rd_int(r, 4);
    for (int t = 0; t < nt && !r->bad; t++) {
        int tlen;
        const char *topic = rd_str(r, &tlen);
        char name[512];
        snprintf(name, sizeof name, "%.*s", tlen > 0 ? tlen : 0, topic ? topic : "");
        int np = (int)(int32_t)rd_int(r, 4);
        for (int p = 0; p < np && !r->bad; p++) {
            int32_t partition = (int32_t)rd_int(r, 4);
            int err = (int16_t)rd_int(r, 2);
            rd_int(r, 8); /* timestamp */
            int64_t offset = (int64_t)rd_int(r, 8);
            rd_kafka_topic_partition_t *tp = rd_kafka_topic_partition_list_find(l, name, partition);
            if (r->bad || !tp) break;
            if (err) k->failed = 1;
            k->offsets[tp - l->elems] = offset;
            k->answered++;
        }
    }
    if (r->bad) k->failed = 1;
}

/* offsets(list) from each partition's leader in the last wire metadata: 1
 * when every partition has its offset, 0 for librdkafka to ask. */
static int wire_offsets(lua_State *L, client *c, rd_kafka_topic_partition_list_t *l, int ms) {
    double end = rb_now() + ms / 1000.0;
    int top = lua_gettop(L);
    if (l->cnt == 0 || lua_getiuservalue(L, 1, 1) != LUA_TTABLE) return lua_settop(L, top), 0;
    int md = lua_gettop(L);
    wcall *k = wire_call(L, c, 1 << 30);
    k->list = l;
    k->offsets = lua_newuserdatauv(L, sizeof *k->offsets * (size_t)l->cnt, 0);
    lua_newtable(L); /* broker id -> its connection */
    int ids = lua_gettop(L);
    lua_newtable(L); /* "topic partition" -> its leader's connection */
    int leaders = lua_gettop(L);
    lua_getfield(L, md, "brokers");
    for (lua_Integer b = 1; lua_geti(L, -1, b) == LUA_TTABLE; b++) {
        lua_getfield(L, -1, "host");
        lua_getfield(L, -2, "port");
        size_t hl;
        const char *h = lua_tolstring(L, -2, &hl);
        int conn = wconn_find(L, k, h, (int)hl, lua_tostring(L, -1));
        lua_getfield(L, -3, "id");
        lua_pushinteger(L, conn);
        lua_rawset(L, ids);
        lua_pop(L, 3);
    }
    lua_pop(L, 2);
    lua_getfield(L, md, "topics");
    for (lua_Integer t = 1; lua_geti(L, -1, t) == LUA_TTABLE; t++) {
        lua_getfield(L, -1, "name");
        const char *name = lua_tostring(L, -1);
        lua_getfield(L, -2, "partitions");
        for (lua_Integer p = 1; lua_geti(L, -1, p) == LUA_TTABLE; p++) {
            lua_getfield(L, -1, "partition");
            lua_getfield(L, -2, "leader");
            lua_pushfstring(L, "%s %d", name ? name : "", (int)lua_tointeger(L, -2));
            lua_pushvalue(L, -2);
            lua_rawget(L, ids);
            lua_rawset(L, leaders);
            lua_pop(L, 3);
        }
        lua_pop(L, 4);
    }
    lua_pop(L, 2);
    int *conn_of = lua_newuserdatauv(L, sizeof *conn_of * (size_t)l->cnt, 0);
    for (int i = 0; i < l->cnt; i++) {
        lua_pushfstring(L, "%s %d", l->elems[i].topic, (int)l->elems[i].partition);
        lua_rawget(L, leaders);
        int known;
        conn_of[i] = (int)lua_tointegerx(L, -1, &known);
        lua_pop(L, 1);
        if (!known) return lua_settop(L, top), 0;
    }
    for (int ci = 0; ci < k->nc; ci++) {   /* one request per leader, a topic entry per run of one topic */
        wconn *w = &k->cs[ci];
        size_t req = 0, topics_at = 0, count_at = 0;
        uint32_t topics = 0, count = 0;
        const char *last = NULL;
        for (int i = 0; i < l->cnt; i++) {
            if (conn_of[i] != ci) continue;
            if (!last) {
                req = wb_begin(L, &w->out, API_LIST_OFFSETS, 1, ci);
                wb_int(L, &w->out, 0xffffffffu, 4); /* replica id: a client */
                topics_at = w->out.len;
                wb_int(L, &w->out, 0, 4);
            }
            if (!last || strcmp(last, l->elems[i].topic)) {
                if (last) wb_set32(&w->out, count_at, count);
                last = l->elems[i].topic;
                topics++;
                wb_str(L, &w->out, last, strlen(last));
                count_at = w->out.len, count = 0;
                wb_int(L, &w->out, 0, 4);
            }
            wb_int(L, &w->out, (uint32_t)l->elems[i].partition, 4);
            wb_int(L, &w->out, (uint64_t)l->elems[i].offset, 8);
            count++;
        }
        if (!last) continue;
        wb_set32(&w->out, count_at, count);
        wb_set32(&w->out, topics_at, topics);
        wb_end(&w->out, req);
        wire_queued(k, w, "ListOffsets");
    }
    int ok = wire_pump(L, k, end, on_list_offsets) && !k->failed && k->answered == l->cnt;
    for (int ci = 0; ci < k->nc; ci++) ok &= !k->cs[ci].why;
    for (int i = 0; ok && i < l->cnt; i++) l->elems[i].offset = k->offsets[i], l->elems[i].err = 0;
    lua_settop(L, top);
    return ok;
}

/* group_offsets({{group=, partitions=list|nil}...}, timeout) -> {[group] = {group, partitions, error}}
 * On a plaintext listener over the wire (above); elsewhere librdkafka takes
 * one group per request: they are all sent, then collected.
 *
 * They go through the reader, a consumer handle, not the producer one. librdkafka 2.0.2
 * segfaults in its own thread when the OffsetFetch of ListConsumerGroupOffsets
 * fails with NOT_COORDINATOR or COORDINATOR_NOT_AVAILABLE (the coordinator
 * moving): rd_kafka_handle_OffsetFetch asks the handle's consumer group to
 * look up its coordinator again, and a producer handle has none (NULL). The
 * reader has one (its group never joins), so the error comes back as
 * the group's result, retryable. spec/kafka_spec.lua keeps the crash away. */
static int k_group_offsets(lua_State *L) {
    client *c = check_client(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int ms = timeout_ms(L, 3), n = (int)luaL_len(L, 2);
    if (c->plaintext) return wire_group_offsets(L, c, ms);
    rd_kafka_t *rk = reader(L, c);
    if (!c->group_queue) c->group_queue = rd_kafka_queue_new(rk);
    queue_drain(c->group_queue);
    for (int i = 1; i <= n; i++) {
        lua_geti(L, 2, i);
        luaL_argcheck(L, lua_istable(L, -1), 2, "requests must be tables {group=, partitions=}");
        lua_getfield(L, -1, "group");
        luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "each request needs a group name");
        rd_kafka_topic_partition_list_t *parts = NULL;
        if (lua_getfield(L, -2, "partitions") == LUA_TTABLE) parts = check_partitions(L, lua_gettop(L), 0);
        rd_kafka_ListConsumerGroupOffsets_t *req = rd_kafka_ListConsumerGroupOffsets_new(lua_tostring(L, -2), parts);
        if (parts) rd_kafka_topic_partition_list_destroy(parts);
        char err[256];
        rd_kafka_AdminOptions_t *o = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS);
        rd_kafka_AdminOptions_set_request_timeout(o, ms, err, sizeof err);
        rd_kafka_ListConsumerGroupOffsets(rk, &req, 1, o, c->group_queue);
        rd_kafka_AdminOptions_destroy(o);
        rd_kafka_ListConsumerGroupOffsets_destroy(req);
        lua_pop(L, 3);
    }
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        rd_kafka_event_t *ev = queue_wait(c->group_queue, ms);
        if (!ev) return raise_wait(L, c, "lag", "reading committed offsets", ms);
        check_event(L, ev, "lag", "reading committed offsets", ms);
        size_t cnt;
        const rd_kafka_group_result_t **gr = rd_kafka_ListConsumerGroupOffsets_result_groups(
            rd_kafka_event_ListConsumerGroupOffsets_result(ev), &cnt);
        push_group_results(L, gr, cnt);
        rd_kafka_event_destroy(ev);
    }
    return 1;
}

/* alter_group_offsets(group, list, timeout, summary) -> {decision, partitions} */
static int k_alter_group_offsets(lua_State *L) {
    client *c = check_producer(L);
    const char *group = luaL_checkstring(L, 2);
    int ms = timeout_ms(L, 4);
    const char *summary = luaL_checkstring(L, 5);
    rd_kafka_topic_partition_list_t *l = check_partitions(L, 3, 1);
    rb_effect e = {"kafka", "reset_offsets", group, summary, 1};
    rb_decision d = rb_gate(L, &e);
    if (d != RB_PERFORM) {
        lua_pushfstring(L, "plan for %d partitions, not committed", l->cnt);
        rd_kafka_topic_partition_list_destroy(l);
        rb_gate_done(L, &e, d, 1);
        lua_createtable(L, 0, 1);
        set_string(L, "decision", d == RB_SIMULATE ? "simulated" : "skipped");
        return 1;
    }
    rd_kafka_AlterConsumerGroupOffsets_t *req = rd_kafka_AlterConsumerGroupOffsets_new(group, l);
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_AdminOptions_t *o = admin_options(c, RD_KAFKA_ADMIN_OP_ALTERCONSUMERGROUPOFFSETS, ms, 0);
    rd_kafka_AlterConsumerGroupOffsets(c->rk, &req, 1, o, c->queue);
    rd_kafka_AdminOptions_destroy(o);
    rd_kafka_AlterConsumerGroupOffsets_destroy(req);
    rd_kafka_event_t *ev = admin_wait(c, ms);
    if (!ev) {
        gate_failed(L, &e, d, "timed out");
        return raise_wait(L, c, "reset_offsets", group, ms);
    }
    if (rd_kafka_event_error(ev)) gate_failed(L, &e, d, rd_kafka_event_error_string(ev));
    check_event(L, ev, "reset_offsets", group, ms);
    size_t cnt;
    const rd_kafka_group_result_t **gr = rd_kafka_AlterConsumerGroupOffsets_result_groups(
        rd_kafka_event_AlterConsumerGroupOffsets_result(ev), &cnt);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "performed");
    lua_setfield(L, -2, "decision");
    lua_createtable(L, 0, 1);
    push_group_results(L, gr, cnt);
    lua_getfield(L, -1, group);
    lua_setfield(L, -3, "result");
    lua_pop(L, 1);
    rd_kafka_event_destroy(ev);
    lua_pushliteral(L, "committed"); /* kafka.lua raises for partition errors */
    rb_gate_done(L, &e, d, 1);
    return 1;
}

static const char *group_state(rd_kafka_consumer_group_state_t s) {
    const char *name = rd_kafka_consumer_group_state_name(s);
    return name ? name : "Unknown";
}

/* describe_groups(names, timeout) -> {{group, state, members = {{client_id, host, consumer_id}}, error}} */
static int k_describe_groups(lua_State *L) {
    client *c = check_producer(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int ms = timeout_ms(L, 3), n = (int)luaL_len(L, 2);
    luaL_argcheck(L, n > 0 && n < 1000, 2, "give 1 to 999 group names");
    const char *names[1000];
    for (int i = 1; i <= n; i++) {
        lua_geti(L, 2, i);
        names[i - 1] = lua_tostring(L, -1);
        luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "group names must be strings");
        lua_pop(L, 1); /* still referenced by the table */
    }
    rd_kafka_AdminOptions_t *o = admin_options(c, RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS, ms, 0);
    rd_kafka_DescribeConsumerGroups(c->rk, names, (size_t)n, o, c->queue);
    rd_kafka_AdminOptions_destroy(o);
    rd_kafka_event_t *ev = admin_wait(c, ms);
    if (!ev) return raise_wait(L, c, "describe_group", "describing consumer groups", ms);
    check_event(L, ev, "describe_group", "describing consumer groups", ms);
    size_t cnt;
    const rd_kafka_ConsumerGroupDescription_t **gd =
        rd_kafka_DescribeConsumerGroups_result_groups(rd_kafka_event_DescribeConsumerGroups_result(ev), &cnt);
    lua_createtable(L, (int)cnt, 0);
    for (size_t i = 0; i < cnt; i++) {
        lua_createtable(L, 0, 5);
        set_string(L, "group", rd_kafka_ConsumerGroupDescription_group_id(gd[i]));
        set_string(L, "state", group_state(rd_kafka_ConsumerGroupDescription_state(gd[i])));
        const rd_kafka_error_t *e = rd_kafka_ConsumerGroupDescription_error(gd[i]);
        if (e) set_error(L, rd_kafka_error_code(e), rd_kafka_error_string(e));
        size_t m = rd_kafka_ConsumerGroupDescription_member_count(gd[i]);
        lua_createtable(L, (int)m, 0);
        for (size_t j = 0; j < m; j++) {
            const rd_kafka_MemberDescription_t *md = rd_kafka_ConsumerGroupDescription_member(gd[i], j);
            lua_createtable(L, 0, 3);
            set_string(L, "client_id", rd_kafka_MemberDescription_client_id(md));
            set_string(L, "consumer_id", rd_kafka_MemberDescription_consumer_id(md));
            set_string(L, "host", rd_kafka_MemberDescription_host(md));
            lua_rawseti(L, -2, (int)j + 1);
        }
        lua_setfield(L, -2, "members");
        lua_rawseti(L, -2, (int)i + 1);
    }
    rd_kafka_event_destroy(ev);
    return 1;
}

/* list_groups(timeout) -> {{group, state, simple}} */
static int k_list_groups(lua_State *L) {
    client *c = check_producer(L);
    int ms = timeout_ms(L, 2);
    rd_kafka_AdminOptions_t *o = admin_options(c, RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPS, ms, 0);
    rd_kafka_ListConsumerGroups(c->rk, o, c->queue);
    rd_kafka_AdminOptions_destroy(o);
    rd_kafka_event_t *ev = admin_wait(c, ms);
    if (!ev) return raise_wait(L, c, "list_groups", "listing consumer groups", ms);
    check_event(L, ev, "list_groups", "listing consumer groups", ms);
    const rd_kafka_ListConsumerGroups_result_t *r = rd_kafka_event_ListConsumerGroups_result(ev);
    size_t nerr;
    const rd_kafka_error_t **errs = rd_kafka_ListConsumerGroups_result_errors(r, &nerr);
    if (nerr) {
        /* some brokers did not answer: a partial list would mislead */
        lua_pushstring(L, rd_kafka_error_string(errs[0]));
        rd_kafka_resp_err_t code = rd_kafka_error_code(errs[0]);
        rd_kafka_event_destroy(ev);
        return rb_error(L, "kafka", "list_groups", code_of(code), is_retryable(code),
                        "listing consumer groups: %s", lua_tostring(L, -1));
    }
    size_t cnt;
    const rd_kafka_ConsumerGroupListing_t **gl = rd_kafka_ListConsumerGroups_result_valid(r, &cnt);
    lua_createtable(L, (int)cnt, 0);
    for (size_t i = 0; i < cnt; i++) {
        lua_createtable(L, 0, 3);
        set_string(L, "group", rd_kafka_ConsumerGroupListing_group_id(gl[i]));
        set_string(L, "state", group_state(rd_kafka_ConsumerGroupListing_state(gl[i])));
        set_boolean(L, "simple", rd_kafka_ConsumerGroupListing_is_simple_consumer_group(gl[i]));
        lua_rawseti(L, -2, (int)i + 1);
    }
    rd_kafka_event_destroy(ev);
    return 1;
}

/* ---- topic administration ----------------------------------------------- */

/* Pushes {name = value} of the resource's config entries. */
static void push_configs(lua_State *L, const rd_kafka_ConfigResource_t *res) {
    size_t n;
    const rd_kafka_ConfigEntry_t **entries = rd_kafka_ConfigResource_configs(res, &n);
    lua_createtable(L, 0, (int)n);
    for (size_t i = 0; i < n; i++) {
        const char *v = rd_kafka_ConfigEntry_value(entries[i]);
        lua_createtable(L, 0, 4);
        if (v && !rd_kafka_ConfigEntry_is_sensitive(entries[i])) {
            set_string(L, "value", v);
        }
        set_string(L, "source", rd_kafka_ConfigSource_name(rd_kafka_ConfigEntry_source(entries[i])));
        set_boolean(L, "default", rd_kafka_ConfigEntry_is_default(entries[i]));
        set_boolean(L, "read_only", rd_kafka_ConfigEntry_is_read_only(entries[i]));
        lua_setfield(L, -2, rd_kafka_ConfigEntry_name(entries[i]));
    }
}

/* Runs one ConfigResource request (describe or alter) and checks its result. */
static const rd_kafka_ConfigResource_t *config_request(lua_State *L, client *c, rd_kafka_ConfigResource_t *res,
                                                       int alter, int ms, int validate_only,
                                                       rd_kafka_event_t **evp, const char *op) {
    rd_kafka_AdminOptions_t *o = admin_options(
        c, alter ? RD_KAFKA_ADMIN_OP_ALTERCONFIGS : RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS, ms, validate_only);
    if (alter) rd_kafka_AlterConfigs(c->rk, &res, 1, o, c->queue);
    else rd_kafka_DescribeConfigs(c->rk, &res, 1, o, c->queue);
    rd_kafka_AdminOptions_destroy(o);
    const char *topic = lua_pushstring(L, rd_kafka_ConfigResource_name(res));
    rd_kafka_ConfigResource_destroy(res);
    rd_kafka_event_t *ev = admin_wait(c, ms);
    if (!ev) raise_wait(L, c, op, topic, ms);
    *evp = ev;
    if (rd_kafka_event_error(ev)) return NULL;
    size_t n;
    const rd_kafka_ConfigResource_t **out =
        alter ? rd_kafka_AlterConfigs_result_resources(rd_kafka_event_AlterConfigs_result(ev), &n)
              : rd_kafka_DescribeConfigs_result_resources(rd_kafka_event_DescribeConfigs_result(ev), &n);
    return n ? out[0] : NULL;
}

static void check_resource(lua_State *L, rd_kafka_event_t *ev, const rd_kafka_ConfigResource_t *r,
                           const char *op, const char *topic, int ms) {
    check_event(L, ev, op, topic, ms);
    rd_kafka_resp_err_t err = r ? rd_kafka_ConfigResource_error(r) : RD_KAFKA_RESP_ERR__BAD_MSG;
    if (!err) return;
    const char *msg = note_timeout(L, err, lua_pushstring(L, r ? rd_kafka_ConfigResource_error_string(r) : "no result"), ms);
    rd_kafka_event_destroy(ev);
    rb_error(L, "kafka", op, code_of(err), is_retryable(err), "%s: %s", topic,
             msg && *msg ? msg : rd_kafka_err2str(err));
}

/* describe_configs(topic, timeout) -> {[name] = {value, source, default, read_only}} */
static int k_describe_configs(lua_State *L) {
    client *c = check_producer(L);
    const char *topic = luaL_checkstring(L, 2);
    int ms = timeout_ms(L, 3);
    rd_kafka_ConfigResource_t *res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
    rd_kafka_event_t *ev;
    const rd_kafka_ConfigResource_t *r = config_request(L, c, res, 0, ms, 0, &ev, "describe_configs");
    check_resource(L, ev, r, "describe_configs", topic, ms);
    push_configs(L, r);
    rd_kafka_event_destroy(ev);
    return 1;
}

/* Common ending of a gated admin write: the effect's outcome, then the result or the error. */
static int admin_write_done(lua_State *L, const rb_effect *e, rb_decision d, rd_kafka_resp_err_t err,
                            const char *msg) {
    if (err) {
        if (!msg || !*msg) msg = rd_kafka_err2str(err);
        gate_failed(L, e, d, msg);
        return rb_error(L, "kafka", e->op, code_of(err), is_retryable(err), "%s: %s", e->target, msg);
    }
    lua_pushstring(L, d == RB_PERFORM ? "done" : "validated by the broker, not applied");
    rb_gate_done(L, e, d, 1);
    lua_createtable(L, 0, 1);
    set_string(L, "decision", d == RB_PERFORM ? "performed" : "simulated");
    return 1;
}

/* Reads {name = value} at idx into a config resource or a new topic. */
#define EACH_CONFIG(L, idx) for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1))
static void check_config_pair(lua_State *L, int idx) {
    if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1))
        luaL_argerror(L, idx, "configs must map names to strings");
}

/* alter_configs(topic, {name = value}, timeout, summary): the whole set of
 * dynamic configs (AlterConfigs replaces them; kafka.lua merges first). */
static int k_alter_configs(lua_State *L) {
    client *c = check_producer(L);
    const char *topic = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    int ms = timeout_ms(L, 4);
    rb_effect e = {"kafka", "alter_topic_config", topic, luaL_checkstring(L, 5), 1};
    EACH_CONFIG(L, 3) check_config_pair(L, 3);
    rb_decision d = rb_gate(L, &e);
    rd_kafka_ConfigResource_t *res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
    EACH_CONFIG(L, 3) rd_kafka_ConfigResource_set_config(res, lua_tostring(L, -2), lua_tostring(L, -1));
    rd_kafka_event_t *ev;
    const rd_kafka_ConfigResource_t *r = config_request(L, c, res, 1, ms, d != RB_PERFORM, &ev, e.op);
    rd_kafka_resp_err_t err = rd_kafka_event_error(ev);
    const char *msg = err ? rd_kafka_event_error_string(ev) : NULL;
    if (!err && r && (err = rd_kafka_ConfigResource_error(r))) msg = rd_kafka_ConfigResource_error_string(r);
    msg = lua_pushstring(L, msg);
    rd_kafka_event_destroy(ev);
    return admin_write_done(L, &e, d, err, note_timeout(L, err, msg, ms));
}

/* A CreateTopics or CreatePartitions request for one topic (req, which it
 * frees), through the gate (validate only unless performed): its event awaited,
 * the request's or the topic's error, then as admin_write_done. */
static int topic_write(lua_State *L, client *c, const rb_effect *e, rd_kafka_admin_op_t op, void *req, int ms) {
    rb_decision d = rb_gate(L, e);
    rd_kafka_AdminOptions_t *o = admin_options(c, op, ms, d != RB_PERFORM);
    if (op == RD_KAFKA_ADMIN_OP_CREATETOPICS) {
        rd_kafka_NewTopic_t *nt = req;
        rd_kafka_CreateTopics(c->rk, &nt, 1, o, c->queue);
        rd_kafka_NewTopic_destroy(nt);
    } else {
        rd_kafka_NewPartitions_t *np = req;
        rd_kafka_CreatePartitions(c->rk, &np, 1, o, c->queue);
        rd_kafka_NewPartitions_destroy(np);
    }
    rd_kafka_AdminOptions_destroy(o);
    rd_kafka_event_t *ev = admin_wait(c, ms);
    if (!ev) return admin_write_done(L, e, d, RD_KAFKA_RESP_ERR__TIMED_OUT, push_timed_out(L, c, ms));
    rd_kafka_resp_err_t err = rd_kafka_event_error(ev);
    const char *msg = err ? rd_kafka_event_error_string(ev) : NULL;
    size_t n = 0;
    const rd_kafka_topic_result_t **tr = NULL;
    if (!err && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_CREATETOPICS_RESULT)
        tr = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    else if (!err)
        tr = rd_kafka_CreatePartitions_result_topics(rd_kafka_event_CreatePartitions_result(ev), &n);
    if (n && rd_kafka_topic_result_error(tr[0])) {
        err = rd_kafka_topic_result_error(tr[0]);
        msg = rd_kafka_topic_result_error_string(tr[0]);
    }
    msg = lua_pushstring(L, msg);
    rd_kafka_event_destroy(ev);
    return admin_write_done(L, e, d, err, note_timeout(L, err, msg, ms));
}

/* create_topic(name, partitions, replication_factor, configs, timeout, summary) */
static int k_create_topic(lua_State *L) {
    client *c = check_producer(L);
    const char *name = luaL_checkstring(L, 2);
    int parts = (int)luaL_checkinteger(L, 3), rf = (int)luaL_checkinteger(L, 4);
    luaL_checktype(L, 5, LUA_TTABLE);
    int ms = timeout_ms(L, 6);
    rb_effect e = {"kafka", "create_topic", name, luaL_checkstring(L, 7), 1};
    EACH_CONFIG(L, 5) check_config_pair(L, 5);
    char errstr[512];
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(name, parts, rf, errstr, sizeof errstr);
    if (!nt) return luaL_error(L, "create_topic %s: %s", name, errstr);
    EACH_CONFIG(L, 5) rd_kafka_NewTopic_set_config(nt, lua_tostring(L, -2), lua_tostring(L, -1));
    return topic_write(L, c, &e, RD_KAFKA_ADMIN_OP_CREATETOPICS, nt, ms);
}

/* create_partitions(topic, new_total, timeout, summary) */
static int k_create_partitions(lua_State *L) {
    client *c = check_producer(L);
    const char *topic = luaL_checkstring(L, 2);
    lua_Integer total = luaL_checkinteger(L, 3);
    int ms = timeout_ms(L, 4);
    rb_effect e = {"kafka", "create_partitions", topic, luaL_checkstring(L, 5), 1};
    char errstr[512];
    rd_kafka_NewPartitions_t *np = rd_kafka_NewPartitions_new(topic, (size_t)total, errstr, sizeof errstr);
    if (!np) return luaL_error(L, "create_partitions %s: %s", topic, errstr);
    return topic_write(L, c, &e, RD_KAFKA_ADMIN_OP_CREATEPARTITIONS, np, ms);
}

/* ---- produce ------------------------------------------------------------ */

/* Reads headers {{name, value}...} of the message at the top of the stack. */
static rd_kafka_headers_t *check_headers(lua_State *L) {
    if (lua_getfield(L, -1, "headers") != LUA_TTABLE) {
        lua_pop(L, 1);
        return NULL;
    }
    int n = (int)luaL_len(L, -1);
    rd_kafka_headers_t *h = rd_kafka_headers_new((size_t)n);
    for (int i = 1; i <= n; i++) {
        lua_geti(L, -1, i);
        lua_geti(L, -1, 1);
        lua_geti(L, -2, 2);
        if (lua_type(L, -2) != LUA_TSTRING || (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)) {
            rd_kafka_headers_destroy(h);
            luaL_error(L, "headers must be {name, value} pairs of strings");
        }
        size_t vlen = 0;
        const char *v = lua_tolstring(L, -1, &vlen);
        rd_kafka_header_add(h, lua_tostring(L, -2), -1, v, v ? (ssize_t)vlen : 0);
        lua_pop(L, 3);
    }
    lua_pop(L, 1);
    return h;
}

/* Checks every message before any is queued: a bad one found halfway
 * would leave the first half sent. */
static void check_messages(lua_State *L, int idx, size_t n) {
    for (size_t i = 1; i <= n; i++) {
        if (lua_geti(L, idx, (lua_Integer)i) != LUA_TTABLE) luaL_error(L, "message %d is not a table", (int)i);
        if (lua_getfield(L, -1, "topic") != LUA_TSTRING) luaL_error(L, "message %d needs a topic", (int)i);
        rd_kafka_headers_t *h = (lua_pop(L, 1), check_headers(L));
        if (h) rd_kafka_headers_destroy(h);
        lua_pop(L, 1);
    }
}

/* Queues message i (1-based) of the list at idx; waits while the queue is full. */
static rd_kafka_resp_err_t queue_message(lua_State *L, client *c, int idx, size_t i, int deadline_ms) {
    lua_geti(L, idx, (lua_Integer)i);
    if (!lua_istable(L, -1)) luaL_error(L, "message %d is not a table", (int)i);
    lua_getfield(L, -1, "topic");
    lua_getfield(L, -2, "key");
    lua_getfield(L, -3, "value");
    lua_getfield(L, -4, "partition");
    lua_getfield(L, -5, "timestamp");
    int64_t ts = lua_isinteger(L, -1) ? (int64_t)lua_tointeger(L, -1) : 0;
    lua_pop(L, 1);
    const char *topic = lua_tostring(L, -4);
    if (lua_type(L, -4) != LUA_TSTRING) luaL_error(L, "message %d needs a topic", (int)i);
    size_t klen = 0, vlen = 0;
    const char *key = lua_type(L, -3) == LUA_TSTRING ? lua_tolstring(L, -3, &klen) : NULL;
    const char *value = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &vlen) : NULL;
    int32_t partition = lua_isinteger(L, -1) ? (int32_t)lua_tointeger(L, -1) : RD_KAFKA_PARTITION_UA;
    lua_pushvalue(L, -5);
    rd_kafka_headers_t *h = check_headers(L);
    lua_pop(L, 1);
    double end = rb_now() + deadline_ms / 1000.0;
    rd_kafka_resp_err_t err;
    while ((err = rd_kafka_producev(c->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(partition),
                                    RD_KAFKA_V_KEY(key, klen), RD_KAFKA_V_VALUE((void *)value, vlen),
                                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(h),
                                    RD_KAFKA_V_TIMESTAMP(ts), RD_KAFKA_V_OPAQUE((void *)(uintptr_t)i), RD_KAFKA_V_END)) ==
               RD_KAFKA_RESP_ERR__QUEUE_FULL &&
           rb_now() < end && !rb_interrupted())
        rd_kafka_poll(c->rk, 10);
    if (err && h) rd_kafka_headers_destroy(h);
    lua_pop(L, 5);
    return err;
}

/* Asks for the metadata of every topic in the batch before queuing: a
 * client that has seen the full topic list otherwise holds messages for a
 * topic it did not see until the next refresh, minutes away. A topic that
 * does not exist (and is not auto-created) fails here, at once. */
static rd_kafka_resp_err_t learn_topics(lua_State *L, client *c, int idx, size_t n, int ms, const char **bad) {
    lua_newtable(L); /* the set of topics already asked about */
    int seen = lua_gettop(L);
    rd_kafka_resp_err_t err = 0;
    for (size_t i = 1; i <= n && !err; i++) {
        lua_geti(L, idx, (lua_Integer)i);
        lua_getfield(L, -1, "topic");
        const char *topic = lua_tostring(L, -1);
        lua_pushvalue(L, -1);
        if (lua_rawget(L, seen) == LUA_TNIL) {
            lua_pushvalue(L, -2);
            lua_pushboolean(L, 1);
            lua_rawset(L, seen);
            rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->rk, topic, NULL);
            const struct rd_kafka_metadata *md;
            err = rd_kafka_metadata(c->rk, 0, rkt, &md, ms);
            if (!err) {
                err = md->topic_cnt == 1 ? md->topics[0].err : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
                rd_kafka_metadata_destroy(md);
            }
            rd_kafka_topic_destroy(rkt);
            if (err) *bad = topic; /* kept alive by the messages table */
        }
        lua_pop(L, 3);
    }
    lua_pop(L, 1);
    return err;
}

static void call_progress(lua_State *L, int fn, size_t done, size_t total) {
    if (lua_isnil(L, fn)) return;
    lua_pushvalue(L, fn);
    lua_pushinteger(L, (lua_Integer)done);
    lua_pushinteger(L, (lua_Integer)total);
    lua_call(L, 2, 0);
}

static size_t count_done(client *c) {
    size_t n = 0;
    for (size_t i = 0; i < c->pending; i++) n += c->deliveries[i].done;
    return n;
}

/* Stops waiting for the messages of a failed call: they must not be
 * delivered behind the runbook's back after it saw an error. */
static void abandon(client *c) {
    rd_kafka_purge(c->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_poll(c->rk, 0);
    free_deliveries(c);
}

/* Pushes {delivered, partitions = {[i] = partition}, offsets = {[i] = offset}}. */
static void push_deliveries(lua_State *L, client *c) {
    lua_createtable(L, 0, 3);
    set_integer(L, "delivered", (lua_Integer)c->pending);
    lua_createtable(L, (int)c->pending, 0);
    lua_createtable(L, (int)c->pending, 0);
    for (size_t i = 0; i < c->pending; i++) {
        lua_pushinteger(L, c->deliveries[i].partition);
        lua_rawseti(L, -3, (lua_Integer)i + 1);
        lua_pushinteger(L, c->deliveries[i].offset);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -3, "offsets");
    lua_setfield(L, -2, "partitions");
    lua_pushliteral(L, "performed");
    lua_setfield(L, -2, "decision");
}

/* produce(messages, timeout, summary, target, progress) -> {delivered, partitions, offsets}
 * messages: {{topic, key, value, partition, timestamp (ms), headers = {{name, value}}}...} */
static int k_produce(lua_State *L) {
    client *c = check_producer(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    int ms = timeout_ms(L, 3);
    rb_effect e = {"kafka", "produce", luaL_checkstring(L, 5), luaL_checkstring(L, 4), 0};
    lua_settop(L, 6);
    size_t n = (size_t)luaL_len(L, 2);
    check_messages(L, 2, n);
    rb_decision d = rb_gate(L, &e);
    if (d != RB_PERFORM) return gate_skipped(L, &e); /* no native dry run: d is RB_SKIP */
    const char *bad_topic = NULL;
    rd_kafka_resp_err_t terr = learn_topics(L, c, 2, n, ms, &bad_topic);
    if (terr) {
        const char *msg = lua_pushfstring(L, "topic %s: %s", bad_topic ? bad_topic : e.target, rd_kafka_err2str(terr));
        gate_failed(L, &e, d, msg);
        return rb_error(L, "kafka", "produce", code_of(terr), is_retryable(terr), "%s", msg);
    }
    free_deliveries(c);
    c->deliveries = calloc(n ? n : 1, sizeof *c->deliveries);
    if (!c->deliveries) return luaL_error(L, "out of memory");
    c->pending = n;
    double start = rb_now(), end = start + ms / 1000.0, next_report = start + 1.0;
    rd_kafka_resp_err_t err = 0;
    size_t failed = 0;
    for (size_t i = 1; i <= n && !err; i++) {
        int left = (int)((end - rb_now()) * 1000);
        err = queue_message(L, c, 2, i, left > 0 ? left : 0);
        if (err) failed = i;
    }
    while (!err && count_done(c) < n) {
        if (rb_interrupted() || rb_now() >= end) {
            err = rb_interrupted() ? RD_KAFKA_RESP_ERR__INTR : RD_KAFKA_RESP_ERR__TIMED_OUT;
            break;
        }
        rd_kafka_poll(c->rk, POLL_SLICE_MS);
        if (rb_now() >= next_report) {
            call_progress(L, 6, count_done(c), n);
            next_report = rb_now() + 1.0;
        }
    }
    for (size_t i = 0; !err && i < n; i++)
        if (c->deliveries[i].err) err = c->deliveries[i].err, failed = i + 1;
    if (err) {
        abandon(c);
        const char *msg = failed ? lua_pushfstring(L, "message %d of %d to %s: %s", (int)failed, (int)n, e.target,
                                                   rd_kafka_err2str(err))
                                 : lua_pushfstring(L, "%d messages to %s: %s", (int)n, e.target, rd_kafka_err2str(err));
        gate_failed(L, &e, d, msg);
        return rb_error(L, "kafka", "produce", code_of(err), is_retryable(err), "%s", msg);
    }
    lua_pushfstring(L, "%d messages delivered", (int)n);
    rb_gate_done(L, &e, d, 1);
    push_deliveries(L, c);
    free_deliveries(c);
    return 1;
}

/* ---- consume ------------------------------------------------------------ */

/* The reader reads what it is assigned (see reader()). */
/* consume_start({{topic, partition, offset}...}): replaces the assignment. */
static int k_consume_start(lua_State *L) {
    client *c = check_client(L);
    rd_kafka_topic_partition_list_t *l = check_partitions(L, 2, 1);
    rd_kafka_t *rk = reader(L, c);
    if (!c->consuming) rd_kafka_poll_set_consumer(rk);
    c->consuming = 1;
    rd_kafka_resp_err_t err = rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (err) return raise_err(L, c, "consume", err, "cannot assign partitions", 0);
    return 0;
}

static int k_consume_stop(lua_State *L) {
    client *c = check_client(L);
    if (c->consumer) rd_kafka_assign(c->consumer, NULL);
    return 0;
}

static void push_message_headers(lua_State *L, rd_kafka_message_t *m) {
    rd_kafka_headers_t *h = NULL;
    lua_newtable(L);
    if (rd_kafka_message_headers(m, &h) || !h) return;
    const char *name;
    const void *v;
    size_t len;
    for (size_t i = 0; rd_kafka_header_get_all(h, i, &name, &v, &len) == RD_KAFKA_RESP_ERR_NO_ERROR; i++) {
        lua_createtable(L, 2, 0);
        lua_pushstring(L, name);
        lua_rawseti(L, -2, 1);
        if (v) {
            lua_pushlstring(L, v, len);
            lua_rawseti(L, -2, 2);
        }
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

static void push_message(lua_State *L, rd_kafka_message_t *m) {
    lua_createtable(L, 0, 8);
    set_string(L, "topic", rd_kafka_topic_name(m->rkt));
    set_integer(L, "partition", m->partition);
    set_integer(L, "offset", m->offset);
    if (m->key) {
        lua_pushlstring(L, m->key, m->key_len);
        lua_setfield(L, -2, "key");
    }
    if (m->payload) {
        lua_pushlstring(L, m->payload, m->len);
        lua_setfield(L, -2, "value");
    }
    rd_kafka_timestamp_type_t tt;
    int64_t ts = rd_kafka_message_timestamp(m, &tt);
    if (tt != RD_KAFKA_TIMESTAMP_NOT_AVAILABLE) {
        set_integer(L, "timestamp", ts);
    }
    push_message_headers(L, m);
    lua_setfield(L, -2, "headers");
}

/* consume_poll(timeout) -> message | nil when none arrived in time */
static int k_consume_poll(lua_State *L) {
    client *c = check_client(L);
    luaL_argcheck(L, c->consumer != NULL, 1, "consume_start first");
    int ms = timeout_ms(L, 2);
    double end = rb_now() + ms / 1000.0;
    while (!rb_interrupted()) {
        int left = (int)((end - rb_now()) * 1000);
        if (left <= 0) break;
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c->consumer, left < POLL_SLICE_MS ? left : POLL_SLICE_MS);
        if (!m) continue;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->err) {
            rd_kafka_resp_err_t err = m->err;
            const char *msg = lua_pushfstring(L, "%s [%d] at offset %d: %s",
                                              m->rkt ? rd_kafka_topic_name(m->rkt) : "?", (int)m->partition,
                                              (int)m->offset, rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            return rb_error(L, "kafka", "consume", code_of(err), is_retryable(err), "%s", msg);
        }
        push_message(L, m);
        rd_kafka_message_destroy(m);
        return 1;
    }
    if (rb_interrupted()) return rb_error(L, "kafka", "consume", "interrupted", 0, "consume: interrupted");
    lua_pushnil(L);
    return 1;
}

/* ---- broker probe ------------------------------------------------------- */

/* Reads exactly n bytes before the deadline; returns NULL or why not. */
static const char *read_full(int fd, unsigned char *buf, size_t n, double end) {
    size_t got = 0;
    while (got < n) {
        if (!net_wait(fd, POLLIN, end)) return "no answer to ApiVersions";
        ssize_t r = read(fd, buf + got, n - got);
        if (r == 0) return "connection closed";
        if (r < 0 && errno != EAGAIN && errno != EINTR) return strerror(errno);
        if (r > 0) got += (size_t)r;
    }
    return NULL;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Sends ApiVersions v0 and pushes {[api_key] = max_version}; NULL or why not. */
static const char *api_versions(lua_State *L, int fd, double end) {
    static const unsigned char req[] = {0, 0, 0, 17, 0, 18, 0, 0, 0, 0, 0, 1, 0, 7,
                                        'r', 'u', 'n', 'b', 'o', 'o', 'k'};
    unsigned char head[4];
    if (write(fd, req, sizeof req) != (ssize_t)sizeof req) return "cannot send ApiVersions";
    const char *why = read_full(fd, head, 4, end);
    if (why) return why;
    uint32_t len = be32(head);
    if (len < 10 || len > 65536) return "not a Kafka answer";
    unsigned char *body = malloc(len);
    if (!body) return "out of memory";
    why = read_full(fd, body, len, end);
    uint32_t n = why ? 0 : be32(body + 6);
    if (!why && (be32(body) != 1 || 10 + (size_t)n * 6 > len)) why = "not a Kafka answer";
    if (!why) {
        lua_createtable(L, 0, (int)n);
        for (uint32_t i = 0; i < n; i++) {
            const unsigned char *e = body + 10 + i * 6;
            lua_pushinteger(L, e[4] << 8 | e[5]);
            lua_rawseti(L, -2, e[0] << 8 | e[1]);
        }
    }
    free(body);
    return why;
}

/* probe(host, port, timeout, plaintext) -> true, apis | false, reason
 * On a plaintext listener the broker must answer ApiVersions (a broker that
 * is down may still accept connections); apis maps the request types it
 * supports to their highest version, so kafka.lua can avoid requests a
 * broker does not know. Elsewhere a TCP connection is all it checks. */
static int k_probe(lua_State *L) {
    const char *host = luaL_checkstring(L, 1);
    const char *port = lua_pushfstring(L, "%d", (int)luaL_checkinteger(L, 2));
    double end = rb_now() + timeout_ms(L, 3) / 1000.0;
    int plaintext = lua_toboolean(L, 4);
    lua_settop(L, 5);
    const char *why = NULL;
    int fd = net_connect(host, port, end, &why);
    if (fd >= 0 && plaintext) why = api_versions(L, fd, end);
    if (fd >= 0) close(fd);
    if (why) {
        lua_pushboolean(L, 0);
        lua_pushstring(L, why);
        return 2;
    }
    lua_pushboolean(L, 1);
    if (plaintext) lua_pushvalue(L, 6);
    else lua_pushnil(L);
    return 2;
}

/* ---- module ------------------------------------------------------------- */

static const luaL_Reg client_methods[] = {
    {"metadata", k_metadata},
    {"offsets", k_offsets},
    {"group_offsets", k_group_offsets},
    {"alter_group_offsets", k_alter_group_offsets},
    {"describe_groups", k_describe_groups},
    {"list_groups", k_list_groups},
    {"describe_configs", k_describe_configs},
    {"alter_configs", k_alter_configs},
    {"create_topic", k_create_topic},
    {"create_partitions", k_create_partitions},
    {"produce", k_produce},
    {"consume_start", k_consume_start},
    {"consume_poll", k_consume_poll},
    {"consume_stop", k_consume_stop},
    {"close", client_close},
    {NULL, NULL}
};

int luaopen_runbook_kafka(lua_State *L) {
    rb_class(L, CLIENT_MT, client_methods, client_close);
    lua_pop(L, 1);
    luaL_newlib(L, kafka_funcs);
    set_string(L, "librdkafka_version", rd_kafka_version_str());
    return 1;
}
