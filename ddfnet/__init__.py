"""ddfnet: Decoupled Dynamic Filter networks for PyTorch and timm.

``import ddfnet`` exposes the DDF op and layers and registers the DDF-ResNets with timm
(``timm.list_models('ddf*')``). Importing compiles and downloads nothing.
"""
from . import models  # noqa: F401  (registers the timm entrypoints)
from .layers import DDFPack, DDFUpPack, DynamicConv2d, FilterNorm
from .ops import ddf
from .export import export_onnx

__version__ = '0.1.0'

__all__ = ['ddf', 'export_onnx', 'FilterNorm', 'DDFPack', 'DDFUpPack', 'DynamicConv2d', '__version__']
