# flowprobe: `make demo` runs the main job (`flowprobe reproduce --quick`: every claim of the paper,
# measured, in REPORT/index.html), `make report-full` its publication version, `make test` the test
# suite, `make bench` the side-by-side benchmark against normflows and Pyro.
# Both create .venv if missing and install the pinned CPU build of PyTorch before the package
# (with its test, data and Ray extras: the sweep tests run on a local Ray instance).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flowprobe-installed
TORCH_PIN := torch==2.13.0
OUT    ?= demo-out
REPORT ?= report
JOBS   ?= 2

.PHONY: install demo train-demo report-full test lint slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,data,ray]"
	$(PY) -c "import sys; from flowprobe.layers import native; sys.exit(native.main())" || echo "(the PyTorch kernels will be used)"
	touch $(STAMP)

# Exit status of reproduce: 0 every section holds, 1 a verdict fails or is inconclusive, 10 + n section n
# raised; the page is written in every case, so its path is printed in every case.
demo: $(STAMP)
	$(VENV)/bin/flowprobe reproduce --quick --jobs $(JOBS) --out $(REPORT); status=$$?; \
	echo "the report: $(abspath $(REPORT))/index.html"; exit $$status

report-full: $(STAMP)
	$(VENV)/bin/flowprobe reproduce --full --jobs $(JOBS) --out $(REPORT)-full; status=$$?; \
	echo "the report: $(abspath $(REPORT))-full/index.html"; exit $$status

# The earlier demo: trains U1 and two moons and writes their figures to OUT.
train-demo: $(STAMP)
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
	rm -rf $(VENV) $(OUT) $(REPORT) $(REPORT)-full .pytest_cache .ruff_cache .hypothesis
