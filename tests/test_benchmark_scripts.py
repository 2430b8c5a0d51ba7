"""scripts/benchmarks/benchmark_model.py, benchmark_op.py and benchmark_loader.py run end to end on tiny CPU
problems (the figures themselves belong in docs/benchmarks.md, not in tests) and refuse bad input in one line."""
import json
import os

import pytest

from support.runner import ROOT, load_script, run_script

pytestmark = pytest.mark.slow  # the benchmark scripts as subprocesses, each starting Python with torch and timm

ENV_KEYS = {'device', 'device_name', 'torch', 'threads', 'date'}


def _run(script, *args):
    return run_script(f'scripts/benchmarks/{script}', *args)


def test_benchmark_model_times_models_side_by_side(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = _run('benchmark_model.py', '--models', 'ddf_resnet26', 'resnet18', '--batch-size', '2', '--img-size', '32',
                '--warmup', '0', '--rounds', '1', '--mode', 'train', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['model'] for r in rows] == ['ddf_resnet26', 'resnet18']
    assert rows[1]['ratio_to_last'] == 1.0 and all(r['ms_per_batch'] > 0 for r in rows)
    assert all(ENV_KEYS <= r.keys() and r['mode'] == 'train' for r in rows)
    assert proc.stdout.strip().splitlines()[-2:] == out.read_text().strip().splitlines()


def test_benchmark_op_covers_dtypes_formats_and_modes(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = _run('benchmark_op.py', '--device', 'cpu', '--shapes', '1x4x9x7', '--dtypes', 'fp32', 'bf16',
                '--warmup', '0', '--rounds', '1', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r['dtype'], r['format'], r['mode']) for r in rows} == {
        (d, f, m) for d in ('fp32', 'bf16') for f in ('nchw', 'nhwc') for m in ('forward', 'fwd+bwd')}
    assert all(ENV_KEYS <= r.keys() and r['ddf_ms'] > 0 and r['reference_ms'] > 0 for r in rows)
    assert all(r['triton_ms'] is None and r['triton_first_call_ms'] is None for r in rows)  # without --triton


def test_benchmark_op_times_the_triton_kernels_beside_the_others(tmp_path):
    # On CPU tensors under triton's interpreter: the plumbing, not the figures.
    out = tmp_path / 'rows.jsonl'
    proc = run_script('scripts/benchmarks/benchmark_op.py', '--device', 'cpu', '--shapes', '1x4x5x5', '--dtypes',
                      'fp32', '--formats', 'nhwc', '--warmup', '0', '--rounds', '1', '--triton', '--json', str(out),
                      env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['mode'] for r in rows] == ['forward', 'fwd+bwd']
    assert all(r['triton_ms'] > 0 and r['triton_first_call_ms'] > 0 and r['ddf_ms'] > 0 for r in rows)
    assert all(r['ratio_triton_dwconv'] > 0 and r['triton_gbps'] is not None and r['triton_pct_peak'] is None for r in rows)
    assert '1st call' in proc.stdout.splitlines()[1]


@pytest.mark.parametrize('script, args, message', [
    ('benchmark_model.py', ['--device', 'meta'], "device 'meta' is not usable"),
    ('benchmark_model.py', ['--models', 'ddf_resnet27'], "unknown model 'ddf_resnet27'"),
    ('benchmark_model.py', ['--models', 'resnet18', '--mode', 'train', '--batch-size', '1', '--img-size', '32'],
     'resnet18 cannot run this input: Expected more than 1 value per channel'),  # BatchNorm on 1x1 features
    ('benchmark_op.py', ['--device', 'meta'], "device 'meta' is not usable"),
    ('benchmark_op.py', ['--shapes', '1x2x3'], 'BxCxHxW'),
    ('benchmark_op.py', ['--device', 'cpu', '--triton'], '--triton on a CPU device needs TRITON_INTERPRET=1'),
])
def test_benchmark_scripts_reject_bad_input(script, args, message):
    proc = _run(script, *args)
    assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr


def test_benchmark_loader_measures_and_suggests_workers(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = run_script('scripts/benchmarks/benchmark_loader', '--config', ROOT / 'configs' / 'ddf_resnet50_in1k.yaml',
                      '--sample-jpegs', '8', '--images', '8', '--batch-size', '4', '--workers', '1', '--repeats', '1',
                      '--model', 'resnet18', '--img-size', '64', '--model-batch', '1', '--json', out,
                      cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r['stage'], r['workers']) for r in rows if 'workers' in r and r['stage'] != 'suggestion'] == [
        ('decode', 1), ('train', 0), ('train', 1), ('eval', 0), ('eval', 1)]
    assert all(r['images_per_sec'] > 0 for r in rows if r['stage'] != 'suggestion')
    model, suggestion = rows[-2], rows[-1]
    assert model['stage'] == 'model_train_step' and suggestion['stage'] == 'suggestion'
    per_worker = max(r['images_per_sec_per_worker'] for r in rows if r['stage'] == 'train' and r['workers'])
    assert suggestion['workers'] == -(-model['images_per_sec'] // per_worker)
    assert f'needs --workers {suggestion["workers"]}' in proc.stdout
    bad = run_script('scripts/benchmarks/benchmark_loader', '--workers', '0', cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith('benchmark_loader.py: error: ') and len(
        bad.stderr.splitlines()) == 1


PTXAS = """\
ptxas info    : Compiling entry function '_Z6kernelILi3EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi3EEvPf
    16 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 65 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4copyPf' for 'sm_90'
ptxas info    : Function properties for _Z4copyPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_kernel_resources_reads_ptxas_and_computes_occupancy():
    # The compile-only report's arithmetic (compiling every kernel takes minutes: not run here).
    module = load_script('scripts/benchmarks/kernel_resources')
    rows = module.parse(PTXAS)
    assert rows == [dict(mangled='_Z6kernelILi3EEvPf', registers=65, spill_stores=20, spill_loads=24, stack=16, smem=1024),
                    dict(mangled='_Z4copyPf', registers=32, spill_stores=0, spill_loads=0, stack=0, smem=0)]
    # 256-thread blocks: 64 registers fit 4 blocks (50%); 65 round up to 72 per thread, 3 blocks (37.5%);
    # 32 registers: 8 blocks, all 64 warps; 100 KiB of shared memory per block: 2 blocks on sm_90, 1 on sm_80.
    assert module.occupancy(64, 0, 90) == (0.5, 'registers')
    assert module.occupancy(65, 1024, 90) == (0.375, 'registers')
    assert module.occupancy(32, 0, 80) == (1.0, 'threads')
    assert module.occupancy(32, 100 * 1024, 90) == (0.25, 'shared memory')
    assert module.occupancy(32, 100 * 1024, 80) == (0.125, 'shared memory')


def test_cuda_kernels_meet_the_occupancy_targets_on_sm90():
    # Compiles csrc/cuda for sm_90 with ptxas' resource usage (about two minutes on two cores, no GPU): a
    # kernel change that spills at k = 3 or falls off the occupancy targets fails here, not on a lent GPU.
    nvcc = os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'bin', 'nvcc')
    if not os.access(nvcc, os.X_OK):
        pytest.skip(f'needs nvcc (none at {nvcc}; set CUDA_HOME to the CUDA toolkit root)')
    proc = run_script('scripts/benchmarks/kernel_resources.py', '--arch', '90', '--check', timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert 'every k = 3 / 5 / 7 instantiation meets the occupancy targets' in proc.stdout


def test_kernel_resources_check_flags_the_kernels_below_the_targets():
    module = load_script('scripts/benchmarks/kernel_resources')

    def row(kernel, registers, spills=0, arch='sm_90'):
        return dict(arch=arch, kernel=kernel, registers=registers, spill_stores=spills, spill_loads=spills,
                    occupancy=module.occupancy(registers, 0, int(arch[3:]))[0])

    rows = [row('grad_sf_nchw_kernel<Half, 3>', 64), row('forward_nchw_kernel<float, 5>', 128),
            row('grad_cf_nhwc_kernel<double, 7>', 255, spills=400), row('forward_nchw_kernel<float, 0>', 200)]
    assert module.misses(rows) == []  # at the targets; float64 and the run-time-k kernel exempt
    missed = module.misses([row('grad_sf_nchw_kernel<Half, 3>', 65), row('grad_cf_nchw_kernel<float, 3>', 48, 4),
                            row('grad_sf_nchw_kernel<BFloat16, 7>', 129)])
    assert [m.split(':')[0] for m in missed] == ['sm_90 grad_sf_nchw_kernel<Half, 3>', 'sm_90 grad_cf_nchw_kernel<float, 3>',
                                                'sm_90 grad_sf_nchw_kernel<BFloat16, 7>']
    assert '37.5% occupancy (target 50%, no spills)' in missed[0] and '8 bytes spilled' in missed[1]
