/* host.h: declarations shared by the host's own C files (not for modules). */
#ifndef RUNBOOK_HOST_H
#define RUNBOOK_HOST_H

#include "runbook.h"

/* Registry keys. */
#define RB_ERROR_MT    "runbook.error"
#define RB_EFFECT_SINK "runbook.effect_sink"
#define RB_INTENT_SINK "runbook.intent_sink"

/* The gate's mode, set only by the engine through the private host library. */
typedef enum { RB_MODE_RUN, RB_MODE_DRY_RUN } rb_mode;
void rb_set_mode(rb_mode m);
rb_mode rb_get_mode(void);

/* The gate for effects written in Lua (host.gate): as rb_gate, and the C
 * module's own check inside it (until host.gate_done) is the same effect. */
rb_decision rb_gate_library(lua_State *L, const rb_effect *e);

/* Step deadline (monotonic seconds; 0 = none) and the hook that enforces it in Lua code. */
void rb_set_deadline(lua_State *L, double deadline);
double rb_get_deadline(void);

/* Signals: install handlers; the count of SIGINT/SIGTERM seen and the last one. */
void rb_signals_install(void);
void rb_clear_interrupt(void);

/* Secrets: redact a string into a new Lua string on the stack. */
void rb_push_redacted(lua_State *L, const char *s, size_t len);

int luaopen_runbook_host(lua_State *L);

/* The terminal ticker's functions, added to the host library. */
#include <lauxlib.h>
extern const luaL_Reg rb_ticker_funcs[];

/* The journal, run lock and sha256 functions, added to the host library. */
void rb_durable_open(lua_State *L);

#endif
