"""Write files so that a crash never leaves a half-written one (temp file, then rename)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

__all__ = ["atomic_write", "write_json_atomic"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yield a temp file in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Args:
        path: destination file. mode: "w" (text) or "wb" (binary).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(obj, path: str) -> None:
    """``json.dump(obj)`` to ``path`` atomically (indent 2)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
