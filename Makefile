# Set-up and the two entry points of the README: `make demo` and `make test`.
# Both create .venv when it is missing.
#
#   TORCH=torch==2.13.0   (default) a pinned CPU-capable wheel; an unpinned torch would pull a CUDA build
#   TORCH=system          keep the torch (and the triton it chose) of the Python that runs make:
#                         the venv is created with --system-site-packages and torch is not installed
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
PY := $(VENV)/bin/python
# onnx + onnxruntime: the ONNX export and its ONNX Runtime check (`fai-mf export`, the onnxruntime runtime)
ONNX_DEPS := onnx==1.23.2 onnxruntime==1.31.1
DEPS := numpy scipy pycocotools pillow matplotlib pytest pytest-benchmark ninja "setuptools>=77" wheel $(ONNX_DEPS)

ifeq ($(TORCH),system)
VENV_FLAGS := --system-site-packages
TORCH_PKGS :=
else
VENV_FLAGS :=
TORCH_PKGS := $(TORCH) $(TRITON)
endif

.PHONY: venv test demo aot ext clean
venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS) $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# GPU readiness (every Triton kernel compiled afresh for sm_75/80/90: no cache hit can hide a failure;
# no spills, shared memory within limits),
# the microbenchmarks in quick mode (so they cannot rot; no timing is asserted), then the test suite.
test: venv
	TRITON_ALWAYS_COMPILE=1 $(PY) -m mf_kernels.aot --arch 75,80,90 --jobs 2
	$(PY) -m pytest -q bench --benchmark-only --quick -p no:cacheprovider
	$(PY) -m pytest -q tests

aot: venv
	TRITON_ALWAYS_COMPILE=1 $(PY) -m mf_kernels.aot --arch 75,80,90 --jobs 2

# Profile fai-mf-s-coco-ins at 640x640 (random weights unless WEIGHTS=path), reference vs fused kernels.
MODEL ?= fai-mf-s-coco-ins
WEIGHTS ?=
DEMO_ARGS ?= --iters 5 --warmup 1
demo: venv
	mkdir -p out
	$(PY) -m fai_mf.cli bench fps --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) --resolution 640 \
		--kernels auto $(DEMO_ARGS) --json out/demo_fps.json --plot out/demo_fps.png

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
