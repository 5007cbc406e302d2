"""Small shared utilities."""
from up2.utils.atomic import atomic_write, write_json_atomic
from up2.utils.paths import expand_path

__all__ = ["atomic_write", "write_json_atomic", "expand_path"]
