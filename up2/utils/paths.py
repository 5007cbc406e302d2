"""Config values that name files: ``$VAR`` / ``${VAR}`` and ``~`` expanded, unset variables refused."""
from __future__ import annotations

import os
import re

__all__ = ["expand_path"]

_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def expand_path(value: str, key: str) -> str:
    """Expand environment variables (``$UP2_WEIGHTS/R-50.pkl``) and a leading ``~`` in the
    config value ``value`` of the key ``key``. An empty value stays empty; a URL
    (``detectron2://...``, ``https://...``) is expanded the same way and not checked further.

    Args:
        value: the config string.
        key: the config key it came from (for the error message), e.g. ``"MODEL.WEIGHTS"``.

    Returns:
        the expanded string.

    Raises:
        ValueError: ``value`` names a variable that is not set (or is set to an empty string):
            os.path.expandvars would leave ``$UP2_WEIGHTS`` in place and the file would be
            looked for in a folder literally called ``$UP2_WEIGHTS``.
    """
    if not value:
        return value
    unset = [a or b for a, b in _VAR.findall(value) if not os.environ.get(a or b)]
    if unset:
        raise ValueError(
            f"{key}={value!r} uses the environment variable ${unset[0]}, which is not set: "
            f"export {unset[0]}=<folder> (docs/pretrained_weights.md says what goes there) or set {key} to a path"
        )
    return os.path.expanduser(os.path.expandvars(value))
