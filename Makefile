# The two set-up commands of the README:  `make up`  and  `make test`.
# Both install what they need first (idempotent; re-run when pyproject.toml changes).
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
ARGS ?=

.PHONY: install up generate test test-fast

# CPU torch 2.13.0 comes from this machine family's local disk; installing it before the project
# keeps pip from resolving an unpinned torch (or nixl's unpinned dependency) to a multi-GB CUDA build.
.install-stamp: pyproject.toml
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
