/*
 * kafka-sandbox: the sandbox's Kafka cluster and its simulated traffic.
 *
 *   kafka-sandbox serve STATE_DIR
 *       Runs librdkafka's mock cluster (3 brokers, real wire protocol on
 *       loopback), creates the todo-chatbot topics, seeds them, and keeps a
 *       workload running: a producer of task events and the consumer groups
 *       recurring-task-service, websocket-service and notification-service,
 *       which commit offsets at a rate proportional to their replica count
 *       (read from STATE_DIR/replicas/<deployment>). Writes
 *       STATE_DIR/kafka/control.port and, once ready, STATE_DIR/kafka/bootstrap.
 *       Control commands arrive one line per connection on the control port.
 *
 *       The control command "groups N" adds consumer groups scale-group-1..N
 *       with committed offsets on every partition of scale-events (12
 *       partitions of SCALE_MESSAGES messages each), for the scale benchmarks.
 *
 *   kafka-sandbox lag BROKERS GROUP TOPIC
 *       An independent client: prints committed offset, high watermark and
 *       lag per partition, then "total <lag>".
 *
 * Consumers commit with explicit offsets and never JoinGroup: the mock
 * answers UNKNOWN_MEMBER_ID forever to admin offset resets for a group that
 * ever joined, and runbooks must be able to reset these groups.
 */
#define _GNU_SOURCE
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NBROKERS 3

struct topic { const char *name; int partitions; };

static const struct topic topics[] = {
    {"task-events", 12}, {"task-updates", 3}, {"reminders", 3}, {"reminders-dlq", 3},
};
#define NTOPICS (int)(sizeof topics / sizeof topics[0])

struct group {
    const char *name;
    const char *deployment;      /* file under STATE_DIR/replicas/ */
    const char *topics[2];
    int per_replica_rate;        /* messages per second one replica consumes */
    int default_replicas;
    int start_behind;            /* initial lag per partition */
    rd_kafka_t *rk;
};

/* recurring-task-service starts far behind and, at one replica, consumes
 * slower than task-events grows: its lag stays over 1000 until scaled up. */
static struct group groups[] = {
    {"recurring-task-service", "recurring-task", {"task-events", NULL}, 15, 1, 130, NULL},
    {"websocket-service", "websocket", {"task-events", "task-updates"}, 30, 2, 0, NULL},
    {"notification-service", "notification", {"reminders", NULL}, 5, 1, 0, NULL},
};
#define NGROUPS (int)(sizeof groups / sizeof groups[0])

static const char *state_dir;
static rd_kafka_mock_cluster_t *mc;
static rd_kafka_t *workload_rk, *control_rk;
static atomic_int stopping, paused, pause_acked;
static atomic_int broker_down[NBROKERS + 1];
static atomic_int rtt_ms;
static long seq;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kafka-sandbox: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void on_signal(int sig) { (void)sig; stopping = 1; }

static double elapsed(void)
{
    static struct timespec t0;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    if (!t0.tv_sec)
        t0 = t;
    return (double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void iso_now(char *buf, size_t n, int offset_s)
{
    time_t t = time(NULL) + offset_s;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Writes a file atomically so readers never see half of it. */
static void write_state_file(const char *name, const char *content)
{
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/kafka/%s", state_dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(content, f) < 0 || fclose(f) != 0)
        die("cannot write %s: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        die("cannot rename %s: %s", tmp, strerror(errno));
}

/* Brokers come back within seconds here (ctl kafka broker-up), so clients
 * retry reconnecting every 100 ms instead of backing off to librdkafka's 10 s,
 * which stalled the workload for seconds after every broker fault. */
static void set_quick_reconnect(rd_kafka_conf_t *conf)
{
    char err[256];
    static const char *const kv[] = {"reconnect.backoff.ms", "20", "reconnect.backoff.max.ms", "100",
                                     "retry.backoff.ms", "20", NULL};
    for (int i = 0; kv[i]; i += 2)
        if (rd_kafka_conf_set(conf, kv[i], kv[i + 1], err, sizeof err))
            die("%s", err);
}

static rd_kafka_t *new_client(rd_kafka_type_t type, const char *brokers, const char *group,
                              const char *const *extra)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (brokers && rd_kafka_conf_set(conf, "bootstrap.servers", brokers, err, sizeof err))
        die("%s", err);
    if (group && (rd_kafka_conf_set(conf, "group.id", group, err, sizeof err) ||
                  rd_kafka_conf_set(conf, "enable.auto.commit", "false", err, sizeof err)))
        die("%s", err);
    for (; extra && extra[0]; extra += 2)
        if (rd_kafka_conf_set(conf, extra[0], extra[1], err, sizeof err))
            die("%s", err);
    rd_kafka_conf_set(conf, "log_level", "3", err, sizeof err);
    set_quick_reconnect(conf);
    rd_kafka_t *rk = rd_kafka_new(type, conf, err, sizeof err);
    if (!rk)
        die("rd_kafka_new: %s", err);
    return rk;
}

/* ---- the cluster ---- */

/* Mock cluster changes (topic creation, leaders, broker down) are ops served
 * by the mock's own thread, which in librdkafka 2.0.2 may only notice them
 * when its 1 s poll times out: a start took 1 to 8 s depending on luck. Any
 * socket activity wakes that thread, so while we change the cluster a helper
 * thread keeps opening and closing connections to a broker that is up. */
static atomic_int nudging;
static int broker_port[NBROKERS + 1];

static void *nudger(void *arg)
{
    (void)arg;
    while (!stopping) {
        int b = 1;
        while (b <= NBROKERS && broker_down[b])
            b++;
        if (!nudging || b > NBROKERS) {
            sleep_ms(10);
            continue;
        }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(broker_port[b]),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0) {
            if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != ECONNREFUSED)
                fprintf(stderr, "kafka-sandbox: nudge: %s\n", strerror(errno));
            close(fd);
        }
        sleep_ms(2);
    }
    return NULL;
}

static void start_nudger(void)
{
    const char *p = rd_kafka_mock_cluster_bootstraps(mc);
    for (int b = 1; b <= NBROKERS && p; b++) {
        const char *colon = strchr(p, ':');
        broker_port[b] = colon ? atoi(colon + 1) : 0;
        p = strchr(p, ',');
        p = p ? p + 1 : NULL;
    }
    pthread_t th;
    pthread_create(&th, NULL, nudger, NULL);
    pthread_detach(th);
}

static int preferred_leader(int partition) { return partition % NBROKERS + 1; }

static int first_up_broker(int preferred)
{
    for (int i = 0; i < NBROKERS; i++) {
        int b = (preferred - 1 + i) % NBROKERS + 1;
        if (!broker_down[b])
            return b;
    }
    return -1;
}

/* Real Kafka elects a new leader when one dies and moves leadership back to
 * the preferred replica when it returns; the mock does neither by itself. */
static void elect_leaders(void)
{
    for (int t = 0; t < NTOPICS; t++)
        for (int p = 0; p < topics[t].partitions; p++)
            rd_kafka_mock_partition_set_leader(mc, topics[t].name, p,
                                               first_up_broker(preferred_leader(p)));
    /* With every broker down the coordinators stay where they were: the mock
     * aborts on a FindCoordinator naming a broker it cannot find. */
    for (int g = 0; g < NGROUPS; g++) {
        int coord = first_up_broker(g + 1);
        if (coord > 0)
            rd_kafka_mock_coordinator_set(mc, "group", groups[g].name, coord);
    }
}

static void start_cluster(void)
{
    static const char *const quiet[] = {"log_level", "3", NULL};
    rd_kafka_t *owner = new_client(RD_KAFKA_PRODUCER, NULL, NULL, quiet);
    mc = rd_kafka_mock_cluster_new(owner, NBROKERS);
    if (!mc)
        die("cannot create the mock cluster");
    start_nudger();
    nudging++;
    for (int t = 0; t < NTOPICS; t++)
        if (rd_kafka_mock_topic_create(mc, topics[t].name, topics[t].partitions, NBROKERS))
            die("cannot create topic %s", topics[t].name);
    elect_leaders();
    nudging--;
}

/* ---- producing ---- */

struct delivery { atomic_int done; rd_kafka_resp_err_t err; };

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk; (void)opaque;
    struct delivery *d = m->_private;
    if (d) {
        d->err = m->err;
        d->done = 1;
    } else if (m->err) {
        fprintf(stderr, "kafka-sandbox: delivery failed: %s\n", rd_kafka_err2str(m->err));
    }
}

/* Learns every topic's partitions before the first produce: otherwise
 * librdkafka holds messages for an unknown topic until its next 1 s metadata
 * refresh, which made start times vary by seconds. */
static void learn_topics(rd_kafka_t *rk)
{
    for (int t = 0; t < NTOPICS; t++) {
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics[t].name, NULL);
        const struct rd_kafka_metadata *md;
        if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR)
            rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
    }
}

static rd_kafka_t *new_producer(const char *brokers, const char *timeout_ms)
{
    const char *const extra[] = {"linger.ms", "5", "message.timeout.ms", timeout_ms, NULL};
    char err[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    set_quick_reconnect(conf);
    if (getenv("KAFKA_SANDBOX_DEBUG"))   /* librdkafka debug contexts, e.g. "msg,topic" */
        rd_kafka_conf_set(conf, "debug", getenv("KAFKA_SANDBOX_DEBUG"), err, sizeof err);
    rd_kafka_conf_set(conf, "bootstrap.servers", brokers, err, sizeof err);
    for (int i = 0; extra[i]; i += 2)
        rd_kafka_conf_set(conf, extra[i], extra[i + 1], err, sizeof err);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk)
        die("producer: %s", err);
    learn_topics(rk);
    return rk;
}

static void produce(rd_kafka_t *rk, const char *topic, const char *key, const char *value,
                    rd_kafka_headers_t *headers)
{
    rd_kafka_resp_err_t err;
    while ((err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, strlen(key)),
                                    RD_KAFKA_V_VALUE((void *)value, strlen(value)),
                                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                    RD_KAFKA_V_HEADERS(headers), RD_KAFKA_V_END)) ==
           RD_KAFKA_RESP_ERR__QUEUE_FULL)
        rd_kafka_poll(rk, 50);
    if (err) {
        fprintf(stderr, "kafka-sandbox: produce to %s: %s\n", topic, rd_kafka_err2str(err));
        if (headers)
            rd_kafka_headers_destroy(headers);
    }
}

static void produce_task_event(void)
{
    static const char *const types[] = {"task.created", "task.updated", "task.completed",
                                        "task.deleted"};
    char key[32], value[512], now[32];
    long n = ++seq;
    long task_id = 1 + n % 3000;
    iso_now(now, sizeof now, 0);
    snprintf(key, sizeof key, "%ld", task_id);
    snprintf(value, sizeof value,
             "{\"event_id\":\"evt-%ld\",\"event_type\":\"%s\",\"task_id\":%ld,"
             "\"user_id\":\"user-%ld\",\"timestamp\":\"%s\"}",
             n, types[n % 4], task_id, 1 + task_id % 50, now);
    produce(workload_rk, "task-events", key, value, NULL);
    if (n % 4 == 0)
        produce(workload_rk, "task-updates", key, value, NULL);
}

static void reminder_json(char *buf, size_t n, long id)
{
    char at[32];
    iso_now(at, sizeof at, (int)(id % 7200) - 3600);
    snprintf(buf, n,
             "{\"reminder_id\":\"rem-%ld\",\"task_id\":%ld,\"user_id\":\"user-%ld\","
             "\"channel\":\"email\",\"remind_at\":\"%s\"}",
             id, 1 + id % 3000, 1 + id % 50, at);
}

static void produce_reminder(long id)
{
    char key[32], value[512];
    snprintf(key, sizeof key, "%ld", 1 + id % 3000);
    reminder_json(value, sizeof value, id);
    produce(workload_rk, "reminders", key, value, NULL);
}

/* Reminders that notification-service gave up on, for the DLQ replay runbook. */
static void produce_failed_reminder(long id)
{
    static const char *const why[] = {"smtp: 550 mailbox unavailable",
                                      "smtp: connection timed out", "template: missing field due_date"};
    char key[32], value[512], failed_at[32];
    snprintf(key, sizeof key, "%ld", 1 + id % 3000);
    reminder_json(value, sizeof value, id);
    iso_now(failed_at, sizeof failed_at, -(int)(id * 60));
    rd_kafka_headers_t *h = rd_kafka_headers_new(5);
    rd_kafka_header_add(h, "error", -1, why[id % 3], -1);
    rd_kafka_header_add(h, "original-topic", -1, "reminders", -1);
    rd_kafka_header_add(h, "consumer-group", -1, "notification-service", -1);
    rd_kafka_header_add(h, "retry-count", -1, "3", -1);
    rd_kafka_header_add(h, "failed-at", -1, failed_at, -1);
    produce(workload_rk, "reminders-dlq", key, value, h);
}

static void seed_topics(void)
{
    for (int i = 0; i < 3000; i++)
        produce_task_event();
    for (long i = 1; i <= 150; i++)
        produce_reminder(i);
    for (long i = 1; i <= 25; i++)
        produce_failed_reminder(1000 + i);
    if (rd_kafka_flush(workload_rk, 30000))
        die("seeding the topics timed out");
}

/* ---- consumer groups ---- */

static int read_replicas(const struct group *g)
{
    char path[4096];
    int n = g->default_replicas;
    snprintf(path, sizeof path, "%s/replicas/%s", state_dir, g->deployment);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%d", &n) != 1 || n < 0)
            n = g->default_replicas;
        fclose(f);
    }
    return n;
}

static rd_kafka_topic_partition_list_t *group_partitions(const struct group *g)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(16);
    for (int i = 0; i < 2 && g->topics[i]; i++)
        for (int t = 0; t < NTOPICS; t++)
            if (strcmp(topics[t].name, g->topics[i]) == 0)
                for (int p = 0; p < topics[t].partitions; p++)
                    rd_kafka_topic_partition_list_add(l, topics[t].name, p);
    return l;
}

/* Every group's lag per partition after the last tick, in the Prometheus
 * exposition format, as kafka_exporter publishes it (kafka/lag.prom; the
 * sandbox's metrics server serves it as the kafka-exporter target). */
static char lag_text[32768];
static size_t lag_len;

static void lag_line(const struct group *g, const rd_kafka_topic_partition_t *tp, int64_t lag)
{
    if (lag_len < sizeof lag_text)
        lag_len += (size_t)snprintf(lag_text + lag_len, sizeof lag_text - lag_len,
                                    "kafka_consumergroup_lag{consumergroup=\"%s\",topic=\"%s\",partition=\"%d\"} %lld\n",
                                    g->name, tp->topic, (int)tp->partition, (long long)lag);
}

static void lag_begin(void)
{
    lag_len = (size_t)snprintf(lag_text, sizeof lag_text,
                               "# HELP kafka_consumergroup_lag Current approximate lag of a consumer group at topic/partition.\n"
                               "# TYPE kafka_consumergroup_lag gauge\n");
}

static void lag_end(void)
{
    if (lag_len < sizeof lag_text)
        write_state_file("lag.prom", lag_text);
}

/* Moves the group's committed offsets forward by `budget` messages spread
 * over its partitions. Offsets are read back from the cluster first so that
 * a runbook's offset reset is respected. */
static void consume(struct group *g, int budget, int initial)
{
    rd_kafka_topic_partition_list_t *l = group_partitions(g);
    if (rd_kafka_committed(g->rk, l, 5000) != RD_KAFKA_RESP_ERR_NO_ERROR)
        goto out;
    int changed = 0;
    for (int i = 0; i < l->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &l->elems[i];
        int64_t lo, hi;
        if (rd_kafka_query_watermark_offsets(g->rk, tp->topic, tp->partition, &lo, &hi, 5000))
            goto out;
        int64_t from = initial ? hi - g->start_behind : tp->offset;
        if (from < lo)
            from = tp->offset < 0 && !initial ? hi : lo;
        int64_t share = budget / l->cnt + (i < budget % l->cnt);
        int64_t to = from + share > hi ? hi : from + share;
        changed |= to != tp->offset;
        tp->offset = to;
        lag_line(g, tp, hi - to);
    }
    if (changed) {
        rd_kafka_resp_err_t err = rd_kafka_commit(g->rk, l, 0);
        if (err)
            fprintf(stderr, "kafka-sandbox: commit %s: %s\n", g->name, rd_kafka_err2str(err));
    }
out:
    rd_kafka_topic_partition_list_destroy(l);
}

static void start_groups(const char *brokers)
{
    lag_begin();
    for (int g = 0; g < NGROUPS; g++) {
        groups[g].rk = new_client(RD_KAFKA_CONSUMER, brokers, groups[g].name, NULL);
        consume(&groups[g], 0, 1);
    }
    lag_end();
}

/* One tick: produce, then let every group consume. */
static void tick(void)
{
    for (int i = 0; i < 20; i++)
        produce_task_event();
    if (seq % 40 == 0)
        produce_reminder(seq);
    rd_kafka_poll(workload_rk, 0);
    lag_begin();
    for (int g = 0; g < NGROUPS && !stopping; g++) {
        double t0 = elapsed();
        consume(&groups[g], read_replicas(&groups[g]) * groups[g].per_replica_rate, 0);
        if (elapsed() - t0 > 1)   /* a tick should take milliseconds */
            fprintf(stderr, "kafka-sandbox: %s's tick took %.1fs\n", groups[g].name,
                    elapsed() - t0);
    }
    lag_end();
}

/* One tick per second. When paused, the thread finishes its tick, waits for
 * every produced message to be delivered, then says so in pause_acked: from
 * then on nothing in the cluster changes until resume. */
static void *workload(void *arg)
{
    (void)arg;
    while (!stopping) {
        if (paused) {
            if (!pause_acked) {
                rd_kafka_flush(workload_rk, 30000);
                pause_acked = 1;
            }
            sleep_ms(20);
            continue;
        }
        tick();
        for (int i = 0; i < 10 && !stopping && !paused; i++) {
            rd_kafka_poll(workload_rk, 0);
            sleep_ms(100);
        }
    }
    return NULL;
}

/* Returns once the workload is idle, so a caller can compare state. */
static int pause_workload(void)
{
    paused = 1;
    for (int i = 0; i < 3000 && !pause_acked; i++)
        sleep_ms(10);
    return pause_acked;
}

static void resume_workload(void)
{
    pause_acked = 0;
    paused = 0;
}

/* Puts every group back where it starts (recurring-task-service far behind,
 * the others caught up), so specs that drained or reset a group's offsets
 * can leave the sandbox as they found it. */
static int reset_groups(void)
{
    int was_paused = paused;
    if (!pause_workload())
        return 0;
    lag_begin();
    for (int g = 0; g < NGROUPS; g++)
        consume(&groups[g], 0, 1);
    lag_end();
    if (!was_paused)
        resume_workload();
    return 1;
}

/* ---- control socket ---- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes hex in place; "-" means empty. Returns the length or -1. */
static int unhex(char *s)
{
    if (strcmp(s, "-") == 0) {
        s[0] = 0;
        return 0;
    }
    int n = 0;
    for (char *p = s; p[0]; p += 2) {
        int a = hexval(p[0]), b = p[1] ? hexval(p[1]) : -1;
        if (a < 0 || b < 0)
            return -1;
        s[n++] = (char)(a * 16 + b);
    }
    s[n] = 0;
    return n;
}

/* produce TOPIC KEYHEX VALUEHEX [NAME=VALUEHEX]...: used by the Dapr stand-in.
 * Waits for delivery so the publisher sees broker faults. */
static void cmd_produce(char **argv, int argc, char *out, size_t n)
{
    if (argc < 4) {
        snprintf(out, n, "error usage: produce TOPIC KEYHEX VALUEHEX [NAME=HEX]...");
        return;
    }
    int klen = unhex(argv[2]), vlen = unhex(argv[3]);
    if (klen < 0 || vlen < 0) {
        snprintf(out, n, "error bad hex");
        return;
    }
    rd_kafka_headers_t *h = rd_kafka_headers_new(argc);
    for (int i = 4; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        int hl = eq ? unhex(eq + 1) : -1;
        if (hl >= 0) {
            *eq = 0;
            rd_kafka_header_add(h, argv[i], -1, eq + 1, hl);
        }
    }
    struct delivery d = {0, 0};
    rd_kafka_resp_err_t err = rd_kafka_producev(
        control_rk, RD_KAFKA_V_TOPIC(argv[1]), RD_KAFKA_V_KEY(klen ? argv[2] : NULL, (size_t)klen),
        RD_KAFKA_V_VALUE(argv[3], (size_t)vlen), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE(&d), RD_KAFKA_V_END);
    if (err) {
        rd_kafka_headers_destroy(h);
        snprintf(out, n, "error %s", rd_kafka_err2str(err));
        return;
    }
    while (!d.done)
        rd_kafka_poll(control_rk, 100);
    if (d.err)
        snprintf(out, n, "error %s", rd_kafka_err2str(d.err));
    else
        snprintf(out, n, "ok");
}

static int broker_arg(const char *s)
{
    int b = atoi(s);
    return b >= 1 && b <= NBROKERS ? b : 0;
}

static void cmd_status(char *out, size_t n)
{
    int len = snprintf(out, n, "ok bootstrap=%s paused=%d rtt_ms=%d down=",
                       rd_kafka_mock_cluster_bootstraps(mc), (int)paused, (int)rtt_ms);
    for (int b = 1; b <= NBROKERS; b++)
        if (broker_down[b])
            len += snprintf(out + len, n - (size_t)len, "%d,", b);
}

static int is_number(const char *s)
{
    if (*s == '-')
        s++;
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

static void set_broker(int b, int down)
{
    broker_down[b] = down;
    if (down)
        rd_kafka_mock_broker_set_down(mc, b);
    else
        rd_kafka_mock_broker_set_up(mc, b);
    elect_leaders();
}

/* errors APIKEY COUNT ERRCODE: the next COUNT requests of that type fail. */
static void push_errors(int16_t apikey, size_t cnt, rd_kafka_resp_err_t code)
{
    rd_kafka_resp_err_t *errs = calloc(cnt ? cnt : 1, sizeof *errs);
    if (!errs)
        die("out of memory");
    for (size_t i = 0; i < cnt; i++)
        errs[i] = code;
    rd_kafka_mock_push_request_errors_array(mc, apikey, cnt, errs);
    free(errs);
}

/* ---- many groups, for the scale benchmarks ---- */

#define SCALE_TOPIC "scale-events"
#define SCALE_PARTITIONS 12
#define SCALE_MESSAGES 100   /* per partition */

/* Group g's committed offset on partition p: every group lags differently. */
static int64_t scale_offset(int g, int p) { return (g * 7 + p * 3) % SCALE_MESSAGES; }

/* Creates scale-events once and fills every partition with SCALE_MESSAGES. */
static const char *scale_topic(void)
{
    static int created;
    if (created)
        return NULL;
    if (rd_kafka_mock_topic_create(mc, SCALE_TOPIC, SCALE_PARTITIONS, NBROKERS))
        return "cannot create " SCALE_TOPIC;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(control_rk, SCALE_TOPIC, NULL);
    const struct rd_kafka_metadata *md;
    if (rd_kafka_metadata(control_rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    for (int p = 0; p < SCALE_PARTITIONS; p++)
        for (int i = 0; i < SCALE_MESSAGES; i++) {
            char v[32];
            snprintf(v, sizeof v, "scale %d/%d", p, i);
            while (rd_kafka_producev(control_rk, RD_KAFKA_V_TOPIC(SCALE_TOPIC), RD_KAFKA_V_PARTITION(p),
                                     RD_KAFKA_V_VALUE(v, strlen(v)), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                     RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
                rd_kafka_poll(control_rk, 50);
        }
    if (rd_kafka_flush(control_rk, 30000))
        return "producing to " SCALE_TOPIC " timed out";
    created = 1;
    return NULL;
}

/* groups N: scale-group-1..N commit their offsets on scale-events, all
 * commits in flight at once (admin offset commits: no JoinGroup, so
 * runbooks can still reset these groups). Idempotent. */
static void cmd_groups(char **argv, int argc, char *out, size_t n)
{
    static rd_kafka_t *admin;
    int count = argc == 2 && is_number(argv[1]) ? atoi(argv[1]) : 0;
    if (count < 1 || count > 100000) {
        snprintf(out, n, "error usage: groups N (1..100000)");
        return;
    }
    const char *why = scale_topic();
    if (why) {
        snprintf(out, n, "error %s", why);
        return;
    }
    if (!admin)
        admin = new_client(RD_KAFKA_CONSUMER, rd_kafka_mock_cluster_bootstraps(mc), NULL, NULL);
    rd_kafka_queue_t *q = rd_kafka_queue_new(admin);
    for (int g = 1; g <= count; g++) {
        char name[64];
        snprintf(name, sizeof name, "scale-group-%d", g);
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(SCALE_PARTITIONS);
        for (int p = 0; p < SCALE_PARTITIONS; p++)
            rd_kafka_topic_partition_list_add(l, SCALE_TOPIC, p)->offset = scale_offset(g, p);
        rd_kafka_AlterConsumerGroupOffsets_t *req = rd_kafka_AlterConsumerGroupOffsets_new(name, l);
        rd_kafka_AlterConsumerGroupOffsets(admin, &req, 1, NULL, q);
        rd_kafka_AlterConsumerGroupOffsets_destroy(req);
        rd_kafka_topic_partition_list_destroy(l);
    }
    int failed = 0;
    char first[256] = "";
    for (int done = 0; done < count;) {
        rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60000);
        if (!ev)
            break;
        if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_ALTERCONSUMERGROUPOFFSETS_RESULT) {
            done++;
            size_t cnt;
            const rd_kafka_group_result_t **gr = rd_kafka_AlterConsumerGroupOffsets_result_groups(
                rd_kafka_event_AlterConsumerGroupOffsets_result(ev), &cnt);
            const rd_kafka_error_t *e = rd_kafka_event_error(ev) ? NULL : cnt ? rd_kafka_group_result_error(gr[0]) : NULL;
            if (rd_kafka_event_error(ev) || e) {
                if (!failed++)
                    snprintf(first, sizeof first, "%s", e ? rd_kafka_error_string(e) : rd_kafka_event_error_string(ev));
            }
        }
        rd_kafka_event_destroy(ev);
    }
    rd_kafka_queue_destroy(q);
    int64_t lag = 0;
    for (int g = 1; g <= count; g++)
        for (int p = 0; p < SCALE_PARTITIONS; p++)
            lag += SCALE_MESSAGES - scale_offset(g, p);
    if (failed)
        snprintf(out, n, "error %d of %d groups failed to commit: %s", failed, count, first);
    else
        snprintf(out, n, "ok groups=%d topic=%s partitions=%d lag=%lld", count, SCALE_TOPIC,
                 SCALE_PARTITIONS, (long long)lag);
}

#define USAGE(...) do { snprintf(out, n, "error usage: " __VA_ARGS__); return; } while (0)

static void run_command(char *line, char *out, size_t n)
{
    char *argv[64];
    int argc = 0;
    for (char *tok = strtok(line, " \t\r\n"); tok && argc < 64; tok = strtok(NULL, " \t\r\n"))
        argv[argc++] = tok;
    const char *cmd = argc ? argv[0] : "";
    snprintf(out, n, "ok");
    if (strcmp(cmd, "produce") == 0) {
        cmd_produce(argv, argc, out, n);
    } else if (strcmp(cmd, "broker-down") == 0 || strcmp(cmd, "broker-up") == 0) {
        if (argc != 2 || !broker_arg(argv[1]))
            USAGE("%s N (N = 1..%d)", cmd, NBROKERS);
        set_broker(broker_arg(argv[1]), cmd[7] == 'd');
    } else if (strcmp(cmd, "rtt") == 0) {
        if (argc != 2 || !is_number(argv[1]) || atoi(argv[1]) < 0)
            USAGE("rtt MILLISECONDS");
        rtt_ms = atoi(argv[1]);
        for (int b = 1; b <= NBROKERS; b++)
            rd_kafka_mock_broker_set_rtt(mc, b, rtt_ms);
    } else if (strcmp(cmd, "errors") == 0) {
        if (argc != 4 || !is_number(argv[1]) || !is_number(argv[2]) || !is_number(argv[3]) ||
            atoi(argv[2]) < 0)
            USAGE("errors APIKEY COUNT ERRCODE (numbers)");
        push_errors((int16_t)atoi(argv[1]), (size_t)atoi(argv[2]), (rd_kafka_resp_err_t)atoi(argv[3]));
    } else if (strcmp(cmd, "clear-errors") == 0) {
        if (argc != 2 || !is_number(argv[1]))
            USAGE("clear-errors APIKEY");
        rd_kafka_mock_clear_request_errors(mc, (int16_t)atoi(argv[1]));
    } else if (strcmp(cmd, "pause") == 0) {
        if (!pause_workload())
            snprintf(out, n, "error the workload did not stop within 30 s");
    } else if (strcmp(cmd, "resume") == 0) {
        resume_workload();
    } else if (strcmp(cmd, "reset-groups") == 0) {
        if (!reset_groups())
            snprintf(out, n, "error the workload did not stop within 30 s");
    } else if (strcmp(cmd, "groups") == 0) {
        cmd_groups(argv, argc, out, n);
    } else if (strcmp(cmd, "status") == 0) {
        cmd_status(out, n);
    } else {
        snprintf(out, n, "error unknown command: %s", cmd);
    }
}

static int listen_loopback(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16) ||
        getsockname(fd, (struct sockaddr *)&a, &len))
        die("control socket: %s", strerror(errno));
    char port[16];
    snprintf(port, sizeof port, "%d\n", ntohs(a.sin_port));
    write_state_file("control.port", port);
    return fd;
}

/* Reads one line (a produce carries the whole payload hex-encoded on it). */
static void serve_connection(int fd)
{
    static char line[4 << 20];
    char reply[512];
    size_t len = 0;
    struct pollfd p = {fd, POLLIN, 0};
    while (len < sizeof line - 1 && poll(&p, 1, 2000) == 1) {
        ssize_t r = read(fd, line + len, sizeof line - 1 - len);
        if (r <= 0)
            break;
        len += (size_t)r;
        if (memchr(line + len - (size_t)r, '\n', (size_t)r))
            break;
    }
    line[len] = 0;
    nudging++;
    run_command(line, reply, sizeof reply);
    nudging--;
    strcat(reply, "\n");
    if (write(fd, reply, strlen(reply)) < 0)
        fprintf(stderr, "kafka-sandbox: control reply: %s\n", strerror(errno));
    close(fd);
}

static int serve(void)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/kafka", state_dir);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    elapsed();
    int lfd = listen_loopback();
    start_cluster();
    const char *brokers = rd_kafka_mock_cluster_bootstraps(mc);
    workload_rk = new_producer(brokers, "30000");
    control_rk = new_producer(brokers, "10000");
    seed_topics();
    fprintf(stderr, "kafka-sandbox: topics seeded at %.2fs\n", elapsed());
    start_groups(brokers);
    pthread_t th;
    pthread_create(&th, NULL, workload, NULL);
    char line[1024];
    snprintf(line, sizeof line, "%s\n", brokers);
    write_state_file("bootstrap", line);   /* readiness signal for `up` */
    fprintf(stderr, "kafka-sandbox: ready on %s at %.2fs\n", brokers, elapsed());
    while (!stopping) {
        struct pollfd p = {lfd, POLLIN, 0};
        if (poll(&p, 1, 200) == 1) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0)
                serve_connection(fd);
        }
    }
    pthread_join(th, NULL);
    for (int g = 0; g < NGROUPS; g++)
        rd_kafka_destroy(groups[g].rk);
    rd_kafka_destroy(workload_rk);
    rd_kafka_destroy(control_rk);
    fprintf(stderr, "kafka-sandbox: stopped\n");
    return 0;   /* the process exit tears the mock cluster down */
}

/* ---- lag ---- */

static int lag(const char *brokers, const char *group, const char *topic)
{
    rd_kafka_t *rk = new_client(RD_KAFKA_CONSUMER, brokers, group, NULL);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    const struct rd_kafka_metadata *md;
    if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) || md->topic_cnt != 1 ||
        md->topics[0].err)
        die("cannot read metadata for %s", topic);
    int parts = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts);
    for (int p = 0; p < parts; p++)
        rd_kafka_topic_partition_list_add(l, topic, p);
    rd_kafka_resp_err_t err = rd_kafka_committed(rk, l, 10000);
    if (err)
        die("committed: %s", rd_kafka_err2str(err));
    int64_t total = 0;
    for (int p = 0; p < parts; p++) {
        int64_t lo, hi, c = l->elems[p].offset;
        if ((err = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000)))
            die("watermarks: %s", rd_kafka_err2str(err));
        int64_t n = c < 0 ? hi - lo : hi - c;
        total += n;
        printf("%s %d %lld %lld %lld\n", topic, p, (long long)c, (long long)hi, (long long)n);
    }
    printf("total %lld\n", (long long)total);
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "serve") == 0) {
        state_dir = argv[2];
        return serve();
    }
    if (argc == 5 && strcmp(argv[1], "lag") == 0)
        return lag(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: kafka-sandbox serve STATE_DIR\n"
                    "       kafka-sandbox lag BROKERS GROUP TOPIC\n");
    return 2;
}
