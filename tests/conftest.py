"""Shared pytest setup: offline Hugging Face, a `gpu` marker, and the coco128 location."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128 = REPO_ROOT.parent / "shared" / "data" / "coco128"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def seed_everything(seed: int = 0) -> None:
    """Seed torch, numpy's and Python's global generators (model init, augmentations, samplers
    that draw from them). Module- and session-scoped fixtures run before the per-test seeding
    below, so those that draw random numbers call this themselves."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Base layer of reproducibility: torch, numpy and ``random`` start from seed 0 in every test
    (tests whose numbers matter still seed explicitly, next to the draws)."""
    seed_everything(0)


def random_projection(out, seed: int = 0):
    """A scalar objective ``sum(out * R)`` with a fixed random ``R`` (standard normal, seeded):
    its gradient is ``R`` pushed back through the network, non-zero for any output that
    depends on the input -- unlike ``out.sum()``, whose gradient through a normalised output
    (LayerNorm with unit weight and zero bias, softmax, ...) is exactly zero and only rounding
    noise reaches the parameters. Computed in float32 (bf16 outputs included)."""
    import torch

    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return (out.float() * r).sum()


def assert_grad_norm(grad, at_least: float, name: str = "grad"):
    """``grad`` exists, is finite and its L2 norm is at least ``at_least`` (far above the ~1e-6
    rounding noise of a gradient that is zero in exact arithmetic)."""
    import torch

    assert grad is not None, f"{name}: no gradient"
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
    norm = grad.float().norm().item()
    assert norm >= at_least, f"{name}: gradient norm {norm:.3g} < {at_least}"


def assert_coco_results(results: dict, dataset_name: str) -> None:
    """One iou type's COCOEvaluator results (percentages) on ``dataset_name``: the six summary
    keys and, with several classes, one ``AP-<class>`` per class; AP, AP50, AP75 finite in
    [0, 100] (the dataset has non-crowd ground truth, and a model without any detection would
    give NaN there); APs / APm / APl in [0, 100] or NaN (NaN: no ground truth of that size);
    ``AP-<class>`` NaN exactly for the classes without non-crowd ground truth."""
    import math

    from detectron2.data import DatasetCatalog, MetadataCatalog

    classes = list(MetadataCatalog.get(dataset_name).thing_classes)
    present = {a["category_id"] for r in DatasetCatalog.get(dataset_name) for a in r.get("annotations", [])
               if not a.get("iscrowd", 0)}
    assert present, f"{dataset_name} has no non-crowd ground truth"
    summary = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(results) == summary | ({f"AP-{c}" for c in classes} if len(classes) > 1 else set())
    for key, value in results.items():
        assert isinstance(value, float), (key, value)
        in_range = 0.0 <= value <= 100.0
        if key in ("AP", "AP50", "AP75"):
            assert in_range, (key, value)
        elif key in summary:
            assert in_range or math.isnan(value), (key, value)
        elif classes.index(key[3:]) in present:
            assert in_range, (key, value)
        else:
            assert math.isnan(value), (key, value)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def coco128() -> Path:
    """Path of the real-photo COCO subset; skips the test when it is absent."""
    if not (COCO128 / "instances.json").is_file():
        pytest.skip(f"coco128 not found at {COCO128}")
    return COCO128


@pytest.fixture(scope="session")
def shapes_datasets(tmp_path_factory):
    """A small shapes dataset (24 train / 8 val images, 64 px) registered as test_shapes_{train,val}."""
    from up2.data.datasets.shapes import generate_shapes_dataset, register_shapes
    from up2.data.datasets.shapes_tasks import register_shapes_tasks

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes_dataset(str(root), num_train=24, num_val=8, image_size=64, seed=0)
    names = register_shapes(str(root), prefix="test_shapes")
    return names + register_shapes_tasks(str(root), prefix="test_shapes")


def add_task(cfg, name, task_type, train, test, **keys):
    """Add cfg.TASKS.<name> (a small batch of 4; extra keys e.g. VOCABULARY="dataset")."""
    node = {"TYPE": task_type, "DATASETS": {"TRAIN": [train], "TEST": [test]}, "IMS_PER_BATCH": 4}
    node.update(keys)
    setattr(cfg.TASKS, name, type(cfg)(node))
    return cfg


def tiny_cfg(task_type: str = "instance_segmentation", train="test_shapes_train", test="test_shapes_val", **overrides):
    """The tiny config (configs/tiny/Base-tiny.yaml) shrunk further for unit tests."""
    from detectron2.config import get_cfg

    import up2  # noqa: F401
    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "tiny" / "Base-tiny.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.PROPOSAL.HIDDEN_DIM", 32, "MODEL.PROPOSAL.NHEADS", 2, "MODEL.PROPOSAL.ENC_LAYERS", 1,
            "MODEL.PROPOSAL.DEC_LAYERS", 2, "MODEL.PROPOSAL.NUM_QUERIES", 12, "MODEL.PROPOSAL.DN_NUM", 8,
            "MODEL.PROPOSAL.TRAIN_NUM_POINTS", 256, "MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS", 8,
            "MODEL.UNIFIED_DECODER.EMBED_DIM", 32, "MODEL.UNIFIED_DECODER.NUM_HEADS", 2,
            "MODEL.UNIFIED_DECODER.FFN_DIM", 64, "MODEL.UNIFIED_DECODER.NUM_LAYERS", 1,
            "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64,
            "INPUT.MAX_SIZE_TEST", 64, "SOLVER.IMS_PER_BATCH", 4,
        ]
    )
    if task_type is not None:
        cfg.TASKS.TASK = type(cfg)({"TYPE": task_type, "DATASETS": {"TRAIN": [train], "TEST": [test]}, "IMS_PER_BATCH": 4})
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg
