# Two entry points: `make demo` and `make test`. Both create .venv with the Python found on PATH.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers; one test file per worker at a time (module fixtures are built once).
TEST_WORKERS ?= 2
.PHONY: demo test install install-test clean

# A venv whose interpreter no longer runs (its Python deleted, moved or upgraded away) is removed,
# so that the rules below make it again from scratch.
ifneq ($(shell $(PY) -c 'print("ok")' 2>/dev/null),ok)
$(shell rm -rf $(VENV))
endif

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m experiments.demo --workdir runs/demo

test: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Removes the virtualenv, pytest's cache and the demo's workdir runs/demo only: training runs
# elsewhere under runs/ (the README's runs/gcc, runs/salsa, ...) are kept.
clean:
	rm -rf $(VENV) runs/demo .pytest_cache
