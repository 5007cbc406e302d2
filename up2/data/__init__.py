"""Data side of up2: image reading, dataset registration, mappers."""
from .datasets import register_coco_instances_checked, register_shapes
from .image_io import read_image, to_rgb_array
from .mappers import DetectionDatasetMapper

__all__ = [
    "read_image",
    "to_rgb_array",
    "register_coco_instances_checked",
    "register_shapes",
    "DetectionDatasetMapper",
]
