# Quick start: `make demo` and `make test`; both set up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  := models/mobilenet_v2_1.0_224_quant_avgpool.tflite
OUT    ?= out

.PHONY: setup demo test soak bench evaluate clean

setup: $(STAMP) $(MODEL)

# Reinstall only when the package's declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[litert,server,dev,ohttp]'
	touch $(STAMP)

$(MODEL): $(STAMP) models/manifest.json tools/cut.py
	$(PY) -m tools.model prepare

demo: setup
	$(PY) -m tools.demo

test: setup
	$(PY) -m pytest -q

soak: setup
	$(PY) -m pytest -q -m soak --run-soak tests

bench: setup
	$(PY) -m tools.bench --out $(OUT)/bench

evaluate: setup
	$(PY) -m tools.evaluate privacy --dataset ../shared/datasets/wa-landmarks --out $(OUT)/privacy --sweep

clean:
	rm -rf $(VENV) $(OUT) .cache models/*.tflite
