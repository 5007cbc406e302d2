"""Dataset registration functions (``register_*``); see datasets/README.md for the layouts."""
from .coco import load_coco_instances_checked, read_coco_categories, register_coco_instances_checked
from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, register_shapes

__all__ = [
    "register_coco_instances_checked",
    "load_coco_instances_checked",
    "read_coco_categories",
    "register_shapes",
    "generate_shapes_dataset",
    "SHAPES_CATEGORIES",
]
