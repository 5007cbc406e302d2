"""Parity of up2's multi-scale deformable attention with transformers' pure-PyTorch version,
plus a brute-force bilinear check, dtype/autocast behaviour and input validation. These run on
the default path (the compiled CPU kernel when built); test_msda_compiled.py compares paths."""
import math

import pytest
import torch

from up2.layers import MSDeformAttn, fast_path_available, ms_deform_attn_core
from up2.layers.msda.library import MSDA_LIBRARY

tmodel = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
from transformers import DeformableDetrConfig  # noqa: E402

# non-square levels and a 1x1 level
SHAPES = [(6, 9), (3, 5), (2, 2), (1, 1)]


def _level_start(shapes):
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def _random_inputs(shapes, n=2, lq=7, m=2, dh=4, p=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, dh, generator=g, dtype=dtype)
    # locations slightly outside [0, 1] too, to exercise zero padding at the borders
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    attn = torch.randn(n, lq, m, len(shapes) * p, generator=g, dtype=dtype).softmax(-1)
    attn = attn.view(n, lq, m, len(shapes), p)
    return value, loc, attn


def _reference(value, shapes, loc, attn):
    return tmodel.MultiScaleDeformableAttention()(
        value, torch.tensor(shapes), shapes, _level_start(shapes), loc, attn, 64
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_core_matches_transformers_forward_and_grads(dtype, tol):
    value, loc, attn = _random_inputs(SHAPES, dtype=dtype)
    ins_a = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ins_b = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out_a = ms_deform_attn_core(ins_a[0], torch.tensor(SHAPES), _level_start(SHAPES), ins_a[1], ins_a[2])
    out_b = _reference(ins_b[0], SHAPES, ins_b[1], ins_b[2])
    assert out_a.shape == (2, 7, 2 * 4) and out_a.dtype == dtype
    diff = (out_a - out_b).abs().max().item()
    assert diff <= tol, f"forward max abs diff {diff}"
    grad_out = torch.randn_like(out_a)
    ga = torch.autograd.grad(out_a, ins_a, grad_out)
    gb = torch.autograd.grad(out_b, ins_b, grad_out)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), ga, gb):
        d = (a - b).abs().max().item()
        assert d <= tol, f"grad wrt {name}: max abs diff {d}"


def _bilinear_zero_pad(img, x, y):
    """Hand bilinear sample of img (h, w) at normalised (x, y), pixel centres at (i+.5)/size."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                total += wx * wy * float(img[yi, xi])
    return total


def test_core_brute_force_single_point():
    shapes = [(3, 5), (1, 1)]
    n, lq, m, dh, p = 1, 1, 2, 3, 1
    value, loc, _ = _random_inputs(shapes, n=n, lq=lq, m=m, dh=dh, p=p, seed=3)
    attn = torch.zeros(n, lq, m, len(shapes), p, dtype=torch.float64)
    attn[..., 0, 0] = 0.25  # level 0 weight
    attn[..., 1, 0] = 0.75  # the 1x1 level
    loc[0, 0, :, 0, 0] = torch.tensor([[0.37, 0.81], [0.95, 0.05]], dtype=torch.float64)  # per head
    loc[0, 0, :, 1, 0] = torch.tensor([[0.5, 0.5], [0.8, 0.3]], dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, None, loc, attn)
    lvl0 = value[0, :15].view(3, 5, m, dh)
    lvl1 = value[0, 15:].view(1, 1, m, dh)
    for head in range(m):
        for c in range(dh):
            x0, y0 = loc[0, 0, head, 0, 0].tolist()
            x1, y1 = loc[0, 0, head, 1, 0].tolist()
            expect = 0.25 * _bilinear_zero_pad(lvl0[..., head, c], x0, y0) + 0.75 * _bilinear_zero_pad(
                lvl1[..., head, c], x1, y1
            )
            assert abs(out[0, 0, head * dh + c].item() - expect) < 1e-12


def _hf_module(dim, heads, levels, points):
    cfg = DeformableDetrConfig(d_model=dim, num_feature_levels=levels, disable_custom_kernels=True)
    return tmodel.DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=heads, n_points=points)


def _random_module(dim, heads, levels, points, std=0.2):
    """A float64 MSDeformAttn with N(0, std) weights everywhere (its init has zero attention
    weights and zero offset weights, which would hide most of the computation)."""
    mod = MSDeformAttn(dim, heads, levels, points).double()
    with torch.no_grad():
        for prm in mod.parameters():
            prm.normal_(0, std)
    return mod


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_transformers_module(ref_dim):
    torch.manual_seed(0)
    dim, heads, points = 32, 4, 3
    shapes = SHAPES[:3]
    ours = _random_module(dim, heads, len(shapes), points)
    ref = _hf_module(dim, heads, len(shapes), points).double()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    n, lq, s = 2, 5, sum(h * w for h, w in shapes)
    query = torch.randn(n, lq, dim, dtype=torch.float64)
    value_in = torch.randn(n, s, dim, dtype=torch.float64)
    ref_pts = torch.rand(n, lq, len(shapes), ref_dim, dtype=torch.float64)
    pad = torch.rand(n, s) < 0.2
    st = torch.tensor(shapes)
    a = ours(query, ref_pts, value_in, st, _level_start(shapes), pad)
    b, _ = ref(query, encoder_hidden_states=value_in, attention_mask=~pad, reference_points=ref_pts,
               spatial_shapes=st, spatial_shapes_list=shapes, level_start_index=_level_start(shapes))
    assert (a - b).abs().max().item() < 1e-12


def test_init_offsets_ring():
    mod = MSDeformAttn(16, 4, 2, 3)
    bias = mod.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, head 2 along -x, head 3 along -y; point p at p+1
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        assert torch.allclose(bias[:, 0, p], dirs * (p + 1), atol=1e-6)
        assert torch.allclose(bias[:, 1, p], dirs * (p + 1), atol=1e-6)
    assert torch.count_nonzero(mod.attention_weights.weight) == 0
    assert torch.count_nonzero(mod.attention_weights.bias) == 0


def test_padding_values_are_ignored():
    torch.manual_seed(1)
    shapes = [(4, 6), (2, 3)]
    s = 30
    mod = MSDeformAttn(16, 2, 2, 2)
    query, value = torch.randn(1, 5, 16), torch.randn(1, s, 16)
    ref = torch.rand(1, 5, 2, 2)
    pad = torch.zeros(1, s, dtype=torch.bool)
    pad[0, 5::6] = True
    value2 = value.clone()
    value2[pad] = 100.0
    a = mod(query, ref, value, torch.tensor(shapes), None, pad)
    b = mod(query, ref, value2, torch.tensor(shapes), None, pad)
    assert torch.allclose(a, b, atol=1e-6)


def test_autocast_bf16_cpu_finite():
    torch.manual_seed(0)
    shapes = torch.tensor(SHAPES)
    s = int(shapes.prod(1).sum())
    mod = MSDeformAttn(32, 4, len(SHAPES), 2)
    query, value = torch.randn(2, 6, 32), torch.randn(2, s, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(query, torch.rand(2, 6, len(SHAPES), 4), value, shapes, _level_start(SHAPES))
        core = ms_deform_attn_core(
            value.view(2, s, 4, 8).bfloat16(), shapes, None,
            torch.rand(2, 6, 4, len(SHAPES), 2, 2), torch.full((2, 6, 4, len(SHAPES), 2), 0.1).half(),
        )
    assert out.shape == (2, 6, 32) and torch.isfinite(out.float()).all()
    assert core.dtype == torch.bfloat16 and torch.isfinite(core.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(mod.value_proj.weight.grad).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, 4, 2, 2)
    mod = MSDeformAttn(16, 2, 2, 2)
    shapes = torch.tensor([(4, 6), (2, 3)])
    with pytest.raises(ValueError, match="S=29"):
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 29, 16), shapes)
    with pytest.raises(ValueError, match="levels"):
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 24, 16), shapes[:1])
    with pytest.raises(ValueError, match="reference_points"):
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 3), torch.randn(1, 30, 16), shapes)
    value, loc, attn = _random_inputs([(4, 6), (2, 3)])
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn_core(value, shapes, torch.tensor([0, 25]), loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(value, shapes, None, loc, attn[..., :1])


def test_fast_path_flag():
    # True exactly when the compiled CPU kernel of the current sources is built (and then loads)
    assert fast_path_available() is MSDA_LIBRARY.path().is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_bf16_autocast():
    value, loc, attn = _random_inputs(SHAPES, dtype=torch.float32)
    cpu = ms_deform_attn_core(value, SHAPES, None, loc, attn)
    gpu = ms_deform_attn_core(value.cuda(), torch.tensor(SHAPES).cuda(), None, loc.cuda(), attn.cuda())
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-5
    mod = MSDeformAttn(32, 4, len(SHAPES), 2).cuda()
    s = sum(h * w for h, w in SHAPES)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mod(torch.randn(2, 6, 32, device="cuda"), torch.rand(2, 6, len(SHAPES), 2, device="cuda"),
                  torch.randn(2, s, 32, device="cuda"), torch.tensor(SHAPES, device="cuda"))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_no_grad_and_inference_mode_match_grad_mode(ref_dim):
    """Without autograd the padding is zeroed in place in value_proj's output and the softmax
    runs in place on a copy: the output is the grad-mode output, and neither the inputs nor
    the weights are modified."""
    torch.manual_seed(0)
    dim, heads, points = 32, 4, 3
    shapes = SHAPES[:3]
    mod = _random_module(dim, heads, len(shapes), points)
    weights = {k: v.clone() for k, v in mod.state_dict().items()}
    n, lq, s = 2, 5, sum(h * w for h, w in shapes)
    query = torch.randn(n, lq, dim, dtype=torch.float64)
    value_in = torch.randn(n, s, dim, dtype=torch.float64)
    ref_pts = torch.rand(n, lq, len(shapes), ref_dim, dtype=torch.float64)
    pad = torch.rand(n, s) < 0.3
    assert pad.any() and not pad.all()
    st, start = torch.tensor(shapes), _level_start(shapes)
    inputs = (query, ref_pts, value_in, st, start, pad)
    saved = [t.clone() for t in inputs]

    with torch.enable_grad():
        ref = mod(*inputs)
    assert ref.requires_grad
    with torch.no_grad():
        no_grad = mod(*inputs)
    with torch.inference_mode():
        inference = mod(*inputs)
    for name, out in (("no_grad", no_grad), ("inference_mode", inference)):
        assert not out.requires_grad
        diff = (out - ref.detach()).abs().max().item()
        assert diff <= 1e-12, f"{name}: max abs diff {diff}"
    for before, after in zip(saved, inputs):
        assert torch.equal(before, after)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, weights[k]), k

    # the padding really matters, and is really ignored, on the in-place path too
    value_big = value_in.clone()
    value_big[pad] = 1e3
    with torch.no_grad():
        assert (mod(query, ref_pts, value_big, st, start, pad) - no_grad).abs().max().item() <= 1e-9
        unmasked = mod(query, ref_pts, value_in, st, start, None)
    assert (unmasked - no_grad).abs().max().item() > 1e-3


def test_two_d_offsets_are_pixels_of_each_level():
    """Hand computation of the 2-D reference-point case: location = ref + offset / (w_l, h_l),
    with the offsets from the (unscaled) sampling_offsets Linear, sampled by the core."""
    torch.manual_seed(2)
    dim, heads, points = 16, 2, 2
    shapes = SHAPES[:3]
    mod = _random_module(dim, heads, len(shapes), points, std=0.3)
    n, lq, s = 1, 4, sum(h * w for h, w in shapes)
    query = torch.randn(n, lq, dim, dtype=torch.float64)
    value_in = torch.randn(n, s, dim, dtype=torch.float64)
    ref_pts = torch.rand(n, lq, len(shapes), 2, dtype=torch.float64)
    lv = len(shapes)
    offsets = (query @ mod.sampling_offsets.weight.T + mod.sampling_offsets.bias).view(n, lq, heads, lv, points, 2)
    loc = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(shapes):
        loc[:, :, :, lvl, :, 0] = ref_pts[:, :, None, lvl, None, 0] + offsets[:, :, :, lvl, :, 0] / w
        loc[:, :, :, lvl, :, 1] = ref_pts[:, :, None, lvl, None, 1] + offsets[:, :, :, lvl, :, 1] / h
    attn = mod.attention_weights(query).view(n, lq, heads, lv * points).softmax(-1).view(n, lq, heads, lv, points)
    value = mod.value_proj(value_in).view(n, s, heads, dim // heads)
    expect = mod.output_proj(_reference(value, shapes, loc, attn))
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx():
            got = mod(query, ref_pts, value_in, torch.tensor(shapes), _level_start(shapes))
        assert (got - expect).abs().max().item() < 1e-12


def test_submodules_are_called_as_modules():
    """Every projection runs through its nn.Linear (forward hooks fire, wrappers and dynamic
    quantization of the Linear layers keep working), for point and box references."""
    shapes = SHAPES[:2]
    mod = MSDeformAttn(16, 4, len(shapes), 2)
    calls = []
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        getattr(mod, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    s = sum(h * w for h, w in shapes)
    for ref_dim in (2, 4):
        calls.clear()
        mod(torch.randn(1, 3, 16), torch.rand(1, 3, len(shapes), ref_dim), torch.randn(1, s, 16), torch.tensor(shapes))
        assert sorted(calls) == ["attention_weights", "output_proj", "sampling_offsets", "value_proj"], ref_dim
    quantized = torch.ao.quantization.quantize_dynamic(mod, {torch.nn.Linear})
    out = quantized(torch.randn(1, 3, 16), torch.rand(1, 3, len(shapes), 2), torch.randn(1, s, 16), torch.tensor(shapes))
    assert out.shape == (1, 3, 16) and torch.isfinite(out).all()


def test_reference_in_bf16_on_one_image_stays_finite_and_close_to_fp32():
    """One image makes the per-level value a strided view; CPU bf16 grid_sample returned NaN for
    it (the reference now samples a contiguous copy)."""
    from up2.layers.msda import ms_deform_attn_core_pytorch

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 32)]
    value = torch.randn(1, 256, 8, 32, generator=g)
    loc = torch.rand(1, 336, 8, 1, 4, 2, generator=g)
    attn = torch.rand(1, 336, 8, 1, 4, generator=g).softmax(-1)
    ref = ms_deform_attn_core_pytorch(value, shapes, loc, attn)
    low = ms_deform_attn_core_pytorch(value.bfloat16(), shapes, loc.bfloat16(), attn.bfloat16()).float()
    assert torch.isfinite(low).all()
    # bf16 locations move samples by up to ~0.1 px on this 32-wide map: a loose bound
    torch.testing.assert_close(low, ref, rtol=0, atol=0.15 * ref.abs().max().item())
