# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench fuzz hostile clean

# An editable install, plus this checkout on sys.path (a .pth file): Twisted looks for
# twisted/plugins/eke_plugin.py on sys.path. setup.cfg's package_dir makes setuptools write such
# a plain .pth itself; an older setuptools may write an import-hook finder instead, which would
# miss the plugin and cost every command 9 ms at start (it imports pathlib and more). Either is
# replaced by our own .pth, as a regular install would have no finder.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -c 'import pathlib, sysconfig; site = pathlib.Path(sysconfig.get_paths()["purelib"]); \
		(site / "eketwist-checkout.pth").write_text(str(pathlib.Path.cwd()) + "\n"); \
		[p.unlink() for p in (*site.glob("__editable__.eketwist-*.pth"), *site.glob("__editable___eketwist_*_finder.py"))]'
	touch $@

# The operations tests run the real tools: HAProxy, systemd-analyze, systemd-socket-activate
# (Debian's haproxy and systemd packages, installed here when missing; without them those
# tests are skipped and say why).
TOOLS_STAMP := $(VENV)/.tools
$(TOOLS_STAMP): | $(STAMP)
	@missing=""; for tool in haproxy systemd-analyze systemd-socket-activate; do \
		command -v $$tool >/dev/null 2>&1 || test -x /usr/sbin/$$tool || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then touch $@; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing the tools the operations tests use:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy systemd >/dev/null && touch $@ \
		|| echo "could not install haproxy/systemd: the tests that need them will be skipped"; \
	else echo "missing$$missing (apt-get install haproxy systemd): the tests that need them will be skipped"; fi

# The whole suite, every layer (tests/unit, tests/protocol, tests/system), on TEST_JOBS workers
# (pytest-xdist); TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= 2
test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS)

# Throughput, small files, handshakes and memory against raw TCP and OpenSSH sftp, and the
# shapes users have (trees, a 20 ms round trip, the real disk) against rsync and sftp
# (bench/run.py, bench/shapes.py; options: $(BIN)/python -m bench.run --help; one part only:
# BENCH_ARGS="--only tree,latency"). Installs OpenSSH and rsync with apt-get when they are
# missing. Figures: a table, and bench/results.json.
bench: $(STAMP)
	@command -v sshd >/dev/null || test -x /usr/sbin/sshd || \
		(echo "installing openssh-server and openssh-client (for the sftp baseline)"; \
		 apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client) || \
		echo "could not install OpenSSH: the sftp baseline will be skipped (apt-get install openssh-server)"
	@command -v rsync >/dev/null || \
		(echo "installing rsync (for the trees' baseline)"; \
		 apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync) || \
		echo "could not install rsync: the rsync baseline will be skipped (apt-get install rsync)"
	$(BIN)/python -m compileall -q eketwist
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# A longer fuzzing run than the suite's: FUZZ_EXAMPLES in each of the server's 10 states
# (30 in the suite).
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -s tests/protocol/test_fuzz.py

# Hostile load against a real daemon, with figures (docs/security.md).
hostile: $(STAMP)
	$(BIN)/python -m bench.hostile

demo: $(STAMP)
	bash contrib/demo.sh

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .hypothesis
