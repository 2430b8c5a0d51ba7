"""Reusable DDF layers; each knows nothing about the models that use it."""
from .ddf_branch import DDFBranchPack
from .ddf_pack import DDFPack, DDFUpPack, FilterNorm
from .dynamic_conv import DynamicConv2d

__all__ = ['FilterNorm', 'DDFPack', 'DDFUpPack', 'DDFBranchPack', 'DynamicConv2d']
