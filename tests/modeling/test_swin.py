"""D2SwinTransformer: the timm Swin wrapped as a detectron2 backbone."""
import math

import pytest
import torch
from conftest import assert_grad_norm, random_projection

timm = pytest.importorskip("timm")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402

from up2.config import add_up2_config  # noqa: E402
from up2.modeling.backbone.swin import D2SwinTransformer  # noqa: E402

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
NAMES = ["res2", "res3", "res4", "res5"]


def tiny_swin(**kw) -> D2SwinTransformer:
    args = dict(model_name="swin_tiny_patch4_window7_224", out_features=NAMES, img_size=64, model_kwargs=TINY)
    args.update(kw)
    return D2SwinTransformer(**args).eval()


@pytest.mark.parametrize("hw", [(96, 128), (64, 64), (70, 50)])
def test_strides_and_channels(hw):
    torch.manual_seed(0)
    model = tiny_swin()
    shapes = model.output_shape()
    assert [shapes[n].stride for n in NAMES] == [4, 8, 16, 32]
    assert [shapes[n].channels for n in NAMES] == [16 * 2**i for i in range(4)]
    assert model.size_divisibility == 32
    x = torch.randn(2, 3, *hw)
    out = model(x)
    assert list(out) == NAMES
    for name, feat in out.items():
        s = shapes[name].stride
        assert feat.shape == (2, shapes[name].channels, math.ceil(hw[0] / s), math.ceil(hw[1] / s))
        assert feat.is_contiguous() and torch.isfinite(feat).all()


def test_matches_timm_on_padded_input():
    """On a 32-multiple input the wrapper is timm's network, read NCHW."""
    torch.manual_seed(0)
    model = tiny_swin()
    ref = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, strict_img_size=False,
        always_partition=True, drop_path_rate=0.0, **TINY
    ).eval()
    ref_sd = ref.state_dict()
    for k, v in model.swin.state_dict().items():
        ref_sd[k.replace("layers_", "layers.", 1)].copy_(v)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model(x)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    for name, t in zip(NAMES, theirs):
        torch.testing.assert_close(ours[name], t)


def test_subset_of_features_and_grad():
    torch.manual_seed(0)
    model = tiny_swin(out_features=["res5", "res3"]).train()
    assert list(model.output_shape()) == ["res3", "res5"]
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"]
    random_projection(out["res5"]).backward()
    # every parameter feeds res5; the gradient reaches the patch embedding at full size (98 here)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert_grad_norm(model.swin.patch_embed.proj.weight.grad, 1.0, "patch_embed.proj.weight")


def test_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_swin()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="res6"):
        tiny_swin(out_features=["res2", "res6"])
    with pytest.raises(ValueError, match="empty"):
        tiny_swin(out_features=[])
    with pytest.raises(RuntimeError, match="no_such_swin"):
        tiny_swin(model_name="no_such_swin")
    model = tiny_swin()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_swin_base_from_config():
    """The paper's Swin-B config builds through detectron2's registry; its parameters are timm's
    Swin-B minus the classifier and the final norm, and every stage keeps shifted windows."""
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    with torch.device("meta"):
        backbone = build_backbone(cfg)
        full = timm.create_model(cfg.MODEL.SWIN.MODEL_NAME, pretrained=False)
    assert isinstance(backbone, D2SwinTransformer)
    n_ours = sum(p.numel() for p in backbone.parameters())
    n_head = sum(p.numel() for n, p in full.named_parameters() if n.startswith(("head.", "norm.")))
    assert n_ours == sum(p.numel() for p in full.parameters()) - n_head
    print(f"swin_base_patch4_window12_384 backbone parameters: {n_ours:,}")
    shapes = backbone.output_shape()
    assert [shapes[n].channels for n in NAMES] == [f["num_chs"] for f in full.feature_info]
    assert [shapes[n].stride for n in NAMES] == [f["reduction"] for f in full.feature_info]
    last_stage = backbone.swin.layers_3
    assert last_stage.blocks[1].window_size == (12, 12) and last_stage.blocks[1].shift_size == (6, 6)
    rates = [blk.drop_path1.drop_prob for blk in last_stage.blocks if hasattr(blk.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(cfg.MODEL.SWIN.DROP_PATH_RATE)
