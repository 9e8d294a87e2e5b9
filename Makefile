# moekit developer entry points. `make demo` and `make test` create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch first, so nothing pulls a multi-GB CUDA build. On this project's machines
# torch==2.13.0 is a local CPU wheel; elsewhere use e.g.
#   make TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_INSTALL ?= torch==2.13.0

.PHONY: install demo test test-all test-real test-launchers bench device-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moekit demo --out demo-out --force

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# The real-model and reader tiers (SmolLM2-135M, transformers 4.57, llama.cpp's converter, vLLM); CI runs them.
test-real: install
	MOEKIT_REAL_TESTS=1 $(PY) -m tests.assets
	MOEKIT_REAL_TESTS=1 $(PY) -m pytest -q tests/real

# The launcher tier: recipe runs as local jobs and on a one-node Slurm cluster the tests start (needs root and
# Debian's slurm-wlm and munge: apt-get install slurm-wlm munge); CI runs it.
test-launchers: install
	MOEKIT_LAUNCHER_TESTS=1 $(PY) -m pytest -q tests/launchers

bench: install
	$(PY) bench/data.py --sizes 100MB,400MB
	$(PY) bench/mix.py
	$(PY) bench/train.py
	$(PY) bench/tune.py
	$(PY) bench/routing_inspect.py
	$(PY) bench/launch.py

# Every GPU path once, with figures (on a CPU: make device-check DEVICE_CHECK="--device cpu --size tiny").
device-check: install
	$(PY) bench/device_check.py $(DEVICE_CHECK)

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
