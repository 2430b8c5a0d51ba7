# The README's two commands on a fresh machine:
#   make demo   install into a virtualenv, train a DDF-ResNet-26 on the embedded demo dataset (CPU, minutes), validate it
#   make test   install into a virtualenv, run the test suite
# VENV (default .venv) is created if missing and reused afterwards; the install is the README's.
VENV ?= .venv
PYTHON ?= python3
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export CUDA_HOME TORCH_CUDA_ARCH_LIST

BIN := $(VENV)/bin
INSTALLED := $(VENV)/.ddfnet-installed

.PHONY: setup demo test

setup: $(INSTALLED)

# Reinstalled when the packaging or the native sources change.
$(INSTALLED): setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install setuptools wheel ninja
	$(BIN)/pip install --no-build-isolation -e ".[test,onnx,wds]"
	touch $@

demo: setup
	$(BIN)/python train.py --config configs/demo.yaml --resume auto
	$(BIN)/python validate.py --config configs/demo.yaml --checkpoint output/demo/best.pth.tar

test: setup
	$(BIN)/python -m pytest -q tests
