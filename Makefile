# pipecomet — two commands: `make run` serves the demo gateway, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# System packages the test suite needs (real services on 127.0.0.1, a real browser).
TEST_APT := $(shell cat scripts/test-packages.txt 2>/dev/null)
BENCH_APT := wrk util-linux
PORT ?= tcp:8080

.PHONY: run test test-pytest test-trial install bench bench-http bench-quota bench-comet \
        bench-workers bench-seed000 bench-lazy perf-doc clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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
	$(MAKE) --no-print-directory test-pytest test-trial

test-pytest: $(STAMP)
	$(VENV)/bin/pytest -q tests

# The unit tests are trial TestCases too; trial finds the tests package on PYTHONPATH.
test-trial: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/trial tests

bench: bench-http bench-quota bench-comet bench-workers bench-lazy

# A static pattern rule: make skips implicit-rule search for .PHONY targets,
# so a plain `bench-%:` rule would never run for them.
bench-http bench-quota bench-comet bench-workers bench-seed000 bench-lazy: bench-%: $(STAMP)
	scripts/apt-ensure $(BENCH_APT)
	$(PY) -m bench.$(subst -,_,$*)
	$(PY) -m bench.report

perf-doc: $(STAMP)
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) build dist src/*.egg-info
