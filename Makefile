# Two entry points a new user needs (see README.md):
#   make train   set up .venv if missing, then train the tiny model on the embedded corpus (CPU)
#   make test    set up .venv if missing, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on this kind of machine torch==2.13.0 is a local CPU wheel; a bare
	# "torch" could resolve to a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m nanomt.train $(ARGS)

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) outputs
