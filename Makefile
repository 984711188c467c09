# Two commands set everything up on a fresh machine:
#   make demo   train on the built-in toy task, translate, report BLEU
#   make test   lint with ruff + the whole test suite
#   (make test also installs Debian's Chromium for the page's browser tests)
# Both create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is installed first and pinned; the project itself
# declares a range (torch>=2.3) that this build satisfies, so pip adds no CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test lint chromium clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(BIN)/rosetta demo

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint chromium
	$(BIN)/python -m pytest -q

# Debian's Chromium, for the web page's browser tests (Playwright drives it; it
# cannot download browsers here); `make test` installs it when it is missing.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
