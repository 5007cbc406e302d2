"""Plain-text corpora for masked language modelling (paper §5.1: MLM on text-only data).

A corpus file is UTF-8 text with one document per line. A registered corpus yields one dict
per non-empty line::

    {"text": str, "doc_id": int}

``text`` is the line without its surrounding whitespace (and line break); ``doc_id`` numbers the
kept documents 0, 1, 2, ... in file order. Lines that are empty or whitespace only are skipped
(counted in the log). Tokenisation and truncation happen in the model
(``TextEncoder.tokenize``), never here.

Registering a name that is already registered REPLACES the old entry (catalog and metadata),
with a log line; :func:`replace_registration` is the helper every ``register_*`` of
``up2.data.datasets`` (besides COCO instances) uses for that.
"""
from __future__ import annotations

import logging
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_text_corpus", "load_text_corpus", "replace_registration"]

logger = logging.getLogger(__name__)


def replace_registration(name: str, source: str) -> None:
    """Check ``name`` and drop an existing registration of it (logged) so it can be registered anew.

    Args:
        name: dataset name.
        source: what the new registration reads (only used in the log line).
    Raises:
        ValueError: ``name`` is not a non-empty str.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    if name in DatasetCatalog.list():
        logger.info(f"dataset {name!r} is already registered; replacing it with {source}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def load_text_corpus(path: str) -> List[dict]:
    """Read a one-document-per-line corpus (module docstring for the record format).

    Args:
        path: the corpus file (UTF-8).
    Returns:
        list of ``{"text": str, "doc_id": int}``, ``doc_id`` = 0..D-1 in file order.
    Raises:
        FileNotFoundError: the file does not exist (named in the message).
        ValueError: the file is not valid UTF-8 (names the file and line) or holds no
            non-empty line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text corpus file not found: {path}")
    records: List[dict] = []
    n_empty = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"text corpus {path}, line {line_no}: not valid UTF-8 ({e})") from e
            if not text:
                n_empty += 1
                continue
            records.append({"text": text, "doc_id": len(records)})
    if not records:
        raise ValueError(f"text corpus {path} has no non-empty line; expected one document per line")
    if n_empty:
        logger.info(f"text corpus {path}: skipped {n_empty} empty lines, kept {len(records)} documents")
    return records


def register_text_corpus(name: str, path: str) -> None:
    """Register a one-document-per-line corpus under ``name`` (loaded lazily).

    Metadata: ``evaluator_type="mlm"``, ``corpus_file`` (absolute path).

    Args:
        name: dataset name; an existing registration of it is replaced (logged).
        path: the corpus file.
    Raises:
        ValueError: empty name, or the file is empty (0 bytes).
        FileNotFoundError: the file does not exist.
        (When loaded: see :func:`load_text_corpus`.)
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text corpus file not found: {path} (dataset {name!r})")
    if os.path.getsize(path) == 0:
        raise ValueError(f"text corpus file {path} is empty (dataset {name!r}); expected one document per line")
    replace_registration(name, path)
    DatasetCatalog.register(name, lambda: load_text_corpus(path))
    MetadataCatalog.get(name).set(evaluator_type="mlm", corpus_file=path)
