"""Reusable DDF layers; each knows nothing about the models that use it."""
from .ddf_pack import DDFPack, DDFUpPack, FilterNorm

__all__ = ['FilterNorm', 'DDFPack', 'DDFUpPack']
