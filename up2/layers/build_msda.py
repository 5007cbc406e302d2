"""Build and locate the compiled CPU kernels: multi-scale deformable attention (and mask pasting).

The kernels (``csrc/ms_deform_attn_cpu.cpp`` and ``csrc/paste_masks_cpu.cpp``, ATen +
``at::parallel_for``) are compiled into one library with ``torch.utils.cpp_extension.load``
into a fixed folder, ``<repo>/build/msda/<name>/<name>.so``
(or ``$UP2_MSDA_BUILD_DIR/<name>/...``). ``<name>`` carries a hash of the sources, the build
flags and the torch version, so a changed kernel or a new torch never loads a stale library.

``tools/install.sh`` runs ``python -m up2.layers.build_msda`` once when a C++ compiler is
present; ``up2.layers.ms_deform_attn`` only loads an already-built library (it never compiles
at import).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import List

import torch

__all__ = ["build", "compiler_available", "library_path", "library_name", "BUILD_DIR_ENV"]

BUILD_DIR_ENV = "UP2_MSDA_BUILD_DIR"
_PREFIX = "up2_msda_"
# -fopenmp: torch's at::parallel_for runs serially in code compiled without it (OpenMP backend).
# No -march=native: the library must run on any x86-64 CPU the folder is copied to.
_CFLAGS = ["-O3", "-fopenmp", "-fopenmp-simd"]
_LDFLAGS = ["-fopenmp"]


def _sources() -> List[Path]:
    csrc = Path(__file__).resolve().parent / "csrc"
    return [csrc / "ms_deform_attn_cpu.cpp", csrc / "paste_masks_cpu.cpp"]


@functools.lru_cache(maxsize=None)
def library_name() -> str:
    """``up2_msda_<12 hex>``: hash of the kernel sources, build flags and torch version."""
    h = hashlib.sha1()
    for src in _sources():
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return _PREFIX + h.hexdigest()[:12]


def _build_root() -> Path:
    env = os.environ.get(BUILD_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "build" / "msda"


def library_path() -> Path:
    """Where the shared library of the current sources lives (whether or not it exists)."""
    name = library_name()
    return _build_root() / name / f"{name}.so"


def compiler_available() -> bool:
    """True when a C++ compiler (``$CXX`` or ``c++``) and ninja are on PATH."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


def build(verbose: bool = False) -> Path:
    """Compile the kernel unless the library of the current sources already exists.

    Also loads it into this process (``torch.ops.up2_msda``) and removes libraries of older
    sources from the build folder.

    Returns:
        Path of the shared library.

    Raises:
        RuntimeError: if no C++ compiler / ninja is available, or compilation fails.
    """
    path = library_path()
    if path.is_file():
        return path
    if not compiler_available():
        raise RuntimeError(
            f"cannot build the MSDA CPU kernel: no C++ compiler ({os.environ.get('CXX', 'c++')}) or ninja on PATH"
        )
    from torch.utils.cpp_extension import load

    root = _build_root()
    for old in root.glob(_PREFIX + "*") if root.is_dir() else ():
        if old.is_dir() and old.name != path.parent.name:
            shutil.rmtree(old)
    path.parent.mkdir(parents=True, exist_ok=True)
    load(
        name=library_name(),
        sources=[str(s) for s in _sources()],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=str(path.parent),
        is_python_module=False,
        verbose=verbose,
    )
    if not path.is_file():
        raise RuntimeError(f"MSDA CPU kernel build finished but {path} is missing")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args()
    if library_path().is_file():
        print(f"build_msda: up to date ({library_path()})")
        return
    t0 = time.perf_counter()
    path = build(verbose=args.verbose)
    print(f"build_msda: built {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
