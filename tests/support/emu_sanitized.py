"""Runs the emulated CUDA kernels of one sanitizer variant on a subset of the grid and checks them against
the reference: `python tests/support/emu_sanitized.py asan|tsan` in a process started with
support.cuda_emulation.sanitizer_env (test_cuda_emulation.py does). Exits 1 on a wrong result; a
sanitizer report exits 66 (sanitizer_env makes every report fatal)."""
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for support.*
from support import cuda_emulation  # noqa: E402
from support.oracles import random_inputs  # noqa: E402

from ddfnet.ops import ddf_backward_reference, ddf_forward_reference  # noqa: E402


def cases(variant):
    """(shape, k, dilation, stride, layout, dtype, combine). ASan+UBSan: every kernel and launch path
    (unrolled k 3/5/7 and run-time k, split reductions, fp16); TSan (threads mode, slow): the backward's
    shared-memory and shuffle reductions in both layouts, unsplit and split (csrc/cuda/ddf_cuda_filters.cu,
    split_count: an NHWC grad_cf of 3 channels splits from 512 output pixels, an NCHW grad_sf from 32
    channels), on the smallest shapes that reach each."""
    if variant == 'asan':
        small = itertools.product(((2, 5, 11, 9), (2, 37, 9, 7)), (3, 9), (1, 2), (1, 2), ('nchw', 'nhwc'),
                                  (torch.float32,), ('mul', 'add'))
        return [*small, ((1, 64, 12, 12), 5, 1, 1, 'nchw', torch.float16, 'mul'),
                ((1, 64, 12, 12), 5, 1, 1, 'nhwc', torch.float16, 'mul'),
                ((1, 256, 15, 17), 3, 1, 1, 'nhwc', torch.float32, 'mul'),
                ((1, 3, 96, 96), 7, 2, 1, 'nchw', torch.float64, 'add')]
    return [((2, 5, 11, 9), 3, 1, 1, 'nchw', torch.float32, 'mul'), ((1, 37, 7, 5), 3, 2, 1, 'nhwc', torch.float32, 'mul'),
            ((1, 3, 24, 24), 1, 1, 1, 'nhwc', torch.float32, 'add'), ((1, 32, 5, 4), 5, 1, 1, 'nchw', torch.float32, 'mul')]


def main():
    variant = sys.argv[1]
    torch.set_num_threads(1)  # OpenMP's own synchronisation is invisible to ThreadSanitizer
    emu = cuda_emulation.load(variant)
    ops = torch.ops.ddfnet_emu
    print(f'{variant}: mode {emu.mode()}', flush=True)
    start, bad = time.perf_counter(), 0
    todo = cases(variant)
    for shape, k, d, s, layout, dtype, combine in todo:
        case_start = time.perf_counter()
        x, cf, sf, grad = random_inputs(*shape, k, s, dtype=dtype, memory_format=layout, grad_output=True)
        got = [ops.ddf(x, cf, sf, k, d, s, combine), *ops.ddf_backward(grad, x, cf, sf, k, d, s, combine)]
        wide = [t.double() for t in (x, cf, sf)]
        want = [ddf_forward_reference(*wide, k, d, s, combine),
                *ddf_backward_reference(grad.double(), *wide, k, d, s, combine)]
        tol = {torch.float64: 1e-10, torch.float32: 1e-3, torch.float16: 5e-2}[dtype]
        for name, g, w in zip(('output', 'grad_input', 'grad_channel_filter', 'grad_spatial_filter'), got, want):
            if not torch.allclose(g.double(), w, rtol=tol, atol=tol * max(1, w.abs().max().item()) ** 0.5):
                bad += 1
                print(f'MISMATCH {name} {shape} k={k} d={d} s={s} {layout} {dtype} {combine}: max error '
                      f'{(g.double() - w).abs().max().item():.3g}', flush=True)
        print(f'{shape} k={k} d={d} s={s} {layout} {dtype} {combine}: {time.perf_counter() - case_start:.1f} s',
              flush=True)
    print(f'{variant}: {len(todo)} cases, {bad} mismatches, {time.perf_counter() - start:.1f} s', flush=True)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
