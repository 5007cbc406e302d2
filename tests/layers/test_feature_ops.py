"""In-place GroupNorm and 2x bilinear upsample-add against torch's own ops in float64."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from up2.layers.feature_ops import add_upsampled_2x_, group_norm_


def _norm(channels, groups, affine=True, seed=0):
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    return norm


def _reference_group_norm(x, norm):
    w = norm.weight.double() if norm.affine else None
    b = norm.bias.double() if norm.affine else None
    return F.group_norm(x.double(), norm.num_groups, w, b, norm.eps)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_in_place_equals_torch(channels_last, chunk, affine):
    """Same values as F.group_norm in float64 (float32 input: to float32 rounding), written into
    x itself with its strides; a mean far from 0 (the one-pass variance's hard case) included."""
    norm = _norm(12, 4, affine)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 7, 9, generator=g) * 3 + 20
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = _reference_group_norm(x, norm)
    y = x.clone(memory_format=torch.preserve_format)
    with torch.no_grad():
        out = group_norm_(y, norm, chunk=chunk)
    assert out is y and out.stride() == x.stride()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    x64 = x.double()
    with torch.no_grad():
        torch.testing.assert_close(group_norm_(x64, norm, chunk=chunk), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_group_norm_in_place_large_mean(channels_last, offset):
    """A mean thousands of standard deviations from 0 does not cancel the variance away (two-pass
    statistics): as close to the float64 result as torch's own kernel, whatever the chunk."""
    norm = _norm(8, 4)
    x = torch.randn(2, 8, 16, 20, generator=torch.Generator().manual_seed(2)) + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = _reference_group_norm(x, norm)
    torch_err = (norm(x).double() - ref).abs().max()
    for chunk in (1, 64, 4096):
        with torch.no_grad():
            ours = group_norm_(x.clone(memory_format=torch.preserve_format), norm, chunk=chunk).double()
        assert (ours - ref).abs().max() <= max(torch_err, 1e-3)


def test_group_norm_in_place_with_grad_enabled_and_trainable_norm():
    """Grad mode on, x without grad, a norm whose parameters require grad: normalised, no graph."""
    norm = _norm(12, 4)
    x = torch.randn(1, 12, 5, 6)
    ref = _reference_group_norm(x, norm)
    out = group_norm_(x, norm)
    assert out.grad_fn is None
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_group_norm_in_place_empty_and_numpy_chunk():
    norm = _norm(8, 4)
    for shape in ((0, 8, 4, 4), (2, 8, 0, 4)):
        x = torch.randn(shape)
        assert group_norm_(x, norm) is x
    x = torch.randn(1, 8, 3, 5)
    ref = _reference_group_norm(x, norm)
    torch.testing.assert_close(group_norm_(x, norm, chunk=np.int64(2)).double(), ref, rtol=0, atol=2e-5)


def test_group_norm_in_place_rejects_bad_input():
    norm = _norm(12, 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) float32 / float64"):
        group_norm_(torch.zeros(2, 12, 5), norm)
    for dtype in (torch.long, torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\) float32 / float64"):
            group_norm_(torch.zeros(1, 12, 2, 2, dtype=dtype), norm)
    with pytest.raises(ValueError, match="8 channels, the norm 12"):
        group_norm_(torch.zeros(1, 8, 2, 2), norm)
    for chunk in (0, True, 2.0):
        with pytest.raises(ValueError, match="chunk must be an int >= 1"):
            group_norm_(torch.zeros(1, 12, 2, 2), norm, chunk=chunk)
    with pytest.raises(ValueError, match="without autograd"):
        group_norm_(torch.zeros(1, 12, 2, 2, requires_grad=True), norm)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (3, 1), (7, 9), (12, 10)])
@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("target_channels_last", [False, True])
def test_add_upsampled_2x_equals_interpolate_then_add(size, rows, target_channels_last):
    """float64: F.interpolate(bilinear, align_corners=False) + add to rounding, for border-only
    maps (1 pixel wide or high), row blocks that do not divide h, and a source that is a
    strided (channels-last) view of token rows, as the pixel decoder passes it."""
    h, w = size
    g = torch.Generator().manual_seed(h * 100 + w)
    tokens = torch.randn(2, h * w + 3, 6, generator=g, dtype=torch.float64)
    source = tokens[:, 3:].transpose(1, 2).reshape(2, 6, h, w)  # channels-last strides
    target = torch.randn(2, 6, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    if target_channels_last:
        target = target.contiguous(memory_format=torch.channels_last)
    ref = target + F.interpolate(source, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
    tokens0 = tokens.clone()
    with torch.no_grad():
        out = add_upsampled_2x_(target, source, rows=rows)
    assert out is target
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(tokens, tokens0)  # the source is only read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_upsampled_2x_low_precision(dtype):
    """float32: to float32 rounding; bf16: no further from the float64 result than torch's
    interpolate-then-add in bf16 (the passes run in float32, one rounding into the target)."""
    g = torch.Generator().manual_seed(0)
    source = torch.randn(1, 8, 10, 14, generator=g)
    target = torch.randn(1, 8, 20, 28, generator=g)
    ref = target.double() + F.interpolate(source.double(), size=(20, 28), mode="bilinear", align_corners=False)
    low_t, low_s = target.to(dtype), source.to(dtype)
    torch_err = (low_t + F.interpolate(low_s, size=(20, 28), mode="bilinear", align_corners=False)).double() - ref
    with torch.no_grad():
        ours_err = add_upsampled_2x_(low_t.clone(), low_s).double() - ref
    if dtype == torch.float32:
        assert ours_err.abs().max() < 1e-5
    else:
        assert ours_err.abs().max() <= torch_err.abs().max()


def test_add_upsampled_2x_rejects_bad_input():
    s = torch.zeros(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"must be \(N, C, 2h, 2w\) = \(1, 3, 8, 10\)"):
        add_upsampled_2x_(torch.zeros(1, 3, 8, 11), s)
    with pytest.raises(ValueError, match=r"must be \(N, C, 2h, 2w\)"):
        add_upsampled_2x_(torch.zeros(1, 4, 8, 10), s)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) float"):
        add_upsampled_2x_(torch.zeros(1, 3, 8, 10, dtype=torch.long), s)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) float"):
        add_upsampled_2x_(torch.zeros(3, 8, 10), s[0])
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        add_upsampled_2x_(torch.zeros(1, 3, 8, 10), s, rows=0)
    with pytest.raises(ValueError, match="without autograd"):
        add_upsampled_2x_(torch.zeros(1, 3, 8, 10), s.clone().requires_grad_())


def test_add_upsampled_2x_non_finite_and_extreme_values_as_interpolate():
    """Weighted sums as F.interpolate forms them: an inf pixel spreads inf (NaN where +inf meets
    -inf), values near the float range do not overflow, empty maps are a no-op, numpy rows."""
    source = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    source[0, 0, 1, 1] = float("inf")
    source[0, 1, 2, 3] = float("-inf")
    source[0, 1, 0, 0] = 1.5e308
    source[0, 1, 0, 1] = -1.6e308
    target = torch.zeros(1, 2, 8, 10, dtype=torch.float64)
    ref = F.interpolate(source, size=(8, 10), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = add_upsampled_2x_(target, source, rows=np.int64(3))
    # the outermost output rows / columns: torch multiplies a clamped tap of weight 0 with the
    # inf (0 * inf = NaN); ours leaves zero-weight taps out, so compare inside them, and there
    # only that the border rows have no NaN of ours
    inner, ref_inner = out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]
    assert torch.equal(inner.isnan(), ref_inner.isnan()) and torch.equal(inner.isinf(), ref_inner.isinf())
    assert inner.isinf().sum() > 0 and inner.isnan().sum() == 0
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-12, atol=1e-12)
    assert out[0, 1, :2, :4].isfinite().all()  # next to +-1.5e308: no overflow in a difference
    for h, w in ((0, 3), (2, 0)):
        empty = torch.zeros(1, 2, 2 * h, 2 * w)
        assert add_upsampled_2x_(empty, torch.zeros(1, 2, h, w)) is empty
