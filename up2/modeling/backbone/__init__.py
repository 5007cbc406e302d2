"""Image backbones. detectron2's ResNet is used as is; importing this package registers
``D2SwinTransformer`` (timm Swin) in detectron2's ``BACKBONE_REGISTRY``."""
from up2.modeling.backbone.swin import D2SwinTransformer

__all__ = ["D2SwinTransformer"]
