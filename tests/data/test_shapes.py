"""Synthetic shapes data: determinism, COCO validity, masks vs boxes/pixels, registration, CLI."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from up2.data.datasets.shapes import SHAPES_CATEGORIES, generate_shapes_dataset, register_shapes

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(num_train=12, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "shapes"
    assert generate_shapes_dataset(root, seed=3, **SMALL)
    return root


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_deterministic_from_seed(shapes_root, tmp_path):
    again = tmp_path / "again"
    generate_shapes_dataset(again, seed=3, **SMALL)
    assert _files(again) == _files(shapes_root)
    for rel in _files(shapes_root):
        assert (again / rel).read_bytes() == (shapes_root / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_shapes_dataset(other, seed=4, **SMALL)
    assert (other / "annotations/instances_train.json").read_bytes() != (
        shapes_root / "annotations/instances_train.json").read_bytes()


def _shoelace(poly):
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


@pytest.mark.parametrize("split,num", [("train", 12), ("val", 4)])
def test_instances_valid(shapes_root, split, num):
    coco = COCO(str(shapes_root / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == num
    cat_ids = sorted(coco.getCatIds())
    assert cat_ids == [c["id"] for c in SHAPES_CATEGORIES] and cat_ids != list(range(1, len(cat_ids) + 1))
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        pixels = np.asarray(Image.open(shapes_root / split / info["file_name"]).convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 4
        union = np.zeros((64, 64), bool)
        for a in anns:
            (poly,) = a["segmentation"]
            assert len(poly) >= 6 and len(poly) % 2 == 0 and a["iscrowd"] == 0
            assert _shoelace(poly) > 0 and a["area"] > 0
            x, y, w, h = a["bbox"]
            assert np.allclose([x, y, x + w, y + h], [min(poly[0::2]), min(poly[1::2]), max(poly[0::2]), max(poly[1::2])], atol=0.011)
            mask = coco.annToMask(a).astype(bool)
            ys, xs = np.nonzero(mask)
            # the rasterised mask fills its box (pycocotools rounds to pixel centres)
            assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
            assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
            # the mask covers exactly the drawn shape: one flat colour inside (shapes never overlap)
            inner = ndimage.binary_erosion(mask, iterations=1)
            assert len(np.unique(pixels[inner], axis=0)) == 1
            assert not (union & mask).any()
            union |= mask


def test_labels_captions_corpus(shapes_root):
    coco = COCO(str(shapes_root / "annotations" / "instances_train.json"))
    labels = json.loads((shapes_root / "annotations" / "labels_train.json").read_text())
    caps = COCO(str(shapes_root / "annotations" / "captions_train.json"))
    names = {c["id"]: c["name"] for c in SHAPES_CATEGORIES}
    assert labels["categories"] == SHAPES_CATEGORIES and len(labels["labels"]) == 12
    for lab in labels["labels"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=lab["image_id"]))
        assert lab["category_id"] == max(anns, key=lambda a: a["area"])["category_id"]
        # the labelled shape dominates: its box side is at least 0.33 S, every other one's below 0.30 S
        # (circumradius 0.24-0.30 S vs 0.07-0.14 S; the larger box side of a rotated polygon lies in [1.4 r, 2 r])
        first, rest = anns[0], anns[1:]
        assert first["category_id"] == lab["category_id"]
        assert max(first["bbox"][2:]) >= 0.33 * 64 and all(max(a["bbox"][2:]) < 0.30 * 64 for a in rest)
        captions = [c["caption"] for c in caps.loadAnns(caps.getAnnIds(imgIds=lab["image_id"]))]
        assert len(captions) == 5 and len(set(captions)) == 5
        assert all(names[a["category_id"]] in captions[0] for a in anns)
    corpus = (shapes_root / "text" / "corpus_train.txt").read_text().splitlines()
    assert len(corpus) == 12 and all(line.strip() for line in corpus)


def test_register_shapes(shapes_root, tmp_path):
    names = register_shapes(shapes_root, prefix="test_up2_shapes")
    assert names == ["test_up2_shapes_train", "test_up2_shapes_val"]
    records = DatasetCatalog.get("test_up2_shapes_train")
    assert len(records) == 12
    meta = MetadataCatalog.get("test_up2_shapes_val")
    assert meta.thing_classes == [c["name"] for c in SHAPES_CATEGORIES]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 5: 2, 7: 3, 9: 4}
    for key in ("labels_file", "captions_file", "corpus_file"):
        assert Path(getattr(meta, key)).is_file() and "_val" in getattr(meta, key)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        register_shapes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="instances_test.json"):
        register_shapes(shapes_root, splits=("test",))


def test_atomic_and_idempotent(tmp_path):
    out = tmp_path / "s"
    assert generate_shapes_dataset(out, num_train=2, num_val=1, image_size=32, seed=0)
    assert not generate_shapes_dataset(out, num_train=2, num_val=1, image_size=32, seed=0)  # up to date
    with pytest.raises(FileExistsError, match=str(out)):
        generate_shapes_dataset(out, num_train=3, num_val=1, image_size=32, seed=0)
    assert generate_shapes_dataset(out, num_train=3, num_val=1, image_size=32, seed=0, overwrite=True)
    assert len(list((out / "train").glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directories left
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path / "t", num_train=1, num_val=1, image_size=8)
    assert not (tmp_path / "t").exists()


def test_older_format_is_regenerated(tmp_path):
    out = tmp_path / "s"
    assert generate_shapes_dataset(out, num_train=2, num_val=1, image_size=32, seed=0)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": meta["format_version"] - 1}))
    assert generate_shapes_dataset(out, num_train=2, num_val=1, image_size=32, seed=0)  # regenerated, no error
    assert json.loads((out / "meta.json").read_text()) == meta
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": meta["format_version"] + 1}))
    with pytest.raises(FileExistsError, match=str(out)):  # a newer format is not ours to replace
        generate_shapes_dataset(out, num_train=2, num_val=1, image_size=32, seed=0)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_shapes", REPO / "datasets" / "prepare_shapes.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path / "c"), "--num-train", "2", "--num-val", "1", "--image-size", "32", "--seed", "5"]
    assert cli.main(argv) == 0
    assert (tmp_path / "c" / "annotations" / "instances_val.json").is_file()
    assert "wrote 2 train + 1 val" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(argv[:-1] + ["6"])  # other parameters on an existing directory need --overwrite


def test_mapper_on_shapes(shapes_root):
    from detectron2.data import transforms as T

    from up2.data.mappers import DetectionDatasetMapper

    register_shapes(shapes_root, splits=("val",), prefix="test_up2_shapes_m")
    mapper = DetectionDatasetMapper(True, augmentations=[T.Resize((128, 128))])
    for rec in DatasetCatalog.get("test_up2_shapes_m_val"):
        inst = mapper(rec)["instances"]
        assert len(inst) == len(rec["annotations"]) and inst.gt_masks.tensor.shape[1:] == (128, 128)
        assert (inst.gt_classes < 5).all()
        np.testing.assert_allclose(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor, atol=2.5)
