# Each target sets itself up: a .venv with the package and its dev extra, made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps spikingjelly==2.0.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import edgeport, torch, onnxruntime, transformers, snntorch, spikingjelly.activation_based.neuron"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeport demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,test-models]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) bench/export_bench.py
	$(PY) bench/runtime_bench.py
	$(PY) bench/slim_bench.py
	$(PY) bench/backend_bench.py
	$(PY) bench/quant_bench.py

clean:
	rm -rf $(VENV) build edgeport-demo .pytest_cache
