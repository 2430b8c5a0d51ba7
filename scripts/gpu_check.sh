#!/usr/bin/env bash
# Everything this project needs from a GPU, in one call on a fresh machine (an H100 by default, sometimes an
# H200): check the environment, build the extension for sm_90 with all cores, run exactly the CUDA cases of
# the tests (tests/test_kernels.py's cuda backend, tests/test_cuda.py, and the Triton kernels' cuda cases in
# tests/test_triton.py, compiled for the GPU), time the op on DDF-ResNet-50's layer shapes and the paper's
# shapes (fp32/bf16, NCHW/NHWC, forward and forward+backward, next to the depth-wise 3x3 conv, % of the
# device's HBM bandwidth; on the layer shapes the Triton kernels too, autotuned, with the time of their first
# call: compiling and autotuning), train.py with the native kernels next to the
# reference, the model benchmark (ddf_resnet50 / resnet50, AMP bf16, channels_last, training and inference
# images/s and peak memory; eager, then torch.compile) and a profiler table of one training step.
#
#   scripts/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# Each part runs under `timeout` with its cap (CAPS below; they add up to the default budget, 540 s, so the
# call ends within 9 minutes); the next part runs whatever happened, and a part the budget has no time left
# for is skipped. Parts run in the order of what they are worth. The environment part stops the call at
# once (one line) when no GPU is visible, nvcc's CUDA major version differs from torch's, or ninja is
# missing: the build would fail or crawl. The CUDA test part fails when any selected test skips. Logs and
# results go to a scratch folder, packed after each part into $OUT/results.tar.gz (a GPU call brings back
# only a few files); $OUT/summary.txt has one line per part (ok / failed / timed out / skipped, seconds),
# printed last. $OUT defaults to output/gpu_check. Exit status 0 when every part ran and passed.
#
# --dry-run: what would waste the call, found on the CPU: the CUDA test part collects the GPU call's
# selection (pytest --collect-only) and fails unless it is exactly the CUDA cases, the caps are checked
# against the budget, and every other part runs on the CPU on tiny problems (the extension already built
# here; the CUDA tests' stand-in is chosen in cuda_tests_stand_in below; the Triton kernels are timed under
# triton's interpreter, TRITON_INTERPRET=1). tests/test_gpu_check.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DEFAULT_BUDGET=540
DRY_RUN=0
BUDGET=${GPU_CHECK_BUDGET:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET=${2:-}; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (use --dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
BUDGET=${BUDGET:-$([ $DRY_RUN = 1 ] && echo 900 || echo $DEFAULT_BUDGET)}  # the dry run: 2 slow cores
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 30 ]; then
  echo "gpu_check.sh: error: --budget must be a whole number of seconds >= 30, got '$BUDGET'" >&2
  exit 2
fi

# The GPU call's parts in order, each with its cap in seconds. Together they fit the default budget
# (the dry run fails otherwise).
PARTS=(environment build test_cuda op_layers train_native train_reference train_compare model_50 compile_50
       profile op_paper)
# The Triton kernels add to test_cuda (about 150 compilations) and op_layers (autotuning 4 kernels x 4
# configurations per shape, dtype and format); the training and model parts give up a little each.
declare -A CAPS=([environment]=15 [build]=135 [test_cuda]=110 [op_layers]=70 [train_native]=45
                 [train_reference]=30 [train_compare]=10 [model_50]=20 [compile_50]=70 [profile]=15 [op_paper]=20)
# The dry run's own caps where the CPU needs longer (collecting the op grid twice on 2 busy cores; the
# Triton kernels interpreted, seconds per call).
declare -A DRY_CAPS=([test_cuda]=300 [op_layers]=240 [train_native]=120 [train_reference]=90 [compile_50]=120)
cap() { if [ $DRY_RUN = 1 ] && [ -n "${DRY_CAPS[$1]:-}" ]; then echo "${DRY_CAPS[$1]}"; else echo "${CAPS[$1]}"; fi; }
CAPS_TOTAL=0
for name in "${PARTS[@]}"; do CAPS_TOTAL=$((CAPS_TOTAL + CAPS[$name])); done

PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/output/gpu_check}
mkdir -p "$OUT" || { echo "gpu_check.sh: error: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DDFNET_CACHE="$WORK/cache"   # the demo dataset, generated once for both training runs
CORES=$(nproc)
START=$SECONDS
DEADLINE=$((START + BUDGET))
NOTES=()
SUMMARY=()
INCOMPLETE=0   # parts that failed, timed out or were skipped for lack of time: the exit status is 1

STOPPED=''     # set when the environment part fails: every later part is skipped with this reason

# The GPU call's test selection, by mark (tests/support/backends.py marks each backend's cases; test_cuda.py
# is marked cuda throughout; test_triton.py's cuda cases run the Triton kernels on CUDA tensors): the cuda
# cases and the GPU-only tests, never the emulation's (it is not built on the GPU machine), the CPU kernel's
# nor the Triton interpreter's (make test-all runs those).
CUDA_TEST_FILES='tests/test_kernels.py tests/test_cuda.py tests/test_triton.py'
CUDA_SELECTION='cuda and not emu'
# The dry run's stand-in for the GPU, in this one place: the CUDA kernels' own source compiled against the
# emulation layer (CPU tensors, torch.ops.ddfnet_emu) when that test-only extension is already built here,
# else the CPU kernel; a few dozen of the grid's cases, since make test-all runs the whole grid on both.
DRY_RUN_CUDA_TESTS='matches_reference and float32 and nchw and mul'
cuda_tests_stand_in() {
  if PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import support.cuda_emulation as emulation
import sys; sys.exit(0 if emulation.is_built('plain') else 1)" >/dev/null 2>&1; then
    echo emu; else echo cpu; fi
}

pack() {  # the results so far, replaced atomically (a call cut short still brings back the last parts)
  tar -czf "$OUT/results.tar.gz.partial" -C "$WORK" --exclude=cache --exclude=runs . \
    && mv -f "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}

skip() {  # skip NAME REASON
  SUMMARY+=("$(printf '%-18s %-26s %5s s' "$1" "skipped ($2)" 0)")
  INCOMPLETE=$((INCOMPLETE + 1))
  echo "gpu_check: $1 skipped: $2"
}

# part NAME COMMAND...: run COMMAND for at most the part's cap (less if the budget ends sooner), output in
# NAME.log, and record ok / failed / timed out / skipped with its seconds.
part() {
  local name=$1 cap status rc begin
  shift
  cap=$(cap "$name")
  local left=$((DEADLINE - SECONDS - 5))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ -n "$STOPPED" ]; then skip "$name" "$STOPPED"; return; fi
  if [ "$cap" -lt 10 ]; then skip "$name" 'budget spent'; return; fi
  echo "gpu_check: $name (at most $cap s) ..."
  begin=$SECONDS
  # timeout signals the command's whole process group (DataLoader workers, torchrun children too). A
  # function of this script runs in a child bash that gets the functions and the settings it reads.
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=10 "$cap" bash -c "set -o pipefail; $(declare -f); $(declare -p $SHARED); \"\$@\"" \
      "$name" "$@" >"$WORK/$name.log" 2>&1
  else
    timeout --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after $cap s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  SUMMARY+=("$(printf '%-18s %-26s %5s s' "$name" "$status" $((SECONDS - begin)))")
  echo "gpu_check: $name: $status, $((SECONDS - begin)) s (log: $name.log)"
  if [ $rc -ne 0 ]; then
    INCOMPLETE=$((INCOMPLETE + 1))
    tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
  fi
  pack
  return $rc
}

if [ $DRY_RUN = 1 ]; then
  DEVICE=cpu
  OP_PAPER=(--shapes 1x8x12x12 1x8x9x13 --dtypes fp32 bf16 --warmup 0 --rounds 1)
  OP_LAYERS=(--model-layers ddf_resnet26 --layer-batch 1 --layer-img-size 32 --dtypes fp32 --formats nhwc
             --warmup 0 --rounds 1 --triton)
  OP_INTERPRET=1  # op_layers times the Triton kernels on CPU tensors: under triton's interpreter
  PAIR=(ddf_resnet26 resnet18)
  # float32: bfloat16 convolutions are slow on this CPU, and the dry run checks the plumbing, not the figures;
  # for the same reason compile uses the eager backend (inductor's C++ build takes minutes here).
  MODEL=(--batch-size 2 --img-size 32 --warmup 0 --rounds 1 --amp none --channels-last)
  COMPILE=eager
  TRAIN=(--model ddf_resnet26 --model-kwargs '{layers: [1, 1, 1, 1]}' --img-size 32 --batch-size 8
         --demo-per-class 4 --workers 0 --channels-last)
  EPOCHS_NATIVE=2 EPOCHS_REFERENCE=1 STEPS_PER_EPOCH=4
  STAND_IN=$(cuda_tests_stand_in)
  NOTES+=("dry run on the CPU: the GPU call's test selection collected and checked; the op grid's $STAND_IN backend ran in place of cuda")
else
  DEVICE=cuda
  # No reference path here: at these sizes it alone would take the part's time. The Triton kernels on the
  # layer shapes only: autotuning the paper's large shapes would take op_paper's cap several times over.
  OP_PAPER=(--shapes 32x256x56x56 32x256x112x112 32x256x224x224 2x256x200x300 --no-reference --warmup 3 --rounds 10)
  OP_LAYERS=(--model-layers ddf_resnet50 --layer-batch 256 --no-reference --warmup 3 --rounds 10 --triton)
  OP_INTERPRET=0
  PAIR=(ddf_resnet50 resnet50)
  MODEL=(--batch-size 256 --img-size 224 --warmup 3 --rounds 10 --amp bf16 --channels-last)
  COMPILE=inductor
  # 200 demo images per class (8 classes) at batch 64: 25 steps an epoch.
  TRAIN=(--model ddf_resnet50 --img-size 224 --batch-size 64 --demo-per-class 200 --workers $((CORES < 8 ? CORES : 8))
         --amp --amp-dtype bfloat16 --channels-last)
  EPOCHS_NATIVE=8 EPOCHS_REFERENCE=4 STEPS_PER_EPOCH=25
fi
SHARED='PY DEVICE DRY_RUN ROOT WORK CORES TRAIN STEPS_PER_EPOCH CUDA_TEST_FILES CUDA_SELECTION DRY_RUN_CUDA_TESTS STAND_IN CAPS_TOTAL DEFAULT_BUDGET'
STAND_IN=${STAND_IN:-}

# The machine can build and run the CUDA kernels: a visible GPU, nvcc of torch's CUDA major version (torch
# refuses to build with another), ninja (without it the build runs one file at a time). The dry run checks
# the caps against the GPU call's budget instead of the GPU.
environment() {
  date -u +%FT%TZ
  uname -a
  echo "cores: $CORES"
  command -v nvidia-smi >/dev/null && nvidia-smi
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
  echo "parts: caps add up to $CAPS_TOTAL s of the GPU call's $DEFAULT_BUDGET s budget"
  if [ "$CAPS_TOTAL" -gt "$DEFAULT_BUDGET" ]; then
    echo "gpu_check: the parts' caps ($CAPS_TOTAL s) exceed the budget ($DEFAULT_BUDGET s)"; return 1
  fi
  local torch_cuda nvcc_cuda
  torch_cuda=$("$PY" -c 'import sys, torch, timm
print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, file=sys.stderr)
print(torch.version.cuda or "", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")') || return 1
  echo "torch: CUDA ${torch_cuda}"
  local cuda_home=${CUDA_HOME:-/usr/local/cuda}
  nvcc_cuda=$("$cuda_home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  echo "nvcc ($cuda_home/bin/nvcc): ${nvcc_cuda:-not found}; ninja: $(command -v ninja || echo 'not found')"
  [ $DRY_RUN = 1 ] && return 0
  set -- $torch_cuda
  [ "${2:-}" = True ] || { echo "gpu_check: no visible GPU (torch.cuda.is_available() is False, torch CUDA ${1:-none})"; return 1; }
  [ -n "$nvcc_cuda" ] || { echo "gpu_check: no nvcc under CUDA_HOME=$cuda_home"; return 1; }
  [ "${nvcc_cuda%%.*}" = "${1%%.*}" ] || {
    echo "gpu_check: nvcc is CUDA $nvcc_cuda, torch was built with CUDA $1: the extension cannot build"; return 1; }
  command -v ninja >/dev/null || { echo 'gpu_check: ninja is missing (pip install ninja): the build would run one file at a time'; return 1; }
}

build() {
  if [ $DRY_RUN = 1 ]; then  # the extension of this checkout, as built here; no rebuild
    echo "dry run: would run TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$CORES $PY -m pip install --no-index --no-deps --no-build-isolation -e ."
  else
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$CORES \
      "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  "$PY" -c "import ddfnet._C as C, ddfnet; print('ddfnet._C', C.__file__, 'with_cuda', C.with_cuda,
'implementation', ddfnet.ops.implementation('$DEVICE'))"
}

# 'native' when the op runs this build's kernels on the device (bounded: a failed build must not start an
# unbounded JIT compile here).
implementation() {
  timeout --kill-after=5 60 "$PY" -c "import ddfnet; print(ddfnet.ops.implementation('$DEVICE'))" 2>/dev/null | tail -n 1
}

# The tests a junit file records: fails when none ran, or any failed, errored or skipped.
junit_verdict() {
  "$PY" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
counts = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
print('junit:', counts)
for case in suite.iter('testcase'):
    for skipped in case.findall('skipped'):
        print(f"SKIPPED {case.get('classname')}.{case.get('name')}: {skipped.get('message')}")
sys.exit(0 if counts['tests'] and not counts['failures'] + counts['errors'] + counts['skipped'] else 1)
PY
}

# The GPU call's selection, collected: it must be exactly the cases with the cuda backend in test_kernels.py
# and test_triton.py and every case of test_cuda.py but the emulation's.
check_cuda_selection() {
  "$PY" -m pytest --collect-only -q -p no:cacheprovider -p no:randomly $CUDA_TEST_FILES >"$WORK/test_cuda_all.txt" || return 1
  "$PY" -m pytest --collect-only -q -p no:cacheprovider -p no:randomly -m "$CUDA_SELECTION" $CUDA_TEST_FILES \
    >"$WORK/test_cuda_selection.txt" || return 1
  "$PY" - "$WORK/test_cuda_all.txt" "$WORK/test_cuda_selection.txt" <<'PY'
import re, sys
def ids(path):
    return [line.strip() for line in open(path) if '::' in line]
def params(node):
    match = re.search(r'\[(.*)\]$', node)
    return set(match.group(1).split('-')) if match else set()
every, selected = ids(sys.argv[1]), ids(sys.argv[2])
want = [n for n in every if 'emu' not in params(n)
        and (n.startswith('tests/test_cuda.py::') or 'cuda' in params(n))]
extra, missing = sorted(set(selected) - set(want)), sorted(set(want) - set(selected))
files = ', '.join(f'{sum(n.startswith(f"tests/{f}::") for n in selected)} in {f}'
                  for f in ('test_kernels.py', 'test_cuda.py', 'test_triton.py'))
print(f'selected {len(selected)} of {len(every)} collected: {files}')
for n in extra[:20]:
    print('SELECTED BUT NOT A CUDA CASE', n)
for n in missing[:20]:
    print('A CUDA CASE NOT SELECTED', n)
sys.exit(0 if selected and not extra and not missing else 1)
PY
}

test_cuda() {
  if [ $DRY_RUN = 1 ]; then
    check_cuda_selection || return 1
    "$PY" -m pytest -q -p no:cacheprovider -p no:randomly tests/test_kernels.py -m "$STAND_IN" \
      -k "$DRY_RUN_CUDA_TESTS" --junitxml="$WORK/test_cuda.xml" || return 1
  else
    "$PY" -m pytest -q -p no:cacheprovider -p no:randomly -m "$CUDA_SELECTION" $CUDA_TEST_FILES -rs \
      --durations=15 --junitxml="$WORK/test_cuda.xml" || return 1
  fi
  junit_verdict "$WORK/test_cuda.xml"
}

train_run() {  # train_run NAME EPOCHS: train.py on the demo data, every step's loss in the log
  local name=$1 epochs=$2
  [ "$name" = reference ] && export DDFNET_FORCE_REFERENCE=1
  "$PY" train.py --config configs/demo.yaml "${TRAIN[@]}" --device $DEVICE --epochs "$epochs" --warmup-epochs 1 \
    --sched step --decay-epochs 1000 --log-interval 1 --checkpoint-interval 1000 --output "$WORK/runs" \
    --experiment "$name"
}
# The two runs' per-step losses side by side. The learning rate is constant after one warm-up epoch
# (a 'step' schedule that never decays), so both runs take the same steps whatever their length.
# ok: all losses finite, step 0 within 2% (same weights and batch, only the op's arithmetic differs), the
# reference run's last third within 10% of the native run's over the same steps (mean), and, for runs of
# 100 steps or more, the native run's last third below its first step.
compare_training() {
  "$PY" - "$WORK/train_native.log" "$WORK/train_reference.log" "$STEPS_PER_EPOCH" "$WORK/train_compare.json" <<'PY'
import json, math, re, sys
native_log, reference_log, per_epoch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
line = re.compile(r'epoch (\d+) \[\s*(\d+)/\d+\] loss (\S+)')
def losses(path):
    found = {}
    for epoch, batch, loss in line.findall(open(path).read()):
        found[int(epoch) * per_epoch + int(batch) - 1] = float(loss)
    return [found[s] for s in sorted(found)]
native, reference = losses(native_log), losses(reference_log)
if not native or not reference:
    sys.exit(f'no loss lines found (native {len(native)}, reference {len(reference)})')
common = min(len(native), len(reference))
third = max(1, common // 3)
mean = lambda xs: sum(xs) / len(xs)
steps = sorted({0, min(100, common - 1), common - 1, len(native) - 1})
print(f'{"step":>6}{"native":>10}{"reference":>11}')
for s in steps:
    ref = f'{reference[s]:.4f}' if s < len(reference) else '-'
    print(f'{s:>6}{native[s]:>10.4f}{ref:>11}')
late_native, late_reference = mean(native[common - third:common]), mean(reference[common - third:common])
checks = {
    'all finite': all(math.isfinite(x) for x in native + reference),
    'step 0 within 2%': abs(native[0] - reference[0]) <= 0.02 * abs(reference[0]),
    f'steps {common - third}-{common - 1} mean within 10%': abs(late_native - late_reference) <= 0.1 * late_reference,
}
if len(native) >= 100:
    checks['native learns (last third below step 0)'] = mean(native[-len(native) // 3:]) < native[0]
print(f'mean loss, steps {common - third}-{common - 1}: native {late_native:.4f}, reference {late_reference:.4f}')
for name, passed in checks.items():
    print(f'{"ok  " if passed else "FAIL"} {name}')
json.dump(dict(native=native, reference=reference, checks=checks), open(out, 'w'))
sys.exit(0 if all(checks.values()) else 1)
PY
}

echo "gpu_check: $([ $DRY_RUN = 1 ] && echo 'dry run, CPU' || echo GPU), budget $BUDGET s, results in $OUT"
part environment environment || STOPPED='environment failed'
part build build
IMPL=$([ -n "$STOPPED" ] || implementation)
if [ -z "$STOPPED" ] && [ "$IMPL" != native ]; then
  # Without this build's kernels every later import would try a JIT compile of csrc/ and fail again;
  # the reference path runs instead and every figure below is the reference's (the CUDA tests fail).
  export DDFNET_FORCE_REFERENCE=1
  NOTES+=("NATIVE KERNELS NOT ACTIVE (implementation: ${IMPL:-unknown}): later parts ran the reference path")
fi
part test_cuda test_cuda
part op_layers env TRITON_INTERPRET=$OP_INTERPRET "$PY" scripts/benchmarks/benchmark_op.py --device $DEVICE "${OP_LAYERS[@]}" --json "$WORK/op_layers.jsonl"
part train_native train_run native $EPOCHS_NATIVE
part train_reference train_run reference $EPOCHS_REFERENCE
part train_compare compare_training
models() {  # models NAME [OPTIONS]: benchmark_model.py on the pair, training and inference, into NAME.jsonl
  local name=$1
  shift
  part "$name" "$PY" scripts/benchmarks/benchmark_model.py --device $DEVICE --models "${PAIR[@]}" --mode train infer \
    "${MODEL[@]}" "$@" --json "$WORK/$name.jsonl"
}
models model_50
models compile_50 --compile $COMPILE
part profile "$PY" scripts/benchmarks/benchmark_model.py --device $DEVICE --models "${PAIR[0]}" --mode train "${MODEL[@]}" \
  --warmup 1 --rounds 2 --profile "$WORK/profile_train_step.txt" --json "$WORK/profile_step.jsonl"
part op_paper "$PY" scripts/benchmarks/benchmark_op.py --device $DEVICE "${OP_PAPER[@]}" --json "$WORK/op_paper.jsonl"

{
  [ -s "$WORK/train_compare.log" ] && { echo 'train.py, loss per step: native kernels vs DDFNET_FORCE_REFERENCE=1'; cat "$WORK/train_compare.log"; echo; }
  echo "gpu_check summary ($([ $DRY_RUN = 1 ] && echo 'dry run' || echo GPU), $((SECONDS - START)) s of $BUDGET; files in results.tar.gz)"
  [ -n "$STOPPED" ] && echo "STOPPED: $(grep '^gpu_check: ' "$WORK/environment.log" | tail -n 1)"
  for note in "${NOTES[@]}"; do echo "note: $note"; done
  printf '%s\n' "${SUMMARY[@]}"
} >"$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/summary.txt.partial" && mv -f "$OUT/summary.txt.partial" "$OUT/summary.txt"
pack
cat "$OUT/summary.txt"
[ $INCOMPLETE = 0 ]
