# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs xbm, trains and evaluates on the bundled Glyphs dataset
#   make test   the test suite (same .venv)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all test-fast gpu-check clean

# Which faiss to install: cpu (default) or gpu (`make gpu-check FAISS=gpu`). Never both: the two
# packages install the same module, so switching uninstalls the other first.
FAISS ?= cpu
STAMP := $(VENV)/.installed-$(FAISS)

# Re-installs only when the package's requirements (or the faiss choice) change.
$(STAMP): setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip uninstall -y -q faiss-cpu faiss-gpu
	$(BIN)/python -m pip install -e ".[$(FAISS),dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

# Everything but the few heavy tests (pytest.ini: heavy), within 5 minutes on 2 cores:
# two pytest workers (pytest-xdist), since many tests wait on subprocesses and imports.
test: install
	$(BIN)/python -m pytest tests -m "not heavy" -n 2

# Everything, the heavy tests included (the submitit cluster launcher, two benchmarks, bf16 under DDP,
# the whole default Glyphs dataset).
test-all: install
	$(BIN)/python -m pytest tests -n 2

# Everything but the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow" -n 2

# On a machine with an NVIDIA GPU: the CUDA tests, AMP runs killed and resumed, GPU search, the memory
# step and training throughput; summary in output/gpu_check/summary.json (exit 2 without CUDA).
gpu-check: install
	$(BIN)/python scripts/gpu_check.py --out output/gpu_check/summary.json

clean:
	rm -rf $(VENV) output *.egg-info
