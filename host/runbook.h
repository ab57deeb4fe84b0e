/*
 * runbook.h: the host's C API for module authors.
 *
 * A module is a shared object (lib/runbook/<name>.so) opened by Lua's require
 * and linked against symbols the runbook executable exports (-rdynamic). It
 * uses four services from the host:
 *
 *   the effect gate   every function that changes the world asks rb_gate()
 *                     before acting and reports with rb_gate_done() after;
 *   errors            backend failures raise rb_error(): a structured error
 *                     table {message, module, op, code, retryable};
 *   secrets           values that must never print are rb_secret_register()ed;
 *   deadlines         every blocking call bounds itself by rb_remaining().
 */
#ifndef RUNBOOK_H
#define RUNBOOK_H

#include <stdio.h>
#include <lua.h>
#include <lauxlib.h>

/* What the gate decided for one effect. */
typedef enum {
    RB_PERFORM,   /* normal mode: do it */
    RB_SIMULATE,  /* dry run and the backend has a native dry run: do that */
    RB_SKIP       /* dry run without simulation: do nothing, report "not simulated" */
} rb_decision;

/* One change to the world, described before it happens. */
typedef struct {
    const char *module;   /* "exec", "http", "fs", "k8s" ... */
    const char *op;       /* the operation in the field's words: "run", "POST", "scale" */
    const char *target;   /* what it acts on: a path, a URL, "todo-chatbot/deploy/backend" */
    const char *summary;  /* one line for humans, phrased so "would " + summary reads well */
    int can_simulate;     /* 1 when the backend can dry-run this effect itself */
} rb_effect;

/*
 * Ask the gate. Returns RB_PERFORM in normal mode, having journaled the
 * effect's intent (it raises, before anything is done, when the intent cannot
 * be journaled: a full disk); in dry-run mode RB_SIMULATE when
 * e->can_simulate, else RB_SKIP. Ask it right before the write, with nothing
 * to free on an error, and report every PERFORM with rb_gate_done().
 */
rb_decision rb_gate(lua_State *L, const rb_effect *e);

/*
 * rb_gate() for an effect that takes place only later, at a point where the
 * module first calls rb_journal_flush() (a pipeline's send, a transaction's
 * COMMIT): its intent is journaled now and made durable then, with the rest
 * of its batch, by one fsync.
 */
rb_decision rb_gate_deferred(lua_State *L, const rb_effect *e);

/*
 * A batch whose outcomes come after all of it was sent (a pipeline): keep
 * rb_gate_seq() after each rb_gate_deferred() that returned RB_PERFORM, and
 * report each outcome with rb_gate_done_seq() and its seq, as rb_gate_done().
 */
lua_Integer rb_gate_seq(void);
void rb_gate_done_seq(lua_State *L, const rb_effect *e, int ok, lua_Integer seq);

/*
 * Make the intents of deferred effects durable. A no-op when none waits.
 * Raises as rb_gate() does when the journal cannot be synced, so nothing of
 * the batch takes place.
 */
void rb_journal_flush(lua_State *L);

/*
 * Nonzero in a dry run (and during a preview). For a module that must shape a
 * session before any effect (pg makes its session read-only); the perform or
 * skip decision for an effect is still rb_gate()'s.
 */
int rb_dry_run(void);

/*
 * Record the outcome of an effect the gate was asked about: the decision it
 * made, whether the operation succeeded, and the value at the top of the
 * stack as its result (a string or a table; nil for none), which is popped.
 * The engine journals it and shows it ("would <summary>" in dry run).
 */
void rb_gate_done(lua_State *L, const rb_effect *e, rb_decision d, int ok);

/*
 * Raise a structured error: {message, module, op, code, retryable}.
 * code may be NULL (then nil); it is a string such as "404", "23505",
 * "timeout". The message is redacted of registered secrets. Never returns.
 */
int rb_error(lua_State *L, const char *module, const char *op,
             const char *code, int retryable, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;

/* Register a value that must never appear in any output. Ignores short values (< 4 bytes). */
void rb_secret_register(lua_State *L, const char *value, size_t len);

/* Write s to f with registered secrets replaced, and flush: for a library's
 * own log lines (its log callback), from any thread. */
void rb_write_redacted(FILE *f, const char *s, size_t len);

/*
 * The timeout for a blocking call: the seconds left before the current step's
 * deadline (never below 0.001), capped at `cap` when cap > 0; `cap` when no
 * deadline is set. Modules derive every timeout from it.
 */
double rb_remaining(lua_State *L, double cap);

/*
 * Raise the structured error that ends a step, when one applies: after SIGINT
 * or SIGTERM {code = "interrupted", message = "interrupted by SIGINT"}, past the
 * step's deadline {code = "timeout"}. Returns when neither.
 */
void rb_check_stop(lua_State *L);

/* Nonzero once SIGINT or SIGTERM arrived: long loops stop waiting. */
int rb_interrupted(void);

/* The signal that interrupted the run (SIGINT or SIGTERM), 0 when none. */
int rb_last_signal(void);

/* Monotonic time in seconds. */
double rb_now(void);

/*
 * A userdata class: registers the metatable `name` the first time (__index
 * the `methods`, none when NULL; __gc and __close the finalizer `fin`, which
 * must be safe to call twice) and pushes it, as luaL_newmetatable does.
 */
void rb_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction fin);

#endif
