"""Errors raised while mapping one dataset record name that record's image file.

A data-loader worker that fails on one record stops the training run; the traceback then has to
say which file it was. :func:`naming_file` wraps the reading / transforming of a record: an
exception whose message already contains the file name passes through unchanged; any other is
re-raised as the same type (or as ``RuntimeError`` when that type cannot be built from one message)
with ``"record of <file>: "`` in front, chained to the original with ``raise ... from``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["naming_file"]


def _with_file(error: Exception, file_name: str) -> Exception:
    message = f"record of {file_name}: {type(error).__name__}: {error}"
    try:
        renamed = type(error)(message)
    except Exception:  # a type whose constructor wants other arguments (e.g. UnicodeDecodeError)
        return RuntimeError(message)
    return renamed if file_name in str(renamed) else RuntimeError(message)


@contextlib.contextmanager
def naming_file(file_name) -> Iterator[None]:
    """Context manager: exceptions inside it name ``file_name`` (module docstring).

    Args:
        file_name: the record's ``file_name`` (any value; it is formatted with ``str``).
    Raises:
        the original exception when its message names the file; otherwise one of the same type
        (or RuntimeError) whose message starts with ``record of <file>:``, ``from`` the original.
        BaseExceptions that are not Exceptions (KeyboardInterrupt, SystemExit) pass through.
    """
    name = str(file_name)
    try:
        yield
    except Exception as e:
        if name in str(e):
            raise
        raise _with_file(e, name) from e
