"""Dataset mapper for image classification (paper §5.1 ImageNet-1k).

Shape shorthand: H0, W0 original image size; H, W size after augmentation.

Input: one classification record (``up2.data.datasets.imagenet`` / ``shapes_tasks``):
``file_name``, ``image_id``, ``class_id`` and optionally ``height``/``width``. Output dict:
    image:     (3, H, W) uint8 tensor, channels in ``image_format`` ("RGB" for up2).
    height, width: H0, W0 (int), the original size.
    image_id, file_name: copied from the record.
    class_id:  int, contiguous class id in [0, C) (training and eval: the evaluator reads it).

Augmentations (:func:`build_image_augmentations`): ResizeShortestEdge as the detection mapper
(``cfg.INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}``, ``MIN_SIZE_TRAIN_SAMPLING``) and, in training, a
random flip (``cfg.INPUT.RANDOM_FLIP``). Large-scale jitter is not used here: its crop can cut the
labelled object out of the image.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T

from ..image_io import SUPPORTED_FORMATS, check_image_size, read_image
from .record_errors import naming_file

__all__ = ["ClassificationDatasetMapper", "build_image_augmentations", "read_and_augment"]

logger = logging.getLogger(__name__)


def build_image_augmentations(cfg, is_train: bool, flip: bool = True) -> List[T.Augmentation]:
    """Whole-image augmentations from ``cfg.INPUT`` (MIN/MAX_SIZE_*, MIN_SIZE_TRAIN_SAMPLING, RANDOM_FLIP).

    Training: ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING), then
    RandomFlip as ``RANDOM_FLIP`` says when ``flip``. Test: ResizeShortestEdge(MIN_SIZE_TEST,
    MAX_SIZE_TEST); ``MIN_SIZE_TEST == 0`` disables resizing (detectron2 convention).

    Args:
        flip: allow the random flip (False for captions, which name left and right).
    Raises:
        ValueError: unknown ``RANDOM_FLIP`` value.
    """
    inp = cfg.INPUT
    if inp.RANDOM_FLIP not in ("none", "horizontal", "vertical"):
        raise ValueError(f"cfg.INPUT.RANDOM_FLIP must be 'none', 'horizontal' or 'vertical', got {inp.RANDOM_FLIP!r}")
    if not is_train:
        return [] if inp.MIN_SIZE_TEST == 0 else [T.ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice")]
    augs: List[T.Augmentation] = [T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)]
    if flip and inp.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=inp.RANDOM_FLIP == "horizontal", vertical=inp.RANDOM_FLIP == "vertical"))
    return augs


def read_and_augment(
    record: dict, augmentations: T.AugmentationList, image_format: str
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Read ``record["file_name"]`` (any PIL mode) and apply ``augmentations``.

    Returns:
        ((3, H, W) uint8 tensor in ``image_format``, (H0, W0) original size in pixels).
    Raises:
        ValueError: missing ``file_name``, an unreadable or too large image, or a size that
            disagrees with the record's ``height``/``width`` (``SizeMismatchError``, names the file
            and, when width and height are swapped, the EXIF orientation).
        FileNotFoundError: the image file does not exist.
        Any other error while reading or augmenting is re-raised naming the file (``naming_file``).
    """
    if "file_name" not in record:
        raise ValueError(f"dataset record is missing 'file_name' (record keys: {sorted(record)})")
    file_name = record["file_name"]
    with naming_file(file_name):
        image = read_image(file_name, format=image_format)
        orig = image.shape[:2]
        check_image_size(record, orig, file_name)
        aug_input = T.AugInput(image)
        augmentations(aug_input)
        image = aug_input.image
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), (int(orig[0]), int(orig[1]))


class ClassificationDatasetMapper:
    """Dataset record -> model input for image classification (module docstring).

    Raises (from ``__call__``):
        TypeError: the record is not a dict.
        ValueError: a missing ``file_name`` / ``image_id`` / ``class_id``, a ``class_id`` that is
            not a non-negative int (or is >= ``num_classes`` when given), an unreadable image or a
            size mismatch; the message names the file and field.
        FileNotFoundError: the image file does not exist.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "RGB",
        num_classes: Optional[int] = None,
    ):
        """
        Args:
            is_train: training mode (random augmentations) or eval mode.
            augmentations: detectron2 augmentations / transforms applied in order.
            image_format: "RGB" or "BGR", channel order of the output image.
            num_classes: C, to reject ``class_id >= C``; None skips that check.
        Raises:
            ValueError: bad ``image_format`` or ``num_classes``.
        """
        if image_format not in SUPPORTED_FORMATS:
            raise ValueError(f"image_format must be one of {SUPPORTED_FORMATS}, got {image_format!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        logger.info(f"[ClassificationDatasetMapper] {'training' if is_train else 'inference'} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, num_classes: Optional[int] = None):
        """Reads cfg.INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}, MIN_SIZE_TRAIN_SAMPLING, RANDOM_FLIP, FORMAT."""
        return {
            "is_train": is_train,
            "augmentations": build_image_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": num_classes,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one record; see the class docstring for errors."""
        if not isinstance(dataset_dict, dict):
            raise TypeError(f"dataset record must be a dict, got {type(dataset_dict).__name__}")
        for key in ("file_name", "image_id", "class_id"):
            if key not in dataset_dict:
                raise ValueError(f"classification record is missing {key!r} (record keys: {sorted(dataset_dict)})")
        file_name = dataset_dict["file_name"]
        cid = dataset_dict["class_id"]
        if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or cid < 0:
            raise ValueError(f"record of {file_name}: 'class_id' must be a non-negative int (contiguous id), got {cid!r}")
        if self.num_classes is not None and cid >= self.num_classes:
            raise ValueError(f"record of {file_name}: 'class_id' {cid} is not in [0, {self.num_classes})")
        image, (h0, w0) = read_and_augment(dataset_dict, self.augmentations, self.image_format)  # names the file on error
        return {
            "image": image,
            "height": h0,
            "width": w0,
            "image_id": dataset_dict["image_id"],
            "file_name": file_name,
            "class_id": int(cid),
        }
