"""GPU training settings of UP2Trainer, checked on the CPU: TF32 and cuDNN autotuning for CUDA
models only, pinned training batches, DDP with gradient bucket views, and the CUDA RNG state in
the checkpoint (an old checkpoint without it still loads)."""
import random

import numpy as np
import pytest
import torch

import up2.engine.trainer as trainer_module
from conftest import tiny_cfg
from up2.engine import UP2Trainer
from up2.engine.trainer import configure_cuda, pin_memory


@pytest.fixture
def restore_backend_flags():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_configure_cuda_only_for_cuda_models(restore_backend_flags):
    cfg = tiny_cfg(task_type=None)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = False, False
    assert not configure_cuda(cfg, torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark

    cfg.CUDNN_BENCHMARK = True
    assert configure_cuda(cfg, "cuda:0")  # the flags are process-wide: settable without a GPU
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark

    cfg.CUDA_ALLOW_TF32, cfg.CUDNN_BENCHMARK = False, False  # the keys turn them off
    assert configure_cuda(cfg, "cuda")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.benchmark


def test_the_paper_configs_autotune():
    from detectron2.config import get_cfg

    from conftest import REPO_ROOT
    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "up2_R50.yaml"))
    assert cfg.CUDNN_BENCHMARK and cfg.CUDA_ALLOW_TF32 and cfg.DATALOADER.PIN_MEMORY and cfg.INPUT.LSJ.ENABLED


def test_pin_memory_needs_a_cuda_model_and_cuda(monkeypatch):
    cfg = tiny_cfg(task_type=None)
    assert cfg.DATALOADER.PIN_MEMORY and not pin_memory(cfg)  # a CPU model
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pin_memory(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_memory(cfg)
    cfg.DATALOADER.PIN_MEMORY = False
    assert not pin_memory(cfg)


def test_trainer_settings_and_rng_state_round_trip(shapes_datasets, tmp_path, monkeypatch):
    calls = {}

    def capture(name, real):
        def wrapped(*args, **kwargs):
            calls.setdefault(name, []).append(kwargs)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer_module, "create_ddp_model", capture("ddp", trainer_module.create_ddp_model))
    monkeypatch.setattr(trainer_module, "build_detection_train_loader",
                        capture("loader", trainer_module.build_detection_train_loader))
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path), **{"DATALOADER.NUM_WORKERS": 0})
    trainer = UP2Trainer(cfg)
    assert calls["ddp"][0]["gradient_as_bucket_view"] and calls["ddp"][0]["find_unused_parameters"]
    assert [kw["pin_memory"] for kw in calls["loader"]] == [False]  # a CPU model: nothing to pin for

    # the CUDA generator, faked (no GPU here): saved when CUDA is in use, restored on load
    cuda_state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": cuda_state.update(now=s.clone()))

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    state = trainer.state_dict()
    assert torch.equal(state["rng"]["cuda"], torch.arange(16, dtype=torch.uint8))
    first = draws()
    cuda_state["now"] = torch.zeros(16, dtype=torch.uint8)  # the CUDA generator moved on
    trainer.load_state_dict(state)
    assert draws() == first
    assert torch.equal(cuda_state["now"], torch.arange(16, dtype=torch.uint8))

    # a checkpoint from before the CUDA state was saved: the other generators load, CUDA's is left as is
    old = {**state, "rng": {k: v for k, v in state["rng"].items() if k != "cuda"}}
    cuda_state["now"] = torch.ones(16, dtype=torch.uint8)
    trainer.load_state_dict(old)
    assert draws() == first
    assert torch.equal(cuda_state["now"], torch.ones(16, dtype=torch.uint8))
