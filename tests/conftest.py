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
