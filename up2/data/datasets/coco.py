"""COCO-format instance datasets, registered with validation.

The paper trains and evaluates detection and instance segmentation on COCO (paper §5.1).

A registered dataset yields detectron2 "standard dataset dicts" (``load_coco_json``): one
dict per image with ``file_name``, ``height``, ``width``, ``image_id`` and ``annotations``;
each annotation has ``bbox`` (4 floats, XYWH in pixels, ``bbox_mode=BoxMode.XYWH_ABS``),
``category_id`` (contiguous, in [0, #classes)), ``iscrowd``, ``id`` (the json annotation id)
and, with masks, ``segmentation`` (polygons ``list[list[float]]`` in pixels, or a compressed
COCO RLE dict for crowd regions).

Clean-ups (counted and logged, never fatal):
    * annotations whose box has zero or negative width/height are dropped;
    * polygons with fewer than 6 coordinates or an odd count are dropped; an annotation left
      with no polygon is dropped (detectron2's ``load_coco_json`` does both);
    * crowd annotations (``iscrowd=1``, RLE) are KEPT, as in detectron2; mappers leave them
      out of training targets and COCOEvaluator uses them as "ignore" regions.
Errors (ValueError naming the json file, image and annotation id): a bbox that is not 4 finite
numbers, a category id not listed in ``categories``, malformed ``categories``.

Registering a name that is already registered REPLACES the old entry (catalog and metadata),
with a log line, so re-running a notebook or a test is harmless.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["register_coco_instances_checked", "load_coco_instances_checked", "read_coco_categories"]

logger = logging.getLogger(__name__)


def read_coco_categories(json_file: str) -> Tuple[List[str], Dict[int, int]]:
    """Class names and the dataset-id -> contiguous-id map of a COCO json.

    Args:
        json_file: path of a COCO instances json.
    Returns:
        (thing_classes, id_map): names ordered by category id, and ``{dataset_id: index}``
        with indices 0..C-1 in the same order (detectron2's convention for non-contiguous ids).
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not valid json, or ``categories`` missing/empty, or a category without an
            int ``id`` / str ``name``, or duplicate ids.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO annotation file {json_file} is not valid json: {e}") from e
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"COCO annotation file {json_file}: expected a non-empty 'categories' list")
    for c in cats:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise ValueError(f"COCO annotation file {json_file}: each category needs an int 'id' and a str 'name', got {c!r}")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"COCO annotation file {json_file}: duplicate category ids in {sorted(ids)}")
    cats = sorted(cats, key=lambda c: c["id"])
    return [c["name"] for c in cats], {c["id"]: i for i, c in enumerate(cats)}


def _valid_bbox(bbox) -> bool:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)


def load_coco_instances_checked(
    json_file: str, image_root: str, dataset_name: Optional[str] = None, with_masks: bool = True
) -> List[dict]:
    """Load a COCO instances json into detectron2 dataset dicts, validated and cleaned.

    Args:
        json_file: COCO instances json.
        image_root: directory the json's ``file_name`` entries are relative to.
        dataset_name: when given, detectron2 maps category ids to contiguous ids and fills this
            dataset's metadata (``thing_classes``, ``thing_dataset_id_to_contiguous_id``).
        with_masks: keep ``segmentation``; False drops it (box-only detection data).
    Returns:
        list of dataset dicts (module docstring), sorted by image id; images without
        annotations are kept with ``annotations == []``.
    Raises:
        FileNotFoundError: missing json file or image_root.
        ValueError: malformed json / bbox / category id (the message names the json file and,
            for annotations, the image id and annotation id).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"COCO image root is not a directory: {image_root}")
    try:
        records = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # detectron2 asserts on bad json
        raise ValueError(f"invalid COCO annotation file {json_file}: {e}") from e

    n_degenerate = 0
    for record in records:
        kept = []
        for anno in record["annotations"]:
            where = f"{json_file}: annotation id {anno.get('id')} of image id {record.get('image_id')}"
            bbox = anno.get("bbox")
            if not _valid_bbox(bbox):
                raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h] in pixels, got {bbox!r}")
            if "category_id" not in anno:
                raise ValueError(f"{where}: missing 'category_id'")
            if bbox[2] <= 0 or bbox[3] <= 0:
                n_degenerate += 1
                continue
            if not with_masks:
                anno.pop("segmentation", None)
            kept.append(anno)
        record["annotations"] = kept
    if n_degenerate:
        logger.warning(f"{json_file}: dropped {n_degenerate} annotations with zero or negative box width/height")
    return records


def register_coco_instances_checked(name: str, json_file: str, image_root: str, with_masks: bool = True) -> None:
    """Register a COCO instances dataset under ``name`` (DatasetCatalog + MetadataCatalog).

    The json is read once here for its categories, so the metadata is complete right away:
    ``thing_classes`` (names ordered by category id), ``thing_dataset_id_to_contiguous_id``,
    ``evaluator_type="coco"``, ``json_file``, ``image_root``. Annotations are loaded lazily by
    :func:`load_coco_instances_checked` when ``DatasetCatalog.get(name)`` is called.

    Args:
        name: dataset name; an existing registration of it is replaced (logged).
        json_file: COCO instances json.
        image_root: directory of the images.
        with_masks: keep instance masks (``segmentation``).
    Raises:
        ValueError: empty name, malformed categories.
        FileNotFoundError: json file or image_root missing (the message names the path).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"COCO image root is not a directory: {image_root} (dataset {name!r})")
    thing_classes, id_map = read_coco_categories(json_file)

    if name in DatasetCatalog.list():
        logger.info(f"dataset {name!r} is already registered; replacing it with {json_file}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_instances_checked(json_file, image_root, name, with_masks))
    MetadataCatalog.get(name).set(
        thing_classes=thing_classes,
        thing_dataset_id_to_contiguous_id=id_map,
        evaluator_type="coco",
        json_file=json_file,
        image_root=image_root,
    )
