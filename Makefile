# Pollen: `make run` trains the default federation, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pollen-installed
ARGS ?=
FED ?=

.PHONY: install run test bench lint clean

# torch is pinned and installed first: that version is a CPU build already on disk here, and
# with it present the project's `torch>=2.4` pulls nothing else (an unpinned torch would
# download a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pollen run $(if $(ARGS),--run-config "$(ARGS)") $(if $(FED),--federation-config "$(FED)")

test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/pollen bench all --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs bench-results .pytest_cache
