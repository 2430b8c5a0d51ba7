"""Model families; importing this package registers every model with timm."""
from .ddf_resnet import DDFBottleneck
from .dy_mobilenetv3 import make_block_convs_dynamic
from .dy_resnet import DyBasicBlock, DyBottleneck

__all__ = ['DDFBottleneck', 'DyBasicBlock', 'DyBottleneck', 'make_block_convs_dynamic']
