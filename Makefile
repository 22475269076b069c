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
        bench-workers bench-seed000 bench-lazy perf-doc clean mutation

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	# An editable install does not put the plugin under site-packages/twisted/plugins.
	# (site-packages is asked for when this line runs: make expands a recipe before the venv exists)
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  ln -sf $(CURDIR)/twisted/plugins/pipecomet_plugin.py $$site/twisted/plugins/pipecomet_plugin.py
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd -n pipecomet --port $(PORT)

test: $(STAMP)
	scripts/apt-ensure $(TEST_APT)
	$(MAKE) --no-print-directory test-pytest test-trial

test-pytest: $(STAMP)
	$(VENV)/bin/pytest -q tests

# The unit tests are trial TestCases too; trial finds the tests package on PYTHONPATH.
test-trial: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/trial tests

# Mutation testing of the core modules (slow, CPU-heavy: not part of `make test`;
# docs/testing.md).  Runs in a temporary copy of the checkout.
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	flock /tmp/pipecomet-bench.lock scripts/mutation

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
