# Baton: the two commands a new machine needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all lint proto check-protos benchmarks clean wheelhouse

# constraints.txt pins torch to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/baton demo --dir demo

# PYTEST_ARGS: more pytest options (.ci/run adds --durations=25).
# XDIST: pytest-xdist workers, 2 by default (this machine's 2 cores: serially the suite took 1242 s
# on a quiet machine in session 13, over its 15-minute budget, with about one core of two busy).
# XDIST=0 runs serially in one process. loadgroup keeps together the tests tests/xdist_groups.py
# groups (Ray, module fixtures). A worker that dies ends the run (--max-worker-restart=0): xdist's
# loadgroup hangs when it replaces a crashed worker (pytest-dev/pytest-xdist#1323, #1327); the
# crash is reported against the test it ran.
XDIST ?= 2
ifeq ($(XDIST),0)
XDIST_ARGS :=
else
XDIST_ARGS := -n $(XDIST) --dist loadgroup --max-worker-restart=0
endif

# The project's own modules are compiled to bytecode first, as an installed wheel ships them (pip
# compiles on install; the editable checkout is not): where PYTHONDONTWRITEBYTECODE is set, every
# coordinator and site process a test starts would otherwise compile them again from source.
BYTECODE := $(PY) -m compileall -q -j 0 protocols coordinator site_agent ordering benchmarks tests

test: install
	$(BYTECODE)
	$(PY) -m pytest -q $(XDIST_ARGS) $(PYTEST_ARGS)

test-all: install
	$(BYTECODE)
	$(PY) -m pytest -q -m '' $(XDIST_ARGS) $(PYTEST_ARGS)

lint: install check-protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Offline install for sites: every wheel of baton-fl[site] + SHA256SUMS (deploy/wheelhouse.sh).
# CPU torch by default; CUDA: make wheelhouse TORCH_INDEX=https://download.pytorch.org/whl/cu126
# TORCH_INDEX= (empty) takes torch from pip's configured indexes only.
WHEELHOUSE ?= wheelhouse
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
wheelhouse:
	TORCH_INDEX='$(TORCH_INDEX)' PYTHON=$(PYTHON) bash deploy/wheelhouse.sh $(WHEELHOUSE)

proto: install
	PYTHON=$(PY) bash .ci/gen-protos.sh

check-protos: install
	PYTHON=$(PY) bash .ci/check-protos.sh

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
