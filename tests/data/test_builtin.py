"""The paper's datasets are registered lazily under $DETECTRON2_DATASETS: present files load
through the checked loaders; absent ones fail on read with the expected path in the message."""
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import up2  # noqa: F401
from up2.data.datasets.builtin import (
    PAPER_CAPTION_DATASETS,
    PAPER_IMAGENET_DATASETS,
    PAPER_TEXT_DATASETS,
    detectron2_datasets_root,
    imagenet_1k_classes,
    register_paper_datasets,
)

ALL = [*PAPER_IMAGENET_DATASETS, *PAPER_CAPTION_DATASETS, *PAPER_TEXT_DATASETS]


def test_every_paper_dataset_is_registered_with_metadata():
    registered = set(DatasetCatalog.list())
    assert set(ALL) <= registered and {"coco_2017_train", "coco_2017_val"} <= registered
    wnids, names = imagenet_1k_classes()
    assert len(wnids) == len(names) == 1000 and wnids == sorted(wnids) and names[0] == "tench"
    assert MetadataCatalog.get("imagenet_1k_val").thing_classes == names
    assert MetadataCatalog.get("coco_caption_karpathy_test").evaluator_type == "captioning"
    assert MetadataCatalog.get("bookswiki_val").evaluator_type == "mlm"


def test_absent_files_fail_on_read_naming_the_path():
    root = detectron2_datasets_root()
    if os.path.isdir(os.path.join(root, "bookswiki")):
        pytest.skip("Books&Wiki is present here")
    with pytest.raises(FileNotFoundError, match=r"bookswiki_val.*bookswiki/corpus_val\.txt"):
        DatasetCatalog.get("bookswiki_val")


@pytest.fixture
def fake_root(tmp_path):
    """A tiny tree in the paper layouts; the real registrations are restored afterwards."""
    wnids, _ = imagenet_1k_classes()
    for w in wnids:
        (tmp_path / "imagenet" / "val" / w).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "val" / wnids[1] / f"img{i}.JPEG")
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "val2014" / "a.jpg")
    captions = {"images": [{"id": 7, "file_name": "val2014/a.jpg"}],
                "annotations": [{"id": 1, "image_id": 7, "caption": "a black square"}]}
    (tmp_path / "coco" / "annotations" / "captions_karpathy_test.json").write_text(json.dumps(captions))
    (tmp_path / "bookswiki").mkdir()
    (tmp_path / "bookswiki" / "corpus_val.txt").write_text("first document\n\nsecond one\n")
    register_paper_datasets(str(tmp_path), replace=True)
    yield tmp_path
    register_paper_datasets(replace=True)


def test_present_files_load(fake_root):
    images = DatasetCatalog.get("imagenet_1k_val")
    assert [r["class_id"] for r in images] == [1, 1]
    caps = DatasetCatalog.get("coco_caption_karpathy_test")
    assert caps[0]["captions"] == ["a black square"] and caps[0]["file_name"].endswith("coco/val2014/a.jpg")
    assert [r["text"] for r in DatasetCatalog.get("bookswiki_val")] == ["first document", "second one"]
    with pytest.raises(FileNotFoundError, match="imagenet/train"):
        DatasetCatalog.get("imagenet_1k_train")
