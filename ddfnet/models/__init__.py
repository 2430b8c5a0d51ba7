"""Model families; importing this package registers every model with timm."""
from .ddf_resnet import DDFBottleneck

__all__ = ['DDFBottleneck']
