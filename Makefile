# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mplus-installed
NATIVE := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

.PHONY: demo test test-fast bench cuda-check clean

$(STAMP): $(NATIVE)
	VENV=$(VENV) bash scripts/bootstrap.sh

demo: $(STAMP)
	$(VENV)/bin/mplus-fast demo

# The whole suite: unit + parity tests, Triton kernels under the CPU interpreter, and every
# benchmark run once untimed so none can rot.
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest bench -q --benchmark-disable

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -x -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf build *.egg-info mplus_fast/_C*.so mplus_fast/_build_info.py

cuda-check:
	bash scripts/cuda_compile_check.sh
