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
static volatile sig_atomic_t nsignals;   /* SIGINT/SIGTERM seen since the last clear */
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

rb_decision rb_gate(lua_State *L, const rb_effect *e)
{
    (void)L;
    if (mode == RB_MODE_RUN)
        return RB_PERFORM;
    return e->can_simulate ? RB_SIMULATE : RB_SKIP;
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

void rb_gate_done(lua_State *L, const rb_effect *e, rb_decision d, int ok)
{
    int result = lua_gettop(L);
    if (lua_getfield(L, LUA_REGISTRYINDEX, RB_EFFECT_SINK) != LUA_TFUNCTION) {
        lua_pop(L, 2);   /* no engine listening (e.g. a module used from a spec) */
        return;
    }
    lua_createtable(L, 0, 8);
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
    if (nsignals)
        rb_error(L, "runbook", "step", "interrupted", 0, "interrupted by %s", last_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    if (deadline > 0 && rb_now() > deadline)
        rb_error(L, "runbook", "step", "timeout", 0, "step timed out");
}

void rb_hook_install(lua_State *L) { lua_sethook(L, deadline_hook, LUA_MASKCOUNT, 10000); }

void rb_set_deadline(double d) { deadline = d; }

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
    last_signal = sig;
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
}

int rb_interrupted(void) { return nsignals != 0; }
int rb_last_signal(void) { return last_signal; }
void rb_clear_interrupt(void) { nsignals = 0; last_signal = 0; }
