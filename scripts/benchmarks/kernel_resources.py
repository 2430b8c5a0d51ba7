"""Registers, spills, shared memory and theoretical occupancy of every CUDA kernel, from the compiler alone.

    python scripts/benchmarks/kernel_resources.py                  # sm_80 and sm_90, a table per arch
    python scripts/benchmarks/kernel_resources.py --arch 90 --json resources.jsonl
    python scripts/benchmarks/kernel_resources.py --arch 90 --check   # exit 1 below the targets

Compiles each csrc/cuda/*.cu with setup.py's nvcc flags (nvcc under $CUDA_HOME, torch's headers) for each
architecture with ptxas' resource usage (``--resource-usage``) and prints one row per kernel
instantiation: registers per thread, spill stores / loads and stack frame (bytes), static shared memory,
and the theoretical occupancy of a full 256-thread block (the kernels' ``__launch_bounds__``): resident
warps per SM / the SM's 64, limited by registers (65,536 per SM, allocated per warp in units of 256), by
shared memory (164 KiB per SM on sm_80, 228 KiB on sm_90, 1 KiB reserved per block) and by threads
(2,048). No GPU needed; minutes per architecture on a small machine.

``--check`` fails (exit status 1, one line per miss) where a float32 / float16 / bfloat16 instantiation
unrolled for k = 3 spills or stays below 50% occupancy, or one for k = 5 / 7 below 25%: the kernel sizes
the models use must not fall off an occupancy cliff (float64 and the run-time-k path are exempt).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREADS = 256  # kThreads in csrc/cuda/ddf_cuda.cuh: every kernel's __launch_bounds__
SM = {80: dict(smem=164 * 1024), 90: dict(smem=228 * 1024)}
REGS_PER_SM, WARP_REG_UNIT, MAX_WARPS, MAX_BLOCKS = 65536, 256, 64, 32


def occupancy(registers: int, smem: int, arch: int, threads: int = THREADS) -> tuple[float, str]:
    """(resident warps / MAX_WARPS, the limit that sets it) for blocks of `threads` threads."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // WARP_REG_UNIT) * WARP_REG_UNIT
    limits = {'threads': min(MAX_WARPS // warps, MAX_BLOCKS),
              'registers': (REGS_PER_SM // per_warp) // warps if per_warp else MAX_BLOCKS,
              'shared memory': SM[arch]['smem'] // (smem + 1024)}
    limit = min(limits, key=limits.get)
    return limits[limit] * warps / MAX_WARPS, limit


def compile_flags() -> list[str]:
    """The extension build's nvcc flags (ddfnet.ops._native, which setup.py and the JIT build use too, and
    torch's own), with torch's and Python's headers."""
    from torch.utils import cpp_extension

    from ddfnet.ops import _native
    python = f'{sys.base_prefix}/include/python{sys.version_info.major}.{sys.version_info.minor}'
    return ['-DDDFNET_WITH_CUDA', *_native.nvcc_flags(), *cpp_extension.COMMON_NVCC_FLAGS, '-std=c++20', f'-I{python}',
            *(f'-I{p}' for p in cpp_extension.include_paths('cuda'))]


def ptxas_report(nvcc: str, source: Path, arch: int, flags: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([nvcc, *flags, f'-gencode=arch=compute_{arch},code=sm_{arch}', '--resource-usage',
                                 '-c', str(source), '-o', os.path.join(tmp, 'out.o')],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'nvcc failed on {source.name} for sm_{arch}:\n{result.stderr[-3000:]}')
    return result.stdout + result.stderr


def parse(report: str) -> list[dict]:
    """One dict per kernel: mangled name, registers, spill bytes, stack, shared memory."""
    rows, current = [], None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = {'mangled': m[1], 'registers': 0, 'spill_stores': 0, 'spill_loads': 0, 'stack': 0, 'smem': 0}
            rows.append(current)
        elif current and (m := re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads',
                                         line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := re.search(r'Used (\d+) registers', line)):
            current['registers'] = int(m[1])
            smem = re.search(r'(\d+) bytes smem', line)
            current['smem'] = int(smem[1]) if smem else 0
    return rows


TARGETS = {3: 0.5, 5: 0.25, 7: 0.25}  # lowest theoretical occupancy per unrolled kernel size


def misses(rows: list[dict]) -> list[str]:
    """The rows below TARGETS (or spilling at k = 3), float64 and the run-time-k kernels (K = 0) exempt."""
    found = []
    for r in rows:
        m = re.search(r'<(\w+), (\d+)>', r['kernel'])
        if not m or m[1] == 'double' or int(m[2]) not in TARGETS:
            continue
        k, spills = int(m[2]), r['spill_stores'] + r['spill_loads']
        if r['occupancy'] < TARGETS[k] or (k == 3 and spills):
            found.append(f'{r["arch"]} {r["kernel"]}: {r["registers"]} registers, {r["occupancy"]:.1%} occupancy '
                         f'(target {TARGETS[k]:.0%}{", no spills" if k == 3 else ""}), {spills} bytes spilled')
    return found


def demangle(names: list[str], nvcc: str) -> list[str]:
    filt = shutil.which('cu++filt', path=str(Path(nvcc).parent)) or shutil.which('c++filt')
    if not filt:
        return names
    out = subprocess.run([filt], input='\n'.join(names), capture_output=True, text=True).stdout.splitlines()
    # 'void ddfnet::ddf_cuda::(anonymous namespace)::forward_nchw_kernel<float, 3>(float const*, ...)'
    # -> 'forward_nchw_kernel<float, 3>'
    def short(name: str) -> str:
        name = re.sub(r'^void |\(anonymous namespace\)::|ddfnet::ddf_cuda::|c10::', '', name)
        return name.split('(')[0]
    return [short(n) for n in out] if len(out) == len(names) else names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', type=int, nargs='+', choices=sorted(SM), default=sorted(SM))
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1, help='nvcc processes at once')
    parser.add_argument('--json', help='also write the rows as JSON lines to this file')
    parser.add_argument('--check', action='store_true', help='exit 1 where a kernel misses the occupancy targets')
    args = parser.parse_args(argv)
    cuda_home = os.environ.get('CUDA_HOME', '/usr/local/cuda')
    nvcc = os.path.join(cuda_home, 'bin', 'nvcc')
    if not os.access(nvcc, os.X_OK):
        parser.error(f'no nvcc at {nvcc} (set CUDA_HOME to the CUDA toolkit root)')
    flags = compile_flags()
    sources = sorted((ROOT / 'csrc' / 'cuda').glob('*.cu'))
    jobs = [(source, arch) for arch in args.arch for source in sources]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        reports = list(pool.map(lambda job: ptxas_report(nvcc, *job, flags), jobs))
    rows = []
    for (source, arch), report in zip(jobs, reports):
        found = parse(report)
        for row, name in zip(found, demangle([r['mangled'] for r in found], nvcc)):
            occ, limit = occupancy(row['registers'], row['smem'], arch)
            rows.append(dict(arch=f'sm_{arch}', file=source.name, kernel=name, **{k: v for k, v in row.items()
                        if k != 'mangled'}, occupancy=round(occ, 3), limited_by=limit))
    for arch in args.arch:
        print(f'\nsm_{arch}, {THREADS}-thread blocks')
        print(f'{"kernel":<52}{"regs":>5}{"spill st/ld":>13}{"stack":>7}{"smem":>7}{"occ":>6}  limit')
        for r in sorted((r for r in rows if r['arch'] == f'sm_{arch}'), key=lambda r: r['kernel']):
            spills = f'{r["spill_stores"]}/{r["spill_loads"]}'
            print(f'{r["kernel"]:<52}{r["registers"]:>5}{spills:>13}{r["stack"]:>7}{r["smem"]:>7}'
                  f'{r["occupancy"]:>6.0%}  {r["limited_by"]}')
    if args.json:
        Path(args.json).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    if args.check:
        found = misses(rows)
        for line in found:
            print(f'below target: {line}', file=sys.stderr)
        print(f'\n{len(found)} instantiation(s) below the occupancy targets' if found else
              '\nevery k = 3 / 5 / 7 instantiation meets the occupancy targets')
        return 1 if found else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
