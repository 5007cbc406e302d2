"""Dataset registration functions (``register_*``); see datasets/README.md for the layouts."""
from .coco import load_coco_instances_checked, read_coco_categories, register_coco_instances_checked
from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, register_shapes
from .imagenet import load_imagenet_folder, read_class_names, register_imagenet_folder
from .captions import karpathy_to_coco_captions, load_coco_caption_dicts, register_coco_captions, register_karpathy_split
from .text_corpus import load_text_corpus, register_text_corpus
from .shapes_tasks import load_image_labels_json, register_shapes_tasks

__all__ = [
    "register_coco_instances_checked",
    "load_coco_instances_checked",
    "read_coco_categories",
    "register_shapes",
    "generate_shapes_dataset",
    "SHAPES_CATEGORIES",
    "register_imagenet_folder",
    "load_imagenet_folder",
    "read_class_names",
    "register_coco_captions",
    "load_coco_caption_dicts",
    "register_karpathy_split",
    "karpathy_to_coco_captions",
    "register_text_corpus",
    "load_text_corpus",
    "register_shapes_tasks",
    "load_image_labels_json",
]
