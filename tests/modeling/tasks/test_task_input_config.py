"""Per-task image size (``TASKS.<NAME>.IMAGE_SIZE``): ``task_input_config`` rewrites cfg.INPUT for
one task, the trainer's mappers and the predictors resize each task's images to its size.

The shapes images of the ``shapes_datasets`` fixture are 64 x 64; the tiny config resizes to 64
(INPUT.MIN/MAX_SIZE_* = 64), so a task with IMAGE_SIZE 32 sees 32 x 32 images and the others 64 x 64.
"""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from conftest import add_task, tiny_cfg
from task_models import tiny_model_cfg
from up2.engine.trainer import UP2Trainer, build_mapper
from up2.modeling.tasks.base import task_input_config, task_specs_from_config


def _spec(cfg, name="TASK"):
    return task_specs_from_config(cfg)[name]


def _sized_cfg(image_size, min_test=600, max_test=1000):
    cfg = tiny_cfg(task_type="classification", train="x", test="y",
                   **{"INPUT.MIN_SIZE_TEST": min_test, "INPUT.MAX_SIZE_TEST": max_test})
    cfg.TASKS.TASK.IMAGE_SIZE = image_size
    cfg.freeze()
    return cfg


def test_sizes_are_set_and_the_longer_side_cap_keeps_its_proportion():
    cfg = _sized_cfg(300)  # test: shorter side 600, longer <= 1000 (ratio 5 / 3)
    before = cfg.dump()
    out = task_input_config(cfg, _spec(cfg))
    assert out is not cfg and out.is_frozen()
    assert tuple(out.INPUT.MIN_SIZE_TRAIN) == (300,)
    assert out.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert out.INPUT.MIN_SIZE_TEST == 300
    assert out.INPUT.MAX_SIZE_TEST == out.INPUT.MAX_SIZE_TRAIN == 500  # 300 * 1000 / 600
    assert out.INPUT.LSJ.IMAGE_SIZE == 300
    assert cfg.dump() == before  # the caller's config is untouched
    # a cap below the size itself (config ratio < 1) is raised to the size: never smaller than the shorter side
    small_cap = _sized_cfg(300, min_test=600, max_test=400)
    assert task_input_config(small_cap, _spec(small_cap)).INPUT.MAX_SIZE_TEST == 300


def test_zero_keeps_the_config_itself():
    cfg = _sized_cfg(0)
    assert _spec(cfg).image_size == 0
    assert task_input_config(cfg, _spec(cfg)) is cfg


def test_negative_size_is_refused_naming_the_key():
    cfg = _sized_cfg(-32)
    with pytest.raises(ValueError, match=r"TASKS\.TASK\.IMAGE_SIZE.*-32"):
        task_specs_from_config(cfg)
    # a spec built in code (not through the config reader) is checked where it is used
    spec = dataclasses.replace(_spec(_sized_cfg(0)), image_size=-1)
    with pytest.raises(ValueError, match=r"TASKS\.TASK\.IMAGE_SIZE.*-1"):
        task_input_config(cfg, spec)


def test_default_spec_has_no_image_size():
    cfg = get_cfg()
    from up2 import add_up2_config

    add_up2_config(cfg)
    add_task(cfg, "CLS", "classification", "x", "y")
    assert task_specs_from_config(cfg)["CLS"].image_size == 0


@pytest.fixture(scope="module")
def two_size_cfg(shapes_datasets):
    return tiny_model_cfg({"CLS": ("classification", {"IMAGE_SIZE": 32}),
                           "RET": ("retrieval", {"IMAGE_SIZE": 48}),
                           "DET": ("detection", {})})


@pytest.mark.parametrize("name, side", [("CLS", 32), ("RET", 48), ("DET", 64)])
@pytest.mark.parametrize("is_train", [True, False])
def test_trainer_mapper_yields_the_tasks_size(two_size_cfg, name, side, is_train):
    spec = task_specs_from_config(two_size_cfg)[name]
    dataset = (spec.datasets_train if is_train else spec.datasets_test)[0]
    records = DatasetCatalog.get(dataset)[:2]
    assert all(Image.open(r["file_name"]).size == (64, 64) for r in records)
    torch.manual_seed(0)
    mapper = build_mapper(two_size_cfg, spec, is_train=is_train)
    for r in records:
        image = mapper(dict(r))["image"]
        assert tuple(image.shape) == (3, side, side), (name, is_train)


def test_trainer_test_loader_uses_the_tasks_size(two_size_cfg):
    spec = task_specs_from_config(two_size_cfg)["CLS"]
    loader = UP2Trainer.build_test_loader(two_size_cfg, spec.datasets_test[0], spec)
    batch = next(iter(loader))
    assert all(tuple(x["image"].shape) == (3, 32, 32) for x in batch)


def _capture_model_inputs(model):
    """A forward pre-hook recording (task, image shape) of every image the model receives."""
    seen = []

    def hook(module, args, kwargs):
        seen.extend((kwargs.get("task"), tuple(x["image"].shape)) for x in args[0])

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_predictors_resize_per_task(two_size_cfg):
    from up2.predictor import BatchPredictor, GeneralistPredictor

    cfg = two_size_cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MAX_SIZE_TEST = 128  # cap: twice the shorter side
    cfg.freeze()
    image = np.random.RandomState(0).randint(0, 256, (50, 150, 3), dtype=np.uint8)  # H 50, W 150
    # by hand: CLS shorter side 50 -> 32 (x 0.64): 32 x 96, cap 64 (32 * 128 / 64) -> x 2/3: 21.3 x 64 -> 21 x 64;
    # DET shorter side -> 64: 64 x 192, cap 128 -> 42.7 x 128 -> 43 x 128
    expected = {"CLS": (3, 21, 64), "DET": (3, 43, 128)}

    predictor = GeneralistPredictor(cfg)
    assert list(predictor.resize["CLS"].short_edge_length) == [32, 32] and predictor.resize["CLS"].max_size == 64
    assert list(predictor.resize["DET"].short_edge_length) == [64, 64] and predictor.resize["DET"].max_size == 128
    seen, handle = _capture_model_inputs(predictor.model)
    try:
        predictor.classify(image, class_names=["circle", "square"])
        predictor.detect(image)
    finally:
        handle.remove()
    assert seen == [("CLS", expected["CLS"]), ("DET", expected["DET"])]

    bp = BatchPredictor(cfg, batch_size=2)
    seen, handle = _capture_model_inputs(bp.model)
    try:
        bp([image], task="CLS", class_names=["circle", "square"])
        bp([image], task="DET")  # the next call without the task's size goes back to cfg.INPUT's
    finally:
        handle.remove()
    assert seen == [("CLS", expected["CLS"]), ("DET", expected["DET"])]


@pytest.mark.parametrize("key, value, expected", [
    ("IMAGE_SIZE", "big", "IMAGE_SIZE must be a whole number, got 'big'"),
    ("IMAGE_SIZE", 64.9, "IMAGE_SIZE must be a whole number, got 64.9"),
    ("IMAGE_SIZE", True, "IMAGE_SIZE must be a whole number, got True"),
    ("BEAM_SIZE", "x", "BEAM_SIZE must be a whole number, got 'x'"),
    ("GATHER_FEATURES", "false", "GATHER_FEATURES must be True or False, got 'false'"),
    ("MATCH_IDENTICAL_CAPTIONS", 1, "MATCH_IDENTICAL_CAPTIONS must be True or False, got 1"),
])
def test_task_keys_of_the_wrong_type_are_refused_naming_the_key(key, value, expected):
    from up2.modeling.tasks.base import task_specs_from_config

    cfg = tiny_cfg("retrieval")
    name = next(iter(cfg.TASKS))
    cfg.defrost()
    cfg.TASKS[name][key] = value
    with pytest.raises(ValueError, match=f"cfg.TASKS.{name}.{expected}".replace("(", r"\(").replace(")", r"\)")):
        task_specs_from_config(cfg)


def test_match_identical_captions_only_on_retrieval():
    from up2.modeling.tasks.base import task_specs_from_config

    cfg = tiny_cfg("classification")
    name = next(iter(cfg.TASKS))
    cfg.defrost()
    cfg.TASKS[name].MATCH_IDENTICAL_CAPTIONS = True
    with pytest.raises(ValueError, match="MATCH_IDENTICAL_CAPTIONS applies to retrieval tasks only"):
        task_specs_from_config(cfg)
    cfg.TASKS[name].MATCH_IDENTICAL_CAPTIONS = False
    assert task_specs_from_config(cfg)[name].match_identical_captions is False
