"""Reusable layers of up2 (hot ops behind one Python wrapper each)."""
from .ms_deform_attn import MSDeformAttn, fast_path_available, ms_deform_attn_core, ms_deform_attn_core_pytorch

__all__ = ["MSDeformAttn", "fast_path_available", "ms_deform_attn_core", "ms_deform_attn_core_pytorch"]
