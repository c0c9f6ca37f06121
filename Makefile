# flowprobe: `make demo` runs the main job, `make test` runs the test suite, `make bench` the
# side-by-side benchmark against normflows and Pyro.
# Both create .venv if missing and install the pinned CPU build of PyTorch before the package
# (with its test, data and Ray extras: the sweep tests run on a local Ray instance).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flowprobe-installed
TORCH_PIN := torch==2.13.0
OUT    ?= demo-out

.PHONY: install demo test lint slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,data,ray]"
	$(PY) -m flowprobe.layers.native || echo "(the PyTorch kernels will be used)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowprobe demo --out $(OUT)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q

slow: $(STAMP)
	$(PY) -m pytest -q -m slow

BENCH_STAMP := $(VENV)/.flowprobe-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet $(TORCH_PIN) -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	mkdir -p bench-out
	$(PY) benchmarks/compare_anchors.py --json bench-out/compare_anchors.json

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache .hypothesis
