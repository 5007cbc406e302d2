"""Dataset mapper for detection / instance segmentation (paper §5.1 COCO tasks).

Shape shorthand: H0, W0 original image size; H, W size after augmentation; K instances kept.

Input: one detectron2 standard dataset dict (see ``up2.data.datasets.coco``). Output dict:
    image:     (3, H, W) uint8 tensor, channels in ``image_format`` ("RGB" for up2).
    height, width: H0, W0 (int), the size predictions are rescaled to.
    image_id, file_name: copied from the record.
    instances (training only): ``Instances`` of size (H, W) with
        gt_boxes   Boxes (K, 4) float32, XYXY in pixels of the augmented image;
        gt_classes (K,) int64 contiguous class ids;
        gt_masks   BitMasks (K, H, W) bool (always bitmasks, also for polygon data, so every
                   image of a batch carries the same mask type; K may be 0).
Crowd annotations (``iscrowd=1``) are never training targets. In eval mode there is no
"instances" (COCOEvaluator reads the ground truth from the json).

Augmentations: ResizeShortestEdge (+ RandomFlip) as detectron2, or large-scale jitter
(``INPUT.LSJ``: RandomFlip, ResizeScale, FixedSizeCrop; MaskDINO's R50 recipe). With
LSJ the polygons are rasterised at the original size before cropping (detectron2's polygon
crop needs ``shapely``, which up2 does not require), and boxes are recomputed from the masks.
"""
from __future__ import annotations

import copy
import logging
from typing import List, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, PolygonMasks
from fvcore.transforms.transform import CropTransform

from ..image_io import SUPPORTED_FORMATS, check_image_size, read_image
from .record_errors import naming_file

__all__ = ["DetectionDatasetMapper", "build_detection_augmentations"]

logger = logging.getLogger(__name__)


def build_detection_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Augmentations from ``cfg.INPUT`` (MIN/MAX_SIZE_*, MIN_SIZE_TRAIN_SAMPLING, RANDOM_FLIP, LSJ.*).

    Training: LSJ when ``cfg.INPUT.LSJ.ENABLED`` (flip, ResizeScale(MIN_SCALE..MAX_SCALE of
    IMAGE_SIZE), FixedSizeCrop to IMAGE_SIZE x IMAGE_SIZE padded with 128 and mask value 0),
    otherwise ResizeShortestEdge + flip. Test: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST);
    ``MIN_SIZE_TEST == 0`` disables resizing (detectron2 convention).
    Raises:
        ValueError: unknown ``RANDOM_FLIP`` value.
    """
    inp = cfg.INPUT
    flip = inp.RANDOM_FLIP
    if flip not in ("none", "horizontal", "vertical"):
        raise ValueError(f"cfg.INPUT.RANDOM_FLIP must be 'none', 'horizontal' or 'vertical', got {flip!r}")
    if not is_train:
        if inp.MIN_SIZE_TEST == 0:
            return []
        return [T.ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice")]
    augs: List[T.Augmentation] = []
    if flip != "none":
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    if inp.LSJ.ENABLED:
        size = int(inp.LSJ.IMAGE_SIZE)
        augs += [
            T.ResizeScale(inp.LSJ.MIN_SCALE, inp.LSJ.MAX_SCALE, size, size),
            T.FixedSizeCrop((size, size), pad=True, pad_value=128.0, seg_pad_value=0),
        ]
    else:
        augs.insert(0, T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING))
    return augs


class DetectionDatasetMapper:
    """Dataset dict -> model input for detection / instance segmentation (module docstring).

    Raises (from ``__call__``):
        TypeError: the record is not a dict.
        ValueError: a missing field (``file_name``, ``image_id``, ``annotations`` in training,
            ``bbox``/``bbox_mode``/``category_id`` of an annotation), a bad category id, an image
            whose size disagrees with the record's height/width (``SizeMismatchError``; names
            EXIF orientation when width and height are swapped), an image that cannot be read or
            is too large (``up2.data.image_io.ImageTooLargeError``); the message names the file and field.
        FileNotFoundError: the image file does not exist.
        Any other error while reading or transforming the record is re-raised naming the file
        (``record_errors.naming_file``, chained with ``from``).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "RGB",
        use_instance_mask: bool = True,
        mask_format: str = "polygon",
        recompute_boxes: bool = False,
    ):
        """
        Args:
            is_train: training mode (targets produced) or eval mode (image only).
            augmentations: detectron2 augmentations / transforms applied in order.
            image_format: "RGB" or "BGR", channel order of the output image.
            use_instance_mask: produce ``gt_masks``; False drops segmentations (box-only).
            mask_format: "polygon" or "bitmask" (detectron2's ``annotations_to_instances``);
                both end as BitMasks.
            recompute_boxes: replace gt boxes by the masks' tight boxes (after cropping).
        Raises:
            ValueError: bad ``image_format`` / ``mask_format``, or recompute_boxes without masks.
        """
        if image_format not in SUPPORTED_FORMATS:
            raise ValueError(f"image_format must be one of {SUPPORTED_FORMATS}, got {image_format!r}")
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got {mask_format!r}")
        if recompute_boxes and not use_instance_mask:
            raise ValueError("recompute_boxes=True needs use_instance_mask=True")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.mask_format = mask_format
        self.recompute_boxes = recompute_boxes
        logger.info(f"[DetectionDatasetMapper] {'training' if is_train else 'inference'} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, use_instance_mask: bool = True):
        """Reads cfg.INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}, MIN_SIZE_TRAIN_SAMPLING, RANDOM_FLIP, FORMAT,
        MASK_FORMAT and cfg.INPUT.LSJ.{ENABLED, IMAGE_SIZE, MIN_SCALE, MAX_SCALE}."""
        return {
            "is_train": is_train,
            "augmentations": build_detection_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": use_instance_mask,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "recompute_boxes": bool(is_train and use_instance_mask and cfg.INPUT.LSJ.ENABLED),
        }

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_annotation(obj, index: int, file_name: str) -> None:
        where = f"annotation {index} of {file_name}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
        for key in ("bbox", "bbox_mode", "category_id"):
            if key not in obj:
                raise ValueError(f"{where}: missing field {key!r}")
        cid = obj["category_id"]
        if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)) or cid < 0:
            raise ValueError(f"{where}: 'category_id' must be a non-negative int (contiguous id), got {cid!r}")

    def _targets(self, annos: list, transforms, image_shape, orig_shape, file_name: str):
        """Transformed, non-crowd annotations -> Instances (module docstring)."""
        annos = [copy.deepcopy(a) for a in annos if int(a.get("iscrowd", 0)) == 0]
        has_seg = [("segmentation" in a) for a in annos]
        if self.use_instance_mask and any(has_seg) and not all(has_seg):
            missing = has_seg.index(False)
            raise ValueError(f"annotation {missing} of {file_name} has no 'segmentation' while others have one")
        if not self.use_instance_mask:
            for a in annos:
                a.pop("segmentation", None)
        crops = any(isinstance(t, CropTransform) for t in transforms.transforms)
        for a in annos:
            seg = a.get("segmentation")
            if crops and isinstance(seg, list):  # rasterise before cropping (no shapely needed)
                a["segmentation"] = mask_util.merge(mask_util.frPyObjects(seg, *orig_shape))
            utils.transform_instance_annotations(a, transforms, image_shape)
            if isinstance(a.get("segmentation"), np.ndarray):
                a["segmentation"] = a["segmentation"].astype(bool)
        all_polygons = all(isinstance(a.get("segmentation"), list) for a in annos)
        fmt = "polygon" if (self.mask_format == "polygon" and all_polygons) else "bitmask"
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=fmt)
        if self.use_instance_mask:
            masks = instances.get("gt_masks") if instances.has("gt_masks") else None
            if isinstance(masks, PolygonMasks):
                masks = BitMasks.from_polygon_masks(masks, *image_shape)
            if masks is None:
                masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
            instances.gt_masks = masks
            if self.recompute_boxes:
                instances.gt_boxes = masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances, by_mask=self.use_instance_mask)

    # ------------------------------------------------------------------ call
    def __call__(self, dataset_dict: dict) -> dict:
        """Map one dataset record; see the class docstring for errors."""
        if not isinstance(dataset_dict, dict):
            raise TypeError(f"dataset record must be a dict, got {type(dataset_dict).__name__}")
        for key in ("file_name", "image_id"):
            if key not in dataset_dict:
                raise ValueError(f"dataset record is missing {key!r} (record keys: {sorted(dataset_dict)})")
        file_name = dataset_dict["file_name"]
        if self.is_train and not isinstance(dataset_dict.get("annotations"), list):
            raise ValueError(f"training record of {file_name} needs an 'annotations' list, got {dataset_dict.get('annotations')!r}")
        record = {k: v for k, v in dataset_dict.items() if k != "annotations"}  # annotations copied lazily
        with naming_file(file_name):
            return self._map(dataset_dict, record, file_name)

    def _map(self, dataset_dict: dict, record: dict, file_name: str) -> dict:
        """Read, check, augment and build targets for one validated record (inside ``naming_file``)."""
        image = read_image(file_name, format=self.image_format)
        check_image_size(record, image.shape[:2], file_name)  # names the file; says when EXIF is the likely cause
        orig_shape = image.shape[:2]
        for key, size in (("height", orig_shape[0]), ("width", orig_shape[1])):
            if record.get(key) is None:  # absent: predictions are rescaled to the image's own size
                record[key] = size

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]

        out = {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": int(record["height"]),
            "width": int(record["width"]),
            "image_id": record["image_id"],
            "file_name": file_name,
        }
        if self.is_train:
            annos = dataset_dict["annotations"]
            for i, obj in enumerate(annos):
                self._check_annotation(obj, i, file_name)
            out["instances"] = self._targets(annos, transforms, image_shape, orig_shape, file_name)
        return out
