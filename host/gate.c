/*
 * gate.c: the effect gate (docs/design.md, principle 1), step deadlines and signals.
 *
 * Every write in every module asks rb_gate() and reports rb_gate_done(); the
 * mode lives here, in C, and only the engine can change it, so a runbook has
 * no way to perform a write in a dry run.
 */
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "host.h"

static rb_mode mode = RB_MODE_DRY_RUN;   /* until the engine starts a real run */
static double deadline;                  /* 0: no deadline */
static volatile sig_atomic_t nsignals;   /* SIGINT/SIGTERM/SIGHUP seen since the last clear */
static volatile sig_atomic_t last_signal;

void rb_set_mode(rb_mode m) { mode = m; }
rb_mode rb_get_mode(void) { return mode; }
int rb_dry_run(void) { return mode == RB_MODE_DRY_RUN; }

double rb_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Intent before effect: before a write is performed, the engine's sink
 * journals (and fsyncs) an "intent" event. Its outcome, the "effect" event,
 * carries the same seq, so a resume finds intents without an outcome: the
 * effects whose fate is unknown. While a Lua library's gate is open (k8s
 * writes), the C module's own last-moment check inside it is the same effect.
 * `ordinal` counts the intents of the current step attempt.
 */
static lua_Integer intent_seq, pending_seq, ordinal;
static int library_gate_open;   /* in any mode, so a plan records what apply checks */
static int library_whole;       /* the open gate is a library's own: what it does inside is part of it */

/* A C module's check inside a library's own gate is that effect, for the
 * journal and for a plan; inside a runbook's gate.effect it is one of its own. */
static int same_effect(void) { return library_gate_open && library_whole; }

static int push_sink(lua_State *L, const char *key)
{
    if (lua_getfield(L, LUA_REGISTRYINDEX, key) == LUA_TFUNCTION) return 1;
    lua_pop(L, 1);
    return 0;
}

static void set_redacted(lua_State *L, const char *key, const char *value);

/* Raises (the sink's error: a full disk) when the intent cannot be journaled,
 * so the effect is not performed. */
static void journal_intent(lua_State *L, const rb_effect *e, int deferred)
{
    if (!push_sink(L, RB_INTENT_SINK)) return;
    pending_seq = ++intent_seq;
    lua_createtable(L, 0, 8);
    set_redacted(L, "module", e->module);
    set_redacted(L, "op", e->op);
    set_redacted(L, "target", e->target);
    set_redacted(L, "summary", e->summary);
    lua_pushinteger(L, pending_seq);
    lua_setfield(L, -2, "seq");
    lua_pushinteger(L, ++ordinal);
    lua_setfield(L, -2, "n");
    rb_journal_defer(deferred);
    int rc = lua_pcall(L, 1, 0, 0);
    rb_journal_defer(0);
    if (rc != LUA_OK) lua_error(L);
}

static rb_decision gate(lua_State *L, const rb_effect *e, int deferred)
{
    int same = same_effect();
    if (mode == RB_MODE_RUN) {
        if (!same) rb_plan_check(L, e);
        if (!library_gate_open) journal_intent(L, e, deferred);
        return RB_PERFORM;
    }
    if (!same) rb_plan_record(L, e);
    return e->can_simulate ? RB_SIMULATE : RB_SKIP;
}

rb_decision rb_gate(lua_State *L, const rb_effect *e) { return gate(L, e, 0); }
rb_decision rb_gate_deferred(lua_State *L, const rb_effect *e) { return gate(L, e, 1); }

rb_decision rb_gate_library(lua_State *L, const rb_effect *e, int whole)
{
    rb_decision d = rb_gate(L, e);
    library_gate_open = 1;
    library_whole = whole;
    return d;
}

static const char *decision_name(rb_decision d)
{
    switch (d) {
    case RB_PERFORM: return "performed";
    case RB_SIMULATE: return "simulated";
    default: return "skipped";
    }
}

static void set_redacted(lua_State *L, const char *key, const char *value)
{
    if (!value)
        return;
    rb_push_redacted(L, value, strlen(value));
    lua_setfield(L, -2, key);
}

/*
 * A performed write that failed because the run was interrupted or its step
 * timed out may have happened all the same (the request was sent, the reply
 * never read): its outcome is unknown, not failed.
 */
static int outcome_unknown(rb_decision d, int ok)
{
    return d == RB_PERFORM && !ok && (nsignals || (deadline > 0 && rb_now() > deadline));
}

lua_Integer rb_gate_seq(void) { return pending_seq; }

static void gate_done(lua_State *L, const rb_effect *e, rb_decision d, int ok, lua_Integer seq)
{
    int result = lua_gettop(L);
    pending_seq = library_gate_open = 0;
    if (!push_sink(L, RB_EFFECT_SINK)) {
        lua_pop(L, 1);   /* no engine listening (e.g. a module used from a spec) */
        return;
    }
    lua_createtable(L, 0, 10);
    if (seq) {
        lua_pushinteger(L, seq);
        lua_setfield(L, -2, "seq");
    }
    if (outcome_unknown(d, ok)) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "unknown");
    }
    set_redacted(L, "module", e->module);
    set_redacted(L, "op", e->op);
    set_redacted(L, "target", e->target);
    set_redacted(L, "summary", e->summary);
    lua_pushstring(L, decision_name(d));
    lua_setfield(L, -2, "decision");
    lua_pushboolean(L, ok);
    lua_setfield(L, -2, "ok");
    lua_pushvalue(L, result);
    lua_setfield(L, -2, "result");
    lua_call(L, 1, 0);
    lua_settop(L, result - 1);
}

void rb_gate_done(lua_State *L, const rb_effect *e, rb_decision d, int ok)
{
    gate_done(L, e, d, ok, d == RB_PERFORM ? pending_seq : 0);
}

void rb_gate_done_seq(lua_State *L, const rb_effect *e, int ok, lua_Integer seq)
{
    gate_done(L, e, RB_PERFORM, ok, seq);
}

/* A count hook that scripts cannot catch: while runbook code runs (a
 * deadline is set), once past the deadline or after a signal it raises again
 * every time it fires, so a pcall in a loop does not keep a timed-out step
 * alive. What it cannot stop, the watchdog does. */
static void deadline_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    if (deadline > 0)
        rb_check_stop(L);
}

void rb_check_stop(lua_State *L)
{
    rb_plan_check_stop(L);
    if (nsignals)
        rb_error(L, "runbook", "step", "interrupted", 0, "interrupted by %s", last_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    if (deadline > 0 && rb_now() > deadline)
        rb_error(L, "runbook", "step", "timeout", 0, "step timed out");
}

void rb_hook(lua_State *co) { lua_sethook(co, deadline_hook, LUA_MASKCOUNT, 10000); }

/* The hook is removed with the deadline: with a count hook set, Lua calls it
 * back on every instruction, which host code need not pay for. */
void rb_set_deadline(lua_State *L, double d)
{
    deadline = d;
    pending_seq = ordinal = library_gate_open = 0;   /* a step attempt starts or ends */
    if (d > 0)
        rb_hook(L);
    else
        lua_sethook(L, NULL, 0, 0);
}

double rb_get_deadline(void) { return deadline; }

double rb_remaining(lua_State *L, double fallback)
{
    (void)L;
    if (deadline <= 0)
        return fallback;
    double left = deadline - rb_now();
    if (left < 0.001)
        left = 0.001;
    return fallback > 0 && fallback < left ? fallback : left;
}

static void on_signal(int sig)
{
    if (nsignals > 0) {
        /* A second Ctrl-C: leave now. The journal is valid line by line. */
        static const char msg[] = "\nrunbook: interrupted again, exiting now\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(128 + sig);
    }
    /* A closed terminal or SSH session (SIGHUP) stops the run as SIGTERM does. */
    last_signal = sig == SIGHUP ? SIGTERM : sig;
    nsignals = 1;
}

void rb_signals_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

int rb_interrupted(void) { return nsignals != 0; }
int rb_last_signal(void) { return last_signal; }
void rb_clear_interrupt(void) { nsignals = 0; last_signal = 0; }
