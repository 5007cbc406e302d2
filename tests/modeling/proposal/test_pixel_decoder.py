"""MSDeformAttnPixelDecoder on a tiny fake backbone output, and the sine position encodings."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_grad_norm, random_projection
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from up2.config import add_up2_config
from up2.modeling.proposal.pixel_decoder import MSDeformAttnPixelDecoder
from up2.modeling.proposal.position_encoding import box_sine_encoding, position_encoding_2d, sine_encode
from up2.structures import PixelDecoderOutput

# a 64x96 padded image through a ResNet-like backbone
SHAPE = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=12, stride=8),
    "res4": ShapeSpec(channels=16, stride=16),
    "res5": ShapeSpec(channels=20, stride=32),
}


def _features(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(n, spec.channels, 64 // spec.stride, 96 // spec.stride, generator=g)
        for name, spec in SHAPE.items()
    }


def _decoder(num_layers=2, in_features=("res3", "res4", "res5")):
    torch.manual_seed(0)
    return MSDeformAttnPixelDecoder(
        input_shape=SHAPE, in_features=list(in_features), mask_in_feature="res2", hidden_dim=32,
        num_heads=2, num_layers=num_layers, ffn_dim=64, num_points=2, dropout=0.0,
    )


def test_output_shapes():
    dec = _decoder()
    out = dec(_features())
    assert isinstance(out, PixelDecoderOutput)
    assert out.mask_features.shape == (2, 32, 16, 24)
    assert out.spatial_shapes.tolist() == [[2, 3], [4, 6], [8, 12]]  # coarse to fine
    assert out.level_start_index.tolist() == [0, 6, 30]
    assert out.memory.shape == (2, 6 + 24 + 96, 32)
    assert out.padding_mask is None
    assert [tuple(f.shape) for f in out.multi_scale_features] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    # the unflattened features are the memory (a reshape of it: same values bit for bit)
    assert torch.equal(out.multi_scale_features[1].flatten(2).transpose(1, 2), out.memory[:, 6:30])


def test_from_config():
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.MODEL.PROPOSAL.HIDDEN_DIM = 32
    cfg.MODEL.PROPOSAL.NHEADS = 2
    cfg.MODEL.PROPOSAL.ENC_LAYERS = 1
    cfg.MODEL.PROPOSAL.ENC_FFN_DIM = 64
    dec = MSDeformAttnPixelDecoder(cfg, SHAPE)
    assert len(dec.layers) == 1 and dec.layers[0].self_attn.num_points == cfg.MODEL.PROPOSAL.N_POINTS
    out = dec(_features(n=1))
    assert out.memory.shape == (1, 126, 32)


def test_gradients_reach_every_parameter():
    dec = _decoder(num_layers=2)
    # the standard init zeroes the query->offset/attention weights, so the position and level
    # embeddings get an exactly-zero gradient at step 0; perturb them as after some training
    with torch.no_grad():
        for layer in dec.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.01)
            layer.self_attn.attention_weights.weight.normal_(0, 0.01)
    out = dec(_features())
    # memory (and multi_scale_features, its reshape) is post-LayerNorm: its mean or mean square
    # has an exactly-zero gradient; fixed random projections of the outputs do not
    (random_projection(out.mask_features, seed=1) + random_projection(out.memory, seed=2)).backward()
    # A per-channel bias in front of GroupNorm(32, 32) (one channel per group) is removed by the
    # normalisation: its true gradient is exactly zero (only rounding noise, ~1e-5, arrives).
    redundant = {f"input_proj.{i}.bias" for i in range(len(dec.input_proj))}
    assert all(m.norm.num_groups == m.norm.num_channels for m in dec.input_proj)
    for name, p in dec.named_parameters():
        if name in redundant:
            assert p.grad.norm() < 1e-3, name
        else:  # norms 5 (level_embed) .. 2000 here
            assert_grad_norm(p.grad, 0.5, name)


def test_padding_mask():
    dec = _decoder().eval()
    feats = _features()
    out_none = dec(feats)
    # an all-False mask is the same as no mask
    out_zero = dec(feats, torch.zeros(2, 64, 96, dtype=torch.bool))
    assert torch.allclose(out_none.memory, out_zero.memory, atol=1e-5)
    assert torch.allclose(out_none.mask_features, out_zero.mask_features, atol=1e-5)
    # image 1 padded on the right half and bottom quarter
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 48:] = True
    mask[1, 48:, :] = True
    out = dec(feats, mask)
    assert out.padding_mask.shape == (2, 126)
    res3_mask = out.padding_mask[:, 30:].view(2, 8, 12)
    assert not res3_mask[0].any()
    assert res3_mask[1, :6, :6].logical_not().all() and res3_mask[1, :, 6:].all() and res3_mask[1, 6:].all()
    assert torch.isfinite(out.memory).all() and torch.isfinite(out.mask_features).all()
    # the unpadded image is unaffected by its neighbour's padding
    assert torch.allclose(out.memory[0], out_none.memory[0], atol=1e-5)
    # the padded image's output differs (valid ratios / masked values are used)
    assert not torch.allclose(out.memory[1], out_none.memory[1], atol=1e-3)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="ENC_LAYERS"):
        _decoder(num_layers=0)
    with pytest.raises(ValueError, match="res6"):
        _decoder(in_features=("res5", "res6"))
    dec = _decoder(num_layers=1)
    feats = _features()
    del feats["res2"]
    with pytest.raises(ValueError, match="res2"):
        dec(feats)
    with pytest.raises(ValueError, match="padding_mask"):
        dec(_features(), torch.zeros(2, 64, 96))


def test_autocast_bf16_cpu():
    dec = _decoder(num_layers=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(_features())
    assert torch.isfinite(out.mask_features.float()).all() and torch.isfinite(out.memory.float()).all()


def _hand_sine(u, f, t=10000.0):
    vals = []
    for k in range(f):
        a = 2 * math.pi * u / t ** (2 * (k // 2) / f)
        vals.append(math.sin(a) if k % 2 == 0 else math.cos(a))
    return vals


def test_position_encoding_2d_formula():
    d = 16
    pos = position_encoding_2d(None, d, shape=(1, 5, 7))
    assert pos.shape == (1, 16, 5, 7)
    for i, j in ((0, 0), (3, 5), (4, 6)):
        expect = _hand_sine((i + 0.5) / 5, 8) + _hand_sine((j + 0.5) / 7, 8)
        assert torch.allclose(pos[0, :, i, j], torch.tensor(expect), atol=1e-5)
    # with padding: normalised by the valid size (3 rows x 4 cols valid)
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[0, :3, :4] = False
    pos_m = position_encoding_2d(mask, d)
    expect = _hand_sine((1 + 0.5) / 3, 8) + _hand_sine((2 + 0.5) / 4, 8)
    assert torch.allclose(pos_m[0, :, 1, 2], torch.tensor(expect), atol=1e-5)
    assert torch.allclose(position_encoding_2d(torch.zeros(2, 5, 7, dtype=torch.bool), d), pos.expand(2, -1, -1, -1))


def test_position_encoding_2d_equals_encoding_every_pixel():
    """The separable encoding equals encoding every pixel's (y, x) = ((i + 0.5) / h_v,
    (j + 0.5) / w_v), h_v / w_v the counts of rows / columns holding a valid pixel, for irregular
    masks too; on the valid part of bottom/right padding it is DETR's cumulative-sum convention;
    the result's token view needs no copy."""
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(3, 9, 11, generator=g) > 0.6, torch.zeros(2, 6, 10, dtype=torch.bool),
             torch.ones(1, 4, 4, dtype=torch.bool)]  # irregular, bottom/right padded, all padded
    masks[1][1, 4:, :] = True
    masks[1][1, :, 7:] = True
    for mask in masks:
        n, h, w = mask.shape
        h_v = (~mask).any(2).sum(1).clamp(min=1).float()
        w_v = (~mask).any(1).sum(1).clamp(min=1).float()
        y = ((torch.arange(h) + 0.5)[None, :, None] / h_v[:, None, None]).expand(n, h, w)
        x = ((torch.arange(w) + 0.5)[None, None, :] / w_v[:, None, None]).expand(n, h, w)
        expected = sine_encode(torch.stack((y, x), dim=-1), 16).permute(0, 3, 1, 2)  # every pixel encoded
        got = position_encoding_2d(mask, 32)
        # sin/cos of the same angles, evaluated on tensors of other shapes: the vectorised
        # kernel and its scalar tail may differ by an ulp (|values| <= 1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert got.flatten(2).transpose(1, 2).is_contiguous()
    mask = masks[1]  # bottom/right padding: valid pixels as DETR's cumulative sums
    valid = (~mask).float()
    cy, cx = valid.cumsum(1), valid.cumsum(2)
    detr = sine_encode(torch.stack(((cy - 0.5) / cy[:, -1:].clamp(min=1), (cx - 0.5) / cx[:, :, -1:].clamp(min=1)),
                                   dim=-1), 16).permute(0, 3, 1, 2)
    keep = (~mask)[:, None].expand_as(detr)
    torch.testing.assert_close(position_encoding_2d(mask, 32)[keep], detr[keep], rtol=0, atol=1e-6)
    rows, cols = (torch.arange(5) + 0.5) / 5, (torch.arange(7) + 0.5) / 7
    yx = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    torch.testing.assert_close(position_encoding_2d(None, 32, shape=(2, 5, 7)),
                               sine_encode(yx, 16).permute(2, 0, 1).expand(2, -1, -1, -1), rtol=0, atol=1e-6)


def test_box_sine_encoding_formula():
    boxes = torch.tensor([[[0.3, 0.6, 0.2, 0.9]], [[0.5, 0.5, 1.0, 0.01]]])
    enc = box_sine_encoding(boxes, 32)
    assert enc.shape == (2, 1, 32)
    for b in range(2):
        expect = sum((_hand_sine(float(c), 8) for c in boxes[b, 0]), [])
        assert torch.allclose(enc[b, 0], torch.tensor(expect), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        box_sine_encoding(boxes, 12)
    with pytest.raises(ValueError, match="cxcywh"):
        box_sine_encoding(boxes[..., :2], 32)
    with pytest.raises(ValueError, match="even"):
        sine_encode(boxes, 3)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_of_channels_last_input_returns_nchw(bias):
    """The mask-feature 1x1 conv as one GEMM: same values as the conv, NCHW-contiguous output for a
    channels-last input (what the mask-logit products want); other inputs and convs go through
    the conv itself."""
    from detectron2.layers import Conv2d

    from up2.modeling.proposal.pixel_decoder import _pointwise_conv_nchw

    torch.manual_seed(0)
    conv = Conv2d(6, 5, kernel_size=1, bias=bias)
    x = torch.randn(2, 6, 7, 9)
    ref = conv(x)
    out = _pointwise_conv_nchw(conv, x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous() and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # differentiable like the conv: the same gradients for a fixed random projection
    params = [conv.weight] + ([conv.bias] if bias else [])
    expected = torch.autograd.grad(random_projection(ref), params)
    random_projection(out).backward()
    for p, want in zip(params, expected):
        assert_grad_norm(p.grad, 1.0, "conv")
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_pointwise_conv_nchw(conv, x), ref)  # NCHW input: the conv
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _pointwise_conv_nchw(conv, x.contiguous(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16 and low.is_contiguous()
    torch.testing.assert_close(low.float(), ref, rtol=0.02, atol=0.05)
    relu = Conv2d(6, 5, kernel_size=1, activation=torch.relu)
    cl = x.contiguous(memory_format=torch.channels_last)
    # activation: the conv itself is called (the same computation repeated, so bit for bit)
    assert torch.equal(_pointwise_conv_nchw(relu, cl), relu(cl))


def test_channels_last_decoder_gives_nchw_mask_features_equal_to_nchw_decoder():
    dec = _decoder().eval()
    feats = _features()
    with torch.no_grad():
        ref = dec(feats)
        dec.to(memory_format=torch.channels_last)
        out = dec({k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()})
    assert out.mask_features.is_contiguous()
    torch.testing.assert_close(out.mask_features, ref.mask_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.memory, ref.memory, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_size", [(16, 24), (15, 23)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_branch_equals_its_definition(mask_size, channels_last):
    """Mask features = 1x1 conv(3x3 conv + GN + ReLU(lateral conv + GN of the stride-4 feature +
    bilinear upsampling of the finest encoder level)), for an exact 2x size (16x24 next to 8x12)
    and another one (15x23), NCHW or channels-last; the backbone features are only read."""
    dec = _decoder().eval()
    feats = _features()
    feats["res2"] = torch.randn(2, 8, *mask_size, generator=torch.Generator().manual_seed(3))
    if channels_last:
        dec.to(memory_format=torch.channels_last)
        feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    feats0 = {k: v.clone() for k, v in feats.items()}
    with torch.no_grad():
        out = dec(feats)
        finest = out.multi_scale_features[-1]
        lateral = dec.lateral_conv(feats["res2"]) + F.interpolate(finest, size=mask_size, mode="bilinear",
                                                                  align_corners=False)
        expected = dec.mask_features(dec.output_conv(lateral))
    assert all(torch.equal(feats[k], feats0[k]) for k in feats)
    assert out.mask_features.shape == (2, 32, *mask_size)
    torch.testing.assert_close(out.mask_features, expected, rtol=1e-5, atol=1e-5)
