"""Small shared utilities."""
from up2.utils.atomic import atomic_write, write_json_atomic

__all__ = ["atomic_write", "write_json_atomic"]
