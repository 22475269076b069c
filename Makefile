# pipecomet — two commands: `make run` serves the demo gateway, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# System packages the test suite needs (real services on 127.0.0.1, a real browser).
TEST_APT := $(shell cat scripts/test-packages.txt 2>/dev/null)
BENCH_APT := wrk util-linux
PORT ?= tcp:8080
# What test-lowest runs: everything but the packaging and browser tests, which
# are about the install and the page, not the dependency versions.
LOWEST_PYTEST_ARGS ?= tests --ignore=tests/test_it_packaging.py --ignore=tests/test_it_browser.py

.PHONY: run test test-pytest test-trial test-lowest install bench bench-http bench-quota bench-comet bench-scale \
        bench-workers bench-seed000 bench-lazy bench-gateway bench-accesslog perf-doc clean mutation typecheck

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A stale egg-info left in src/ by an older install would shadow the new
	# entry points (importlib.metadata reads src/ first): the install makes
	# the current one.
	rm -rf src/pipecomet.egg-info
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	# The editable install puts src/ on sys.path, where twistd finds
	# src/twisted/plugins/pipecomet_plugin.py; the symlink older trees made
	# into site-packages is dropped (site-packages is asked for when this
	# line runs: make expands a recipe before the venv exists).
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  if [ -L $$site/twisted/plugins/pipecomet_plugin.py ]; then rm $$site/twisted/plugins/pipecomet_plugin.py; fi
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pipecomet serve --port $(PORT)

# The npm `eventsource` client the comet tests resume with (into .venv, not the tree).
NODE_DEPS := $(VENV)/node_modules/eventsource/package.json
$(NODE_DEPS):
	command -v npm >/dev/null || scripts/apt-ensure nodejs npm
	npm install --silent --no-audit --no-fund --prefix $(VENV) eventsource@4

test: $(STAMP)
	scripts/apt-ensure $(TEST_APT)
	$(MAKE) --no-print-directory $(NODE_DEPS)
	$(MAKE) --no-print-directory typecheck test-pytest test-trial test-lowest

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test-pytest: $(STAMP)
	$(VENV)/bin/pytest -q tests

# The same suite on the lowest dependency versions pyproject.toml claims
# (scripts/lowest-constraints.txt), in a venv of its own.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml scripts/lowest-constraints.txt
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c scripts/lowest-constraints.txt -e '.[test,demo]'
	site=$$($(LOWEST)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  if [ -L $$site/twisted/plugins/pipecomet_plugin.py ]; then rm $$site/twisted/plugins/pipecomet_plugin.py; fi
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -c 'import twisted, klein, treq; print("lowest:", "twisted", twisted.__version__, "klein", klein.__version__, "treq", treq.__version__)'
	$(LOWEST)/bin/pytest -q $(LOWEST_PYTEST_ARGS)

# The unit tests are trial TestCases too; trial finds the tests package on PYTHONPATH.
test-trial: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/trial tests

# Mutation testing of the core modules (slow, CPU-heavy: not part of `make test`;
# docs/testing.md).  Runs in a temporary copy of the checkout.
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	flock /tmp/pipecomet-bench.lock scripts/mutation

bench: bench-http bench-quota bench-comet bench-workers bench-lazy bench-gateway

# A static pattern rule: make skips implicit-rule search for .PHONY targets,
# so a plain `bench-%:` rule would never run for them.
bench-http bench-quota bench-comet bench-workers bench-seed000 bench-lazy bench-gateway bench-accesslog: bench-%: $(STAMP)
	scripts/apt-ensure $(BENCH_APT)
	$(PY) -m bench.$(subst -,_,$*)
	$(PY) -m bench.report

# --processes and the Redis bus (bench/scale.py); run it under the shared lock:
# flock /tmp/pipecomet-bench.lock make bench-scale
bench-scale: $(STAMP)
	scripts/apt-ensure $(BENCH_APT) redis-server
	$(PY) -m bench.scale
	$(PY) -m bench.report

perf-doc: $(STAMP)
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) $(LOWEST) build dist src/*.egg-info
