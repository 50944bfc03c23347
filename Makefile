# Two entry points for a fresh machine: `make run` (the whole pipeline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EVAL_STAMP := $(VENV)/.installed-eval

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# lm-evaluation-harness (optional for users, installed for the tests): about 75 s
$(EVAL_STAMP): $(STAMP) requirements-eval.txt
	$(BIN)/pip install -q -r requirements-eval.txt
	touch $(EVAL_STAMP)

# headless Chromium and its driver (Debian's packages) for the arena's browser test; a no-op
# once installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }

setup: $(STAMP)

setup-eval: $(EVAL_STAMP)

run: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/elasticmoe run --out runs/default

test: $(STAMP) $(EVAL_STAMP) browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check elasticmoe tests bench
	$(BIN)/ruff format --check elasticmoe tests bench

.PHONY: setup setup-eval browser run test lint
