# Two entry points: `make speedrun` (the main job) and `make test` (what CI runs).
# Both create .venv on first use; torch is installed first with its exact pin so that
# pip takes the CPU build on a CPU machine instead of a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
# the oldest transformers the [hf] extra allows (pyproject.toml): the interop tests also run under it,
# in a second virtualenv, so an export is checked against both major versions
HF_OLDEST_PIN := transformers==4.51.3
HF_OLDEST_VENV ?= .venv-hf-oldest
HF_TESTS := tests/test_interop.py tests/test_hf.py tests/test_tokenizer.py

.PHONY: speedrun test install install-dev lint clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[data,report]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(HF_OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(HF_OLDEST_VENV)
	$(HF_OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(HF_OLDEST_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(HF_OLDEST_VENV)/bin/python -m pip install -q -e . '$(HF_OLDEST_PIN)' 'peft>=0.13' 'pytest>=8' 'hypothesis>=6'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

speedrun: install
	$(BIN)/xiaolm speedrun $(ARGS)

# The chat page's test drives Debian's chromium with its chromedriver (version-matched packages).
# Installed when missing and possible (root with apt-get); otherwise that test is skipped, saying why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null) || echo "could not install chromium: the browser test will be skipped"; \
	  else \
	    echo "chromium/chromedriver missing and not root with apt-get: the browser test will be skipped"; \
	  fi; \
	fi

test: install-dev $(HF_OLDEST_VENV)/.installed browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest
	$(HF_OLDEST_VENV)/bin/python -m pytest -p no:cacheprovider $(HF_TESTS)

lint: install-dev
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(HF_OLDEST_VENV) .pytest_cache
