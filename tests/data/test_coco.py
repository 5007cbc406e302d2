"""register_coco_instances_checked: real coco128 and a fixture with broken annotations."""
import json
import math

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from up2.data.datasets.coco import register_coco_instances_checked


def test_coco128_registration(coco128):
    name = "test_up2_coco128"
    register_coco_instances_checked(name, coco128 / "instances.json", coco128 / "images")
    records = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    raw = json.loads((coco128 / "instances.json").read_text())

    assert len(records) == 128
    assert len(meta.thing_classes) == 80
    assert meta.evaluator_type == "coco"
    assert meta.json_file == str(coco128 / "instances.json") and meta.image_root == str(coco128 / "images")
    raw_ids = sorted(c["id"] for c in raw["categories"])
    assert raw_ids != list(range(1, 81))  # the real ids have gaps
    assert meta.thing_dataset_id_to_contiguous_id == {cid: i for i, cid in enumerate(raw_ids)}
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert meta.thing_classes == [names[i] for i in raw_ids]

    # every annotation's contiguous id maps back to its raw category id (matched by annotation id)
    raw_by_id = {a["id"]: a for a in raw["annotations"]}
    n_crowd, n_empty, n = 0, 0, 0
    for r in records:
        assert (r["height"], r["width"]) == Image.open(r["file_name"]).size[::-1]
        n_empty += not r["annotations"]
        for a in r["annotations"]:
            n += 1
            src = raw_by_id[a["id"]]
            assert raw_ids[a["category_id"]] == src["category_id"]
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and np.allclose(a["bbox"], src["bbox"])
            if a["iscrowd"]:
                n_crowd += 1
                assert isinstance(a["segmentation"], dict) and "counts" in a["segmentation"]
    assert (n_crowd, n_empty, n) == (10, 2, len(raw["annotations"]))


def test_missing_paths_named(tmp_path, coco128):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        register_coco_instances_checked("test_up2_missing", tmp_path / "nothere.json", coco128 / "images")
    with pytest.raises(FileNotFoundError, match="noimages"):
        register_coco_instances_checked("test_up2_missing", coco128 / "instances.json", tmp_path / "noimages")


def _write_fixture(tmp_path, annotations, categories=None):
    """Three 40x60 images; image 3 has no annotations. Returns (json path, image root)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    images = []
    for i in (1, 2, 3):
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 40, "width": 60})
    categories = categories or [{"id": 2, "name": "a"}, {"id": 7, "name": "b"}, {"id": 11, "name": "c"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, root


def _poly(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _ann(id, image_id, cat, bbox, segm="box", iscrowd=0):
    segm = [_poly(*bbox)] if segm == "box" else segm
    return {"id": id, "image_id": image_id, "category_id": cat, "bbox": bbox, "segmentation": segm,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def test_broken_annotations_cleaned(tmp_path, caplog):
    crowd_rle = {"size": [40, 60], "counts": [5 * 40, 10 * 40, 45 * 40]}  # column-major: columns 5..14 set
    anns = [
        _ann(1, 1, 2, [1, 2, 10, 8]),  # valid
        _ann(2, 1, 7, [5, 5, 0, 8]),  # zero width -> dropped
        _ann(3, 1, 11, [5, 5, 4, -3]),  # negative height -> dropped
        _ann(4, 2, 7, [3, 3, 2, 2], segm=[[3, 3, 5, 5]]),  # only a 4-coordinate polygon -> dropped
        _ann(5, 2, 11, [10, 10, 20, 10], segm=[[1, 2, 3, 4, 5], _poly(10, 10, 20, 10)]),  # odd polygon removed
        _ann(6, 2, 2, [5, 0, 10, 40], segm=crowd_rle, iscrowd=1),  # crowd RLE kept
    ]
    json_file, root = _write_fixture(tmp_path, anns)
    register_coco_instances_checked("test_up2_broken", json_file, root)
    with caplog.at_level("WARNING"):
        records = DatasetCatalog.get("test_up2_broken")
    assert "dropped 2 annotations" in caplog.text
    assert [len(r["annotations"]) for r in records] == [1, 2, 0]
    meta = MetadataCatalog.get("test_up2_broken")
    assert meta.thing_classes == ["a", "b", "c"]
    assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 7: 1, 11: 2}
    a1 = records[0]["annotations"][0]
    assert a1["category_id"] == 0 and a1["id"] == 1
    a5, a6 = records[1]["annotations"]
    assert a5["category_id"] == 2 and a5["segmentation"] == [_poly(10, 10, 20, 10)]
    assert a6["iscrowd"] == 1 and a6["category_id"] == 0 and isinstance(a6["segmentation"]["counts"], (str, bytes))

    # same name again replaces the registration cleanly
    (tmp_path / "again").mkdir()
    json_file2, root2 = _write_fixture(tmp_path / "again", anns[:1])
    register_coco_instances_checked("test_up2_broken", json_file2, root2)
    assert [len(r["annotations"]) for r in DatasetCatalog.get("test_up2_broken")] == [1, 0, 0]

    register_coco_instances_checked("test_up2_nomask", json_file, root, with_masks=False)
    assert all("segmentation" not in a for r in DatasetCatalog.get("test_up2_nomask") for a in r["annotations"])


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, math.nan, 4], [1, 2, "3", 4], None])
def test_bad_bbox_is_an_error(tmp_path, bbox):
    anns = [_ann(1, 1, 2, [1, 2, 10, 8]), dict(_ann(42, 2, 2, [1, 2, 10, 8]), bbox=bbox)]
    json_file, root = _write_fixture(tmp_path, anns)
    register_coco_instances_checked("test_up2_badbox", json_file, root)
    with pytest.raises(ValueError, match=str(json_file)) as info:
        DatasetCatalog.get("test_up2_badbox")
    if bbox is not None:
        assert "42" in str(info.value) and "bbox" in str(info.value)


def test_unknown_category_and_bad_categories(tmp_path):
    json_file, root = _write_fixture(tmp_path, [_ann(1, 1, 99, [1, 2, 10, 8])])
    register_coco_instances_checked("test_up2_badcat", json_file, root)
    with pytest.raises(ValueError, match="99"):
        DatasetCatalog.get("test_up2_badcat")
    json_file, root = _write_fixture(tmp_path, [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="duplicate category"):
        register_coco_instances_checked("test_up2_badcat2", json_file, root)
    json_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid json"):
        register_coco_instances_checked("test_up2_badcat3", json_file, root)
