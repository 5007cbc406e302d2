"""Reusable layers of up2 (hot ops behind one Python wrapper each)."""
from .frozen_bn import FrozenBNConv2d, fold_frozen_batchnorm
from .msda import MSDeformAttn, fast_path_available, ms_deform_attn_core, ms_deform_attn_core_pytorch

__all__ = ["FrozenBNConv2d", "MSDeformAttn", "fast_path_available", "fold_frozen_batchnorm",
           "ms_deform_attn_core", "ms_deform_attn_core_pytorch"]
