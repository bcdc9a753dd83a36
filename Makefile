# The commands of the README: `make serve`, `make test` and `make bench`.
PYTHON ?= python3
PORT ?= 3000
VENV := .venv
BIN := $(VENV)/bin
TINY_MODEL := models/tiny

# The offline demo model; unset these (or run `bentoml serve` directly) for the real SDXL models.
export SDXL_BASE_MODEL ?= $(TINY_MODEL)/base
export SDXL_CONTROLNET_MODEL ?= $(TINY_MODEL)/controlnet
export SDXL_VAE_MODEL ?= $(TINY_MODEL)/vae

.PHONY: serve test bench lint tiny-model clean

$(BIN)/bentoml: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(TINY_MODEL)/base/model_index.json: | $(BIN)/bentoml
	$(BIN)/python -m sdxl_controlnet.tiny_model $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/base/model_index.json

serve: tiny-model
	$(BIN)/bentoml serve . --port $(PORT)

test: tiny-model
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# Figures, never a failure: `make bench BENCH_ARGS="--compare old.json"` compares two runs.
bench: tiny-model
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: $(BIN)/bentoml
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) models
