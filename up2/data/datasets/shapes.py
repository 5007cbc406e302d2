""""shapes": a small synthetic dataset for every up2 task, generated offline and deterministically.

Shape shorthand: S image side in pixels.

Layout written by :func:`generate_shapes_dataset` (CLI: ``datasets/prepare_shapes.py``)::

    <root>/meta.json                           generator parameters (used to skip up-to-date data)
    <root>/{train,val}/NNNNNN.png              S x S RGB images, 1-4 non-overlapping shapes; the
                                               first one dominates (circumradius 0.24-0.30 S, the
                                               others 0.07-0.14 S)
    <root>/annotations/instances_{split}.json  COCO instances: polygons in pixels, NON-contiguous
                                               category ids (1, 3, 5, 7, 9), iscrowd 0
    <root>/annotations/labels_{split}.json     {"categories": [...], "labels": [{"image_id",
                                               "file_name", "category_id"}]}: class of the largest shape
    <root>/annotations/captions_{split}.json   COCO captions format, 5 captions per image
    <root>/text/corpus_{split}.txt             one short document per line (one per image)

Shapes never overlap (their bounding circles are 2 px apart), so each polygon is exactly the
visible object. Image and annotation ids start at 1 in each split.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .coco import register_coco_instances_checked

__all__ = ["SHAPES_CATEGORIES", "generate_shapes_dataset", "register_shapes"]

# category id -> name; ids deliberately non-contiguous to exercise the id mapping
SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
    {"id": 9, "name": "hexagon", "supercategory": "shape"},
]
_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
_BACKGROUNDS = {"gray": 128, "dark": 30, "light": 225}
_TEXTURES = ("plain", "noisy", "striped")
_NUMBERS = ["zero", "one", "two", "three", "four"]
_FORMAT_VERSION = 2  # 2: the first shape dominates (circumradius 0.24-0.30 S, others 0.07-0.14 S)
_DOMINANT_RADIUS = (0.24, 0.30)  # circumradius as a fraction of the image side S
_OTHER_RADIUS = (0.07, 0.14)


def _polygon(kind: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """(P, 2) float vertices (x, y) in pixels of a shape of circumradius r."""
    if kind == "star":
        ang = theta + np.arange(10) * (math.pi / 5)
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        n = {"circle": 24, "square": 4, "triangle": 3, "hexagon": 6}[kind]
        ang = theta + np.arange(n) * (2 * math.pi / n)
        rad = np.full(n, r)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _position(cx: float, cy: float, size: int) -> str:
    v = ("top", "middle", "bottom")[min(int(3 * cy / size), 2)]
    h = ("left", "center", "right")[min(int(3 * cx / size), 2)]
    if v == "middle" and h == "center":
        return "in the center"
    if v == "middle":
        return f"on the {h}"
    if h == "center":
        return f"at the {v}"
    return f"in the {v} {h} corner"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _render(rng: np.random.Generator, size: int):
    """Draw one image. Returns (uint8 image (S, S, 3), list of shape dicts, background words)."""
    bg_name = list(_BACKGROUNDS)[rng.integers(len(_BACKGROUNDS))]
    texture = _TEXTURES[rng.integers(len(_TEXTURES))]
    base = np.full((size, size, 3), _BACKGROUNDS[bg_name], np.float32)
    if texture == "noisy":
        base += rng.normal(0.0, 12.0, (size, size, 1)).astype(np.float32)
    elif texture == "striped":
        period = int(rng.integers(6, 16))
        stripes = ((np.arange(size) // period) % 2 * 2 - 1).astype(np.float32) * 15.0
        base += stripes[None, :, None] if rng.random() < 0.5 else stripes[:, None, None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    shapes = []
    for k in range(int(rng.integers(1, 5))):
        for _try in range(30):
            # the first shape dominates (like the one object of an ImageNet photo), so the image
            # label "largest shape" is visible at a glance; the others are clearly smaller
            r = float(rng.uniform(*(_DOMINANT_RADIUS if k == 0 else _OTHER_RADIUS)) * size)
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            if all(math.hypot(cx - s["cx"], cy - s["cy"]) >= r + s["r"] + 2 for s in shapes):
                break
        else:
            continue
        cat = SHAPES_CATEGORIES[rng.integers(len(SHAPES_CATEGORIES))]
        color = list(_COLORS)[rng.integers(len(_COLORS))]
        poly = np.round(_polygon(cat["name"], cx, cy, r, float(rng.uniform(0, 2 * math.pi))), 2)
        jitter = rng.integers(-12, 13, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(_COLORS[color], jitter))
        draw.polygon([tuple(p) for p in poly.tolist()], fill=fill)
        x, y = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))  # shoelace, pixels^2
        shapes.append({"cx": cx, "cy": cy, "r": r, "cat": cat, "color": color, "poly": poly, "area": area})
    return np.asarray(image), shapes, (bg_name, texture)


def _texts(shapes: List[dict], bg: tuple, size: int):
    """5 captions and one corpus document describing an image."""
    bg_name, texture = bg
    bg_words = bg_name if texture == "plain" else f"{texture} {bg_name}"
    phrases = [f"{_article(s['color'])} {s['color']} {s['cat']['name']}" for s in shapes]
    n = len(shapes)
    largest = max(shapes, key=lambda s: s["area"])
    big = f"{largest['color']} {largest['cat']['name']}"
    where = [f"{p} {_position(s['cx'], s['cy'], size)}" for p, s in zip(phrases, shapes)]
    counts: Dict[str, int] = {}
    for s in shapes:
        counts[s["cat"]["name"]] = counts.get(s["cat"]["name"], 0) + 1
    counted = [f"{_NUMBERS[c]} {k}s" if c > 1 else f"{_article(k)} {k}" for k, c in counts.items()]
    noun = "shape" if n == 1 else "shapes"
    captions = [
        f"{_join(phrases)} on {_article(bg_words)} {bg_words} background",
        f"{_NUMBERS[n]} {noun} on {_article(bg_words)} {bg_words} background",
        f"a picture with a large {big} {_position(largest['cx'], largest['cy'], size)}",
        _join(where),
        f"an image showing {_join(counted)}",
    ]
    sentences = [f"This picture shows {_NUMBERS[n]} {noun} on {_article(bg_words)} {bg_words} background."]
    sentences += [f"There is {w}." for w in where]
    sentences.append(f"The largest shape is the {big}.")
    return captions, " ".join(sentences)


def _write_split(tmp: str, split: str, split_code: int, num: int, size: int, seed: int) -> None:
    img_dir = os.path.join(tmp, split)
    os.makedirs(img_dir)
    images, annos, labels, caps, docs = [], [], [], [], []
    for i in range(num):
        rng = np.random.default_rng([seed, split_code, i])
        pixels, shapes, bg = _render(rng, size)
        image_id, file_name = i + 1, f"{i:06d}.png"
        Image.fromarray(pixels).save(os.path.join(img_dir, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for s in shapes:
            poly = s["poly"]
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annos.append({
                "id": len(annos) + 1, "image_id": image_id, "category_id": s["cat"]["id"],
                "segmentation": [poly.reshape(-1).tolist()], "area": round(s["area"], 2),
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)], "iscrowd": 0,
            })
        largest = max(shapes, key=lambda s: s["area"])
        labels.append({"image_id": image_id, "file_name": file_name, "category_id": largest["cat"]["id"]})
        captions, doc = _texts(shapes, bg, size)
        caps += [{"id": len(caps) + k + 1, "image_id": image_id, "caption": c} for k, c in enumerate(captions)]
        docs.append(doc)
    info = {"description": f"up2 synthetic shapes, {split} split", "version": str(_FORMAT_VERSION)}
    ann_dir = os.path.join(tmp, "annotations")
    files = {
        f"instances_{split}.json": {"info": info, "licenses": [], "images": images, "annotations": annos,
                                    "categories": SHAPES_CATEGORIES},
        f"labels_{split}.json": {"info": info, "categories": SHAPES_CATEGORIES, "labels": labels},
        f"captions_{split}.json": {"info": info, "licenses": [], "images": images, "annotations": caps},
    }
    for name, obj in files.items():
        with open(os.path.join(ann_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f)
    with open(os.path.join(tmp, "text", f"corpus_{split}.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")


def _older_format_of(meta_file: str, meta: dict) -> bool:
    """True when ``meta_file`` records the same parameters as ``meta`` but an older format version."""
    try:
        with open(meta_file, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or not isinstance(old.get("format_version"), int):
        return False
    same_params = {k: v for k, v in old.items() if k != "format_version"} == {
        k: v for k, v in meta.items() if k != "format_version"}
    return same_params and old["format_version"] < meta["format_version"]


def generate_shapes_dataset(
    out: str, num_train: int = 2000, num_val: int = 200, image_size: int = 128, seed: int = 0, overwrite: bool = False
) -> bool:
    """Write the shapes dataset (module docstring) to ``out`` atomically.

    Everything is written to a temporary sibling directory that is renamed to ``out`` at the
    end, so ``out`` is never half-written. The output is a pure function of the arguments.

    Args:
        out: output directory.
        num_train, num_val: number of images per split (>= 1 for train, >= 0 for val).
        image_size: S, the image side in pixels (>= 32).
        seed: random seed.
        overwrite: replace an existing ``out`` even when it was made with the same arguments.
    Returns:
        True when data was written; False when ``out`` already holds data made with the same
        arguments (nothing done).
    Raises:
        ValueError: bad sizes/counts.
        FileExistsError: ``out`` exists, is not empty, is not shapes data of the same
            parameters, and ``overwrite`` is False. (Shapes data of the same parameters made by an
            older format version is regenerated.)
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    out = os.path.abspath(os.fspath(out))
    meta = {"format_version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed}
    meta_file = os.path.join(out, "meta.json")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        try:
            with open(meta_file, encoding="utf-8") as f:
                same = json.load(f) == meta
        except (OSError, ValueError):
            same = False
        if same:
            return False
        if _older_format_of(meta_file, meta):
            overwrite = True  # our own output from an older generator: regenerate it in place
        else:
            raise FileExistsError(f"{out} exists and is not shapes data made with {meta}; pass overwrite=True (--overwrite)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        os.makedirs(os.path.join(tmp, "text"))
        for code, (split, num) in enumerate((("train", num_train), ("val", num_val))):
            _write_split(tmp, split, code, num, image_size, seed)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "data"))
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def register_shapes(root: str, splits: Sequence[str] = ("train", "val"), prefix: str = "shapes") -> List[str]:
    """Register ``<prefix>_<split>`` COCO instance datasets for the shapes data under ``root``.

    Metadata besides the COCO keys: ``labels_file``, ``captions_file``, ``corpus_file`` (paths of
    the image-label json, captions json and text corpus of that split) and ``shapes_root``.
    Re-registering replaces the previous entries.

    Returns:
        the registered dataset names, in ``splits`` order.
    Raises:
        FileNotFoundError: ``root`` or one of the split's files is missing (names root and file;
            run ``datasets/prepare_shapes.py``).
    """
    from detectron2.data import MetadataCatalog

    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"shapes root {root} does not exist; create it with datasets/prepare_shapes.py --out {root}")
    names = []
    for split in splits:
        files = {
            "json_file": os.path.join(root, "annotations", f"instances_{split}.json"),
            "labels_file": os.path.join(root, "annotations", f"labels_{split}.json"),
            "captions_file": os.path.join(root, "annotations", f"captions_{split}.json"),
            "corpus_file": os.path.join(root, "text", f"corpus_{split}.txt"),
            "image_root": os.path.join(root, split),
        }
        for key, path in files.items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"shapes root {root}: missing {path} (split {split!r}); run datasets/prepare_shapes.py")
        name = f"{prefix}_{split}"
        register_coco_instances_checked(name, files["json_file"], files["image_root"])
        MetadataCatalog.get(name).set(labels_file=files["labels_file"], captions_file=files["captions_file"],
                                      corpus_file=files["corpus_file"], shapes_root=root)
        names.append(name)
    return names
