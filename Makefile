# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.12 when it is missing and install saljax into it.
VENV := .venv
# `python3.12` may be a pyenv shim that fails when 3.12 is not the selected version, so try it
# and fall back to the interpreters pyenv and Debian install.
PYTHON312 := $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) /usr/local/bin/python3.12 /usr/bin/python3.12,$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $(p))))

.PHONY: demo test install clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg requirements.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "saljax needs Python 3.12: none found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

demo: install
	$(VENV)/bin/saljax demo

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
