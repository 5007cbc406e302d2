"""Event writers: detectron2's JSON-lines ``metrics.json`` as strict JSON.

detectron2's ``JSONWriter`` writes ``json.dumps`` of each iteration's scalars, which puts
``NaN`` / ``Infinity`` into the file when a metric is not finite (e.g. an AP of a category
without ground truth); strict parsers (RFC 8259, JavaScript's ``JSON.parse``) reject those
lines. :class:`StrictJSONWriter` writes the same lines with ``null`` for them.
"""
from __future__ import annotations

import json

from detectron2.utils.events import JSONWriter

from up2.utils.atomic import to_strict_json

__all__ = ["StrictJSONWriter"]


class _StrictLines:
    """A text file wrapper that re-encodes each JSON line it is given as strict JSON."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, text: str) -> int:
        lines = [json.dumps(to_strict_json(json.loads(line)), sort_keys=True, allow_nan=False)
                 for line in text.splitlines() if line.strip()]
        return self._handle.write("".join(line + "\n" for line in lines))

    def __getattr__(self, name):  # flush, close, ... of the real file
        return getattr(self._handle, name)


class StrictJSONWriter(JSONWriter):
    """detectron2's ``JSONWriter`` (same file, same lines, appended per ``write``) with non-finite
    values written as ``null``.

    Args:
        json_file: path of the JSON-lines file (appended to). window_size: as ``JSONWriter``.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        super().__init__(json_file, window_size)
        self._file_handle = _StrictLines(self._file_handle)
