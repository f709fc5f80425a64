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
# benchmark run once untimed so none can rot. When setup.py built the native library
# (mplus_fast/_build_info.py), failing to load it is an error, not a silent fall-back to the
# references (whose op tests would then skip).
REQUIRE_EXT = $(shell $(PY) -c "from mplus_fast._build_info import EXT_BUILT; print(int(EXT_BUILT))" 2>/dev/null || echo 0)
test: $(STAMP)
	MPLUS_FAST_REQUIRE_EXT=$(REQUIRE_EXT) $(PY) -m pytest tests -q
	MPLUS_FAST_REQUIRE_EXT=$(REQUIRE_EXT) $(PY) -m pytest bench -q --benchmark-disable

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -x -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf build *.egg-info mplus_fast/_C*.so mplus_fast/_build_info.py

cuda-check:
	bash scripts/cuda_compile_check.sh
