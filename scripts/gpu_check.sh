#!/usr/bin/env bash
# Everything this project needs from a GPU, in one call on a fresh machine (an H200: sm_90, 4.8 TB/s HBM):
# build the extension for sm_90 with all cores, tests/test_cuda.py, the op benchmark (the paper's shapes and
# DDF-ResNet-50's layer shapes at batch 256; fp32/bf16, NCHW/NHWC, forward and forward+backward, next to
# the depth-wise 3x3 conv and the reference, % of the HBM floor), the model benchmark (ddf_resnet50 /
# resnet50 and ddf_resnet101 / resnet101; AMP bf16, channels_last; training and inference images/s and peak
# memory; eager, then torch.compile), a profiler table of one training step, and 300 bf16 train.py steps
# next to DDFNET_FORCE_REFERENCE=1 on the first 150.
#
#   scripts/gpu_check.sh [--dry-run] [--budget SECONDS]
#
# Each part runs under `timeout` and the next one runs whatever happened; parts still to come when the
# budget (default 480 s, the whole script) runs out are skipped, so the call ends in time. Parts run in
# the order of what they are worth, the ddf_resnet101 timings last. Logs and results go to a scratch
# folder, packed after each part into $OUT/results.tar.gz (a GPU call brings back only a few files);
# $OUT/summary.txt has one line per part (ok / failed / timed out / skipped, seconds), printed last. $OUT
# defaults to output/gpu_check. Exit status 0 when every part that ran passed and none was cut for time.
#
# --dry-run: the same parts on the CPU in about a minute (tiny shapes and models, a few steps, the
# extension already built here); the CUDA test part runs against a stand-in, chosen in
# cuda_tests_stand_in below. The test suite runs it (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
BUDGET=${GPU_CHECK_BUDGET:-480}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET=${2:-}; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (use --dry-run, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 30 ]; then
  echo "gpu_check.sh: error: --budget must be a whole number of seconds >= 30, got '$BUDGET'" >&2
  exit 2
fi

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

# The dry run's stand-in for the GPU in the CUDA test part, in this one place: the CUDA kernels' own source
# compiled against the emulation layer (CPU tensors, torch.ops.ddfnet_emu) when that test-only extension is
# importable, else the CPU kernel (the op grid's cpu backend);
# a few dozen of the file's cases, since make test-all runs the whole file on both.
CUDA_TEST_FILES='tests/test_kernels.py tests/test_cuda.py'   # the op grid on every backend, and the GPU-only tests
DRY_RUN_CUDA_TESTS='matches_reference and float32 and nchw and mul'
cuda_tests_stand_in() {  # the op grid's backend that stands in for cuda: the emulated CUDA kernels, else the CPU kernel
  if PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import support.cuda_emulation as emulation; emulation.load('plain')" \
      >/dev/null 2>&1; then
    echo emu; else echo cpu; fi
}

pack() {  # the results so far, replaced atomically (a call cut short still brings back the last parts)
  tar -czf "$OUT/results.tar.gz.partial" -C "$WORK" --exclude=cache --exclude=runs . \
    && mv -f "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}

# part NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less if the budget ends sooner), output in
# NAME.log, and record ok / failed / timed out / skipped with its seconds.
part() {
  local name=$1 cap=$2 status rc begin
  shift 2
  local left=$((DEADLINE - SECONDS - 5))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 10 ]; then
    SUMMARY+=("$(printf '%-18s %-26s %5s s' "$name" 'skipped (budget spent)' 0)")
    INCOMPLETE=$((INCOMPLETE + 1))
    echo "gpu_check: $name skipped: the budget is spent"
    return
  fi
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
}

if [ $DRY_RUN = 1 ]; then
  DEVICE=cpu
  OP_PAPER=(--shapes 1x8x12x12 1x8x9x13 --dtypes fp32 bf16 --warmup 0 --rounds 1)
  OP_LAYERS=(--model-layers ddf_resnet26 --layer-batch 1 --layer-img-size 32 --dtypes fp32 --formats nhwc
             --warmup 0 --rounds 1)
  PAIR50=(ddf_resnet26 resnet18); PAIR101=()   # the 101 pair would repeat the same small models
  # float32: bfloat16 convolutions are slow on this CPU, and the dry run checks the plumbing, not the figures;
  # for the same reason compile uses the eager backend (inductor's C++ build takes minutes here).
  MODEL=(--batch-size 2 --img-size 32 --warmup 0 --rounds 1 --amp none --channels-last)
  COMPILE=eager
  TRAIN=(--model ddf_resnet26 --model-kwargs '{layers: [1, 1, 1, 1]}' --img-size 32 --batch-size 8
         --demo-per-class 4 --workers 0 --channels-last)
  EPOCHS_NATIVE=2 EPOCHS_REFERENCE=1 STEPS_PER_EPOCH=4
  STAND_IN=$(cuda_tests_stand_in)
  CUDA_TESTS=("$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
              -k "$STAND_IN and $DRY_RUN_CUDA_TESTS" --junitxml="$WORK/test_cuda.xml")
  NOTES+=("dry run on the CPU: the op grid on the $STAND_IN backend in place of cuda")
else
  DEVICE=cuda
  OP_PAPER=(--shapes 32x256x56x56 32x256x112x112 32x256x224x224 2x256x200x300 --warmup 3 --rounds 10)
  OP_LAYERS=(--model-layers ddf_resnet50 --layer-batch 256 --warmup 3 --rounds 10)
  PAIR50=(ddf_resnet50 resnet50); PAIR101=(ddf_resnet101 resnet101)
  MODEL=(--batch-size 256 --img-size 224 --warmup 3 --rounds 10 --amp bf16 --channels-last)
  COMPILE=inductor
  # 400 demo images per class (8 classes) at batch 64: 50 steps an epoch.
  TRAIN=(--model ddf_resnet50 --img-size 224 --batch-size 64 --demo-per-class 400 --workers $((CORES < 8 ? CORES : 8))
         --amp --amp-dtype bfloat16 --channels-last)
  EPOCHS_NATIVE=6 EPOCHS_REFERENCE=3 STEPS_PER_EPOCH=50
  CUDA_TESTS=("$PY" -m pytest -v -p no:cacheprovider $CUDA_TEST_FILES --durations=15 --junitxml="$WORK/test_cuda.xml")
fi
SHARED='PY DEVICE DRY_RUN ROOT WORK CORES TRAIN STEPS_PER_EPOCH'  # what the functions below read

environment() {
  date -u +%FT%TZ
  uname -a
  echo "cores: $CORES"
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version
  "$PY" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "timm", timm.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
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

# 'native' when the op runs this build's kernels on the device.
implementation() {
  "$PY" -c "import ddfnet; print(ddfnet.ops.implementation('$DEVICE'))" 2>/dev/null | tail -n 1
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
part environment 30 environment
part build 240 build
IMPL=$(implementation)
if [ "$IMPL" != native ]; then
  # Without this build's kernels every later import would try a JIT compile of csrc/ and fail again;
  # the reference path runs instead and every figure below is the reference's.
  export DDFNET_FORCE_REFERENCE=1
  NOTES+=("NATIVE KERNELS NOT ACTIVE (implementation: ${IMPL:-unknown}): later parts ran the reference path")
fi
part test_cuda "$([ "$DRY_RUN" = 1 ] && echo 240 || echo 120)" "${CUDA_TESTS[@]}"  # dry run: collecting the op grid on 2 busy cores
part op_layers 60 "$PY" scripts/benchmarks/benchmark_op.py --device $DEVICE "${OP_LAYERS[@]}" --peak-gbps 4800 --json "$WORK/op_layers.jsonl"
part op_paper 60 "$PY" scripts/benchmarks/benchmark_op.py --device $DEVICE "${OP_PAPER[@]}" --peak-gbps 4800 --json "$WORK/op_paper.jsonl"
part train_native 90 train_run native $EPOCHS_NATIVE
part train_reference 80 train_run reference $EPOCHS_REFERENCE
part train_compare 20 compare_training
models() {  # models NAME CAP MODELS... [-- OPTIONS]: benchmark_model.py, training and inference, into NAME.jsonl
  local name=$1 cap=$2 list=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do list+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  if [ ${#list[@]} = 0 ]; then
    SUMMARY+=("$(printf '%-18s %-26s %5s s' "$name" 'skipped (dry run)' 0)")
    return
  fi
  part "$name" "$cap" "$PY" scripts/benchmarks/benchmark_model.py --device $DEVICE --models "${list[@]}" --mode train infer \
    "${MODEL[@]}" "$@" --json "$WORK/$name.jsonl"
}
models model_50 60 "${PAIR50[@]}"
models compile_50 150 "${PAIR50[@]}" -- --compile $COMPILE
part profile 45 "$PY" scripts/benchmarks/benchmark_model.py --device $DEVICE --models "${PAIR50[0]}" --mode train "${MODEL[@]}" \
  --warmup 1 --rounds 2 --profile "$WORK/profile_train_step.txt" --json "$WORK/profile_step.jsonl"
models model_101 60 "${PAIR101[@]}"
models compile_101 150 "${PAIR101[@]}" -- --compile $COMPILE

{
  [ -s "$WORK/train_compare.log" ] && { echo 'train.py, loss per step: native kernels vs DDFNET_FORCE_REFERENCE=1'; cat "$WORK/train_compare.log"; echo; }
  echo "gpu_check summary ($([ $DRY_RUN = 1 ] && echo 'dry run' || echo GPU), $((SECONDS - START)) s of $BUDGET; files in results.tar.gz)"
  for note in "${NOTES[@]}"; do echo "note: $note"; done
  printf '%s\n' "${SUMMARY[@]}"
} >"$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/summary.txt.partial" && mv -f "$OUT/summary.txt.partial" "$OUT/summary.txt"
pack
cat "$OUT/summary.txt"
[ $INCOMPLETE = 0 ]
