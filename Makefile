# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what is missing and skips what is done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LMCOMPRESS_HOME ?= $(HOME)/.cache/lmcompress
# tcmalloc makes CPU training 1.2-2x faster here; used only when the Debian package is present.
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
RUN := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)) $(VENV)/bin/

.PHONY: setup assets demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: an unpinned torch would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(RUN)lmcompress assets

demo: assets
	$(RUN)lmcompress run recipes/demo.yaml --out runs/demo

test: assets
	$(RUN)pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache
