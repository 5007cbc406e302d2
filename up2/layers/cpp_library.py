"""Build, locate and load the compiled CPU kernels of ``up2.layers`` (shared by every kernel).

Each kernel is one ``CppLibrary``: a few ATen sources under ``up2/layers/csrc`` compiled with
``torch.utils.cpp_extension.load`` into ``<repo>/build/kernels/<name>/<name>.so`` (or
``$UP2_KERNEL_BUILD_DIR/<name>/...``). ``<name>`` is the library's prefix plus a hash of its
sources, the build flags and the torch version, so a changed kernel or a new torch never loads
a stale library. Nothing is compiled at import: ``python -m up2.layers.build_kernels`` (run by
``tools/install.sh``) builds, and the op wrappers only load an already-built library.

The kernels declare themselves next to their Python wrappers: ``up2.layers.msda.library``
(multi-scale deformable attention) and ``up2.layers.paste_masks_library`` (mask pasting).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["CppLibrary", "compiler_available", "BUILD_DIR_ENV", "CSRC_DIR"]

BUILD_DIR_ENV = "UP2_KERNEL_BUILD_DIR"
CSRC_DIR = Path(__file__).resolve().parent / "csrc"
# -fopenmp: torch's at::parallel_for runs serially in code compiled without it (OpenMP backend).
# No -march=native: the library must run on any x86-64 CPU the folder is copied to.
_CFLAGS = ("-O3", "-fopenmp", "-fopenmp-simd")
_LDFLAGS = ("-fopenmp",)


def compiler_available() -> bool:
    """True when a C++ compiler (``$CXX`` or ``c++``) and ninja are on PATH."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


def build_root() -> Path:
    """Folder holding one sub-folder per built library: ``$UP2_KERNEL_BUILD_DIR`` or
    ``<repo>/build/kernels``."""
    env = os.environ.get(BUILD_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "build" / "kernels"


@functools.lru_cache(maxsize=None)
def _hashed_name(prefix: str, sources: Tuple[Path, ...]) -> str:
    h = hashlib.sha1()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return prefix + h.hexdigest()[:12]


class CppLibrary:
    """One compiled kernel library: its sources, where it is built, and loading it once.

    Args:
        key: short name used on the command line (``python -m up2.layers.build_kernels KEY``).
        prefix: file-name prefix of the built library (``up2_msda_`` -> ``up2_msda_<12 hex>.so``).
        sources: C++ file names under ``up2/layers/csrc``.
        description: what the kernel does, for messages ("multi-scale deformable attention").
    """

    def __init__(self, key: str, prefix: str, sources: Sequence[str], description: str):
        self.key = key
        self.prefix = prefix
        self.sources = tuple(CSRC_DIR / s for s in sources)
        self.description = description
        self._loaded = False
        self._load_error: Optional[str] = None  # set once loading a built library failed (not retried)

    @property
    def build_command(self) -> str:
        """The shell command that builds this library (for error and log messages)."""
        return f"python -m up2.layers.build_kernels {self.key}"

    def name(self) -> str:
        """``<prefix><12 hex>``: hash of the sources, build flags and torch version.

        Raises:
            OSError: if a source file is missing.
        """
        return _hashed_name(self.prefix, self.sources)

    def path(self) -> Path:
        """Where the shared library of the current sources lives (whether or not it exists).

        Raises:
            OSError: if a source file is missing.
        """
        name = self.name()
        return build_root() / name / f"{name}.so"

    def unavailable_reason(self) -> Optional[str]:
        """None when the library is loaded (loading it on the first success), else why not.

        A missing library is not cached (a build later in this process is picked up); a
        library that fails to load is not retried.
        """
        if self._loaded:
            return None
        if self._load_error is not None:
            return self._load_error
        try:
            path = self.path()
        except OSError as e:  # the kernel sources are not installed next to this file
            self._load_error = f"kernel sources not found ({e})"
            return self._load_error
        if not path.is_file():
            return f"not built ({path} is missing; run tools/install.sh or {self.build_command})"
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as e:  # dlopen failure (e.g. built for another torch) / registration
            self._load_error = f"{path} failed to load: {e}"
            return self._load_error
        self._loaded = True
        return None

    def build(self, verbose: bool = False) -> Path:
        """Compile the library unless the one of the current sources already exists.

        Also loads it into this process and removes this kernel's libraries of older sources
        from the build folder (only those with the same prefix).

        Returns:
            Path of the shared library.

        Raises:
            RuntimeError: if no C++ compiler / ninja is available, or compilation fails.
        """
        path = self.path()
        if path.is_file():
            return path
        if not compiler_available():
            raise RuntimeError(f"cannot build the {self.description} CPU kernel: no C++ compiler "
                               f"({os.environ.get('CXX', 'c++')}) or ninja on PATH")
        from torch.utils.cpp_extension import load

        root = build_root()
        for old in root.glob(self.prefix + "*") if root.is_dir() else ():
            if old.is_dir() and old.name != path.parent.name:
                shutil.rmtree(old)
        path.parent.mkdir(parents=True, exist_ok=True)
        load(
            name=self.name(),
            sources=[str(s) for s in self.sources],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(path.parent),
            is_python_module=False,
            verbose=verbose,
        )
        if not path.is_file():
            raise RuntimeError(f"{self.description} CPU kernel build finished but {path} is missing")
        self._loaded = True  # cpp_extension.load registered the ops in this process
        return path
