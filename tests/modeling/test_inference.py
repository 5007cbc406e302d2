"""``prepare_for_inference``: every kept inference rewrite gives the unprepared model's outputs
(float tolerance), keeps parameters and state_dict keys, and is idempotent."""
import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from conftest import tiny_cfg
from up2.layers.frozen_bn import FrozenBNConv2d
from up2.modeling.inference import INFERENCE_ONLY, REWRITES, ChunkedFFNEncoderLayer, prepare_for_inference
from up2.modeling.proposal.pixel_decoder import DeformableEncoderLayer
from up2.modeling.tasks import resolve_task_data


def _layer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[6, 7], [3, 4]])  # S = 54 tokens
    return (torch.randn(2, 54, 32, generator=g), torch.randn(2, 54, 32, generator=g),
            torch.rand(2, 54, 2, 2, generator=g), shapes, torch.tensor([0, 42]), None)


@pytest.mark.parametrize("chunk", [1, 7, 54, 1000])
def test_chunked_ffn_encoder_layer_equals_the_layer(chunk):
    """Pieces of 1, 7 (a remainder), all and more than all tokens; the inputs are left alone."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(32, 4, 2, 2, 64, 0.0).eval()
    args = _layer_inputs()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        expected = layer(*args)
        fast = copy.deepcopy(layer)
        fast.__class__ = ChunkedFFNEncoderLayer
        fast.ffn_chunk = chunk
        for context in (torch.no_grad, torch.inference_mode):
            with context():
                out = fast(*args)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before[:3]))
    assert fast.state_dict().keys() == layer.state_dict().keys()


@pytest.fixture(scope="module")
def model(shapes_datasets):
    """The tiny model with a FrozenBN backbone (norm statistics away from the identity) and box
    heads that depend on the features, in eval mode, unprepared."""
    cfg = resolve_task_data(tiny_cfg(task_type="instance_segmentation", **{"MODEL.RESNETS.NORM": "FrozenBN"}))
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.backbone.modules():
            if isinstance(mod, FrozenBatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        dec = m.proposal_network.decoder
        for mlp in (dec.box_head, dec.enc_box):
            mlp.layers[-1].weight.normal_(0, 0.02, generator=g)
            mlp.layers[-1].bias.normal_(0, 0.02, generator=g)
    return m


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 64, 48), generator=g, dtype=torch.uint8), "height": 80, "width": 60},
            {"image": torch.randint(0, 256, (3, 40, 64), generator=g, dtype=torch.uint8)}]


def _assert_same_predictions(out, ref):
    assert len(out) == len(ref) == 2
    for a, b in zip(out, ref):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("rewrites", [[r] for r in REWRITES] + [None], ids=list(REWRITES) + ["all"])
def test_prepared_model_predicts_as_the_unprepared_one(model, rewrites):
    with torch.no_grad():
        ref = model(_inputs())
    prepared = prepare_for_inference(copy.deepcopy(model).train(), rewrites)
    assert not prepared.training
    assert prepared.state_dict().keys() == model.state_dict().keys()
    for (name, p), q in zip(prepared.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        _assert_same_predictions(prepared(_inputs()), ref)
    chosen = REWRITES if rewrites is None else rewrites
    swapped = {type(m) for m in prepared.modules()}
    assert (FrozenBNConv2d in swapped) == ("fold_frozen_bn" in chosen)
    assert (ChunkedFFNEncoderLayer in swapped) == ("encoder_ffn_chunks" in chosen)
    assert (prepared.target_cache is not None) == ("target_cache" in chosen)
    conv = prepared.backbone.stem.conv1.weight  # 7x7: tells the layouts apart
    assert conv.is_contiguous(memory_format=torch.channels_last) == ("channels_last" in chosen)


def test_prepare_is_idempotent_and_checks_names(model):
    prepared = prepare_for_inference(copy.deepcopy(model))
    classes = [type(m) for m in prepared.modules()]
    assert prepare_for_inference(prepared) is prepared
    assert [type(m) for m in prepared.modules()] == classes
    assert all(type(m) is not FrozenBNConv2d and type(m) is not ChunkedFFNEncoderLayer for m in model.modules())
    with pytest.raises(ValueError, match="unknown rewrites"):
        prepare_for_inference(copy.deepcopy(model), ["in_place_gelu"])
    with pytest.raises(ValueError, match=r"did you mean \['target_cache'\]"):
        prepare_for_inference(copy.deepcopy(model), "target_cache")  # not split into letters


def test_a_prepared_model_refuses_to_train(model):
    safe = prepare_for_inference(copy.deepcopy(model), [r for r in REWRITES if r not in INFERENCE_ONLY])
    assert safe.inference_only_rewrites == ()  # channels-last, folding and the cache can still train
    prepared = prepare_for_inference(copy.deepcopy(model), ["encoder_ffn_chunks"])
    assert prepared.inference_only_rewrites == ("encoder_ffn_chunks",)
    prepared.train()
    with pytest.raises(RuntimeError, match="prepared for inference"):
        prepared(_inputs())
    assert model.inference_only_rewrites == ()  # the unprepared original is untouched


def test_target_cache_serves_the_second_call_until_a_weight_changes(model):
    prepared = prepare_for_inference(copy.deepcopy(model), ["target_cache"])
    calls = []
    handle = prepared.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            first = prepared(_inputs())
            second = prepared(_inputs())
            assert len(calls) == 1  # the class names were encoded once
            prepared.text_encoder.proj.weight.mul_(1.5)  # an optimizer step or load_state_dict bumps versions too
            prepared(_inputs())
        assert len(calls) == 2
    finally:
        handle.remove()
    _assert_same_predictions(second, first)
