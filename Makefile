# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs xbm, trains and evaluates on the bundled Glyphs dataset
#   make test   the test suite (same .venv)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast bench clean

# Re-installs only when the package's requirements change.
$(VENV)/.installed: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest tests

# Everything but the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) output *.egg-info
