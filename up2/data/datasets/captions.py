"""Image-caption datasets: COCO captions and Karpathy splits (paper §5.1: COCO Caption captioning,
COCO / Flickr30k image-text retrieval).

A registered dataset yields one dict per image, sorted by image id::

    {"file_name": str (absolute path), "image_id": int, "captions": [str, ...] (>= 1),
     "height": int, "width": int}        (height/width only when the json gives them)

Captions are stripped of surrounding whitespace; empty ones are skipped (counted in the log); an
image left with no caption is an error naming it. Tokenisation and truncation happen in the
model (``TextEncoder.tokenize``), never here.

Metadata: ``evaluator_type="captioning"``, ``captions_file`` (a COCO captions json with the
references, read by ``up2.evaluation.CaptioningEvaluator``), ``image_root``.

Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``)::

    {"images": [{"filepath"?: str, "filename": str, "split": "train"|"val"|"test"|"restval",
                 "cocoid"? | "imgid": int, "sentences": [{"raw": str, "tokens": [str]}], ...}]}

are converted at registration into a COCO captions json of the chosen split, written atomically
to ``<cache_dir>/<name>_captions.json``; that file is then both the dataset source and its
``captions_file``. Image ids are ``cocoid`` when present (COCO), else ``imgid``. File names are
``<image_root>/<filepath>/<filename>`` (``filepath`` is absent for Flickr30k). The "restval"
images (the 30k of COCO val2014 outside Karpathy's val/test) belong to no split unless
``include_restval=True`` folds them into "train" (the usual 113k-image training set).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog

from up2.utils.atomic import atomic_write

from .text_corpus import replace_registration

__all__ = ["register_coco_captions", "load_coco_caption_dicts", "register_karpathy_split", "karpathy_to_coco_captions"]

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid json: {e}") from e


def load_coco_caption_dicts(json_file: str, image_root: str) -> List[dict]:
    """Load a COCO captions json (``images`` + ``annotations`` with ``caption``) as image records.

    Args:
        json_file: COCO captions json (e.g. ``captions_train2017.json``).
        image_root: directory the images' ``file_name`` entries are relative to.
    Returns:
        one record per image of ``images`` (module docstring), sorted by image id.
    Raises:
        FileNotFoundError: missing json file or image_root.
        ValueError: not a COCO captions json; an image without int ``id`` / str ``file_name``;
            a duplicate image id; an annotation without ``image_id`` / str ``caption`` or naming
            an unknown image; an image with no non-empty caption (names the file and the id).
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"caption image root is not a directory: {image_root}")
    data = _read_json(json_file, "COCO captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{json_file}: expected a COCO captions json with 'images' and 'annotations' lists")
    records: Dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{json_file}: images[{k}] needs an int 'id' and a str 'file_name', got {img!r:.120}")
        if img["id"] in records:
            raise ValueError(f"{json_file}: image id {img['id']} is listed twice (images[{k}])")
        rec = {"file_name": os.path.join(image_root, img["file_name"]), "image_id": img["id"], "captions": []}
        for key in ("height", "width"):
            if isinstance(img.get(key), int):
                rec[key] = img[key]
        records[img["id"]] = rec
    n_empty = 0
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{json_file}: annotations[{k}] needs 'image_id' and a str 'caption', got {ann!r:.120}")
        rec = records.get(ann["image_id"])
        if rec is None:
            raise ValueError(f"{json_file}: annotations[{k}] (id {ann.get('id')}) refers to unknown image id {ann['image_id']!r}")
        caption = ann["caption"].strip()
        if caption:
            rec["captions"].append(caption)
        else:
            n_empty += 1
    if n_empty:
        logger.warning(f"{json_file}: skipped {n_empty} empty captions")
    for rec in records.values():
        if not rec["captions"]:
            raise ValueError(f"{json_file}: image id {rec['image_id']} ({rec['file_name']}) has no non-empty caption")
    return [records[i] for i in sorted(records)]


def register_coco_captions(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO captions json under ``name`` (records loaded lazily; module docstring).

    Metadata: ``evaluator_type="captioning"``, ``captions_file=json_file``, ``image_root``.

    Raises:
        FileNotFoundError: missing json file or image_root (checked now).
        ValueError: bad ``name``. (When loaded: see :func:`load_coco_caption_dicts`.)
    """
    json_file = os.path.abspath(os.fspath(json_file))
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO captions file not found: {json_file} (dataset {name!r})")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"caption image root is not a directory: {image_root} (dataset {name!r})")
    replace_registration(name, json_file)
    DatasetCatalog.register(name, lambda: load_coco_caption_dicts(json_file, image_root))
    MetadataCatalog.get(name).set(evaluator_type="captioning", captions_file=json_file, image_root=image_root)


def karpathy_to_coco_captions(karpathy_json: str, split: str, include_restval: bool = False) -> dict:
    """Convert one split of a Karpathy json into a COCO captions dict (module docstring).

    Args:
        karpathy_json: ``dataset_coco.json`` / ``dataset_flickr30k.json`` style file.
        split: "train", "val", "test" or "restval".
        include_restval: with ``split="train"``, also take the "restval" images.
    Returns:
        ``{"info", "images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}``
        with images in file order and ``file_name`` = ``<filepath>/<filename>``.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown ``split``; not a Karpathy json; an image entry without str
            ``filename`` / ``split``, int ``cocoid``/``imgid`` or a ``sentences`` list; a sentence
            without ``raw`` or ``tokens``; a duplicate image id; an image with no non-empty
            sentence; no image in the split (the message names the file, the entry and the splits
            present).
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    data = _read_json(karpathy_json, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{karpathy_json}: expected a Karpathy split json {{'images': [...]}}")
    wanted = {split, "restval"} if (split == "train" and include_restval) else {split}
    images, annotations, seen, present, n_empty = [], [], set(), set(), 0
    for k, img in enumerate(data["images"]):
        where = f"{karpathy_json}: images[{k}]"
        if not isinstance(img, dict) or not isinstance(img.get("split"), str) or not isinstance(img.get("filename"), str):
            raise ValueError(f"{where} needs str 'filename' and 'split', got {img!r:.120}")
        present.add(img["split"])
        if img["split"] not in wanted:
            continue
        image_id = img.get("cocoid", img.get("imgid"))
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{where} ({img['filename']}) needs an int 'cocoid' or 'imgid', got {image_id!r}")
        if image_id in seen:
            raise ValueError(f"{where}: image id {image_id} is listed twice")
        seen.add(image_id)
        if not isinstance(img.get("sentences"), list):
            raise ValueError(f"{where} ({img['filename']}) needs a 'sentences' list")
        captions = []
        for j, sent in enumerate(img["sentences"]):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(str(t) for t in sent["tokens"])
            if not isinstance(raw, str):
                raise ValueError(f"{where} ({img['filename']}), sentences[{j}]: needs a str 'raw' or a 'tokens' list")
            raw = raw.strip()
            if raw:
                captions.append(raw)
            else:
                n_empty += 1
        if not captions:
            raise ValueError(f"{where}: image id {image_id} ({img['filename']}) has no non-empty sentence")
        file_name = os.path.join(img["filepath"], img["filename"]) if img.get("filepath") else img["filename"]
        images.append({"id": image_id, "file_name": file_name})
        annotations += [{"id": len(annotations) + i + 1, "image_id": image_id, "caption": c} for i, c in enumerate(captions)]
    if not images:
        raise ValueError(f"{karpathy_json}: no image in split(s) {sorted(wanted)}; splits present: {sorted(present)}")
    if n_empty:
        logger.warning(f"{karpathy_json}: skipped {n_empty} empty sentences in split(s) {sorted(wanted)}")
    info = {"description": f"Karpathy split {'+'.join(sorted(wanted))} of {os.path.basename(karpathy_json)}"}
    return {"info": info, "images": images, "annotations": annotations}


def _write_json_atomic(obj: dict, path: str) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


def register_karpathy_split(
    name: str, karpathy_json: str, image_root: str, split: str, cache_dir: str, include_restval: bool = False
) -> str:
    """Register one split of a Karpathy json under ``name`` (module docstring).

    The split is converted now (:func:`karpathy_to_coco_captions`) and written atomically to
    ``<cache_dir>/<name>_captions.json`` (replacing an older one); records are loaded lazily
    from that file. Metadata: ``evaluator_type="captioning"``, ``captions_file`` (that file),
    ``image_root``, ``karpathy_json``, ``karpathy_split`` (e.g. "train+restval").

    Args:
        name: dataset name; an existing registration of it is replaced (logged).
        karpathy_json: the Karpathy split file.
        image_root: the directory ``filepath/filename`` are relative to.
        split: "train", "val", "test" or "restval".
        cache_dir: directory for the converted json (created if needed).
        include_restval: with ``split="train"``, fold the "restval" images into it.
    Returns:
        the path of the written COCO captions json.
    Raises:
        FileNotFoundError: missing Karpathy json or image_root.
        ValueError: see :func:`karpathy_to_coco_captions`; bad ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"caption image root is not a directory: {image_root} (dataset {name!r})")
    karpathy_json = os.path.abspath(os.fspath(karpathy_json))
    coco = karpathy_to_coco_captions(karpathy_json, split, include_restval)
    out = os.path.join(os.path.abspath(os.fspath(cache_dir)), f"{name.replace(os.sep, '_')}_captions.json")
    _write_json_atomic(coco, out)
    register_coco_captions(name, out, image_root)
    used = "train+restval" if (split == "train" and include_restval) else split
    MetadataCatalog.get(name).set(karpathy_json=karpathy_json, karpathy_split=used)
    logger.info(f"dataset {name!r}: {len(coco['images'])} images of split {used} of {karpathy_json} -> {out}")
    return out
