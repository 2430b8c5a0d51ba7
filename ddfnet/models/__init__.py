"""Model families (importing this package registers every model with timm), and FLOP counting of models."""
from .ddf_resnet import DDFBottleneck
from .dy_mobilenetv3 import make_block_convs_dynamic
from .dy_resnet import DyBasicBlock, DyBottleneck
from .flops import count_macs

__all__ = ['DDFBottleneck', 'DyBasicBlock', 'DyBottleneck', 'count_macs', 'make_block_convs_dynamic']
