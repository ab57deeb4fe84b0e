# runbook: build, dependencies, tests, sandbox and demo.
PREFIX  ?= /usr/local
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN     = -Wall -Wextra
LUA_INC := $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
# Lua is linked statically and its symbols exported (-Wl,-E), as lua5.4 does, so
# modules and Debian's Lua C libraries (cjson, lyaml) bind to this one copy.
LUA_LIB  = /usr/lib/x86_64-linux-gnu/liblua5.4.a
ifeq ($(wildcard $(LUA_LIB)),)
LUA_LIB  = -llua5.4
endif

HOST_SRC = $(wildcard host/*.c)
# sha256 from nettle, linked statically: a few KB, nothing more to load at start.
HOST_LIBS = -l:libnettle.a
MODULES  = exec http k8s k8s_exec ws pg redis kafka httpd tls
MODULE_SO = $(MODULES:%=lib/runbook/%.so)
# The stdlib precompiled to bytecode: parsing the source was most of start-up.
STDLIB_SRC := $(shell find stdlib -name '*.lua')
STDLIB_BC  = $(STDLIB_SRC:stdlib/%.lua=lib/lua/%.luac)
# Debian's lua-argparse, which every command line goes through, compiled the
# same way (parsing its source was half of a no-op run's start-up), and without
# debug information, which only lines inside argparse would use.
ARGPARSE  := $(wildcard /usr/share/lua/5.4/argparse.lua)
STDLIB_BC += $(ARGPARSE:/usr/share/lua/5.4/%.lua=lib/lua/%.luac)

# Backend libraries, linked only into the module that uses them.
LIBS_http  = -lcurl
LIBS_k8s   = -lcurl
LIBS_k8s_exec = -lwebsockets
LIBS_ws    = -lwebsockets
LIBS_kafka = -lrdkafka
LIBS_pg    = $(shell pkg-config --cflags --libs libpq 2>/dev/null || echo -I/usr/include/postgresql -lpq)
LIBS_redis = -lhiredis -lssl -lcrypto
LIBS_httpd = -lmicrohttpd
LIBS_tls   = -lssl -lcrypto

DEB_PACKAGES = build-essential pkg-config lua5.4 liblua5.4-dev lua-cjson lua-yaml lua-busted \
  nettle-dev libcurl4-openssl-dev librdkafka-dev libpq-dev libhiredis-dev libssl-dev libwebsockets-dev \
  libmicrohttpd-dev lua-luaossl lua-zlib \
  postgresql postgresql-client redis-server redis-tools kcat python3-confluent-kafka curl python3 openssl procps strace tmux hyperfine time python3-jsonschema \
  lua-filesystem lua-argparse lua-check scdoc debootstrap bash-completion zsh podman runc \
  prometheus prometheus-alertmanager prometheus-pushgateway python3-requests python3-websockets chromium nodejs
# The console's browser spec (spec/console/browser_spec.lua) drives Debian's chromium with
# playwright-core from npm, pinned, installed under build/node (not in the tree).
PLAYWRIGHT_CORE = playwright-core@1.65.1

# The package version is the one `runbook version` prints.
VERSION := $(shell sed -n 's/^M.VERSION = "\(.*\)"$$/\1/p' stdlib/runbook/cli.lua)
DEB      = runbook_$(VERSION)_amd64.deb
IMAGE    = localhost/runbook:$(VERSION)
BASE_IMAGE = localhost/runbook-base:bookworm
# podman's options, e.g. PODMAN_OPTS="--runtime runc" where crun cannot run
# (cgroups in hybrid mode), with --ulimit where the defaults exceed the hard limits.
PODMAN_OPTS ?=

.PHONY: all deps test check clean install uninstall deb base-image image sandbox sandbox-stop demo check-asan check-valgrind
all: runbook $(MODULE_SO) $(STDLIB_BC)

runbook: $(HOST_SRC) host/runbook.h host/host.h
	$(CC) $(CFLAGS) $(WARN) $(LUA_INC) -o $@ $(HOST_SRC) $(LUA_LIB) $(HOST_LIBS) -lm -ldl -Wl,-E

lib/lua/%.luac: stdlib/%.lua
	@mkdir -p $(dir $@)
	luac5.4 -o $@ $<

lib/lua/argparse.luac: $(ARGPARSE)
	@mkdir -p $(dir $@)
	luac5.4 -s -o $@ $<

lib/runbook/%.so: modules/%.c host/runbook.h $(wildcard modules/*.h)
	@mkdir -p lib/runbook
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared $(LUA_INC) -Ihost -o $@ $< $(LIBS_$*)

deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $(DEB_PACKAGES)
	@if command -v npm >/dev/null; then \
	  npm install --prefix build/node --no-save --no-audit --no-fund $(PLAYWRIGHT_CORE); \
	else echo "deps: no npm, so no playwright-core: the console's browser spec will be pending"; fi

# The whole suite: spec/suite starts the sandboxes it needs (one per worker),
# runs the specs with their env, and the runs they start keep their journals
# and locks in a state dir of their own, and push no metrics (loading libcurl
# at the end of each of thousands of runs) unless a spec asks. `make check`
# runs the specs that need no sandbox.
TEST_STATE = build/test-state
test: all
	spec/suite

# The specs that need no sandbox, in seconds: engine, CLI, loader, params,
# journal, gate and the modules against local fixtures.
CHECK_SPECS = spec/base64_spec.lua spec/cli_spec.lua spec/durable_spec.lua \
  spec/engine_spec.lua spec/exec_spec.lua spec/gate_spec.lua spec/http_check_all_spec.lua spec/http_spec.lua \
  spec/loader_spec.lua spec/notify_spec.lua spec/operator_spec.lua spec/params_spec.lua spec/step_spec.lua
check: all
	rm -rf $(TEST_STATE) && mkdir -p $(TEST_STATE) && RUNBOOK_STATE_DIR=$(CURDIR)/$(TEST_STATE) ./runbook test $(CHECK_SPECS)

# The host and modules built with AddressSanitizer and UBSan into build/asan/,
# then the suite run against that build (the sandbox's own specs need no rebuild).
# intercept_tls_get_addr=0: GCC 12's interceptor takes a dynamic TLS block that
# happens to start 16 bytes into a page for a glibc 2.19 one and reads a bogus
# range from before it, and LeakSanitizer's tracer then dies on it at exit
# ("Tracer caught signal 11", "DTLS 5 at 0x3cc-...") whatever the code did.
ASAN_FLAGS = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
check-asan:
	@mkdir -p build/asan/lib/runbook
	ln -sfn ../../stdlib build/asan/stdlib
	$(MAKE) --no-print-directory CFLAGS="$(ASAN_FLAGS)" build/asan/runbook \
	  $(MODULES:%=build/asan/lib/runbook/%.so)
	RUNBOOK_BIN=build/asan/runbook ASAN_OPTIONS=detect_leaks=1:intercept_tls_get_addr=0 spec/suite build/asan/runbook

build/asan/runbook: $(HOST_SRC) host/runbook.h host/host.h
	$(CC) $(CFLAGS) $(WARN) $(LUA_INC) -o $@ $(HOST_SRC) $(LUA_LIB) $(HOST_LIBS) -lm -ldl -Wl,-E

build/asan/lib/runbook/%.so: modules/%.c host/runbook.h $(wildcard modules/*.h)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared $(LUA_INC) -Ihost -o $@ $< $(LIBS_$*)

# The suite with every runbook process under valgrind's memcheck.
check-valgrind: all
	RUNBOOK_BIN="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --suppressions=spec/valgrind.supp ./runbook" \
	  spec/suite

# The Debian 12 root (debootstrap --variant=minbase), made once.
build/bookworm-minbase:
	pkg/debian-root.sh prepare $@

# The container image, from no registry: the debootstrap root imported as the
# base (without apt's caches), the .deb installed into it by pkg/Containerfile.
base-image: build/bookworm-minbase
	podman image exists $(BASE_IMAGE) || tar -C build/bookworm-minbase --exclude='./var/lib/apt/lists/*' \
	  --exclude='./var/cache/apt/*' -c . | podman import --change 'CMD ["/bin/bash"]' - $(BASE_IMAGE)

image: deb base-image
	podman build $(PODMAN_OPTS) --network=host --build-arg DEB=$(DEB) -f pkg/Containerfile -t $(IMAGE) .

sandbox:
	examples/sandbox/up

# Stops the sandbox of SANDBOX_STATE when it is set, else every one of this
# checkout's (spec/suite starts one per worker).
sandbox-stop:
	examples/sandbox/down
	[ -n "$$SANDBOX_STATE" ] || for s in examples/sandbox/.state-*; do \
	  [ ! -d "$$s" ] || SANDBOX_STATE=$(CURDIR)/$$s examples/sandbox/down; done

demo: all
	examples/demo

build/runbook.1: pkg/runbook.1.scd
	@mkdir -p build
	scdoc < $< > $@

# Architecture-independent files (the stdlib's sources, the shipped runbooks)
# under share/runbook, the modules and the compiled stdlib under lib/runbook.
install: all build/runbook.1
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/runbook/runbook $(DESTDIR)$(PREFIX)/share/runbook \
	  $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
	  $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions
	install -m 755 runbook $(DESTDIR)$(PREFIX)/bin/runbook
	install -m 644 $(MODULE_SO) $(DESTDIR)$(PREFIX)/lib/runbook/runbook/
	cp -R stdlib runbooks $(DESTDIR)$(PREFIX)/share/runbook/
	cp -R lib/lua $(DESTDIR)$(PREFIX)/lib/runbook/   # after stdlib: compiled files must be newer
	install -m 644 build/runbook.1 $(DESTDIR)$(PREFIX)/share/man/man1/runbook.1
	install -m 644 pkg/runbook.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/runbook
	install -m 644 pkg/runbook.zsh $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_runbook

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/runbook $(DESTDIR)$(PREFIX)/share/man/man1/runbook.1 \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions/runbook $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_runbook
	rm -rf $(DESTDIR)$(PREFIX)/lib/runbook $(DESTDIR)$(PREFIX)/share/runbook

# The Debian package, from `make install PREFIX=/usr` into build/deb. Depends:
# the shared libraries' packages (dpkg-shlibdeps) and the Lua libraries of
# debian/control.
deb: all build/runbook.1
	rm -rf build/deb && $(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/build/deb PREFIX=/usr
	strip --strip-unneeded --remove-section=.comment build/deb/usr/bin/runbook build/deb/usr/lib/runbook/runbook/*.so
	gzip -9n build/deb/usr/share/man/man1/runbook.1
	install -d build/deb/usr/share/doc/runbook
	install -m 644 debian/copyright build/deb/usr/share/doc/runbook/
	gzip -9nc debian/changelog > build/deb/usr/share/doc/runbook/changelog.gz
	gzip -9nc README.md > build/deb/usr/share/doc/runbook/README.md.gz
	dpkg-shlibdeps -Tbuild/deb.substvars build/deb/usr/bin/runbook build/deb/usr/lib/runbook/runbook/*.so 2>/dev/null
	install -d build/deb/DEBIAN
	dpkg-gencontrol -v$(VERSION) -Pbuild/deb -Tbuild/deb.substvars -fbuild/deb.files
	dpkg-deb --root-owner-group --build build/deb $(DEB)

clean:
	rm -rf runbook lib build runbook_*.deb
