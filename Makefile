# Quick start: `make demo` (the main job) and `make test` (what CI runs).
# Both create .venv with python3 and install what they need; no other setup.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; a looser requirement pulls a multi-GB CUDA build on Linux.
TORCH  ?= torch==2.13.0

.PHONY: test test-gpu demo lint clean

# constraints.txt: the library versions the README's demo lines were measured with.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH)" -e '.[torch,mlx,serve,dev]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest

# The GPU half of the suite, on a machine with CUDA: it uses that machine's Python, which holds a
# CUDA build of torch and transformers (no install, no network). Tests marked `gpu` skip elsewhere.
GPU_PY ?= python3
test-gpu:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -m gpu -p no:cacheprovider -rs tests/test_gpu.py

demo: $(VENV)/.installed
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
