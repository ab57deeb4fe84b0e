/* host.h: declarations shared by the host's own C files (not for modules). */
#ifndef RUNBOOK_HOST_H
#define RUNBOOK_HOST_H

#include "runbook.h"

/* Registry keys. */
#define RB_ERROR_MT    "runbook.error"
#define RB_EFFECT_SINK "runbook.effect_sink"
#define RB_INTENT_SINK "runbook.intent_sink"

/* The gate's mode, set only by the host's own Lua (the CLI and the engine)
 * through the private host library. It starts as a dry run: loading a
 * runbook, or anything before the engine starts a real run, changes nothing. */
typedef enum { RB_MODE_RUN, RB_MODE_DRY_RUN } rb_mode;
void rb_set_mode(rb_mode m);
rb_mode rb_get_mode(void);

/* The gate for effects written in Lua (host.gate): as rb_gate. When `whole`
 * (a runbook library's own effect), the C modules' checks inside it (until
 * host.gate_done) are the same effect; inside a runbook's gate.effect they
 * are held to a plan on their own. */
rb_decision rb_gate_library(lua_State *L, const rb_effect *e, int whole);

/* Step deadline (monotonic seconds; 0 = none), enforced in Lua code by a
 * count hook on the calling thread while it is set (coroutines created
 * meanwhile inherit it). rb_hook puts the hook on a coroutine for good: a
 * runbook's, which may be created before any deadline, when it loads. */
void rb_set_deadline(lua_State *L, double deadline);
double rb_get_deadline(void);
void rb_hook(lua_State *co);

/* The watchdog (watchdog.c): ends the process RB_WATCHDOG_GRACE seconds
 * after a deadline runbook code did not stop at. See rb_watchdog there. */
#define RB_WATCHDOG_GRACE 5.0
void rb_watchdog(lua_State *L, double deadline, int t);
void rb_watchdog_stop(void);

/* Signals: install handlers; the count of SIGINT/SIGTERM seen and the last one. */
void rb_signals_install(void);
void rb_clear_interrupt(void);

/* Secrets: redact a string into a new Lua string on the stack; a copy of the
 * value at idx with every string in it redacted (before it is encoded); the
 * credentials of the environment, registered at start-up. */
void rb_push_redacted(lua_State *L, const char *s, size_t len);
void rb_push_redacted_value(lua_State *L, int idx);
void rb_secret_register_env(void);

int luaopen_runbook_host(lua_State *L);

/* The terminal ticker's functions, added to the host library. */
#include <lauxlib.h>
extern const luaL_Reg rb_ticker_funcs[];

/* The standard library's writers refuse in a dry run (guard.c); mkdir for fs.lua. */
void rb_guard_stdlib(lua_State *L);
extern const luaL_Reg rb_guard_funcs[];

/* A run held to its plan (plan.c): the gate's check before a performed
 * effect, the same difference raised again after it was found, and
 * plan_load, plan_step and plan_drift for the host library. */
void rb_plan_check(lua_State *L, const rb_effect *e);
void rb_plan_record(lua_State *L, const rb_effect *e);
void rb_plan_check_stop(lua_State *L);
extern const luaL_Reg rb_plan_funcs[];

/* serve's zygote (zygote.c): zygote_start and zygote_spawn for serve,
 * zygote_wait for the zygote, added to the host library. */
extern const luaL_Reg rb_zygote_funcs[];

/* The journal, run lock and sha256 functions, added to the host library. */
void rb_durable_open(lua_State *L);

/* While on, a journal's sync() only notes that it is owed (rb_journal_flush pays it). */
void rb_journal_defer(int on);

#endif
