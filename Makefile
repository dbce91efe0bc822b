# The two set-up commands of the README:  `make up`  and  `make test`.
# Both install what they need first (idempotent; re-run when pyproject.toml changes).
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
ARGS ?=

.PHONY: install up generate test test-fast

# CPU torch 2.13.0 comes from this machine family's local disk; installing it before the project
# keeps pip from resolving an unpinned torch (or nixl's unpinned dependency) to a multi-GB CUDA build.
# Redis and Prometheus servers are real parts of the tests (Debian packages; needs root + apt).
.install-stamp: pyproject.toml
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus >/dev/null; } || \
	  echo "make: redis-server/prometheus not installed; their tests will skip"
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $@

install: .install-stamp

up: install
	pdserve up $(ARGS)

generate: install
	pdserve generate $(ARGS)

test: install
	$(PYTHON) -m pytest -q --durations=15 tests $(ARGS)
