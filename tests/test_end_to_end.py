"""End to end on a tiny config: train_net-style training, COCOEvaluator, checkpoint round trip,
DefaultPredictor on real photos of unusual modes, and bad input."""

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from conftest import assert_coco_results, seed_everything, tiny_cfg
from up2.data.image_io import read_image
from up2.data.mappers import DetectionDatasetMapper
from up2.engine import UP2Trainer


@pytest.fixture(scope="module")
def trained(shapes_datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(**{"SOLVER.MAX_ITER": 3, "OUTPUT_DIR": str(out), "SOLVER.IMS_PER_BATCH": 4})
    cfg.freeze()
    seed_everything(0)  # model init and augmentations (a module fixture: before the per-test seeding)
    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer.cfg, trainer, out  # the trainer's config carries the resolved class names


def test_training_writes_a_checkpoint_and_logs_losses(trained):
    cfg, trainer, out = trained
    assert (out / "model_final.pth").is_file()
    assert trainer.iter == 3  # detectron2 leaves iter at MAX_ITER after the loop
    latest = trainer.storage.latest()
    assert "TASK/loss_class" in latest and np.isfinite(latest["total_loss"][0])
    assert latest["task_count/TASK"][0] == 3 and "grad_norm" in latest and "tau" in latest


def test_coco_evaluator_runs_on_val(trained):
    cfg, trainer, _ = trained
    results = UP2Trainer.test(cfg, trainer.model)
    assert set(results["bbox"]) >= {"AP", "AP50"} and "segm" in results
    for kind in ("bbox", "segm"):
        assert_coco_results(results[kind], "test_shapes_val")


def test_checkpoint_reloads_with_identical_predictions(trained):
    cfg, trainer, out = trained
    mapper = DetectionDatasetMapper(cfg, is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get("test_shapes_val")[:2]]
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(inputs)
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(str(out / "model_final.pth"))
    fresh.eval()
    with torch.no_grad():
        after = fresh(inputs)
    for a, b in zip(before, after):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.allclose(a.scores, b.scores) and torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("name", ["camera", "logo"])
def test_default_predictor_on_grayscale_and_rgba_photos(trained, tmp_path, name):
    import skimage.data

    cfg, _, out = trained
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(out / "model_final.pth")
    photo = getattr(skimage.data, name)()
    assert photo.ndim == (2 if name == "camera" else 3)
    path = tmp_path / f"{name}.png"
    Image.fromarray(photo).save(path)
    bgr = read_image(str(path), format="BGR")
    inst = DefaultPredictor(cfg)(bgr)["instances"]
    h, w = photo.shape[:2]
    assert inst.image_size == (h, w) and len(inst) > 0
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert inst.pred_masks.shape[-2:] == (h, w)


def test_demo_names_a_missing_or_corrupt_file(trained, tmp_path):
    from projects.demo.demo import run

    cfg, _, out = trained
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(out / "model_final.pth")
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        run(cfg, [str(missing)], str(tmp_path / "vis"))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        run(cfg, [str(corrupt)], str(tmp_path / "vis"))


def test_task_config_errors_name_the_field(shapes_datasets):
    from up2.modeling.tasks import check_datasets_registered, resolve_task_data, task_specs_from_config

    cfg = tiny_cfg()
    cfg.TASKS.TASK.TYPE = "segmentation-ish"
    with pytest.raises(ValueError, match="TASKS.TASK.TYPE"):
        task_specs_from_config(cfg)
    cfg = tiny_cfg(train="no_such_dataset")
    for check in (lambda: check_datasets_registered(task_specs_from_config(cfg)), lambda: resolve_task_data(cfg),
                  lambda: UP2Trainer(cfg)):
        with pytest.raises(ValueError, match=r"TASKS\.TASK: dataset 'no_such_dataset' is not registered.*UP2_DATASETS"):
            check()
    cfg = tiny_cfg()
    cfg.TASKS.TASK.SAMPLING_RATIO = 0.0
    with pytest.raises(ValueError, match="SAMPLING_RATIO"):
        task_specs_from_config(cfg)


def test_open_vocabulary_class_names_at_inference(trained):
    cfg, trainer, _ = trained
    mapper = DetectionDatasetMapper(cfg, is_train=False)
    inputs = [mapper(DatasetCatalog.get("test_shapes_val")[0])]
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(inputs, class_names=["ellipse", "pentagon"])
    assert out[0]["instances"].pred_classes.max() <= 1
    with pytest.raises(ValueError, match="class_names"):
        trainer.model(inputs, class_names=[])
