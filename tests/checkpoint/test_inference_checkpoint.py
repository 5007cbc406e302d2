"""The inference checkpoint folder (up2.checkpoint): a save / load round trip gives the same weights
in a file the size of the weights, the folder needs neither the training config, its text-encoder
folder nor its datasets, other format versions are refused with a message naming the version, and
the model card is generated from the model."""
import json
import os
import shutil
import stat

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import add_task, tiny_cfg
from up2.checkpoint import (
    FORMAT_VERSION, UP2Checkpointer, inference_config, is_inference_checkpoint, read_format, save_inference_checkpoint)
from up2.checkpoint.inference_checkpoint import state_dict_for_saving
from up2.modeling.tasks.task_data import read_checkpoint_task_data
from up2.modeling.text_encoder import load_tokenizer, resolve_text_model_path
from up2.modeling.tasks.vocabulary import vocabulary_ids_of_texts
from up2.predictor import GeneralistPredictor
from up2.utils.parameter_count import parameter_counts

DET_NAMES = ["circle", "square", "triangle"]
METRICS = {"DET": {"unregistered_val": {"bbox": {"AP": 12.5, "APl": float("nan")}}}}


def _cfg(text_model: str):
    cfg = tiny_cfg(task_type=None, **{"MODEL.TEXT_ENCODER.NAME": text_model, "MODEL.DEVICE": "cpu"})
    # datasets that are registered nowhere: everything inference needs is in the config
    add_task(cfg, "DET", "instance_segmentation", "unregistered_train", "unregistered_val", CLASS_NAMES=DET_NAMES)
    add_task(cfg, "CLS", "classification", "unregistered_cls_train", "unregistered_cls_val", CLASS_NAMES=["a", "b"])
    ids = vocabulary_ids_of_texts(load_tokenizer(text_model), ["a red circle", "two blue squares"])
    add_task(cfg, "CAP", "captioning", "unregistered_cap_train", "unregistered_cap_val", VOCABULARY="dataset",
             VOCABULARY_IDS=list(ids))
    cfg.MODEL.DEFAULT_TASK = "DET"
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved as an inference checkpoint; its text-encoder folder (the training
    machine's MODEL.TEXT_ENCODER.NAME) is deleted afterwards."""
    tmp = tmp_path_factory.mktemp("inference_checkpoint")
    text = tmp / "training_machine_text_model"
    shutil.copytree(resolve_text_model_path("minilm"), text)
    cfg = _cfg(str(text))
    torch.manual_seed(0)
    model = build_model(cfg)
    folder = save_inference_checkpoint(model, cfg, str(tmp / "shared"), metrics=METRICS, iteration=7)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counts = parameter_counts(model)
    shutil.rmtree(text)
    return {"tmp": tmp, "folder": folder, "state": state, "counts": counts, "cfg": cfg}


def _default_file_mode(folder) -> int:
    probe = os.path.join(folder, "probe")
    with open(probe, "w"):
        pass
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.unlink(probe)
    return mode


def test_round_trip_gives_the_weights_in_a_file_of_their_size(saved):
    folder = saved["folder"]
    names = set(os.listdir(folder))
    assert names == {"up2_checkpoint.json", "model.safetensors", "config.yaml", "task_data.json", "README.md",
                     "text_encoder"}
    assert not [n for n in os.listdir(saved["tmp"]) if n.startswith(".")]  # no temporary folder left
    assert read_format(folder)["format_version"] == FORMAT_VERSION
    weight_bytes = sum(v.numel() * v.element_size() for v in saved["state"].values())
    weights_file = os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert 0 <= weights_file - weight_bytes < 100_000  # safetensors' JSON header only
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert total < weight_bytes + 2_000_000  # + config, task data, card, tokenizer
    mode = _default_file_mode(saved["tmp"])
    for d, _, files in os.walk(folder):
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == mode, f

    predictor = GeneralistPredictor.from_pretrained(folder, device="cpu")
    loaded = predictor.model.state_dict()
    assert set(loaded) == set(saved["state"])
    assert all(torch.equal(loaded[k], v) for k, v in saved["state"].items())
    cfg = predictor.cfg
    assert cfg.MODEL.TEXT_ENCODER.NAME == os.path.join(folder, "text_encoder")  # not the deleted training folder
    assert list(cfg.TASKS.DET.CLASS_NAMES) == DET_NAMES and cfg.MODEL.WEIGHTS == folder
    assert predictor.model.tasks["CAP"].spec.vocabulary_ids == tuple(saved["cfg"].TASKS.CAP.VOCABULARY_IDS)


def test_class_names_and_vocabulary_come_from_the_folder_when_the_config_lacks_them(saved):
    folder = saved["folder"]
    data = read_checkpoint_task_data(folder)
    assert data["tasks"]["DET"]["class_names"] == DET_NAMES
    cfg = _cfg(os.path.join(folder, "text_encoder"))  # a config without the task data, MODEL.WEIGHTS the folder
    cfg.TASKS.DET.CLASS_NAMES, cfg.TASKS.CAP.VOCABULARY_IDS = [], []
    cfg.MODEL.WEIGHTS = folder
    from up2.modeling.tasks.task_data import task_specs_for_model

    specs = task_specs_for_model(cfg)
    assert specs["DET"].class_names == tuple(DET_NAMES)
    assert specs["CAP"].vocabulary_ids == tuple(saved["cfg"].TASKS.CAP.VOCABULARY_IDS)


def test_model_card_is_generated_from_the_model(saved):
    card = open(os.path.join(saved["folder"], "README.md"), encoding="utf-8").read()
    counts = saved["counts"]
    assert f"- all: {counts.full / 1e6:.1f}M ({counts.full:,})" in card
    assert f"({counts.deployment:,})" in card and "Tab. 6" in card
    assert "| DET | instance_segmentation | unregistered_train | unregistered_val | 3 classes: circle, square, " \
           "triangle |" in card
    vocabulary = len(saved["cfg"].TASKS.CAP.VOCABULARY_IDS)
    assert "| CAP | captioning |" in card and f"dataset vocabulary, {vocabulary} tokens" in card
    assert "- data: unregistered_cap_train, unregistered_cls_train, unregistered_train" in card
    assert "| DET/unregistered_val/bbox/AP | 12.5 |" in card and "| DET/unregistered_val/bbox/APl | n/a |" in card
    assert f"- torch: {torch.__version__.split('+')[0]}" in card and "weights after 7" in card
    info = json.load(open(os.path.join(saved["folder"], "up2_checkpoint.json"), encoding="utf-8"))
    assert info["metrics"]["DET"]["unregistered_val"]["bbox"] == {"AP": 12.5, "APl": None}  # strict JSON


@pytest.mark.parametrize("version,words", [(0, "version 0 is older than any this up2 reads"),
                                           (FORMAT_VERSION + 1, f"version {FORMAT_VERSION + 1} is newer than this up2 "
                                                                "reads .* upgrade up2")])
def test_other_format_versions_are_refused_naming_the_version(saved, tmp_path, version, words):
    other = tmp_path / f"v{version}"
    other.mkdir()
    info = json.load(open(os.path.join(saved["folder"], "up2_checkpoint.json"), encoding="utf-8"))
    info["format_version"] = version
    (other / "up2_checkpoint.json").write_text(json.dumps(info))
    for name in ("config.yaml", "task_data.json"):
        shutil.copy(os.path.join(saved["folder"], name), other / name)
    os.symlink(os.path.join(saved["folder"], "model.safetensors"), other / "model.safetensors")
    assert is_inference_checkpoint(str(other))
    for load in (lambda: GeneralistPredictor.from_pretrained(str(other)),
                 lambda: UP2Checkpointer(nn.Linear(2, 2)).load(str(other)),
                 lambda: read_checkpoint_task_data(str(other)),
                 lambda: inference_config(str(other))):
        with pytest.raises(ValueError, match=words):
            load()


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not an up2 inference checkpoint: no up2_checkpoint.json.*up2.export"):
        GeneralistPredictor.from_pretrained(str(tmp_path))
    with pytest.raises(IsADirectoryError, match="without up2_checkpoint.json"):
        UP2Checkpointer(nn.Linear(2, 2)).load(str(tmp_path))


class _Tied(nn.Module):
    """A small model without a text encoder, with a tied weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight


def test_saving_replaces_a_checkpoint_but_never_an_unrelated_folder(saved, tmp_path):
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not an up2 inference checkpoint"):
        save_inference_checkpoint(_Tied(), saved["cfg"], str(unrelated))
    assert os.listdir(unrelated) == ["cat.jpg"] and sorted(os.listdir(tmp_path)) == ["photos"]

    folder = str(tmp_path / "ckpt")
    save_inference_checkpoint(_Tied(), saved["cfg"], folder, iteration=1)
    torch.manual_seed(1)
    second = _Tied()
    save_inference_checkpoint(second, saved["cfg"], folder, iteration=2)
    assert read_format(folder)["iteration"] == 2 and sorted(os.listdir(tmp_path)) == ["ckpt", "photos"]
    assert "text_encoder" not in os.listdir(folder)


def test_tied_weights_are_stored_once_and_restored(saved, tmp_path):
    tensors, aliases = state_dict_for_saving(_Tied())
    assert aliases == {"b.weight": "a.weight"} and set(tensors) == {"a.weight", "a.bias", "b.bias"}
    torch.manual_seed(2)
    source = _Tied()
    save_inference_checkpoint(source, saved["cfg"], str(tmp_path / "tied"))
    target = _Tied()
    checkpointer = UP2Checkpointer(target)
    checkpointer.load(str(tmp_path / "tied"))
    assert not checkpointer.last_incompatible.missing_keys and not checkpointer.last_incompatible.unexpected_keys
    assert torch.equal(target.b.weight, source.a.weight) and target.b.weight is target.a.weight
