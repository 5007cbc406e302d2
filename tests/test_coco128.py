"""Real COCO photos (../shared/data/coco128): a training step on every image, crowd and empty
ones included, and COCOEvaluator over predictions for all 128 images."""
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from conftest import assert_coco_results, tiny_cfg
from up2.data import register_coco_instances_checked
from up2.data.mappers import DetectionDatasetMapper
from up2.engine import UP2Trainer
from up2.modeling.tasks import resolve_task_data


@pytest.fixture(scope="module")
def coco128_cfg(coco128, tmp_path_factory):
    register_coco_instances_checked("test_coco128", coco128 / "instances.json", coco128 / "images")
    cfg = tiny_cfg(train="test_coco128", test="test_coco128",
                   **{"OUTPUT_DIR": str(tmp_path_factory.mktemp("coco128")), "INPUT.MIN_SIZE_TRAIN": (96,),
                      "INPUT.MAX_SIZE_TRAIN": 128, "INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 128,
                      "MODEL.PROPOSAL.TEST_TOPK": 20})
    cfg = resolve_task_data(cfg)
    cfg.freeze()
    return cfg


def test_training_step_on_every_image(coco128_cfg):
    torch.manual_seed(0)
    model = build_model(coco128_cfg)
    model.train()
    mapper = DetectionDatasetMapper(coco128_cfg, is_train=True)
    records = DatasetCatalog.get("test_coco128")
    assert len(records) == 128
    crowd = sum(a.get("iscrowd", 0) for r in records for a in r["annotations"])
    empty = sum(not r["annotations"] for r in records)
    assert crowd == 10 and empty == 2
    keys = None
    for start in range(0, 128, 16):
        batch = [mapper(r) for r in records[start : start + 16]]
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), (start, {k: v.item() for k, v in losses.items()})
        total.backward()
        keys = keys or set(losses)
        assert set(losses) == keys  # the same loss keys for every batch (DDP)
        model.zero_grad(set_to_none=True)


def test_empty_image_batch_gives_the_same_loss_keys(coco128_cfg):
    torch.manual_seed(0)
    model = build_model(coco128_cfg)
    model.train()
    mapper = DetectionDatasetMapper(coco128_cfg, is_train=True)
    records = DatasetCatalog.get("test_coco128")
    empty = [mapper(r) for r in records if not r["annotations"]]
    full = [mapper(r) for r in records[:2]]
    a, b = model(empty), model(full)
    assert set(a) == set(b)
    sum(a.values()).backward()


def test_coco_evaluator_over_all_128_images(coco128_cfg):
    torch.manual_seed(0)
    model = build_model(coco128_cfg)
    results = UP2Trainer.test(coco128_cfg, model)
    for kind in ("bbox", "segm"):
        assert "AP" in results[kind] and "AP50" in results[kind]
        assert_coco_results(results[kind], "test_coco128")
