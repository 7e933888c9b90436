# Quick start: `make demo` and `make test`; both set up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  := models/mobilenet_v2_1.0_224_quant_avgpool.tflite
OUT    ?= out
# The device test run: Chaquopy's Python and numpy 1.x, no interpreter, nothing server-side.
# The first python3.10 that really runs (a pyenv shim may exist yet not be active).
ifndef PYTHON310
PYTHON310 := $(shell for p in $$(command -v python3.10) $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10 \
	/root/.pyenv/versions/3.10*/bin/python3.10; do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' \
	2>/dev/null && echo "$$p" && break; done)
endif
DEVICE := .venv-device
DPY    := $(DEVICE)/bin/python
DSTAMP := $(DEVICE)/.installed

.PHONY: setup setup-device demo test test-main test-device soak bench evaluate clean convert-check

setup: $(STAMP) $(MODEL)

# Reinstall only when the package's declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[litert,server,dev,ohttp,quantize,ray]'
	touch $(STAMP)

$(MODEL): $(STAMP) models/manifest.json tools/model/cut.py
	$(PY) -m tools.model prepare

demo: setup
	$(PY) -m tools.demo

test: test-main test-device

test-main: setup
	$(PY) -m pytest -q

# Only the device side and its small extras: the ohttp extra, numpy < 2, pytest; no server
# extras, no interpreter (the tests check both). Reinstalled when the dependencies change.
$(DSTAMP): setup.cfg pyproject.toml
	test -x $(DPY) || $(PYTHON310) -m venv $(DEVICE)
	$(DPY) -m pip install --quiet --disable-pip-version-check -e '.[ohttp]' 'numpy>=1.26,<2' 'pytest>=7.4'
	touch $(DSTAMP)

ifeq ($(PYTHON310),)
setup-device test-device:
	@echo "$@: skipped, no Python 3.10 found (set PYTHON310=/path/to/python3.10)"
else
setup-device: $(DSTAMP)

# The main .venv builds the index, extracts the features and runs the server; the device venv asks.
test-device: setup $(DSTAMP)
	ENFPIRE_SERVER_PYTHON=$(CURDIR)/$(PY) $(DPY) -m pytest -q --confcutdir=tests/device tests/device
endif

# Bring your own model: PyTorch and Keras conversion need torch and TensorFlow, kept out of .venv
# so `make test` stays lean; their own venv gets the main extras too and runs the conversion tests.
CONVERT := .venv-convert
CSTAMP  := $(CONVERT)/.installed
$(CSTAMP): setup.cfg pyproject.toml
	test -x $(CONVERT)/bin/python || $(PYTHON) -m venv $(CONVERT)
	$(CONVERT)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e '.[litert,server,dev,quantize,torch,tensorflow]'
	touch $(CSTAMP)

convert-check: $(CSTAMP)
	$(CONVERT)/bin/python -m pytest -q -rs tests/test_convert.py

soak: setup
	$(PY) -m pytest -q -m soak --run-soak tests

bench: setup
	$(PY) -m tools.bench --out $(OUT)/bench

evaluate: setup
	$(PY) -m tools.evaluate privacy --dataset ../shared/datasets/wa-landmarks --out $(OUT)/privacy --sweep

# The device side on arm64 (not part of `make test`): Debian's debootstrap, proot and qemu-user-static,
# installed with apt-get when missing; the arm64 root is cached in .cache/arm64. Needs root or sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARM_TOOLS := debootstrap debian-archive-keyring proot qemu-user-static
.PHONY: arm-check
arm-check: setup
	dpkg -s $(ARM_TOOLS) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(ARM_TOOLS); }
	$(SUDO) $(PY) -m tools.arm_check

clean:
	rm -rf $(VENV) $(DEVICE) $(CONVERT) $(OUT) .cache models/*.tflite
