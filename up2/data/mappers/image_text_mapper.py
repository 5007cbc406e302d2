"""Dataset mapper for image-text pairs: captioning and image-text retrieval (paper §5.1 COCO Caption,
COCO / Flickr30k retrieval).

Shape shorthand: H0, W0 original image size; H, W size after augmentation; n_i captions of image i.

Input: one caption record (``up2.data.datasets.captions``): ``file_name``, ``image_id``,
``captions`` (n_i >= 1 str) and optionally ``height``/``width``. Output dict:
    image:     (3, H, W) uint8 tensor, channels in ``image_format`` ("RGB" for up2).
    height, width: H0, W0 (int), the original size.
    image_id, file_name: copied from the record.
    captions:  list of the n_i reference strings (all of them; retrieval evaluation encodes each).
    caption (training only): one of ``captions`` drawn uniformly at random (``numpy.random``, which
               detectron2 seeds per data-loader worker).

Captions are passed through as strings, whatever their length: tokenisation and truncation are the
model's job (``TextEncoder.tokenize`` truncates with the tokenizer). Augmentations: ResizeShortestEdge
as the classification mapper; NO random flip by default, because captions say "left" and "right"
(the shapes captions do), which a flip would make wrong.
"""
from __future__ import annotations

import logging
from typing import List, Union

import numpy as np
from detectron2.config import configurable
from detectron2.data import transforms as T

from ..image_io import SUPPORTED_FORMATS
from .classification_mapper import build_image_augmentations, read_and_augment

__all__ = ["ImageTextDatasetMapper", "check_captions"]

logger = logging.getLogger(__name__)


def check_captions(record: dict) -> List[str]:
    """The record's ``captions`` after validation.

    Returns:
        the n_i >= 1 captions (the record's own list, not a copy).
    Raises:
        ValueError: ``captions`` is missing, not a list, empty, or holds a non-str or a
            whitespace-only entry (the message names the image id and the index).
    """
    image_id = record.get("image_id")
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions:
        raise ValueError(f"record of image id {image_id!r}: 'captions' must be a non-empty list of str, got {captions!r:.80}")
    for k, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"record of image id {image_id!r}: captions[{k}] must be a non-empty str, got {c!r:.80}")
    return captions


class ImageTextDatasetMapper:
    """Dataset record -> model input for captioning / retrieval (module docstring).

    Raises (from ``__call__``):
        TypeError: the record is not a dict.
        ValueError: missing ``file_name`` / ``image_id``; bad ``captions`` (:func:`check_captions`);
            an unreadable image or a size mismatch (names the file).
        FileNotFoundError: the image file does not exist.
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[Union[T.Augmentation, T.Transform]], image_format: str = "RGB"):
        """
        Args:
            is_train: training mode (random augmentations, one sampled ``caption``) or eval mode.
            augmentations: detectron2 augmentations / transforms applied in order.
            image_format: "RGB" or "BGR", channel order of the output image.
        Raises:
            ValueError: bad ``image_format``.
        """
        if image_format not in SUPPORTED_FORMATS:
            raise ValueError(f"image_format must be one of {SUPPORTED_FORMATS}, got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info(f"[ImageTextDatasetMapper] {'training' if is_train else 'inference'} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, flip: bool = False):
        """Reads cfg.INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}, MIN_SIZE_TRAIN_SAMPLING, FORMAT, and RANDOM_FLIP
        only when ``flip=True`` (off by default: captions name left and right)."""
        return {
            "is_train": is_train,
            "augmentations": build_image_augmentations(cfg, is_train, flip=flip),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one record; see the class docstring for errors."""
        if not isinstance(dataset_dict, dict):
            raise TypeError(f"dataset record must be a dict, got {type(dataset_dict).__name__}")
        for key in ("file_name", "image_id"):
            if key not in dataset_dict:
                raise ValueError(f"caption record is missing {key!r} (record keys: {sorted(dataset_dict)})")
        captions = list(check_captions(dataset_dict))
        image, (h0, w0) = read_and_augment(dataset_dict, self.augmentations, self.image_format)
        out = {
            "image": image,
            "height": h0,
            "width": w0,
            "image_id": dataset_dict["image_id"],
            "file_name": dataset_dict["file_name"],
            "captions": captions,
        }
        if self.is_train:
            out["caption"] = captions[np.random.randint(len(captions))]
        return out
