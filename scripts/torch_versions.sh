#!/usr/bin/env bash
# The fast tier of the test suite on each torch version given (default: the floor setup.py declares, 2.11.0
# and 2.15.0), each in a virtualenv of its own with the README's install.
#
#   scripts/torch_versions.sh [VERSION ...]
#
# Each version gets, under $TORCH_VERSIONS_DIR (default: a fresh temporary directory; set it to reuse the
# virtualenvs and their multi-GB torch downloads across runs), a virtualenv torch-VERSION
# and a copy of this checkout src-VERSION (its tracked and untracked, not ignored files: the work tree as
# it is, uncommitted edits included; the checkout itself, its own build included, is left alone). There:
# torch==VERSION and its torchvision (the map below), setuptools wheel ninja, then `pip install
# --no-build-isolation -e ".[test,onnx,wds,detection]"`, which builds the CPU kernels only (CUDA_HOME and CUDA_PATH
# empty: the CUDA build is slow, and the machine's nvcc need not match an older torch's CUDA), and
# `python -m pytest -q -m "not slow" tests`; the output goes to torch-VERSION.log. pip runs with
# PIP_CONFIG_FILE=/dev/null, so that a machine-wide pip configuration (a constraints file capping torch,
# say) does not apply. One summary line per version at the end; the exit status is 1 when any version
# failed to install or to pass. PYTHON (default python3) creates the virtualenvs; PYTEST_ARGS adds pytest
# options.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PYTEST_ARGS=${PYTEST_ARGS:-}

# torch -> the torchvision released with it.
declare -A TORCHVISION=(
  [2.4.1]=0.19.1
  [2.5.1]=0.20.1
  [2.6.0]=0.21.0
  [2.11.0]=0.26.0
  [2.14.1]=0.29.1
  [2.15.0]=0.29.2
)

floor=$(sed -n "s/.*'torch>=\([0-9.]*\)'.*/\1/p" "$ROOT/setup.py")
case $floor in 2.4) floor=2.4.1 ;; 2.5) floor=2.5.1 ;; 2.6) floor=2.6.0 ;; esac
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$floor" 2.11.0 2.15.0)
for v in "${versions[@]}"; do
  if [ -z "${TORCHVISION[$v]:-}" ]; then
    echo "torch_versions: no torchvision known for torch $v; add it to TORCHVISION in $0" >&2
    exit 2
  fi
done

WORK=${TORCH_VERSIONS_DIR:-$(mktemp -d -t ddfnet-torch-versions.XXXXXX)}
mkdir -p "$WORK"
echo "torch_versions: virtualenvs and logs in $WORK" >&2

export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
summary=()
status=0
for v in "${versions[@]}"; do
  venv=$WORK/torch-$v src=$WORK/src-$v log=$WORK/torch-$v.log
  start=$SECONDS
  echo "torch_versions: torch $v: installing (log: $log)" >&2
  (
    set -e
    # A fresh copy each run (pip's editable build compiles the kernels anew anyway), with a git index of
    # the same files: a test reads `git ls-files`.
    rm -rf "$src" && mkdir -p "$src"
    git -C "$ROOT" ls-files -z -co --exclude-standard | tar -C "$ROOT" --null -T - -cf - | tar -C "$src" -xf -
    git -C "$src" init -q && git -C "$src" add -A
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$v" "torchvision==${TORCHVISION[$v]}"
    "$venv/bin/python" -m pip install -q setuptools wheel ninja
    cd "$src" && CUDA_HOME= CUDA_PATH= "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test,onnx,wds,detection]"
  ) >"$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    tail -n 20 "$log" >&2
    summary+=("torch $v: install failed (rc $rc, $((SECONDS - start)) s; see $log)")
    status=1
    continue
  fi
  installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>>"$log")
  echo "torch_versions: torch $v: fast tier" >&2
  # shellcheck disable=SC2086
  (cd "$src" && CUDA_HOME= CUDA_PATH= "$venv/bin/python" -m pytest -q -m "not slow" tests $PYTEST_ARGS) >>"$log" 2>&1
  rc=$?
  counts=$(tail -n 5 "$log" | grep -E '(passed|failed|error|skipped)' | tail -n 1 | sed 's/^=* *//; s/ *=*$//')
  summary+=("torch $v ($installed): rc $rc, ${counts:-no pytest summary}, $((SECONDS - start)) s")
  [ $rc -eq 0 ] || status=1
done

printf '%s\n' "${summary[@]}"
exit $status
