/*
 * tls.c: the certificates a TLS server presents (runbook.tls), for
 * stdlib/tls.lua, which parses them with Debian's lua-luaossl.
 *
 *   peer_chain(host, port, {timeout = 10, servername = host}) -> {pem, ...}
 *       connects, sends SNI (unless the host is an address), completes the
 *       handshake WITHOUT verifying (an expired or self-signed certificate is
 *       what a certificate check must be able to read), and returns the chain
 *       the server sent, leaf first, as PEM; then closes.
 *
 * Nothing is written to the server beyond the handshake: a read, not gated.
 * Failures raise rb_error(module "tls", op "peer_chain") naming host:port,
 * with code "connection_refused", "timeout", "cannot_resolve", "not_tls" (the
 * handshake failed: the server does not speak TLS, or no protocol or cipher
 * in common), "interrupted" or "io_error".
 */
#define _GNU_SOURCE   /* getaddrinfo_a, in net.h */
#include <arpa/inet.h>
#include <stdarg.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "module.h"
#include "net.h"

typedef struct {
    char why[300];
    const char *code;
} failure;

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int failed(failure *f, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->why, sizeof f->why, fmt, ap);
    va_end(ap);
    f->code = code;
    return 0;
}

/* OpenSSL's reason for a failed handshake (or the socket's). */
static int handshake_failed(failure *f, int ret) {
    unsigned long e = ERR_get_error();
    if (e) {
        char buf[200];
        ERR_error_string_n(e, buf, sizeof buf);
        ERR_clear_error();
        return failed(f, "not_tls", "TLS handshake failed (not a TLS server?): %s", buf);
    }
    if (ret == 0 || errno == 0)
        return failed(f, "not_tls", "TLS handshake failed: the server closed the connection");
    return failed(f, "io_error", "TLS handshake failed: %s", strerror(errno));
}

/* The handshake on connected socket fd before `end`; 1, or 0 with f set. */
static int handshake(SSL *ssl, int fd, const char *servername, double end, double limit, failure *f) {
    unsigned char ip[sizeof(struct in6_addr)];
    if (!SSL_set_fd(ssl, fd)) return handshake_failed(f, -1);
    if (inet_pton(AF_INET, servername, ip) != 1 && inet_pton(AF_INET6, servername, ip) != 1)
        SSL_set_tlsext_host_name(ssl, servername);
    for (;;) {
        ERR_clear_error();
        int r = SSL_connect(ssl);
        if (r == 1) return 1;
        int e = SSL_get_error(ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) return handshake_failed(f, r);
        if (!net_wait(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, end))
            return rb_interrupted() ? failed(f, "interrupted", "TLS handshake: interrupted")
                                    : failed(f, "timeout", "TLS handshake timed out after %.3gs (is it a TLS port?)", limit);
    }
}

/* Pushes the peer's chain as a list of PEM strings. */
static int push_chain(lua_State *L, SSL *ssl, failure *f) {
    STACK_OF(X509) *chain = SSL_get_peer_cert_chain(ssl);
    int n = chain ? sk_X509_num(chain) : 0;
    if (n == 0) return failed(f, "not_tls", "the server presented no certificate");
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        BIO *b = BIO_new(BIO_s_mem());
        char *data;
        if (!b || !PEM_write_bio_X509(b, sk_X509_value(chain, i))) {
            BIO_free(b);
            lua_pop(L, 1);
            return handshake_failed(f, -1);
        }
        long len = BIO_get_mem_data(b, &data);
        lua_pushlstring(L, data, (size_t)len);
        lua_rawseti(L, -2, i + 1);
        BIO_free(b);
    }
    return 1;
}

static int tls_peer_chain(lua_State *L) {
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    luaL_argcheck(L, port > 0 && port < 65536, 2, "a port number (1-65535)");
    double limit = rb_remaining(L, opt_seconds(L, 3, "timeout", 10));
    const char *servername = opt_string(L, 3, "servername", NULL, host);
    char portstr[8];
    snprintf(portstr, sizeof portstr, "%d", (int)port);

    double end = rb_now() + limit;
    failure f = {{0}, NULL};
    const char *why = NULL;
    int ok = 0, fd = net_connect(host, portstr, end, &why);
    if (fd < 0) {
        if (strstr(why, "timed out")) failed(&f, "timeout", "connecting: timed out after %.3gs", limit);
        else failed(&f, strstr(why, "refused") ? "connection_refused" : !strcmp(why, "interrupted") ? "interrupted"
                        : !strcmp(why, "cannot resolve") ? "cannot_resolve" : "io_error", "connecting: %s", why);
    } else {
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        SSL *ssl = ctx ? SSL_new(ctx) : NULL;
        if (!ssl) handshake_failed(&f, -1);
        else {
            SSL_set_verify(ssl, SSL_VERIFY_NONE, NULL);   /* read what is there, valid or not */
            ok = handshake(ssl, fd, servername, end, limit, &f) && push_chain(L, ssl, &f);
            if (ok) SSL_shutdown(ssl);
        }
        SSL_free(ssl);
        SSL_CTX_free(ctx);
        close(fd);
    }
    if (ok) return 1;
    return rb_error(L, "tls", "peer_chain", f.code,
                    !strcmp(f.code, "connection_refused") || !strcmp(f.code, "timeout") || !strcmp(f.code, "io_error"),
                    "%s:%d: %s", host, (int)port, f.why);
}

/* backupset's encryption, as `openssl enc -aes-256-cbc -pbkdf2` does it.
 * lua-luaossl has both, but its kdf.derive leaks the EVP_KDF it fetches on
 * every call, and a failed decryption makes it read a freed error string. */

/* pbkdf2(pass, salt, iter, md, len) -> len bytes of key: PKCS5_PBKDF2_HMAC. */
static int tls_pbkdf2(lua_State *L)
{
    size_t plen, slen;
    const char *pass = luaL_checklstring(L, 1, &plen);
    const char *salt = luaL_checklstring(L, 2, &slen);
    lua_Integer iter = luaL_checkinteger(L, 3);
    const EVP_MD *md = EVP_get_digestbyname(luaL_checkstring(L, 4));
    lua_Integer len = luaL_checkinteger(L, 5);
    unsigned char out[1024];
    luaL_argcheck(L, plen <= INT_MAX && slen <= INT_MAX, 1, "too long");
    luaL_argcheck(L, iter > 0 && iter <= INT_MAX, 3, "a positive iteration count");
    luaL_argcheck(L, md != NULL, 4, "a digest name (sha256)");
    luaL_argcheck(L, len > 0 && len <= (lua_Integer)sizeof out, 5, "a key length (1-1024 bytes)");
    if (!PKCS5_PBKDF2_HMAC(pass, (int)plen, (const unsigned char *)salt, (int)slen, (int)iter, md, (int)len, out))
        return rb_error(L, "tls", "pbkdf2", "crypto", 0, "PKCS5_PBKDF2_HMAC failed");
    lua_pushlstring(L, (const char *)out, (size_t)len);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}

/* cipher(name, key, iv, data, encrypt) -> the output of EVP_Cipher*, or nil
 * when it fails (a decryption: a wrong key, or damaged data). */
static int tls_cipher(lua_State *L)
{
    size_t klen, ivlen, dlen;
    const EVP_CIPHER *c = EVP_get_cipherbyname(luaL_checkstring(L, 1));
    const char *key = luaL_checklstring(L, 2, &klen);
    const char *iv = luaL_checklstring(L, 3, &ivlen);
    const char *data = luaL_checklstring(L, 4, &dlen);
    int enc = lua_toboolean(L, 5), n = 0, m = 0;
    luaL_argcheck(L, c != NULL, 1, "a cipher name (aes-256-cbc)");
    luaL_argcheck(L, (int)klen == EVP_CIPHER_get_key_length(c), 2, "a key of the cipher's length");
    luaL_argcheck(L, (int)ivlen == EVP_CIPHER_get_iv_length(c), 3, "an IV of the cipher's length");
    luaL_argcheck(L, dlen <= INT_MAX - EVP_MAX_BLOCK_LENGTH, 4, "too long");
    /* the output lives in Lua's buffer, so nothing of OpenSSL's is held when Lua may raise */
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, dlen + EVP_MAX_BLOCK_LENGTH);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = ctx && EVP_CipherInit_ex(ctx, c, NULL, (const unsigned char *)key, (const unsigned char *)iv, enc)
             && EVP_CipherUpdate(ctx, out, &n, (const unsigned char *)data, (int)dlen)
             && EVP_CipherFinal_ex(ctx, out + n, &m);
    EVP_CIPHER_CTX_free(ctx);
    ERR_clear_error();
    if (!ok) {
        OPENSSL_cleanse(out, dlen + EVP_MAX_BLOCK_LENGTH);
        lua_pushnil(L);
        return 1;
    }
    luaL_pushresultsize(&b, (size_t)(n + m));
    return 1;
}

static const luaL_Reg tls_funcs[] = {
    {"cipher", tls_cipher},
    {"peer_chain", tls_peer_chain},
    {"pbkdf2", tls_pbkdf2},
    {NULL, NULL}
};

int luaopen_runbook_tls(lua_State *L) {
    luaL_newlib(L, tls_funcs);
    return 1;
}
