"""Registers and spills of every Triton DDF kernel x autotune configuration, compiled for sm_80 and sm_90.

No GPU needed: triton.compile builds each cubin for a named target, and cuobjdump (shipped with triton)
reads its resource usage. Each kernel is compiled for float32, float16 and bfloat16, NCHW and channels_last
(a stride of 1 is specialised, as triton does at run time), the 'mul' combine (the 'add' one loads the
same and multiplies less) and k = 3 (the taps are a loop, so k changes no register count).
tests/test_triton_compile.py fails when any of them spills.

    python scripts/benchmarks/triton_resources.py [--arch 80 90] [--dtype float32 ...]
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
DTYPES = ('float32', 'float16', 'bfloat16')
LAYOUTS = ('nchw', 'nhwc')
_POINTER = {'float32': '*fp32', 'float16': '*fp16', 'bfloat16': '*bf16'}
# The strides equal to 1 in each layout (x, grad_output, output share the activation's), and the channel
# filter's last one; triton turns an int argument equal to 1 into a constant.
_UNIT_STRIDES = {'nchw': {'sxw', 'sgw', 'sow', 'ssw', 'scj'}, 'nhwc': {'sxc', 'sgc', 'soc', 'sst', 'scj'}}


def compile_kernel(name: str, config: tuple, arch: int, dtype: str = 'float32', layout: str = 'nchw', k: int = 3):
    """The compiled kernel (triton's CompiledKernel: .asm['cubin'], .asm['ptx'], .metadata)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ddfnet.ops import _triton_kernels
    fn = getattr(_triton_kernels, f'ddf_{name}_kernel')
    block_p, block_c, warps, stages = config
    constants = {'K': k, 'MUL': True, 'ACC': tl.float32, 'BLOCK_P': block_p, 'BLOCK_C': block_c}
    constants.update({s: 1 for s in _UNIT_STRIDES[layout] if s in fn.arg_names})
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = 'constexpr'
        elif index < 4:  # the four tensors: torch's allocations are 16-byte aligned
            signature[arg] = _POINTER[dtype]
            attrs[(index,)] = [['tt.divisibility', 16]]
        else:
            signature[arg] = 'i32'
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget('cuda', arch, 32),
                          options={'num_warps': warps, 'num_stages': stages})


def cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')


def resource_usage(cubin: bytes) -> dict:
    """{'registers', 'stack', 'spill_stores', 'spill_loads', 'shared'} of a one-kernel cubin, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), '--dump-resource-usage', f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = {'registers': r'REG:(\d+)', 'stack': r'STACK:(\d+)', 'shared': r'SHARED:(\d+)'}
    usage = {key: int(re.search(pattern, text)[1]) for key, pattern in fields.items()}
    # ptxas counts spills in bytes; a kernel without spills has no local memory beyond its stack (0 here).
    usage['local'] = int(re.search(r'LOCAL:(\d+)', text)[1])
    return usage


def report(archs=ARCHS, dtypes=DTYPES, layouts=LAYOUTS, out=sys.stdout) -> list[dict]:
    """Compiles every kernel x configuration x arch x dtype x layout; prints one line each; returns the rows."""
    from ddfnet.ops.triton_ddf import CONFIGS, KERNELS
    rows = []
    print(f'{"kernel":21} {"BLOCK_P x BLOCK_C":>17} {"warps":>5} {"stages":>6} {"arch":>6} {"dtype":>8} {"layout":>6} '
          f'{"regs":>4} {"stack":>5} {"local":>5}', file=out)
    for name in KERNELS:
        for config, arch, dtype, layout in itertools.product(CONFIGS[name], archs, dtypes, layouts):
            usage = resource_usage(compile_kernel(name, config, arch, dtype, layout).asm['cubin'])
            rows.append(dict(kernel=name, config=config, arch=arch, dtype=dtype, layout=layout, **usage))
            print(f'{name:21} {f"{config[0]} x {config[1]}":>17} {config[2]:>5} {config[3]:>6} {f"sm_{arch}":>6} '
                  f'{dtype:>8} {layout:>6} {usage["registers"]:>4} {usage["stack"]:>5} {usage["local"]:>5}',
                  file=out, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=list(ARCHS), help='compute capabilities (80 90)')
    parser.add_argument('--dtype', nargs='+', default=list(DTYPES), choices=DTYPES)
    parser.add_argument('--layout', nargs='+', default=list(LAYOUTS), choices=LAYOUTS)
    args = parser.parse_args(argv)
    rows = report(args.arch, args.dtype, args.layout)
    spilling = [r for r in rows if r['stack'] or r['local']]
    print(f'{len(rows)} kernels compiled, {len(spilling)} with spills or stack', file=sys.stderr)
    return 1 if spilling else 0


if __name__ == '__main__':
    sys.exit(main())
