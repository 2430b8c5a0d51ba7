"""ddfnet: Decoupled Dynamic Filter networks for PyTorch and timm.

``import ddfnet`` exposes the DDF op and layers and registers the DDF and DyConv models with timm
(``timm.list_models('ddf*')``, ``timm.list_models('dy_*')``). Importing also loads the native kernels: the
extension built at install time (``ddfnet._C``) or, where there is none, a just-in-time build of ``csrc/``
that compiles on the first import only (one line on stderr says so, with its time) and is cached after
that; if neither works, the pure-PyTorch reference runs and a warning says why. Importing downloads nothing.
"""
from . import models  # noqa: F401  (registers the timm entrypoints)
from .layers import DDFPack, DDFUpPack, DynamicConv2d, FilterNorm
from .ops import ddf
from .export import export_onnx

__version__ = '0.1.0'

__all__ = ['ddf', 'export_onnx', 'FilterNorm', 'DDFPack', 'DDFUpPack', 'DynamicConv2d', '__version__']
