# The commands of the README: `make serve` and `make test`; `make bench`; the container targets `make image*`.
PYTHON ?= python3
PORT ?= 3000
VENV := .venv
BIN := $(VENV)/bin
TINY_MODEL := models/tiny
CONTAINER := scripts/container.sh
CPU_IMAGE := sdxl-controlnet-cpu:latest
TORCH_CPU_WHEEL := wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

# The offline demo model; unset these (or run `bentoml serve` directly) for the real SDXL models.
export SDXL_BASE_MODEL ?= $(TINY_MODEL)/base
export SDXL_CONTROLNET_MODEL ?= $(TINY_MODEL)/controlnet
export SDXL_VAE_MODEL ?= $(TINY_MODEL)/vae
export SDXL_PREVIEW_MODEL ?= $(TINY_MODEL)/preview
# No GPU is needed for the tiny model; a GPU deployment leaves this unset.
export ALLOW_CPU ?= 1

.PHONY: serve test test-tooling bench lint tiny-model clean image image-cpu image-run image-test readable-model

$(BIN)/bentoml: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(TINY_MODEL)/base/model_index.json: | $(BIN)/bentoml
	$(BIN)/python -m devtools.tiny_model $(TINY_MODEL)

# The preview decoder came later: a model built before it gets just that part.
$(TINY_MODEL)/preview/config.json: | $(TINY_MODEL)/base/model_index.json
	$(BIN)/python -m devtools.tiny_model --preview-only $(TINY_MODEL)

# So did the depth ControlNet and the ControlNet Union (SDXL_CONTROLNETS).
$(TINY_MODEL)/controlnet-union/config.json: | $(TINY_MODEL)/base/model_index.json
	$(BIN)/python -m devtools.tiny_model --controls-only $(TINY_MODEL)

# And the IP-Adapter (SDXL_IP_ADAPTER=models/tiny/ip-adapter), both variants.
$(TINY_MODEL)/ip-adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors: | $(TINY_MODEL)/base/model_index.json
	$(BIN)/python -m devtools.tiny_model --ip-adapter-only $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/base/model_index.json $(TINY_MODEL)/preview/config.json $(TINY_MODEL)/controlnet-union/config.json \
	$(TINY_MODEL)/ip-adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors

serve: tiny-model
	$(BIN)/bentoml serve . --port $(PORT)

# The product's tests, on two pytest workers, each taking whole modules (their servers and
# compiled pipelines are module fixtures): the servers under test leave a core idle half the time.
test: tiny-model
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadscope --no-loadscope-reorder --ignore=tests/tooling -m "not alone and not restarts and not thorough"
	$(BIN)/pytest -m alone tests/e2e

# The tooling's own tests: the GPU kit, run offline in a Python 3.12 stand-in for a rented GPU
# machine (about 5 GB, built once and rebuilt only when devtools/gpu_machine.txt changes), and
# the GPU options' tests on that machine's torch; the GPU benchmark's machinery and the
# full-size model builder; and the product's tests that stop and start servers of their own
# (jobs across restarts), or that walk the rest of a browser journey or a configuration
# matrix whose representative `make test` runs.
GPU_MACHINE := .venv-gpu/gpu_machine.txt
$(GPU_MACHINE): devtools/gpu_machine.txt | $(BIN)/bentoml
	$(PYTHON) -m devtools.gpu_kit mirror .venv-gpu

test-tooling: tiny-model $(GPU_MACHINE)
	$(MAKE) --jobs=2 --output-sync=target tooling-tests soak
	$(BIN)/pytest -n 2 --dist loadscope --ignore=tests/tooling -m "restarts or thorough" tests

# The soak holds a server busy for SOAK_S (300 s; `SOAK_S=3600 make soak` for an hour, then
# prints its request counts and memory), so it runs beside the tooling's other tests: on one
# of their two pytest workers it would be the last to end, with whatever module pytest-xdist
# queued behind it.
.PHONY: tooling-tests soak
tooling-tests: tiny-model $(GPU_MACHINE)
	$(BIN)/pytest -n 2 --dist loadscope --ignore=tests/tooling/test_soak.py tests/tooling

soak: tiny-model
	$(BIN)/pytest -s tests/tooling/test_soak.py

# Figures, never a failure: `make bench BENCH_ARGS="--compare old.json"` compares two runs.
bench: tiny-model
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The GPU tier on a full-size SDXL + Canny ControlNet with random weights, built into
# FULL_SIZE_MODEL (about 9.5 GB; no hub), all within BENCH_GPU_BUDGET_S (default 540 s).
# Without CUDA it says so and exits 0. `make bench-gpu BENCH_GPU_ARGS=--full`; `python -m bench.gpu -h`.
FULL_SIZE_MODEL ?= models/full-size
.PHONY: bench-gpu gpu-kit
bench-gpu: | $(BIN)/bentoml
	$(BIN)/python -m bench.gpu --model-dir $(FULL_SIZE_MODEL) $(BENCH_GPU_ARGS)

# The same on a rented GPU machine without network: copy gpu-kit/ there, then run
# `scripts/gpu-bench.sh OUT` in it (docs/performance.md).
gpu-kit: | $(BIN)/bentoml
	$(BIN)/python -m devtools.gpu_kit build gpu-kit

lint: $(BIN)/bentoml
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) models wheels gpu-kit .venv-gpu .venv-gpu.lock

# The production image: CUDA torch from PyPI and the real model ids. Several GB: built only when asked.
image: | $(BIN)/bentoml
	$(CONTAINER) build-image gpu

# The CPU image, for CPU hosts, tests and CI.
image-cpu: $(TORCH_CPU_WHEEL) | $(BIN)/bentoml
	$(CONTAINER) build-image cpu

# PyTorch's CPU build, from wherever the host's pip configuration finds it: an index or a
# find-links folder that carries PyTorch's CPU wheels (PyPI has only the CUDA build).
$(TORCH_CPU_WHEEL): | $(BIN)/bentoml
	$(BIN)/pip download --no-deps --dest $(@D) torch==2.13.0+cpu

# save_pretrained writes weights as 0600, and the image runs as a non-root user.
readable-model: tiny-model
	chmod -R a+rX $(TINY_MODEL)

# Like `make serve`, from the CPU image; Ctrl-C stops and removes the container.
image-run: image-cpu readable-model
	$(CONTAINER) run --rm -p 127.0.0.1:$(PORT):3000 -v $(CURDIR)/$(TINY_MODEL):/models/tiny:ro \
		-e SDXL_BASE_MODEL=/models/tiny/base -e SDXL_CONTROLNET_MODEL=/models/tiny/controlnet \
		-e SDXL_VAE_MODEL=/models/tiny/vae -e SDXL_PREVIEW_MODEL=/models/tiny/preview $(CPU_IMAGE)

image-test: image-cpu readable-model
	SDXL_TEST_IMAGE=$(CPU_IMAGE) $(BIN)/pytest -m image
