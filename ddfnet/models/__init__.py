"""Model families (importing this package registers every model with timm), the DDF-Up detection and
joint-upsampling models, and FLOP counting of models."""
from .ddf_resnet import DDFBottleneck
from .detection import (BackboneWithDDFUpFPN, DDFUpFeaturePyramidNetwork, fasterrcnn_ddf_resnet50_ddfup_fpn,
                        fasterrcnn_resnet50_ddfup_fpn)
from .dy_mobilenetv3 import make_block_convs_dynamic
from .dy_resnet import DyBasicBlock, DyBottleneck
from .flops import count_macs
from .joint_upsampling import BilinearJointUpsampling, DDFUpJointUpsamplingNet

__all__ = ['BackboneWithDDFUpFPN', 'BilinearJointUpsampling', 'DDFBottleneck', 'DDFUpFeaturePyramidNetwork',
           'DDFUpJointUpsamplingNet', 'DyBasicBlock', 'DyBottleneck', 'count_macs', 'fasterrcnn_ddf_resnet50_ddfup_fpn',
           'fasterrcnn_resnet50_ddfup_fpn', 'make_block_convs_dynamic']
