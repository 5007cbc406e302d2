"""UP2Checkpointer, the loader behind MODEL.WEIGHTS: no pickle without consent (a .pkl whose
unpickling would run code is not opened; a .pth is read with weights_only=True), the opt-in
(MODEL.ALLOW_PICKLE_WEIGHTS) is named in the error and works, and saves are atomic."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from up2.checkpoint import PickleRefusedError, UP2Checkpointer


class _RunsCode:
    """Unpickling this object creates a marker file (a malicious checkpoint could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _zoo_pickle(path, state, extra=None):
    """detectron2's model-zoo layout: {"model": numpy arrays, "__author__": ...}."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": extra or "someone"}, f)


def test_pickles_that_run_code_are_not_opened(tmp_path):
    marker = tmp_path / "pwned"
    state = _model().state_dict()
    evil_pkl = tmp_path / "evil.pkl"
    _zoo_pickle(evil_pkl, state, _RunsCode(marker))
    evil_pth = tmp_path / "evil.pth"
    torch.save({"model": state, "extra": _RunsCode(marker)}, evil_pth)
    for path in (evil_pkl, evil_pth):
        with pytest.raises(PickleRefusedError, match=rf"{path.name}.*MODEL.ALLOW_PICKLE_WEIGHTS True"):
            UP2Checkpointer(_model()).load(str(path))
        assert not marker.exists()
    with pytest.raises(PickleRefusedError, match="weights_only=True"):
        UP2Checkpointer(_model()).load(str(evil_pth))
    # the payload is real: with the opt-in, loading runs it
    UP2Checkpointer(_model(), allow_pickle=True).load(str(evil_pkl))
    assert marker.exists()


def test_the_opt_in_loads_a_trusted_model_zoo_pickle(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    _zoo_pickle(tmp_path / "zoo.pkl", source.state_dict())
    target = _model()
    UP2Checkpointer(target, allow_pickle=True).load(str(tmp_path / "zoo.pkl"))
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_torch_files_of_tensors_and_plain_containers_load(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    # a detectron2 training checkpoint's layout: weights, iteration, trainer state of plain types
    torch.save({"model": source.state_dict(), "iteration": 4, "trainer": {"iteration": 4, "hooks": {"lr": (1.0, 2)}}},
               tmp_path / "model_final.pth")
    target = _model()
    extra = UP2Checkpointer(target).load(str(tmp_path / "model_final.pth"))
    assert extra["iteration"] == 4
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_predictor_and_training_refuse_a_pickle_naming_the_opt_in(tmp_path, monkeypatch):
    from up2.engine.pretrained_weights import check_backbone_weights
    from up2.predictor import BatchPredictor

    marker = tmp_path / "pwned"
    evil = tmp_path / "R-18.pkl"
    _zoo_pickle(evil, _model().state_dict(), _RunsCode(marker))
    cfg = tiny_cfg(**{"MODEL.BACKBONE.RANDOM_INIT": False, "MODEL.WEIGHTS": str(evil)})
    cfg.TASKS.TASK.CLASS_NAMES = ["circle", "square"]  # no dataset needed to build the model
    with pytest.raises(PickleRefusedError, match=r"MODEL.WEIGHTS=.*R-18.pkl.*MODEL.ALLOW_PICKLE_WEIGHTS True"):
        check_backbone_weights(cfg)  # training: refused before the datasets load
    with pytest.raises(PickleRefusedError, match=r"R-18.pkl.*MODEL.ALLOW_PICKLE_WEIGHTS True"):
        BatchPredictor(cfg)
    assert not marker.exists()
    cfg.MODEL.ALLOW_PICKLE_WEIGHTS = True
    assert check_backbone_weights(cfg) == str(evil)


def test_saves_are_atomic(tmp_path):
    class Broken:
        def state_dict(self):
            raise RuntimeError("disk full")

    UP2Checkpointer(_model(), str(tmp_path)).save("model_0000001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    first = (tmp_path / "model_0000001.pth").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        UP2Checkpointer(_model(), str(tmp_path), broken=Broken()).save("model_0000001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "model_0000001.pth").read_bytes() == first
