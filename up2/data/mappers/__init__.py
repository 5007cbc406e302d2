"""Dataset mappers: one per input kind."""
from .detection_mapper import DetectionDatasetMapper, build_detection_augmentations
from .classification_mapper import ClassificationDatasetMapper, build_image_augmentations, read_and_augment
from .image_text_mapper import ImageTextDatasetMapper, check_captions
from .text_mapper import TextDatasetMapper

__all__ = [
    "DetectionDatasetMapper",
    "build_detection_augmentations",
    "ClassificationDatasetMapper",
    "build_image_augmentations",
    "read_and_augment",
    "ImageTextDatasetMapper",
    "check_captions",
    "TextDatasetMapper",
]
