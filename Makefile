# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse a virtualenv, install pyprune into it in editable mode with
# build isolation off (so the C++/CUDA extension builds against the installed
# torch), then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
PYTEST_ARGS ?=
# `make test` runs the tests in this many processes (pytest-xdist), each test file in
# one of them so that a file's module fixtures are built once; 0 runs them in this one.
PYTEST_WORKERS ?= 2

# The project's shared data and checkpoints, when they sit beside the checkout.
ifneq ($(wildcard $(SHARED)/data),)
export PYPRUNE_DATA ?= $(abspath $(SHARED)/data)
endif
ifneq ($(wildcard $(SHARED)/models),)
export PYPRUNE_MODELS ?= $(abspath $(SHARED)/models)
endif
# /usr/local/bin/nvcc is a wrapper script on these machines, which makes torch guess
# CUDA_HOME=/usr/local and fail to link cudart (see BUILD-NOTES in ../shared).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= 2

STAMP := $(VENV)/.pyprune-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: install demo test test-all bench baselines fuzz asan clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1 pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e '.[test]'
	touch $@

install: $(STAMP)

# The main job: compile the pretrained ResNet-20 to the smallest model within one
# accuracy point of its own (2 min 19 s on 2 cores after the install; --budget-minutes 10 caps it).
DEMO_OUT ?= out/resnet20
demo: install
	$(VENV)/bin/pyprune compile --arch resnet20 --pretrained --download --max-drop 0.01 --val-from test \
		--finetune-epochs 0.25 --slim-l1 5e-3 --l1-epochs 0.5 --budget-minutes 10 --force -o $(DEMO_OUT)
	@echo "see $(DEMO_OUT)/report.md and $(DEMO_OUT)/pareto.png; the model is $(DEMO_OUT)/model.ppz, and $(DEMO_OUT)/model.onnx for onnxruntime"
	@echo "next, from this folder:"
	@echo "  export PYPRUNE_DATA=$(or $(PYPRUNE_DATA),$(abspath data))   # where the data is, for every command below"
	@echo "  $(VENV)/bin/pyprune eval $(DEMO_OUT)/model.ppz --split test-report   # the written file on the held-out test half"
	@echo "  $(VENV)/bin/pyprune inspect $(DEMO_OUT)/model.ppz                     # how each tensor is stored"
	@echo "  $(VENV)/bin/pyprune eval $(DEMO_OUT)/model.ppz --split test-report --runtime auto   # on the sparse kernels"

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Everything, including tests marked slow.
test-all: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "" $(PYTEST_ARGS)

bench: install
	$(PY) bench/sparse_conv.py
	$(PY) bench/huffman.py
	$(PY) bench/end_to_end.py
	$(PY) bench/onnx_export.py
	$(PY) bench/train_throughput.py
	$(PY) bench/search_vs_grid.py
	$(PY) bench/single_vs_combined.py
	$(PY) bench/paper_table.py

# Checkpoints adapted to the JPEG copy of CIFAR-10 (the recipe of ../shared/models/README.md),
# for the models ../shared/models has none of; cached outside the repo (bench/_checkpoints.py).
baselines: install
	$(PY) bench/_checkpoints.py --arch resnet20 --arch resnet56

# The long fuzz run: FUZZ_COUNT structure-aware mutants of each model-file kind (.ppz,
# graph file) through inspect, info and eval, in worker processes (tests/fuzz). Prints
# one row of counts per kind and every finding; fails on any finding, a hang (30 s of CPU
# on one mutant) or a worker over 2 GB. Findings are kept in FUZZ_OUT.
FUZZ_COUNT ?= 20000
FUZZ_OUT ?= /tmp/pyprune-fuzz
fuzz: install
	$(PY) -m tests.fuzz --count $(FUZZ_COUNT) --out $(FUZZ_OUT)

# The container decoder, its fuzz tests and ASAN_FUZZ_COUNT mutants of each model-file
# kind under AddressSanitizer, built in a copy of the tree so the normal extension is
# left alone (docs/format.md, "Fuzzing under ASan").
ASAN_DIR ?= /tmp/pyprune-asan
ASAN_FUZZ_COUNT ?= 2000
asan: install
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	tar --exclude=./.venv --exclude=./build --exclude=./data --exclude=./.git --exclude='*.so' -cf - . | tar -C $(ASAN_DIR) -xf -
	cd $(ASAN_DIR) && CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" \
		PYPRUNE_CUDA=0 $(abspath $(PY)) setup.py build_ext --inplace
	cd $(ASAN_DIR) && PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		$(abspath $(PY)) -m pytest -p no:cacheprovider -s -m "" \
		tests/encode/test_ppz_fuzz.py tests/encode/test_ppz_v2.py tests/encode/test_ppz.py tests/encode/test_huffman.py \
		tests/encode/test_hostile_ppz.py tests/fuzz
	cd $(ASAN_DIR) && PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		$(abspath $(PY)) -m tests.fuzz --count $(ASAN_FUZZ_COUNT) --max-rss-mb 8192 --out $(ASAN_DIR)/fuzz

clean:
	rm -rf build *.egg-info pyprune/*.so
