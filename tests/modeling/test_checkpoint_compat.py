"""Checkpoints written before the task / data-flow refactor still load: the parameter and buffer
names (and shapes) of the tiny joint model are those that main wrote before it
(``fixtures/state_dict_keys_v0.json``, dumped from that code), and a checkpoint under those
names, loaded through detectron2's checkpointer (the MODEL.WEIGHTS path), reproduces the model
it came from.

The one deliberate exception is the conditional MoE gate (issue 16: Uni-Perceiver-MoE's gate,
Linear-LayerNorm-Linear over attributes without the task family, replaced one Linear over 11
attributes): its keys are new, the experts' keep their names and shapes, and a checkpoint with
the old gate is refused with an error that says so."""
import json
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import add_task, tiny_cfg

FIXTURE = Path(__file__).parent / "fixtures" / "state_dict_keys_v0.json"


def _cfg():
    cfg = tiny_cfg(task_type=None, **{"MODEL.UNIFIED_DECODER.MOE.ENABLED": True, "MODEL.DEVICE": "cpu"})
    add_task(cfg, "DET", "instance_segmentation", "x", "x", CLASS_NAMES=["circle", "square", "triangle"])
    add_task(cfg, "CLS", "classification", "x", "x", CLASS_NAMES=["circle", "square"])
    add_task(cfg, "CAP", "captioning", "x", "x")
    add_task(cfg, "RET", "retrieval", "x", "x")
    add_task(cfg, "MLM", "masked_lm", "x", "x")
    cfg.MODEL.DEFAULT_TASK = "DET"
    return cfg


def _old_gate(name: str) -> bool:
    return ".ffn.gate." in name


def test_old_checkpoint_names_load_and_predict_the_same(tmp_path):
    old = json.loads(FIXTURE.read_text())["state_dict"]
    torch.manual_seed(0)
    source = build_model(_cfg()).eval()
    now = {k: list(v.shape) for k, v in source.state_dict().items()}
    kept = {k: v for k, v in old.items() if not _old_gate(k)}
    assert {k: v for k, v in now.items() if not _old_gate(k)} == kept, {
        "renamed or new": sorted(set(now) - set(old)), "gone": sorted(set(old) - set(now))}
    layers = sorted({k.split(".ffn.")[0] for k in old if _old_gate(k)})
    assert layers and all(f"{layer}.ffn.w1" in now for layer in layers)  # experts: same names
    assert {k for k in old if _old_gate(k)} == {f"{layer}.ffn.gate.{p}" for layer in layers for p in ("weight", "bias")}
    assert {k for k in now if _old_gate(k)} == {f"{layer}.ffn.gate.{p}" for layer in layers for p in
                                                ("embed.weight", "embed.bias", "norm.weight", "norm.bias",
                                                 "logits.weight")}

    state = source.state_dict()
    new_gate = {k: state[k] for k in state if _old_gate(k)}
    torch.save({"model": {**{name: state[name] for name in kept}, **new_gate}}, tmp_path / "old.pth")
    torch.manual_seed(1)
    loaded = build_model(_cfg()).eval()
    assert any(not torch.equal(a, b) for a, b in zip(loaded.parameters(), source.parameters()))
    DetectionCheckpointer(loaded).load(str(tmp_path / "old.pth"))
    after = loaded.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # every tensor came from the old names
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (a,), (b,) = source([{"image": image}]), loaded([{"image": image}])
        cls_a, cls_b = (m([{"image": image}], task="CLS")[0]["pred_class_scores"] for m in (source, loaded))
    ia, ib = a["instances"], b["instances"]
    torch.testing.assert_close(ib.scores, ia.scores)
    torch.testing.assert_close(ib.pred_boxes.tensor, ia.pred_boxes.tensor)
    assert torch.equal(ib.pred_classes, ia.pred_classes)
    torch.testing.assert_close(cls_b, cls_a)


def test_checkpoint_with_the_version_1_moe_gate_is_refused(tmp_path):
    old = json.loads(FIXTURE.read_text())["state_dict"]
    torch.manual_seed(0)
    state = build_model(_cfg()).state_dict()
    ckpt = {name: state[name] for name in old if not _old_gate(name)}
    ckpt.update({name: torch.zeros(shape) for name, shape in old.items() if _old_gate(name)})
    torch.save({"model": ckpt}, tmp_path / "v1_moe.pth")
    with pytest.raises(ValueError, match=r"unified_decoder\.layers\.0\.ffn\.gate\.weight is a version-1"):
        DetectionCheckpointer(build_model(_cfg())).load(str(tmp_path / "v1_moe.pth"))
