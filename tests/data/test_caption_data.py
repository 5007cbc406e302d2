"""COCO captions and Karpathy splits (records, restval, GT json written atomically, errors),
shapes caption registration, ImageTextDatasetMapper (sampling, long captions untouched)."""
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from up2.config import add_up2_config
from up2.data.datasets import (
    generate_shapes_dataset,
    load_coco_caption_dicts,
    register_coco_captions,
    register_karpathy_split,
    register_shapes_tasks,
)
from up2.evaluation import load_coco_captions


def _img(path, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(path)


@pytest.fixture
def coco_caps(tmp_path):
    root = tmp_path / "coco" / "val2017"
    for name in ("a.jpg", "b.jpg"):
        _img(root / name)
    data = {
        "images": [{"id": 42, "file_name": "b.jpg", "height": 20, "width": 30}, {"id": 7, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 42, "caption": "A dog on grass. \n"},
            {"id": 2, "image_id": 7, "caption": "a cat"},
            {"id": 3, "image_id": 42, "caption": "   "},
            {"id": 4, "image_id": 42, "caption": "two dogs"},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path, root, data


def test_coco_captions_records(coco_caps):
    path, root, _ = coco_caps
    register_coco_captions("test_caps_coco", str(path), str(root))
    meta = MetadataCatalog.get("test_caps_coco")
    assert meta.evaluator_type == "captioning" and meta.captions_file == str(path)
    recs = DatasetCatalog.get("test_caps_coco")
    assert [r["image_id"] for r in recs] == [7, 42]
    assert recs[0]["captions"] == ["a cat"] and "height" not in recs[0]
    assert recs[1]["captions"] == ["A dog on grass.", "two dogs"]  # stripped, empty one skipped
    assert (recs[1]["height"], recs[1]["width"]) == (20, 30)
    assert recs[1]["file_name"] == os.path.join(str(root), "b.jpg")


def test_coco_captions_errors(coco_caps, tmp_path):
    path, root, data = coco_caps
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "annotations": data["annotations"][:1] + [{"id": 9, "image_id": 7, "caption": ""}]}))
    with pytest.raises(ValueError, match=r"bad\.json: image id 7 .*a\.jpg.* has no non-empty caption"):
        load_coco_caption_dicts(str(bad), str(root))
    bad.write_text(json.dumps({**data, "annotations": [{"id": 5, "image_id": 3, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 5\) refers to unknown image id 3"):
        load_coco_caption_dicts(str(bad), str(root))
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'images' and 'annotations' lists"):
        load_coco_caption_dicts(str(bad), str(root))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_captions("test_caps_missing", str(tmp_path / "nope.json"), str(root))


def _karpathy(tmp_path, coco_style=True):
    images = []
    for i, split in enumerate(["train", "val", "test", "restval", "train", "restval"]):
        img = {"filename": f"im{i}.jpg", "split": split, "imgid": i,
               "sentences": [{"raw": f"picture {i} number {k}", "tokens": ["picture", str(i)]} for k in range(5)]}
        if coco_style:
            img["filepath"] = "val2014" if split in ("val", "test", "restval") else "train2014"
            img["cocoid"] = 1000 + i
        images.append(img)
    images[0]["sentences"][2] = {"raw": "  ", "tokens": []}  # empty sentence: skipped
    images[4]["sentences"][0] = {"tokens": ["only", "tokens"]}  # no raw: joined tokens
    path = tmp_path / ("dataset_coco.json" if coco_style else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco_style else "flickr30k"}))
    return path


@pytest.mark.parametrize("include_restval", [False, True])
def test_karpathy_split_and_gt_json(tmp_path, include_restval):
    kjson = _karpathy(tmp_path)
    cache = tmp_path / "cache"
    (tmp_path / "imgs").mkdir()
    out = register_karpathy_split("test_karp_train", str(kjson), str(tmp_path / "imgs"), "train", str(cache),
                                  include_restval=include_restval)
    meta = MetadataCatalog.get("test_karp_train")
    assert meta.captions_file == out and os.path.dirname(out) == str(cache)
    assert meta.karpathy_split == ("train+restval" if include_restval else "train")
    assert [p for p in os.listdir(cache) if p.endswith(".tmp")] == []  # no temp file left behind
    recs = DatasetCatalog.get("test_karp_train")
    expected_idx = [0, 3, 4, 5] if include_restval else [0, 4]
    assert [r["image_id"] for r in recs] == [1000 + i for i in expected_idx]
    for r, i in zip(recs, expected_idx):
        folder = "train2014" if i in (0, 4) else "val2014"
        assert r["file_name"] == os.path.join(str(tmp_path / "imgs"), folder, f"im{i}.jpg")
    assert recs[0]["captions"] == [f"picture 0 number {k}" for k in (0, 1, 3, 4)]
    by_id = {r["image_id"]: r for r in recs}
    assert by_id[1004]["captions"][0] == "only tokens"
    # the GT json the captioning evaluator reads holds exactly the records' references
    gts = load_coco_captions(out)
    assert gts == {r["image_id"]: r["captions"] for r in recs}


def test_karpathy_flickr_and_errors(tmp_path):
    kjson = _karpathy(tmp_path, coco_style=False)
    (tmp_path / "imgs").mkdir()
    out = register_karpathy_split("test_karp_test", str(kjson), str(tmp_path / "imgs"), "test", str(tmp_path / "c"))
    recs = DatasetCatalog.get("test_karp_test")
    assert [(r["image_id"], os.path.basename(r["file_name"])) for r in recs] == [(2, "im2.jpg")]
    assert len(recs[0]["captions"]) == 5 and os.path.isfile(out)
    with pytest.raises(ValueError, match="split must be one of"):
        register_karpathy_split("test_karp_x", str(kjson), str(tmp_path / "imgs"), "testing", str(tmp_path / "c"))
    data = json.loads(kjson.read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "val"]
    kjson.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no image in split\(s\) \['val'\]; splits present: \['restval', 'test', 'train'\]"):
        register_karpathy_split("test_karp_val", str(kjson), str(tmp_path / "imgs"), "val", str(tmp_path / "c"))
    data["images"][1]["sentences"] = [{"raw": ""}]
    kjson.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[1\]: image id 2 \(im2\.jpg\) has no non-empty sentence"):
        register_karpathy_split("test_karp_t", str(kjson), str(tmp_path / "imgs"), "test", str(tmp_path / "c"))
    data["images"][1]["sentences"] = [{"raw": "x"}]
    data["images"][0]["imgid"] = 2
    data["images"][0]["split"] = "test"
    kjson.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="image id 2 is listed twice"):
        register_karpathy_split("test_karp_t", str(kjson), str(tmp_path / "imgs"), "test", str(tmp_path / "c"))


def _cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    return cfg


def test_mapper_long_caption_and_sampling(tmp_path):
    from up2.data.mappers import ImageTextDatasetMapper

    _img(tmp_path / "x.png", (40, 20))
    long_caption = " ".join(f"word{i}" for i in range(600))
    rec = {"file_name": str(tmp_path / "x.png"), "image_id": 3, "captions": ["short one", long_caption, "third"]}
    train = ImageTextDatasetMapper(_cfg(), is_train=True)
    assert not any(isinstance(a, T.RandomFlip) for a in train.augmentations.augs)  # captions name left/right
    assert any(isinstance(a, T.RandomFlip) for a in ImageTextDatasetMapper(_cfg(), True, flip=True).augmentations.augs)
    np.random.seed(0)
    counts = Counter(train(dict(rec))["caption"] for _ in range(300))
    assert set(counts) == set(rec["captions"]) and min(counts.values()) > 60  # ~uniform over 3
    out = train(dict(rec))
    assert out["captions"] == rec["captions"] and out["captions"][1] == long_caption  # passed through unchanged
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 64, 32)
    assert (out["height"], out["width"], out["image_id"]) == (40, 20, 3)
    test = ImageTextDatasetMapper(_cfg(), is_train=False)
    out = test(dict(rec))
    assert "caption" not in out and out["captions"] == rec["captions"]
    with pytest.raises(ValueError, match=r"image id 3: captions\[1\] must be a non-empty str"):
        test({**rec, "captions": ["ok", "  "]})
    with pytest.raises(ValueError, match="image id 3: 'captions' must be a non-empty list"):
        test({**rec, "captions": []})
    with pytest.raises(ValueError, match="missing 'image_id'"):
        test({"file_name": rec["file_name"], "captions": ["a"]})


def test_shapes_caption_registration(tmp_path):
    from up2.data.mappers import ImageTextDatasetMapper

    root = tmp_path / "shapes"
    generate_shapes_dataset(root, num_train=8, num_val=4, image_size=64)
    register_shapes_tasks(str(root), prefix="cshapes")
    for split, n in (("train", 8), ("val", 4)):
        recs = DatasetCatalog.get(f"cshapes_caption_{split}")
        meta = MetadataCatalog.get(f"cshapes_caption_{split}")
        assert len(recs) == n and meta.evaluator_type == "captioning"
        gts = load_coco_captions(meta.captions_file)  # independent reader of the same json
        for r in recs:
            assert len(r["captions"]) == 5 and r["captions"] == gts[r["image_id"]]
            assert (r["height"], r["width"]) == (64, 64) and os.path.isfile(r["file_name"])
    out = ImageTextDatasetMapper(_cfg(), is_train=True)(recs[0])
    assert out["caption"] in recs[0]["captions"] and out["image"].shape == (3, 32, 32)
