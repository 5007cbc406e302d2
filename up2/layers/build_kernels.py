"""Command line that builds the compiled CPU kernels of ``up2.layers`` (``tools/install.sh`` runs it).

    python -m up2.layers.build_kernels              # every kernel
    python -m up2.layers.build_kernels msda         # one kernel, by key (see --help)

Each kernel is declared next to its Python wrapper (``up2.layers.msda.library``,
``up2.layers.paste_masks_library``); building and locating is ``up2.layers.cpp_library``.
A kernel whose library of the current sources exists is not rebuilt.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional

from .cpp_library import CppLibrary

__all__ = ["kernel_libraries", "main"]


def kernel_libraries() -> Dict[str, CppLibrary]:
    """Every compiled kernel of ``up2.layers``, by key (``msda``, ``paste_masks``)."""
    from .msda.library import MSDA_LIBRARY
    from .paste_masks_library import PASTE_LIBRARY

    return {lib.key: lib for lib in (MSDA_LIBRARY, PASTE_LIBRARY)}


def main(argv: Optional[List[str]] = None) -> int:
    """Build the named kernels (all when none is named); returns the exit status (1 if one failed)."""
    libraries = kernel_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", metavar="KERNEL",
                        help=f"kernels to build: {', '.join(sorted(libraries))} (default: all)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kernels if k not in libraries]
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(sorted(libraries))}")
    status = 0
    for key in args.kernels or sorted(libraries):
        lib = libraries[key]
        if lib.path().is_file():
            print(f"build_kernels: {key} up to date ({lib.path()})")
            continue
        t0 = time.perf_counter()
        try:
            path = lib.build(verbose=args.verbose)
        except RuntimeError as e:  # no compiler, or the compiler failed: report and go on with the others
            print(f"build_kernels: {key} failed: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"build_kernels: {key} built {path} in {time.perf_counter() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
