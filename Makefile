# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.12 when it is missing and install saljax into it.
VENV := .venv
# PyTorch for the baseline in baselines/torch, in its own interpreter: the CPU build of torch 2.13.0
# for Python 3.11. The parity tests find it through SALJAX_TORCH_PYTHON.
TORCH_VENV := .venv-torch
PYTHON311 := $(firstword $(foreach p,python3.11 $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python3.11) /usr/local/bin/python3.11 /usr/bin/python3.11,$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1 && echo $(p))))
# `python3.12` may be a pyenv shim that fails when 3.12 is not the selected version, so try it
# and fall back to the interpreters pyenv and Debian install.
PYTHON312 := $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) /usr/local/bin/python3.12 /usr/bin/python3.12,$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $(p))))

# Python compiles each module it imports to bytecode. Where writing that bytecode is switched off
# (PYTHONDONTWRITEBYTECODE, as on some CI machines) every process compiles jax, flax and saljax again,
# ~5 s of CPU each, and `make test` starts dozens of Python processes (test workers, command-line and
# multi-process tests, data-loading workers, PyTorch). Keep the bytecode in one folder inside the
# environment instead, away from the sources.
unexport PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache

.PHONY: demo test test-fast lint install torch-env clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg requirements.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "saljax needs Python 3.12: none found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@# --no-compile: byte-compiling every installed file takes longer than the install itself (Python
	@# compiles the modules it imports on first use).
	$(VENV)/bin/python -m pip install -q --no-compile -r requirements.txt
	touch $@

torch-env: $(TORCH_VENV)/.installed

$(TORCH_VENV)/.installed:
	@test -n "$(PYTHON311)" || { echo "the PyTorch baseline needs Python 3.11: none found (set PYTHON311=/path/to/python3.11)" >&2; exit 1; }
	test -x $(TORCH_VENV)/bin/python || $(PYTHON311) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --no-compile torch==2.13.0 numpy
	touch $@

demo: install
	$(VENV)/bin/saljax experiment decoy_mnist --quick

# Every test, in parallel over the cores (pytest-xdist); `make test-fast` leaves out the slow end-to-end ones
# and sends whole files to a worker, so that a module's fixtures and compiled programs are built once (the
# full run balances single tests instead: its end-to-end modules are too long for one worker).
test:
	@# The two environments build side by side (each install is mostly one process unpacking wheels).
	$(MAKE) --no-print-directory -j2 install torch-env
	SALJAX_TORCH_PYTHON=$(abspath $(TORCH_VENV)/bin/python) $(VENV)/bin/python -m pytest -n auto --dist loadgroup

test-fast: install
	$(VENV)/bin/python -m pytest -n auto --dist loadfile -m "not slow"

# ruff and mypy, configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check saljax tests benchmarks baselines experiments
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(TORCH_VENV) build *.egg-info .pytest_cache
