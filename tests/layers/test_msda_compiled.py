"""The compiled CPU kernel of multi-scale deformable attention against the pure-PyTorch path:
values and gradients (fp32, fp64), gradcheck, bf16 autocast, and the UP2_MSDA_PATH switch.

The kernel is normally built by tools/install.sh; if it is missing and a compiler is present,
the fixture builds it (about 10-25 s on 2 cores). Without a compiler these tests skip."""
import pytest
import torch

from up2.layers import cpp_library
from up2.layers.msda import PATH_ENV, fast_path_available, library, ms_deform_attn_core, routing

SHAPE_SETS = {
    "mixed": [(6, 9), (3, 5), (2, 2), (1, 1)],  # non-square levels and a 1x1 level
    "one_pixel": [(1, 1)],
    "tall": [(11, 4), (5, 2)],
}


@pytest.fixture(scope="module")
def compiled():
    if not fast_path_available():
        if not cpp_library.compiler_available():
            pytest.skip("no C++ compiler / ninja on PATH: the compiled MSDA CPU kernel cannot be built")
        library.MSDA_LIBRARY.build()
    assert fast_path_available(), "the compiled MSDA kernel was built but does not load"


def _inputs(shapes, n, lq, m, dh, p, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, dh, generator=g, dtype=dtype)
    # locations in [-0.3, 1.3]: inside, on the border band and wholly outside the map
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    attn = torch.randn(n, lq, m, len(shapes) * p, generator=g, dtype=dtype).softmax(-1)
    return value, loc, attn.view(n, lq, m, len(shapes), p)


def _run(monkeypatch, path, shapes, ins, grad_out=None):
    monkeypatch.setenv(PATH_ENV, path)
    leaves = [t.clone().requires_grad_() for t in ins]
    out = ms_deform_attn_core(leaves[0], torch.tensor(shapes), None, leaves[1], leaves[2])
    if grad_out is None:
        return out, None
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
@pytest.mark.parametrize("dh,threads", [(4, 1), (32, 1), (32, 4), (20, 4)])
def test_compiled_matches_pytorch_fp32(compiled, monkeypatch, shape_set, dh, threads):
    # dh=32 takes the fixed-width kernels; 4 threads with n*m=2 heads splits channels into blocks
    shapes = SHAPE_SETS[shape_set]
    ins = _inputs(shapes, n=2, lq=9, m=1 if threads > 1 else 3, dh=dh, p=3, dtype=torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, _ = _run(monkeypatch, "pytorch", shapes, ins)
        grad_out = torch.randn_like(ref)
        ref, ref_grads = _run(monkeypatch, "pytorch", shapes, ins, grad_out)
        out, grads = _run(monkeypatch, "compiled", shapes, ins, grad_out)
    finally:
        torch.set_num_threads(old)
    assert out.grad_fn is not None and "Compiled" in type(out.grad_fn).__name__
    assert ref.grad_fn is not None and "Compiled" not in type(ref.grad_fn).__name__
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        # 1e-5 absolute for gradients of size <= 1; gradients wrt locations reach ~40 here
        # (d/dx = map width * value differences), where fp32 rounding alone moves the
        # reference itself by ~3e-5 from the fp64 result, so the bound scales with their size.
        d = (a - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        assert d <= 1e-5 * scale, f"grad wrt {name}: max abs diff {d} (max |grad| {scale})"


def test_compiled_matches_pytorch_fp64_tight(compiled, monkeypatch):
    shapes = SHAPE_SETS["mixed"]
    ins = _inputs(shapes, n=1, lq=6, m=2, dh=5, p=2, dtype=torch.float64, seed=1)
    grad_out = torch.randn(1, 6, 10, dtype=torch.float64)
    ref, ref_grads = _run(monkeypatch, "pytorch", shapes, ins, grad_out)
    out, grads = _run(monkeypatch, "compiled", shapes, ins, grad_out)
    assert out.dtype == torch.float64 and (out - ref).abs().max().item() < 1e-12
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 1e-12


def test_compiled_gradcheck_fp64(compiled, monkeypatch):
    monkeypatch.setenv(PATH_ENV, "compiled")
    shapes = [(3, 4), (1, 2)]
    value, loc, attn = _inputs(shapes, n=1, lq=3, m=2, dh=3, p=2, dtype=torch.float64, seed=2)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, xy, a: ms_deform_attn_core(v, shapes, None, xy, a), leaves, eps=1e-6, atol=1e-7
    )


def test_compiled_bf16_autocast(compiled, monkeypatch):
    monkeypatch.setenv(PATH_ENV, "compiled")
    shapes = SHAPE_SETS["mixed"]
    value, loc, attn = _inputs(shapes, n=2, lq=5, m=2, dh=8, p=2, dtype=torch.float32)
    value = value.bfloat16().requires_grad_()
    attn = attn.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_core(value, torch.tensor(shapes), None, loc, attn)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and torch.isfinite(value.grad.float()).all()
    # same numbers as the reference up to bf16 rounding of the output
    monkeypatch.setenv(PATH_ENV, "pytorch")
    ref = ms_deform_attn_core(value.detach().float(), shapes, None, loc, attn.float())
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_path_env_switch(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "pytorch")
    assert routing.select_path(torch.device("cpu")) == "pytorch"
    monkeypatch.setenv(PATH_ENV, "fastest")
    with pytest.raises(ValueError, match=PATH_ENV):
        routing.select_path(torch.device("cpu"))
    monkeypatch.setenv(PATH_ENV, "compiled")
    with pytest.raises(RuntimeError, match="CPU only"):
        routing.select_path(torch.device("meta"))
    # forced but unavailable: a clear error, not a silent fallback
    monkeypatch.setattr(library, "compiled_unavailable_reason", lambda: "not built (test)")
    with pytest.raises(RuntimeError, match="not built"):
        routing.select_path(torch.device("cpu"))
    monkeypatch.setenv(PATH_ENV, "auto")
    assert routing.select_path(torch.device("cpu")) == "pytorch"


def test_auto_uses_compiled_when_built(compiled, monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)
    assert routing.select_path(torch.device("cpu")) == "compiled"
    assert routing.select_path(torch.device("meta")) == "pytorch"  # non-CPU: PyTorch path
