# Set-up and the entry points of the README: `make demo`, `make test` (both create .venv when it is
# missing) and `make gpu-check` (creates nothing: the machine's own Python, torch, triton and nvcc).
#
#   TORCH=torch==2.13.0   (default) a pinned CPU-capable wheel; an unpinned torch would pull a CUDA build
#   TORCH=system          keep the torch (and the triton it chose) of $(PYTHON), the Python that runs make;
#                         PYTHON=/path/to/python names one in another venv. The venv sees every package of
#                         that Python (.ci/system_venv.py), and pip runs only for what is missing: offline is fine
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
PY := $(VENV)/bin/python
# Triton < 3.7's interpreter (the CPU tests) fails with numpy >= 2.4: see mf_kernels.dispatch
OLD_TRITONS := triton==3.2.% triton==3.3.% triton==3.4.% triton==3.5.% triton==3.6.%
NUMPY := $(if $(filter $(OLD_TRITONS),$(TRITON)),numpy<2.4,numpy)
DEPS := scipy pillow pytest pytest-benchmark
# onnx + onnxruntime: the ONNX export and its ONNX Runtime check (`fai-mf export`, the onnxruntime runtime)
ONNX_DEPS := onnx==1.23.2 onnxruntime==1.31.1
OPTIONAL_DEPS := pycocotools matplotlib tqdm ninja $(ONNX_DEPS)
BUILD_DEPS := setuptools>=77 wheel
quote = $(foreach p,$(1),'$(p)')
GPU_CHECK_OUT ?= out/gpu-check

.PHONY: venv test demo aot gpu-check clean
venv: $(VENV)/.ready

ifeq ($(TORCH),system)
$(VENV)/.ready: pyproject.toml setup.py .ci/system_venv.py
	$(PYTHON) .ci/system_venv.py --venv $(VENV) --require "numpy $(DEPS)" --optional "$(OPTIONAL_DEPS) $(BUILD_DEPS)" \
		--project .
	touch $@
else
$(VENV)/.ready: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(TRITON) $(call quote,$(NUMPY) $(DEPS) $(OPTIONAL_DEPS) $(BUILD_DEPS))
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@
endif

# The GPU check in its dry mode (no CUDA device needed: environment, every Triton kernel compiled afresh
# for sm_75/80/90 with no spill and shared memory within limits, the kernel driver in the interpreter),
# the microbenchmarks in quick mode (so they cannot rot; no timing is asserted), then the test suite.
test: venv
	$(PY) bench/gpu_check.py --dry-run --out build/gpu-check-dry
	$(PY) -m pytest -q bench --benchmark-only --quick -p no:cacheprovider
	$(PY) -m pytest -q tests

aot: venv
	TRITON_ALWAYS_COMPILE=1 $(PY) -m mf_kernels.aot --arch 75,80,90 --jobs 2

# On a machine with a CUDA device: build, parity at the model's shapes, the suite, compute-sanitizer, benchmarks;
# one folder of results ($(GPU_CHECK_OUT)/summary.md). Runs from the source tree with $(PYTHON): no venv, no pip.
gpu-check:
	$(PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT)

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
