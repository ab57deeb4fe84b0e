/*
 * durable.c: what makes a run survive the process: the journal file
 * (append-only, fsync'd at the points the engine chooses), the run lock
 * (flock, so a crashed holder's lock is released by the kernel), and the
 * sha256 that pins a journal to the runbook text it ran.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <nettle/sha2.h>

#include "host.h"

#define JOURNAL_MT "runbook.journal"
#define LOCK_MT    "runbook.lock"

typedef struct { int fd; } rb_fd;

static int push_errno(lua_State *L, const char *what, const char *path)
{
    int e = errno;
    lua_pushnil(L);
    lua_pushfstring(L, "%s %s: %s", what, path, strerror(e));
    return 2;
}

/* Userdata holding a descriptor, created closed (-1) so a failed open leaks nothing. */
static rb_fd *new_fd(lua_State *L, const char *mt)
{
    rb_fd *h = lua_newuserdatauv(L, sizeof *h, 0);
    h->fd = -1;
    luaL_setmetatable(L, mt);
    return h;
}

/*
 * Deferred syncs: the intent of an effect that takes place only later (a
 * Redis pipeline's send, a PostgreSQL transaction's COMMIT) is written at
 * once, and the batch is made durable by one fsync right before that point
 * (rb_journal_flush). `owed` is the journal written since its last fsync.
 */
static int deferring;
static int owed = -1;

void rb_journal_defer(int on) { deferring = on; }

static int sync_fd(int fd)
{
    if (fd == owed) owed = -1;
    return fsync(fd) < 0 && errno != EINVAL ? -1 : 0;
}

static int raise_sync(lua_State *L)
{
    int e = errno;
    return rb_error(L, "journal", "sync", e == ENOSPC || e == EDQUOT ? "disk_full" : "journal_write", 0,
                    "cannot sync the journal: %s", strerror(e));
}

void rb_journal_flush(lua_State *L)
{
    if (owed >= 0 && sync_fd(owed) < 0) raise_sync(L);
}

/* One finalizer for __gc, __close and close(): closing twice is harmless. */
static int fd_close(lua_State *L)
{
    rb_fd *h = lua_touserdata(L, 1);
    if (h && h->fd >= 0) {
        if (h->fd == owed) owed = -1;
        close(h->fd);
        h->fd = -1;
    }
    return 0;
}

static int write_all(int fd, const char *s, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, s, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        s += n;
        len -= (size_t)n;
    }
    return 0;
}

/*
 * A torn last line (the process died, or the disk filled, in the middle of a
 * write) is cut off before anything is appended, so the next line starts on a
 * line of its own. Returns the bytes dropped, or -1 with errno set.
 */
static off_t drop_torn_tail(int fd)
{
    off_t end = lseek(fd, 0, SEEK_END), pos = end;
    if (end <= 0) return end < 0 ? -1 : 0;
    char buf[4096];
    while (pos > 0) {
        size_t n = pos < (off_t)sizeof buf ? (size_t)pos : sizeof buf;
        if (pread(fd, buf, n, pos - (off_t)n) != (ssize_t)n) return -1;
        size_t i = n;
        while (i > 0 && buf[i - 1] != '\n') i--;
        if (i > 0) { pos = pos - (off_t)n + (off_t)i; break; }
        pos -= (off_t)n;
    }
    if (pos == end) return 0;
    if (ftruncate(fd, pos) < 0) return -1;
    return end - pos;
}

/* mkdir_private(path) -> true | nil, message: a directory of the state dir,
 * created 0700 (journals hold outputs, lock files who runs what); true when
 * it is a directory already. */
static int d_mkdir_private(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    struct stat st;
    if (mkdir(path, 0700) < 0 && (errno != EEXIST || stat(path, &st) < 0 || !S_ISDIR(st.st_mode)))
        return push_errno(L, "cannot create directory", path);
    lua_pushboolean(L, 1);
    return 1;
}

/* journal_open(path) -> journal, bytes of a torn last line dropped | nil,
 * message, true when another process holds the journal. Appends; created 0600
 * (it holds outputs); locked (flock) for the life of the handle. */
static int j_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    rb_fd *h = new_fd(L, JOURNAL_MT);
    h->fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (h->fd < 0) return push_errno(L, "cannot open journal", path);
    /* One process acts for a run at a time: it holds its journal locked. */
    if (flock(h->fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        close(h->fd);
        h->fd = -1;
        lua_pushnil(L);
        if (e == EWOULDBLOCK) lua_pushfstring(L, "%s is in use: another process is running this run", path);
        else lua_pushfstring(L, "cannot lock journal %s: %s", path, strerror(e));
        lua_pushboolean(L, e == EWOULDBLOCK);
        return 3;
    }
    off_t dropped = drop_torn_tail(h->fd);
    if (dropped < 0) return push_errno(L, "cannot repair the torn last line of journal", path);
    lua_pushinteger(L, (lua_Integer)dropped);
    return 2;
}

static rb_fd *check_journal(lua_State *L)
{
    rb_fd *h = luaL_checkudata(L, 1, JOURNAL_MT);
    luaL_argcheck(L, h->fd >= 0, 1, "journal is closed");
    return h;
}

/*
 * journal:write(line): one write(2) per line, so a crash tears at most the
 * last one. A failed write (a full disk) is cut back to the last whole line
 * and raised as {code = "disk_full" or "journal_write"}: the journal stays
 * readable and resumable.
 */
static int j_write(lua_State *L)
{
    rb_fd *h = check_journal(L);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    off_t before = lseek(h->fd, 0, SEEK_END);
    if (before >= 0 && write_all(h->fd, s, len) == 0) return 0;
    int e = errno;
    if (before >= 0 && ftruncate(h->fd, before) < 0) {}
    return rb_error(L, "journal", "write", e == ENOSPC || e == EDQUOT ? "disk_full" : "journal_write", 0,
                    "cannot write the journal: %s", strerror(e));
}

/* journal:sync(): the lines written so far survive a crash or power loss
 * (while deferring, by the next rb_journal_flush or sync). */
static int j_sync(lua_State *L)
{
    rb_fd *h = check_journal(L);
    if (deferring) owed = h->fd;
    else if (sync_fd(h->fd) < 0) return raise_sync(L);
    return 0;
}

/*
 * lock_try(path, holder) -> lock | false, current holder text | nil, message.
 * An exclusive flock on path; on success the file is rewritten with `holder`
 * (who holds it, for the message the next contender prints).
 */
static int l_try(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    size_t len;
    const char *holder = luaL_checklstring(L, 2, &len);
    rb_fd *h = new_fd(L, LOCK_MT);
    h->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (h->fd < 0) return push_errno(L, "cannot open lock file", path);
    if (flock(h->fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno != EWOULDBLOCK) return push_errno(L, "cannot lock", path);
        char buf[1024];
        ssize_t n = pread(h->fd, buf, sizeof buf, 0);
        close(h->fd);
        h->fd = -1;
        lua_pushboolean(L, 0);
        lua_pushlstring(L, buf, n > 0 ? (size_t)n : 0);
        return 2;
    }
    /* Overwrite, then cut: the file never reads empty once it named a holder. */
    if (pwrite(h->fd, holder, len, 0) != (ssize_t)len || ftruncate(h->fd, (off_t)len) < 0)
        return push_errno(L, "cannot record the holder in", path);
    return 1;
}

/* lock_held(path) -> true when some process holds the lock now (a peek, not taken). */
static int l_held(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { lua_pushboolean(L, 0); return 1; }
    int held = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
    close(fd);
    lua_pushboolean(L, held);
    return 1;
}

static void push_hex(lua_State *L, const uint8_t *d, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char out[2 * SHA256_DIGEST_SIZE];
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    lua_pushlstring(L, out, 2 * n);
}

/* sha256(string) -> hex digest. */
static int d_sha256(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    struct sha256_ctx c;
    uint8_t d[SHA256_DIGEST_SIZE];
    sha256_init(&c);
    sha256_update(&c, len, (const uint8_t *)s);
    sha256_digest(&c, sizeof d, d);
    push_hex(L, d, sizeof d);
    return 1;
}

/* sha256_file(path) -> hex digest, size | nil, message. Streams: any file size. */
static int d_sha256_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return push_errno(L, "cannot read", path);
    struct sha256_ctx c;
    uint8_t buf[65536], d[SHA256_DIGEST_SIZE];
    lua_Integer size = 0;
    ssize_t n;
    sha256_init(&c);
    while ((n = read(fd, buf, sizeof buf)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            errno = e;
            return push_errno(L, "cannot read", path);
        }
        sha256_update(&c, (size_t)n, buf);
        size += n;
    }
    close(fd);
    sha256_digest(&c, sizeof d, d);
    push_hex(L, d, sizeof d);
    lua_pushinteger(L, size);
    return 2;
}

static const luaL_Reg journal_methods[] = {
    { "write", j_write }, { "sync", j_sync }, { "close", fd_close }, { NULL, NULL }
};
static const luaL_Reg lock_methods[] = { { "release", fd_close }, { NULL, NULL } };

static const luaL_Reg durable_funcs[] = {
    { "mkdir_private", d_mkdir_private },
    { "journal_open", j_open },
    { "lock_try", l_try },
    { "lock_held", l_held },
    { "sha256", d_sha256 },
    { "sha256_file", d_sha256_file },
    { NULL, NULL }
};

/* Add the durable-run functions to the host library table at the top of the stack. */
void rb_durable_open(lua_State *L)
{
    rb_class(L, JOURNAL_MT, journal_methods, fd_close);
    rb_class(L, LOCK_MT, lock_methods, fd_close);
    lua_pop(L, 2);
    luaL_setfuncs(L, durable_funcs, 0);
}
