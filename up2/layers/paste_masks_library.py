"""The compiled CPU kernel of mask pasting: ``torch.ops.up2_masks.paste_positive``.

``csrc/paste_masks_cpu.cpp`` (ATen + ``at::parallel_for``), built by ``tools/install.sh``
(``python -m up2.layers.build_kernels paste_masks``) when a C++ compiler is present; see
``up2.layers.cpp_library`` for where it lives. Nothing is compiled at import. The wrapper that
uses it is ``up2.layers.paste_masks``.
"""
from __future__ import annotations

import torch

from .cpp_library import CppLibrary

__all__ = ["PASTE_LIBRARY", "compiled_paste_available"]

PASTE_LIBRARY = CppLibrary(
    key="paste_masks", prefix="up2_masks_", sources=["paste_masks_cpu.cpp"], description="mask pasting",
)


def compiled_paste_available() -> bool:
    """Whether ``torch.ops.up2_masks.paste_positive`` is built and loaded (loads an already-built
    library on first call; never compiles)."""
    return PASTE_LIBRARY.unavailable_reason() is None and hasattr(torch.ops.up2_masks, "paste_positive")
