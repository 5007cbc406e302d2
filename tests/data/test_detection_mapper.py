"""DetectionDatasetMapper: hand-checked geometry, crowd/empty handling, errors, every coco128 image."""
import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode
from PIL import Image

from up2.config import add_up2_config
from up2.data.datasets.coco import register_coco_instances_checked
from up2.data.mappers import DetectionDatasetMapper


def _small_cfg(lsj=False):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 213
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 213
    cfg.INPUT.LSJ.ENABLED = lsj
    cfg.INPUT.LSJ.IMAGE_SIZE = 128
    return cfg


@pytest.fixture
def record(tmp_path):
    """A 40x60 image with a 20x10 rectangle (x 10..30, y 5..15), a crowd region, and its record."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :, 0] = np.arange(60)[None, :] * 4  # red ramp along x, to check flips and channel order
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    rect = [10, 5, 30, 5, 30, 15, 10, 15]
    return {
        "file_name": str(path), "image_id": 7, "height": 40, "width": 60,
        "annotations": [
            {"bbox": [10, 5, 20, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 0,
             "segmentation": [rect]},
            {"bbox": [40, 0, 20, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1,
             "segmentation": [[40, 0, 60, 0, 60, 40, 40, 40]]},
        ],
    }, img


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_resize_and_flip_by_hand(record, mask_format):
    rec, img = record
    mapper = DetectionDatasetMapper(True, augmentations=[T.Resize((80, 120)), T.HFlipTransform(120)],
                                    mask_format=mask_format)
    out = mapper(copy.deepcopy(rec))
    assert out["image"].shape == (3, 80, 120) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"], out["image_id"], out["file_name"]) == (40, 60, 7, rec["file_name"])
    red = out["image"][0].numpy().astype(int)
    assert red[:, 0].mean() > red[:, -1].mean() + 150  # flipped: the bright end of the ramp is now left
    inst = out["instances"]
    assert len(inst) == 1  # the crowd region is not a target
    assert inst.gt_classes.tolist() == [3]
    # x 10..30 -> 20..60 after x2, then flipped in a 120-wide image -> 60..100; y 5..15 -> 10..30
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [[60, 10, 100, 30]], atol=1e-4)
    assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.shape == (1, 80, 120)
    mask = inst.gt_masks.tensor[0]
    assert abs(int(mask.sum()) - 40 * 20) <= 2 * (40 + 20)  # rasterisation of the boundary
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert 59 <= xs.min() <= 61 and 98 <= xs.max() <= 100 and 9 <= ys.min() <= 11 and 28 <= ys.max() <= 30


def test_eval_mode_and_formats(record):
    rec, img = record
    rgb = DetectionDatasetMapper(False, augmentations=[])(copy.deepcopy(rec))
    bgr = DetectionDatasetMapper(False, augmentations=[], image_format="BGR")(copy.deepcopy(rec))
    assert "instances" not in rgb
    np.testing.assert_array_equal(rgb["image"].numpy(), img.transpose(2, 0, 1))
    np.testing.assert_array_equal(bgr["image"].numpy(), img[:, :, ::-1].transpose(2, 0, 1))
    rec2 = {k: v for k, v in rec.items() if k not in ("annotations", "height", "width")}
    out = DetectionDatasetMapper(False, augmentations=[])(rec2)  # eval needs no annotations; size from the image
    assert (out["height"], out["width"]) == (40, 60)


def test_empty_and_crowd_only_images(record):
    rec, _ = record
    mapper = DetectionDatasetMapper(True, augmentations=[T.Resize((20, 30))])
    for annos in ([], rec["annotations"][1:]):
        out = mapper(dict(rec, annotations=annos))
        inst = out["instances"]
        assert len(inst) == 0 and inst.image_size == (20, 30)
        assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.shape == (0, 20, 30)
        assert inst.gt_boxes.tensor.shape == (0, 4) and inst.gt_classes.dtype == torch.int64


def test_broken_records(record, tmp_path):
    rec, _ = record
    mapper = DetectionDatasetMapper(True, augmentations=[])
    with pytest.raises(TypeError, match="dict"):
        mapper(["not", "a", "dict"])
    with pytest.raises(ValueError, match="file_name"):
        mapper({k: v for k, v in rec.items() if k != "file_name"})
    with pytest.raises(ValueError, match="image_id"):
        mapper({k: v for k, v in rec.items() if k != "image_id"})
    with pytest.raises(ValueError, match="annotations"):
        mapper({k: v for k, v in rec.items() if k != "annotations"})
    bad = copy.deepcopy(rec)
    del bad["annotations"][0]["bbox_mode"]
    with pytest.raises(ValueError, match="bbox_mode"):
        mapper(bad)
    bad = copy.deepcopy(rec)
    bad["annotations"][0]["category_id"] = -1
    with pytest.raises(ValueError, match="category_id"):
        mapper(bad)
    with pytest.raises(ValueError, match="img.png"):
        mapper(dict(rec, height=41))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        mapper(dict(rec, file_name=str(tmp_path / "gone.jpg")))
    with pytest.raises(ValueError, match="mask_format"):
        DetectionDatasetMapper(True, augmentations=[], mask_format="rle")


def test_from_config_reads_input_keys():
    cfg = _small_cfg()
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.RANDOM_FLIP = "none"
    m = DetectionDatasetMapper(cfg, is_train=True)
    assert m.image_format == "BGR" and not m.recompute_boxes
    assert [type(a).__name__ for a in m.augmentations.augs] == ["ResizeShortestEdge"]
    m = DetectionDatasetMapper(_small_cfg(lsj=True), is_train=True)
    assert [type(a).__name__ for a in m.augmentations.augs] == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]
    assert m.recompute_boxes
    cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        DetectionDatasetMapper(cfg, is_train=True)


@pytest.fixture
def one_thread():
    """Mappers run in data-loader workers with one torch thread; so does this test (2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_coco128_image(coco128, one_thread):
    """Train (plain and LSJ) and eval mapping of all 128 real photos: no exception, sane targets."""
    register_coco_instances_checked("test_up2_coco128_mapper", coco128 / "instances.json", coco128 / "images")
    records = DatasetCatalog.get("test_up2_coco128_mapper")
    torch.manual_seed(0)
    np.random.seed(0)
    modes = {
        "train": DetectionDatasetMapper(_small_cfg(), is_train=True),
        "lsj": DetectionDatasetMapper(_small_cfg(lsj=True), is_train=True),
        "eval": DetectionDatasetMapper(_small_cfg(), is_train=False),
    }
    n_empty = 0
    for rec in records:
        non_crowd = [a for a in rec["annotations"] if not a["iscrowd"]]
        for mode, mapper in modes.items():
            out = mapper(rec)
            image = out["image"]
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert (out["height"], out["width"], out["image_id"]) == (rec["height"], rec["width"], rec["image_id"])
            h, w = image.shape[1:]
            if mode == "eval":
                assert "instances" not in out
                assert min(h, w) == 128 or max(h, w) == 213
                continue
            if mode == "lsj":
                assert (h, w) == (128, 128)
            inst = out["instances"]
            masks = inst.gt_masks
            assert isinstance(masks, BitMasks) and masks.tensor.shape == (len(inst), h, w)
            assert len(inst) <= len(non_crowd)
            assert ((inst.gt_classes >= 0) & (inst.gt_classes < 80)).all()
            if len(inst):
                assert masks.tensor.flatten(1).any(1).all()
                boxes = inst.gt_boxes.tensor
                assert (boxes[:, 2:] > boxes[:, :2]).all()
                assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
                mask_boxes = masks.get_bounding_boxes().tensor
                assert ((mask_boxes[:, :2] >= boxes[:, :2] - 3) & (mask_boxes[:, 2:] <= boxes[:, 2:] + 3)).all()
            if mode == "train" and not rec["annotations"]:
                n_empty += 1
                assert len(inst) == 0
    assert n_empty == 2
