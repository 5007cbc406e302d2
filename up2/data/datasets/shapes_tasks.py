"""Registration of the synthetic shapes data for the non-localization tasks (see ``shapes.py``).

For each split (``<root>`` written by ``datasets/prepare_shapes.py``):

    ``<prefix>_cls_<split>``      classification: one record per image, ``class_id`` = contiguous id
                                  (category ids 1, 3, 5, 7, 9 -> 0..4) of the image's LARGEST shape;
                                  ``thing_classes`` = the 5 shape names in that order
                                  (``annotations/labels_<split>.json``).
    ``<prefix>_caption_<split>``  image + its 5 captions (``annotations/captions_<split>.json``,
                                  COCO captions format; see ``captions.py``).
    ``<prefix>_text_<split>``     one document per line (``text/corpus_<split>.txt``; see
                                  ``text_corpus.py``).
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .captions import register_coco_captions
from .coco import read_coco_categories
from .text_corpus import register_text_corpus, replace_registration

__all__ = ["register_shapes_tasks", "load_image_labels_json"]


def load_image_labels_json(labels_file: str, image_root: str) -> List[dict]:
    """Image-level labels ``{"categories": [...], "labels": [{"image_id", "file_name", "category_id"}]}``.

    Returns:
        one record ``{"file_name" (absolute), "image_id", "class_id"}`` per label, sorted by image
        id; ``class_id`` is contiguous (categories sorted by id, as :func:`read_coco_categories`).
    Raises:
        FileNotFoundError: missing file.
        ValueError: malformed categories or labels, an unknown category id, a duplicate image id
            (the message names the file and the entry).
    """
    _, id_map = read_coco_categories(labels_file)
    with open(labels_file, "r", encoding="utf-8") as f:
        labels = json.load(f).get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{labels_file}: expected a non-empty 'labels' list")
    records, seen = [], set()
    for k, lab in enumerate(labels):
        if not isinstance(lab, dict) or not all(key in lab for key in ("image_id", "file_name", "category_id")):
            raise ValueError(f"{labels_file}: labels[{k}] needs 'image_id', 'file_name' and 'category_id', got {lab!r:.120}")
        if lab["category_id"] not in id_map:
            raise ValueError(f"{labels_file}: labels[{k}] has category_id {lab['category_id']!r}, not in {sorted(id_map)}")
        if lab["image_id"] in seen:
            raise ValueError(f"{labels_file}: labels[{k}]: image id {lab['image_id']!r} is listed twice")
        seen.add(lab["image_id"])
        records.append({"file_name": os.path.join(image_root, lab["file_name"]), "image_id": lab["image_id"],
                        "class_id": id_map[lab["category_id"]]})
    return sorted(records, key=lambda r: r["image_id"])


def register_shapes_tasks(root: str, splits: Sequence[str] = ("train", "val"), prefix: str = "shapes") -> List[str]:
    """Register the classification, caption and text datasets of the shapes data (module docstring).

    Metadata of ``<prefix>_cls_<split>``: ``thing_classes``, ``thing_dataset_id_to_contiguous_id``,
    ``evaluator_type="classification"``, ``labels_file``, ``image_root``. The others: see
    :func:`register_coco_captions` and :func:`register_text_corpus`. Re-registering replaces.

    Returns:
        the registered names: for each split, cls, caption, text.
    Raises:
        FileNotFoundError: ``root`` or a split's file is missing (names it; run
            ``datasets/prepare_shapes.py``).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"shapes root {root} does not exist; create it with datasets/prepare_shapes.py --out {root}")
    names = []
    for split in splits:
        labels_file = os.path.join(root, "annotations", f"labels_{split}.json")
        captions_file = os.path.join(root, "annotations", f"captions_{split}.json")
        corpus_file = os.path.join(root, "text", f"corpus_{split}.txt")
        image_root = os.path.join(root, split)
        for path in (labels_file, captions_file, corpus_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(f"shapes root {root}: missing {path} (split {split!r}); run datasets/prepare_shapes.py")
        thing_classes, id_map = read_coco_categories(labels_file)
        cls_name = f"{prefix}_cls_{split}"
        replace_registration(cls_name, labels_file)
        DatasetCatalog.register(cls_name, lambda f=labels_file, r=image_root: load_image_labels_json(f, r))
        MetadataCatalog.get(cls_name).set(
            thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map,
            evaluator_type="classification", labels_file=labels_file, image_root=image_root,
        )
        register_coco_captions(f"{prefix}_caption_{split}", captions_file, image_root)
        register_text_corpus(f"{prefix}_text_{split}", corpus_file)
        names += [cls_name, f"{prefix}_caption_{split}", f"{prefix}_text_{split}"]
    return names
