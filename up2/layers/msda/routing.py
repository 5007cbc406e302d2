"""Which implementation of multi-scale deformable attention runs for tensors on a device.

* ``compiled``: the C++ CPU kernel (``up2.layers.msda.library``), for CPU tensors when built.
* ``triton``: the Triton kernels (``up2.layers.msda.triton_kernels``), for CUDA tensors when
  ``triton`` imports. On CPU tensors only when forced and ``TRITON_INTERPRET=1`` (Triton's
  interpreter, for tests).
* ``compiled_reference``: ``torch.compile`` of the reference, for CUDA tensors where the Triton
  kernels do not import but Inductor can still compile (it generates Triton code for CUDA, so
  this needs a working ``triton`` too, e.g. an older one than the kernels need).
* ``pytorch``: the pure-PyTorch reference (``up2.layers.msda.reference``), everywhere else:
  other devices, CPU without the compiled kernel, CUDA without any ``triton``.

The environment variable ``UP2_MSDA_PATH`` = ``auto`` (default) | ``pytorch`` | ``compiled`` |
``triton`` | ``compiled_reference`` forces a path; forcing one where it cannot run raises.
Which path runs is logged once per path and device type.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Set, Tuple

import torch

from . import library

__all__ = ["PATH_ENV", "PATHS", "select_path", "triton_unavailable_reason"]

logger = logging.getLogger(__name__)

PATH_ENV = "UP2_MSDA_PATH"
PATHS = ("auto", "pytorch", "compiled", "triton", "compiled_reference")
_LOGGED: Set[Tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> Optional[str]:
    """None when ``up2.layers.msda.triton_kernels`` imports (importing it, and ``triton``), else why not."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError as exc:
        return f"do not import ({exc})"
    return None


def _triton_interpreting() -> bool:
    """Whether the Triton kernels would run (and were jitted) for Triton's CPU interpreter."""
    from . import triton_kernels

    return triton_kernels.INTERPRETED and triton_kernels.interpreter_on()


def _inductor_has_triton() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()


def _forced_path(forced: str, device: torch.device) -> str:
    """The forced path if it can run for tensors on ``device``; raise why not otherwise."""
    if forced == "pytorch":
        return "pytorch"
    if forced == "compiled":
        if device.type != "cpu":
            raise RuntimeError(f"{PATH_ENV}=compiled, but the compiled MSDA kernel is CPU only (tensors on {device})")
        reason = library.compiled_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{PATH_ENV}=compiled, but the compiled MSDA CPU kernel is unavailable: {reason}")
        return "compiled"
    if forced == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{PATH_ENV}=triton, but the Triton MSDA kernels are unavailable: they {reason}")
        if device.type == "cpu" and not _triton_interpreting():
            raise RuntimeError(
                f"{PATH_ENV}=triton with CPU tensors needs Triton's interpreter: TRITON_INTERPRET=1 set before "
                "up2.layers.msda.triton_kernels is first imported"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{PATH_ENV}=triton, but the Triton MSDA kernels run on CUDA only (tensors on {device})")
        return "triton"
    # compiled_reference
    if device.type == "cuda" and not _inductor_has_triton():
        raise RuntimeError(
            f"{PATH_ENV}=compiled_reference, but torch.compile cannot compile for CUDA here: Inductor needs a "
            "working triton"
        )
    return "compiled_reference"


def _auto_path(device: torch.device) -> str:
    if device.type == "cpu":
        return "pytorch" if library.compiled_unavailable_reason() is not None else "compiled"
    if device.type == "cuda":
        if triton_unavailable_reason() is None:
            return "triton"
        return "compiled_reference" if _inductor_has_triton() else "pytorch"
    return "pytorch"


def _describe(path: str, forced: str, device: torch.device) -> str:
    """``"<the path>[, why]"`` for the log line."""
    names = {
        "compiled": "compiled C++ CPU kernel",
        "triton": "Triton kernel" + (" (interpreted)" if device.type == "cpu" else ""),
        "compiled_reference": "torch.compile of the pure-PyTorch reference",
        "pytorch": "pure-PyTorch path (F.grid_sample per level)",
    }
    if forced != "auto":
        return f"{names[path]}, forced by {PATH_ENV}"
    if path in ("compiled", "triton"):
        return names[path]
    if path == "compiled_reference":
        return f"{names[path]}: the Triton kernels {triton_unavailable_reason()}"
    if device.type == "cpu":
        return f"{names[path]}: the compiled kernel {library.compiled_unavailable_reason()}"
    if device.type == "cuda":
        return f"{names[path]}: the Triton kernels {triton_unavailable_reason()}, and Inductor has no triton"
    return f"{names[path]}: no kernel for {device.type}"


def select_path(device: torch.device) -> str:
    """The path (``"compiled"``, ``"triton"``, ``"compiled_reference"`` or ``"pytorch"``) for
    tensors on ``device``, honouring ``UP2_MSDA_PATH``.

    Without ``UP2_MSDA_PATH``: ``compiled`` for CPU tensors when built, ``triton`` for CUDA
    tensors when the Triton kernels import (else ``compiled_reference`` where Inductor has a
    working triton), ``pytorch`` otherwise.

    Raises:
        ValueError: if ``UP2_MSDA_PATH`` is not one of ``PATHS``.
        RuntimeError: if the forced path cannot run for tensors on ``device`` (``compiled``: not
            built or not CPU; ``triton``: no triton, a device other than CUDA, or CPU without
            ``TRITON_INTERPRET=1``; ``compiled_reference``: CUDA without triton).
    """
    forced = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if forced not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {', '.join(PATHS)}, got {os.environ.get(PATH_ENV)!r}")
    path = _auto_path(device) if forced == "auto" else _forced_path(forced, device)
    if (path, device.type) not in _LOGGED:
        _LOGGED.add((path, device.type))
        logger.info("MSDeformAttn on %s: using the %s.", device.type, _describe(path, forced, device))
    return path
