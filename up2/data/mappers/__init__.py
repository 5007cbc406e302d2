"""Dataset mappers: one per input kind (DESIGN §2)."""
from .detection_mapper import DetectionDatasetMapper, build_detection_augmentations

__all__ = ["DetectionDatasetMapper", "build_detection_augmentations"]
