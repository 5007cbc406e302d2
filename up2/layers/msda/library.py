"""The compiled CPU kernel of multi-scale deformable attention: ``torch.ops.up2_msda``.

``csrc/ms_deform_attn_cpu.cpp`` (ATen + ``at::parallel_for``, forward and backward), built by
``tools/install.sh`` (``python -m up2.layers.build_kernels msda``) when a C++ compiler is
present; see ``up2.layers.cpp_library`` for where it lives. Nothing is compiled at import.
"""
from __future__ import annotations

from typing import Optional

from ..cpp_library import CppLibrary

__all__ = ["MSDA_LIBRARY", "compiled_unavailable_reason", "fast_path_available"]

MSDA_LIBRARY = CppLibrary(
    key="msda", prefix="up2_msda_", sources=["ms_deform_attn_cpu.cpp"],
    description="multi-scale deformable attention",
)


def compiled_unavailable_reason() -> Optional[str]:
    """None when ``torch.ops.up2_msda`` is loaded (loading it on first success), else why not."""
    return MSDA_LIBRARY.unavailable_reason()


def fast_path_available() -> bool:
    """Whether the compiled CPU kernel is built and loaded (``torch.ops.up2_msda``).

    Loads an already-built library on first call (never compiles); a failed load is logged by
    ``ms_deform_attn_core`` when it falls back, and raised when ``UP2_MSDA_PATH=compiled``.
    The kernel is CPU only: CUDA tensors take the Triton path (``up2.layers.msda.routing``).
    """
    return compiled_unavailable_reason() is None
