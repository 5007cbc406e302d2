"""Write files so that a crash never leaves a half-written one (temp file, then rename).

Files get the mode any new file gets (``0o666 & ~umask``, plus the folder's default ACL): the temp
file is created with ``os.open(..., 0o666)``, so the kernel applies the umask itself; the umask is
never read or changed (``os.umask`` would change it for every thread for a moment). Replacing an
existing file keeps that file's permission bits, as ``open(path, "w")`` would.

JSON is written strictly (RFC 8259): NaN and +-inf become ``null`` (:func:`to_strict_json`) and
``json.dumps(..., allow_nan=False)`` refuses anything else a strict parser would reject.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from typing import Any, Optional

__all__ = ["atomic_write", "write_json_atomic", "to_strict_json"]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _create_temp(folder: str, suffix: str) -> tuple:
    """(fd, path) of a new, empty ``.tmp-<random><suffix>`` file in ``folder`` with the default mode."""
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, _CREATE_FLAGS, 0o666), path  # O_EXCL: never an existing file or link
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file in {folder} after 100 tries")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yield a temp file in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Args:
        path: destination file. mode: "w" (text, UTF-8) or "wb" (binary).
    The file's mode is that of a new file (``0o666 & ~umask``), or the replaced file's mode.
    Raises:
        ValueError: ``mode`` is not "w" or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.splitext(path)[1])
    try:
        with contextlib.suppress(FileNotFoundError):
            old = os.stat(path)
            if stat.S_ISREG(old.st_mode) and hasattr(os, "fchmod"):
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            fd = None  # owned by f now
            yield f
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_strict_json(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats (NaN, +-inf, also numpy
    scalars) become None; numpy scalars and arrays become Python numbers and lists; tuples become
    lists. Dict keys and other values are left as they are (``json.dumps`` judges them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if type(obj).__module__ == "numpy":
        import numpy as np  # only when a numpy value is present

        if isinstance(obj, np.ndarray):
            return to_strict_json(obj.tolist())
        if isinstance(obj, (np.floating, np.integer, np.bool_)):
            return to_strict_json(obj.item())
    return obj


def write_json_atomic(obj, path: str, indent: Optional[int] = 2) -> None:
    """Write ``obj`` as strict JSON (NaN/inf -> null, :func:`to_strict_json`) to ``path`` atomically.

    Args:
        obj: JSON-able data (dicts, lists, str, numbers, bool, None; numpy scalars/arrays allowed).
        path: destination file. indent: ``json.dumps`` indent (None: one compact line).
    Raises:
        TypeError / ValueError: ``obj`` holds a value JSON cannot represent (``path`` is left as it was).
    """
    text = json.dumps(to_strict_json(obj), indent=indent, allow_nan=False)
    with atomic_write(path) as f:
        f.write(text)
