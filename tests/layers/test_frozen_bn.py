"""conv + FrozenBN folded into one convolution (up2.layers.frozen_bn; applied by prepare_for_inference).

The reference is detectron2's own ``Conv2d`` -> ``FrozenBatchNorm2d`` forward, on a copy of the
same module whose convs keep detectron2's class."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from conftest import tiny_cfg
from up2.layers.frozen_bn import FrozenBNConv2d, fold_frozen_batchnorm
from up2.modeling.inference import prepare_for_inference


def _randomize_norms(module, seed=0):
    """Frozen statistics far from the identity, so a missing or wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.randn(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g))
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _r50(channels_last=False):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(0)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        _randomize_norms(backbone)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return backbone


def _unfolded(module):
    """A copy whose folded convs are detectron2 ``Conv2d`` again: the reference."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if type(m) is FrozenBNConv2d:
            m.__class__ = Conv2d
    return ref


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_resnet_equals_detectron2(channels_last):
    backbone = _r50(channels_last)
    reference = copy.deepcopy(backbone)
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert fold_frozen_batchnorm(backbone) == n_frozen == 53  # every R50 conv has one
    assert backbone.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 96, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out, ref = backbone(x), reference(x)
        for k in ref:
            scale = ref[k].abs().max()
            torch.testing.assert_close(out[k] / scale, ref[k] / scale, rtol=0, atol=2e-5, msg=k)
            if channels_last:
                assert out[k].is_contiguous(memory_format=torch.channels_last), k


def test_folded_conv_trains_like_the_unfolded_one():
    """One path: with autograd the folded convolution runs too, and its gradients w.r.t. the
    conv's weight, bias and input are those of conv -> norm -> activation (float rounding)."""
    conv = Conv2d(4, 6, 3, padding=1, bias=True, norm=FrozenBatchNorm2d(6), activation=F.relu)
    with torch.no_grad():
        _randomize_norms(conv)
    reference = copy.deepcopy(conv)
    assert fold_frozen_batchnorm(conv) == 1 and type(conv) is FrozenBNConv2d
    assert fold_frozen_batchnorm(conv) == 0  # idempotent: already folded
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = conv(x), reference(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for got, want in ((conv.weight.grad, reference.weight.grad), (conv.bias.grad, reference.bias.grad),
                      (x.grad, x_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_no_stale_fold_after_weights_or_statistics_change():
    conv = Conv2d(3, 5, 1, bias=False, norm=FrozenBatchNorm2d(5))
    fold_frozen_batchnorm(conv)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        first = conv(x)
        conv.norm.running_var.mul_(4.0)  # s halves
        conv.norm.bias.add_(1.0)
        other = Conv2d(3, 5, 1, bias=False, norm=FrozenBatchNorm2d(5))
        other.load_state_dict(conv.state_dict())
        torch.testing.assert_close(conv(x), other(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(conv(x), first)
        conv.weight.mul_(-1)
        other.weight.mul_(-1)
        torch.testing.assert_close(conv(x), other(x), rtol=1e-5, atol=1e-6)


def test_low_precision_runs_detectron2_forward():
    """bf16 / fp16 (autocast, or low-precision weights and inputs) are not folded: the folded
    bias would be rounded before it is added. The results are detectron2's, bit for bit."""
    backbone = _r50(channels_last=True)
    reference = copy.deepcopy(backbone)
    fold_frozen_batchnorm(backbone)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = backbone(x), reference(x)
        for k in ref:
            assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], ref[k]), k
        backbone.bfloat16()
        reference.bfloat16()
        out, ref = backbone(x.bfloat16()), reference(x.bfloat16())
        for k in ref:
            assert torch.equal(out[k], ref[k]), k


def test_only_detectron2_convs_with_frozen_bn_are_folded():
    gn = Conv2d(4, 4, 1, norm=torch.nn.GroupNorm(2, 4))
    bn = Conv2d(4, 4, 1, norm=torch.nn.BatchNorm2d(4))
    plain = torch.nn.Conv2d(4, 4, 1)
    module = torch.nn.Sequential(gn, bn, plain)
    assert fold_frozen_batchnorm(module) == 0
    assert type(gn) is Conv2d and type(bn) is Conv2d and type(plain) is torch.nn.Conv2d


def test_up2_model_folds_a_frozen_bn_backbone_and_predicts_the_same(shapes_datasets):
    from up2.modeling.tasks import resolve_task_data

    cfg = resolve_task_data(tiny_cfg(task_type="instance_segmentation", **{"MODEL.RESNETS.NORM": "FrozenBN"}))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert not any(type(m) is FrozenBNConv2d for m in model.modules())  # the constructor does not fold
    prepare_for_inference(model, ["fold_frozen_bn"])
    folded = [m for m in model.backbone.modules() if type(m) is FrozenBNConv2d]
    assert len(folded) == sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules()) > 0
    with torch.no_grad():
        _randomize_norms(model.backbone)
    reference = copy.deepcopy(model)
    reference.backbone = _unfolded(model.backbone)
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 48), generator=g, dtype=torch.uint8), "height": 64, "width": 48}]
    with torch.no_grad():
        out, ref = model(inputs)[0]["instances"], reference(inputs)[0]["instances"]
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=1e-3)
    assert (out.pred_masks != ref.pred_masks).float().mean() < 1e-3
