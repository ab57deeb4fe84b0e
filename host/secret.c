#define _GNU_SOURCE   /* memmem */
/*
 * secret.c: the registry of values that must never reach any output.
 * Every output path (terminal, JSON lines, journal, report, error messages)
 * passes text through rb_push_redacted.
 */
#include <stdlib.h>
#include <string.h>
#include <lauxlib.h>
#include "host.h"

#define MIN_SECRET 4   /* shorter values would redact ordinary text */

static char **secrets;
static size_t *secret_lens;
static size_t nsecrets, capsecrets;

void rb_secret_register(lua_State *L, const char *value, size_t len)
{
    (void)L;
    if (value == NULL || len < MIN_SECRET)
        return;
    for (size_t i = 0; i < nsecrets; i++)
        if (secret_lens[i] == len && memcmp(secrets[i], value, len) == 0)
            return;
    if (nsecrets == capsecrets) {
        size_t cap = capsecrets ? capsecrets * 2 : 8;
        char **s = realloc(secrets, cap * sizeof *s);
        size_t *l = s ? realloc(secret_lens, cap * sizeof *l) : NULL;
        if (s) secrets = s;
        if (!s || !l) return;
        secret_lens = l;
        capsecrets = cap;
    }
    char *copy = malloc(len);
    if (!copy) return;
    memcpy(copy, value, len);
    secrets[nsecrets] = copy;
    secret_lens[nsecrets++] = len;
}

/* Leftmost occurrence of any secret in s[0..len), or NULL; *which gets its index. */
static const char *find_secret(const char *s, size_t len, size_t *which)
{
    const char *best = NULL;
    for (size_t i = 0; i < nsecrets; i++) {
        const char *p = memmem(s, len, secrets[i], secret_lens[i]);
        if (p && (!best || p < best || (p == best && secret_lens[i] > secret_lens[*which]))) {
            best = p;
            *which = i;
        }
    }
    return best;
}

void rb_push_redacted(lua_State *L, const char *s, size_t len)
{
    size_t which = 0;
    const char *p = nsecrets ? find_secret(s, len, &which) : NULL;
    if (!p) {
        lua_pushlstring(L, s, len);
        return;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    while (p) {
        luaL_addlstring(&b, s, (size_t)(p - s));
        luaL_addstring(&b, "***");
        len -= (size_t)(p - s) + secret_lens[which];
        s = p + secret_lens[which];
        p = find_secret(s, len, &which);
    }
    luaL_addlstring(&b, s, len);
    luaL_pushresult(&b);
}
