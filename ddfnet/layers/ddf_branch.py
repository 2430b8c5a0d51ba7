"""Single-branch DDF layers for the DDF paper's ablation (Table 3: spatial or channel branch alone) on the
same op and names.

With ``kernel_combine='mul'`` a filter of ones leaves the other filter unchanged, so one branch alone is
the DDF op with the absent filter fixed to ones: the spatial branch alone is an involution-like per-pixel
filter shared across the channels of a head, the channel branch alone a WeightNet-like per-sample
depth-wise conv. No new kernel is needed.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..ops import output_size
from .ddf_pack import DDFPack, _ddf_heads

__all__ = ['DDFBranchPack', 'BRANCHES']

BRANCHES = ('spatial', 'channel')


class DDFBranchPack(DDFPack):
    """A :class:`DDFPack` with only its ``branch`` ('spatial' or 'channel'); the other filter is ones.

    Modules and parameters keep DDFPack's names (``spatial_branch.*`` or ``channel_branch.*``); the
    absent branch is ``None`` and has no parameters. ``head`` must be 1 for the channel branch (heads only
    split the spatial filter); ``se_ratio`` is unused by the spatial branch.
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = 'relu', branch: str = 'spatial',
                 device=None, dtype=None):
        if branch not in BRANCHES:
            raise ValueError(f"DDFBranchPack: branch must be 'spatial' or 'channel', got {branch!r}")
        if branch == 'channel' and head != 1:
            raise ValueError(f'DDFBranchPack: head={head} has no effect without the spatial branch; use 1')
        nn.Module.__init__(self)  # DDFPack's own __init__ would build both branches
        self._build(in_channels, kernel_size, stride, dilation, head, se_ratio, nonlinearity, 'mul', (branch,),
                    dict(device=device, dtype=dtype))
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        if self.spatial_branch is not None:
            spatial_filter = self.spatial_branch(x)
            channel_filter = spatial_filter.new_ones(x.shape[0], self.in_channels, k, k)
        else:
            channel_filter = self.channel_branch(x)
            spatial_filter = channel_filter.new_ones(x.shape[0], k * k, output_size(x.shape[2], self.stride),
                                                     output_size(x.shape[3], self.stride))
        return _ddf_heads(x, channel_filter, spatial_filter, k, self.dilation, self.stride, self.head, 'mul')

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, branch={self.branch!r}'
