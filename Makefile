# The README's two commands on a fresh machine:
#   make demo       install into a virtualenv, train a DDF-ResNet-26 on the embedded demo dataset (CPU, minutes), validate it
#   make test       install into a virtualenv, run the fast tier of the test suite (before every commit)
# and CI's (.ci/run):
#   make test-all   the whole suite: the slow tier and the sanitizer runs included
# VENV (default .venv) is created if missing and reused afterwards; the install is the README's.
VENV ?= .venv
PYTHON ?= python3
# The install compiles the CUDA kernels when a GPU is visible, or when TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX")
# or DDFNET_BUILD_CUDA=1 asks for them (setup.py); on a machine without a GPU, the CPU kernel alone.
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

BIN := $(VENV)/bin
INSTALLED := $(VENV)/.ddfnet-installed

.PHONY: setup demo test test-all emulation test-sanitizers

setup: $(INSTALLED)

# The whole install (from the package index) when the packaging changes or on the first run; when only the
# native sources changed, the extension alone is rebuilt, offline.
define INSTALL
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install setuptools wheel ninja
	$(BIN)/pip install --no-build-isolation -e ".[test,onnx,wds,detection]"
endef
$(INSTALLED): setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(if $(filter setup.py pyproject.toml,$?),$(INSTALL),$(BIN)/pip install --no-build-isolation --no-deps --no-index -e .)
	touch $@

demo: setup
	$(BIN)/python train.py --config configs/demo.yaml --resume auto
	$(BIN)/python validate.py --config configs/demo.yaml --checkpoint output/demo/best.pth.tar

# The fast tier: every test not marked slow (the marks are beside the tests: a file's pytestmark, a test's
# decorator, a parameter's marks); under 3 minutes on 2 cores, and no network.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# Everything: the fast and the slow tier (timm's own model tests, fetched from timm's sdist on the package
# index; torchrun and elastic runs; export, ONNX and torch.compile; the CUDA kernels on the CPU, plain and
# under the sanitizers; the dry run of scripts/gpu_check.sh). The slowest tests are listed at the end.
# TEST_WORKERS pytest-xdist processes (default 2, the CI machine's cores), one intra-op thread each; a
# worker starts with half of the tests and takes over the other's remaining ones when it runs out (worksteal).
# PYTEST_ARGS: more pytest options (.ci/run adds a junit file, whose skips it checks).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test-all: setup emulation
	DDFNET_TEST_SANITIZERS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests \
		--durations=25 $(PYTEST_ARGS)

# The CUDA kernels compiled for the CPU (test-only; tests/support/cuda_emulation): built once and
# cached, then run by tests/test_kernels.py (backend 'emu') and tests/test_cuda_emulation.py.
emulation: setup
	PYTHONPATH=tests $(BIN)/python -c "import support.cuda_emulation as emulation; emulation.load('plain')"

# The emulated kernels under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer
# (threads mode) alone (test-all runs them too): each variant is built on first use (minutes), then a
# subset runs against the reference.
test-sanitizers: setup
	DDFNET_TEST_SANITIZERS=1 $(BIN)/python -m pytest -q tests/test_cuda_emulation.py -k sanitizers
