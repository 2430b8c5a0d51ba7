"""The Triton kernels' size limits (ddfnet.ops.triton_ddf.check_sizes): they index within a sample in int32
and launch grids of at most 65535 programs along two axes, so larger problems raise a ValueError naming the
limit before any launch. Checked on meta tensors (nothing allocated); triton need not be installed."""
import pytest
import torch

from ddfnet.ops import triton_ddf


def meta(*shape):
    return torch.empty(shape, device='meta')


def op_args(batch, channels, height, width, k=3):
    return meta(batch, channels, height, width), meta(batch, channels, k, k), meta(batch, k * k, height, width)


@pytest.mark.parametrize('shape', ((1, 2 ** 15, 2 ** 8, 2 ** 8), (2, 1, 2 ** 16, 2 ** 15)))  # 2^31 per sample
def test_a_sample_of_2_31_elements_is_refused_before_launch(shape):
    x, cf, sf = op_args(*shape)
    with pytest.raises(ValueError, match=r'fewer than 2\^31 elements \(int32 indexing\)'):
        triton_ddf.forward(x, cf, sf, 3, 1, 1, 'mul')
    with pytest.raises(ValueError, match=r'fewer than 2\^31 elements'):
        triton_ddf.backward(meta(*shape), x, cf, sf, 3, 1, 1, 'mul')


def test_one_element_less_passes():
    triton_ddf.check_sizes(3, *op_args(1, 2 ** 15 - 1, 2 ** 8, 2 ** 8))  # no error: 2^31 - 2^16 per sample


def test_a_strided_view_reaching_past_2_31_is_refused():
    # 2 x 2 x 2 elements per sample, the last one 2^31 elements past the first (an as_strided view on meta).
    x = meta(1).as_strided((2, 2, 2, 2), (2 ** 32, 2 ** 30, 2 ** 29, 2 ** 29))
    with pytest.raises(ValueError, match=r'sizes \(2, 2, 2, 2\) with strides'):
        triton_ddf.check_sizes(3, x)
    triton_ddf.check_sizes(3, meta(1).as_strided((2, 2, 2, 2), (2 ** 32, 2 ** 29, 2 ** 29, 2 ** 29)))


@pytest.mark.parametrize('batch, channels, k', ((65536, 1, 3), (1, 65535 * 8 + 1, 3), (1, 1, 257)))
def test_grids_beyond_65535_programs_are_refused(batch, channels, k):
    with pytest.raises(ValueError, match='must be at most 65535'):
        triton_ddf.check_sizes(k, meta(batch, channels, 1, 1))
    triton_ddf.check_sizes(k - 2 if k > 3 else k, meta(min(batch, 65535), min(channels, 65535 * 8), 1, 1))
