"""Which implementation of multi-scale deformable attention runs for tensors on a device.

* ``compiled``: the C++ CPU kernel (``up2.layers.msda.library``), for CPU tensors when built.
* ``pytorch``: the pure-PyTorch reference (``up2.layers.msda.reference``), for CUDA and other
  non-CPU tensors (no GPU kernel yet) and on CPU when the kernel is not built.

The environment variable ``UP2_MSDA_PATH`` = ``pytorch`` | ``compiled`` (default ``auto``)
forces a path; forcing ``compiled`` where it cannot run raises. Which path runs is logged once
per path and device type.
"""
from __future__ import annotations

import logging
import os
from typing import Set, Tuple

import torch

from . import library

__all__ = ["PATH_ENV", "select_path"]

logger = logging.getLogger(__name__)

PATH_ENV = "UP2_MSDA_PATH"
_PATHS = ("auto", "pytorch", "compiled")
_LOGGED: Set[Tuple[str, str]] = set()


def select_path(device: torch.device) -> str:
    """``"compiled"`` or ``"pytorch"`` for tensors on ``device``, honouring ``UP2_MSDA_PATH``.

    Raises:
        ValueError: if ``UP2_MSDA_PATH`` is not one of auto / pytorch / compiled.
        RuntimeError: if ``UP2_MSDA_PATH=compiled`` but the kernel is not available or the
            tensors are not on the CPU.
    """
    forced = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if forced not in _PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {', '.join(_PATHS)}, got {os.environ.get(PATH_ENV)!r}")
    if forced == "pytorch":
        path = "pytorch"
    elif device.type != "cpu":
        if forced == "compiled":
            raise RuntimeError(f"{PATH_ENV}=compiled, but the compiled MSDA kernel is CPU only (tensors on {device})")
        path = "pytorch"
    else:
        reason = library.compiled_unavailable_reason()
        if reason is not None and forced == "compiled":
            raise RuntimeError(f"{PATH_ENV}=compiled, but the compiled MSDA CPU kernel is unavailable: {reason}")
        path = "pytorch" if reason is not None else "compiled"
    if (path, device.type) not in _LOGGED:
        _LOGGED.add((path, device.type))
        if path == "compiled":
            detail = "compiled C++ CPU kernel"
        elif forced == "pytorch":
            detail = f"pure-PyTorch (F.grid_sample per level), forced by {PATH_ENV}"
        elif device.type != "cpu":
            detail = f"pure-PyTorch (F.grid_sample per level): no compiled kernel for {device.type}"
        else:
            detail = f"pure-PyTorch (F.grid_sample per level): compiled kernel {library.compiled_unavailable_reason()}"
        logger.info("MSDeformAttn on %s: using the %s path.", device.type, detail)
    return path
