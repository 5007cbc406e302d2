"""ImageNet-style folders (every class-name file form, errors), shapes classification registration,
ClassificationDatasetMapper (any image mode, resize/flip, class_id checks)."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from up2.config import add_up2_config
from up2.data.datasets import (
    SHAPES_CATEGORIES,
    generate_shapes_dataset,
    load_imagenet_folder,
    read_class_names,
    register_imagenet_folder,
    register_shapes_tasks,
)
from up2.data.mappers import ClassificationDatasetMapper, build_image_augmentations

WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


@pytest.fixture
def folder(tmp_path):
    """3 class folders (unsorted creation order); class 1 has a grayscale image, class 2 an RGBA one."""
    root = tmp_path / "imagenet" / "train"
    rng = np.random.default_rng(0)
    for wnid in reversed(WNIDS):
        (root / wnid).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / WNIDS[0] / "a.JPEG")
    Image.fromarray(rng.integers(0, 255, (24, 16, 3), dtype=np.uint8)).save(root / WNIDS[0] / "b.png")
    Image.fromarray(rng.integers(0, 255, (12, 18), dtype=np.uint8), mode="L").save(root / WNIDS[1] / "gray.jpg")
    rgba = rng.integers(0, 255, (10, 14, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white after compositing
    Image.fromarray(rgba, mode="RGBA").save(root / WNIDS[2] / "rgba.PNG")
    (root / WNIDS[2] / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_folder_records_sorted_and_labelled(folder):
    recs = load_imagenet_folder(str(folder))
    rel = [os.path.relpath(r["file_name"], folder) for r in recs]
    assert rel == [f"{WNIDS[0]}/a.JPEG", f"{WNIDS[0]}/b.png", f"{WNIDS[1]}/gray.jpg", f"{WNIDS[2]}/rgba.PNG"]
    assert [r["class_id"] for r in recs] == [0, 0, 1, 2]
    assert [r["image_id"] for r in recs] == [0, 1, 2, 3]
    assert all(os.path.isabs(r["file_name"]) for r in recs)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("form", ["json_dict", "json_index", "txt_pairs", "txt_names", "none"])
def test_class_name_file_forms(folder, tmp_path, form):
    if form == "json_dict":  # extra keys are fine
        f = _write(tmp_path / "names.json", json.dumps({**dict(zip(WNIDS, NAMES)), "n99999999": "extra"}))
    elif form == "json_index":
        f = _write(tmp_path / "idx.json", json.dumps({str(i): [w, n] for i, (w, n) in enumerate(zip(WNIDS, NAMES))}))
    elif form == "txt_pairs":  # LOC_synset_mapping.txt style, shuffled, with a blank line and an extra class
        lines = [f"{WNIDS[2]} {NAMES[2]}", "", f"{WNIDS[0]} {NAMES[0]}", "n00000001 other", f"{WNIDS[1]}  {NAMES[1]} "]
        f = _write(tmp_path / "map.txt", "\n".join(lines) + "\n")
    elif form == "txt_names":
        f = _write(tmp_path / "names.txt", "\n".join(NAMES) + "\n\n")
    else:
        f = None
    expected = list(WNIDS) if f is None else NAMES
    assert read_class_names(str(folder), f) == expected
    register_imagenet_folder("test_in_cls", str(folder), f)
    meta = MetadataCatalog.get("test_in_cls")
    assert meta.thing_classes == expected and meta.evaluator_type == "classification"
    assert meta.class_folders == WNIDS
    recs = DatasetCatalog.get("test_in_cls")
    assert [meta.thing_classes[r["class_id"]] for r in recs] == [expected[0], expected[0], expected[1], expected[2]]


def test_bad_class_name_files(folder, tmp_path):
    bad_line = _write(tmp_path / "bad.txt", f"{WNIDS[0]} tench\n{WNIDS[1]} goldfish\nshark\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3"):
        read_class_names(str(folder), bad_line)
    missing = _write(tmp_path / "missing.txt", f"{WNIDS[0]} tench\n{WNIDS[1]} goldfish\n")
    with pytest.raises(ValueError, match=rf"missing\.txt has no name for class folder.*{WNIDS[2]}"):
        read_class_names(str(folder), missing)
    dup = _write(tmp_path / "dup.txt", f"{WNIDS[0]} a\n{WNIDS[1]} b\n{WNIDS[2]} c\n\n{WNIDS[0]} d\n")
    with pytest.raises(ValueError, match=r"dup\.txt, line 5: folder 'n01440764' is listed twice"):
        read_class_names(str(folder), dup)
    too_many = _write(tmp_path / "many.txt", "a\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"many\.txt: 4 names for 3 class folders \(line 4 is one too many\)"):
        read_class_names(str(folder), too_many)
    too_few = _write(tmp_path / "few.txt", "a\nb\n")
    with pytest.raises(ValueError, match=r"few\.txt: 2 names for 3"):
        read_class_names(str(folder), too_few)
    bad_json = _write(tmp_path / "x.json", "{not json")
    with pytest.raises(ValueError, match=r"x\.json is not valid json"):
        read_class_names(str(folder), bad_json)
    wrong_json = _write(tmp_path / "y.json", json.dumps({WNIDS[0]: 3}))
    with pytest.raises(ValueError, match=r"y\.json, key 'n01440764'"):
        read_class_names(str(folder), wrong_json)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_class_names(str(folder), str(tmp_path / "nope.txt"))
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        register_imagenet_folder("test_in_empty", str(empty_root))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        register_imagenet_folder("test_in_missing", str(tmp_path / "absent"))


def test_folder_without_images_errors(tmp_path):
    (tmp_path / "r" / "cls").mkdir(parents=True)
    (tmp_path / "r" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        load_imagenet_folder(str(tmp_path / "r"))


def _cfg(flip="horizontal"):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.INPUT.RANDOM_FLIP = flip
    return cfg


def test_mapper_any_mode_and_resize(folder):
    recs = load_imagenet_folder(str(folder))
    mapper = ClassificationDatasetMapper(_cfg(), is_train=False)
    for rec in recs:
        h0, w0 = Image.open(rec["file_name"]).size[::-1]
        out = mapper(dict(rec))
        img = out["image"]
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        scale = 32 / min(h0, w0)  # ResizeShortestEdge(32, 64), hand computed
        assert tuple(img.shape[1:]) == (int(h0 * scale + 0.5), int(w0 * scale + 0.5))
        assert (out["height"], out["width"]) == (h0, w0)
        assert out["class_id"] == rec["class_id"] and out["image_id"] == rec["image_id"]
    gray = mapper(dict(recs[2]))["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # L -> 3 equal channels
    assert int(mapper(dict(recs[3]))["image"].min()) == 255  # transparent RGBA composited on white


def test_mapper_flip_by_hand(tmp_path):
    ramp = np.repeat((np.arange(32) * 8).astype(np.uint8)[None, :], 32, 0)
    path = tmp_path / "ramp.png"
    Image.fromarray(np.stack([ramp] * 3, -1)).save(path)
    rec = {"file_name": str(path), "image_id": 0, "class_id": 1, "height": 32, "width": 32}
    mapper = ClassificationDatasetMapper(True, augmentations=[T.HFlipTransform(32)])
    out = mapper(dict(rec))
    assert np.array_equal(out["image"][0].numpy(), ramp[:, ::-1])
    augs = build_image_augmentations(_cfg(), is_train=True)
    assert [type(a) for a in augs] == [T.ResizeShortestEdge, T.RandomFlip]
    assert [type(a) for a in build_image_augmentations(_cfg("none"), is_train=True)] == [T.ResizeShortestEdge]
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        build_image_augmentations(_cfg("diagonal"), is_train=True)


def test_mapper_errors(folder):
    rec = load_imagenet_folder(str(folder))[0]
    mapper = ClassificationDatasetMapper(False, augmentations=[], num_classes=3)
    with pytest.raises(ValueError, match="missing 'class_id'"):
        mapper({k: v for k, v in rec.items() if k != "class_id"})
    with pytest.raises(ValueError, match="'class_id' must be a non-negative int"):
        mapper({**rec, "class_id": -1})
    with pytest.raises(ValueError, match=r"'class_id' 3 is not in \[0, 3\)"):
        mapper({**rec, "class_id": 3})
    with pytest.raises(ValueError, match="height=99"):
        mapper({**rec, "height": 99})
    with pytest.raises(FileNotFoundError, match="gone.png"):
        mapper({**rec, "file_name": str(folder / "gone.png")})
    with pytest.raises(TypeError):
        mapper([rec])


def test_shapes_cls_labels_match_largest_shape(tmp_path):
    root = tmp_path / "shapes"
    generate_shapes_dataset(root, num_train=8, num_val=4, image_size=64)
    names = register_shapes_tasks(str(root), prefix="tshapes")
    assert names[:3] == ["tshapes_cls_train", "tshapes_caption_train", "tshapes_text_train"]
    meta = MetadataCatalog.get("tshapes_cls_val")
    assert meta.thing_classes == [c["name"] for c in SHAPES_CATEGORIES]
    id_to_name = {c["id"]: c["name"] for c in SHAPES_CATEGORIES}
    for split, n in (("train", 8), ("val", 4)):
        inst = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        recs = DatasetCatalog.get(f"tshapes_cls_{split}")
        assert len(recs) == n
        for rec in recs:  # independent reference: the largest-area instance of the image
            anns = [a for a in inst["annotations"] if a["image_id"] == rec["image_id"]]
            largest = max(anns, key=lambda a: a["area"])
            assert meta.thing_classes[rec["class_id"]] == id_to_name[largest["category_id"]]
            assert os.path.isfile(rec["file_name"])
    out = ClassificationDatasetMapper(_cfg(), is_train=True)(recs[0])
    assert out["image"].shape == (3, 32, 32) and (out["height"], out["width"]) == (64, 64)
