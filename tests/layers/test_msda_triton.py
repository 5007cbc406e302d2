"""The Triton kernels of multi-scale deformable attention against the pure-PyTorch reference, run
on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``): values and the three gradients in
fp32 (and fp64), bf16 and mixed dtypes, several query blocks per head, sampling points inside,
outside and exactly on the map's borders and pixel centres; the ``triton`` routing; and both
kernels compiled ahead of time for a GPU (sm_80), which the interpreter does not do.

``triton.jit`` decides when a function is decorated whether it is interpreted, and that includes
``triton.language``'s own helpers (``tl.sum``, ``tl.zeros``), decorated when ``triton`` is first
imported. So the interpreted cases run in a child process (this file run as a script) that has
``TRITON_INTERPRET=1`` from its start; each case reports its numbers (or its traceback) as JSON,
and the tests below check them. The variable never reaches this process (``up2.layers.msda``
already imports ``triton`` through its dependencies). The interpreter runs programs one after
another, so the cases are tiny.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))

from up2.layers.msda import PATH_ENV, library, ms_deform_attn_core, ms_deform_attn_core_pytorch, routing  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: the Triton MSDA kernels cannot run")

SHAPE_SETS = {
    "one_level": [(4, 8)],  # powers of two: pixel centres and the outer sampling borders are exact
    "three_levels": [(5, 7), (3, 2), (1, 1)],  # odd sizes and a one-pixel level
}

# Normalised (x, y) of point 0 of the first queries (the other points are random in
# [-0.3, 1.3]). In pixels of the 4x8 level (x = 8 * loc_x - 0.5, y = 4 * loc_y - 0.5): the map's
# edges, pixel centres (where the bilinear weights have kinks: both paths floor them alike and
# take the right-hand derivative), the outer borders of the sampling band (x = -1 or 8, y = -1:
# one or no neighbour inside), and points wholly outside. 0.5 is also a pixel centre on odd sizes
# and on the 1x1 level. All are exact in binary, so both paths see the same pixel coordinates.
SPECIAL = (
    (0.0, 0.0), (1.0, 1.0), (0.5, 0.5),  # edges, the centre
    (-0.0625, 0.5),  # x = -1: only the right-hand neighbours inside
    (0.0625, 0.125), (0.9375, 0.875),  # centres of the first and last pixels
    (1.0625, -0.125),  # x = 8, y = -1: no neighbour inside
    (1.5, 0.5), (0.5, -0.5), (-1e4, 0.5), (0.5, 1e4),  # outside; the last two far outside
)
FAR_OUTSIDE = (9, 10)
ON_BORDER = 3


# --- the child process: interpreted cases ------------------------------------------------------

def _inputs(shapes, n, lq, m, dh, p, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, dh, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.6 - 0.3
    for i, xy in enumerate(SPECIAL[:lq]):
        loc[:, i, :, :, 0] = torch.tensor(xy)
    attn = torch.randn(n, lq, m, len(shapes) * p, generator=g).softmax(-1).view(n, lq, m, len(shapes), p)
    return tuple(t.to(dtype) for t in (value, loc, attn))


def _run(path, shapes, ins, grad_out):
    """Output and gradients (value, locations, weights) of ``ms_deform_attn_core`` on ``path``."""
    os.environ[PATH_ENV] = path
    leaves = [t.clone().requires_grad_() for t in ins]
    out = ms_deform_attn_core(leaves[0], torch.tensor(shapes), None, leaves[1], leaves[2])
    return out, torch.autograd.grad(out, leaves, grad_out)


def _errors(out, grads, ref, ref_grads):
    """Max abs error and max |reference| of the output and each gradient."""
    names = ("output", "value", "sampling_locations", "attention_weights")
    return {name: {"error": (a.double() - b.double()).abs().max().item(), "scale": b.abs().max().item(),
                   "dtype": str(a.dtype).replace("torch.", "")}
            for name, a, b in zip(names, (out, *grads), (ref, *ref_grads))}


def _case_parity(shape_set, dtype=torch.float32, n=2, lq=len(SPECIAL) + 1, m=2, dh=5, seed=0):
    shapes = SHAPE_SETS[shape_set]
    ins = _inputs(shapes, n=n, lq=lq, m=m, dh=dh, p=2, dtype=dtype, seed=seed)  # dh=5: masked channels
    grad_out = torch.randn(n, lq, m * dh, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref, ref_grads = _run("pytorch", shapes, [t.double() for t in ins], grad_out.double())
    out, grads = _run("triton", shapes, ins, grad_out)
    g_loc, ref_g_loc = grads[1][:, :, :, :, 0], ref_grads[1][:, :, :, :, 0]
    return {
        "grad_fn": type(out.grad_fn).__name__,
        "errors": _errors(out, grads, ref, ref_grads),
        "far_outside_loc_grad": g_loc[:, FAR_OUTSIDE].abs().max().item() if lq > max(FAR_OUTSIDE) else 0.0,
        "border_loc_grad": ref_g_loc[:, ON_BORDER].abs().max().item(),
    }


def _case_query_blocks():
    # block_q=4 over Lq=10: three blocks per (image, head), the last one partly masked; 2 heads of 8
    from up2.layers.msda import triton_kernels as tk

    shapes = SHAPE_SETS["three_levels"]
    value, loc, attn = _inputs(shapes, n=1, lq=10, m=2, dh=8, p=2, seed=2)
    config = tk.LaunchConfig(block_q=4, num_warps=1)
    shapes_t = torch.tensor(shapes, dtype=torch.int32)
    out = tk.msda_forward(value, shapes_t, loc, attn, config)
    leaves = [t.double().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_core_pytorch(leaves[0], shapes, leaves[1], leaves[2])
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    grads = tk.msda_backward(grad_out, value, shapes_t, loc, attn, config)
    return {"errors": _errors(out, grads, ref, torch.autograd.grad(ref, leaves, grad_out.double()))}


def _case_mixed_dtypes():
    # bf16 values with fp32 locations and weights (as under autocast): read as they are, no casts
    shapes = SHAPE_SETS["three_levels"]
    value, loc, attn = _inputs(shapes, n=1, lq=6, m=2, dh=4, p=2, seed=6)
    value = value.bfloat16()
    grad_out = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(7)).bfloat16()
    ref, ref_grads = _run("pytorch", shapes, [value.double(), loc.double(), attn.double()], grad_out.double())
    out, grads = _run("triton", shapes, (value, loc, attn), grad_out)
    return {"errors": _errors(out, grads, ref, ref_grads)}


def _case_empty():
    shapes = SHAPE_SETS["three_levels"]
    out, grads = _run("triton", shapes, _inputs(shapes, n=1, lq=0, m=2, dh=4, p=2), torch.zeros(1, 0, 8))
    return {"shape": list(out.shape), "grad_value_abs_max": grads[0].abs().max().item()}


def _case_routing():
    routing._LOGGED.clear()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger(routing.__name__).addHandler(handler)
    logging.getLogger(routing.__name__).setLevel(logging.INFO)
    os.environ[PATH_ENV] = "triton"
    forced = [routing.select_path(torch.device("cpu")) for _ in range(2)]
    os.environ[PATH_ENV] = "auto"
    return {"forced": forced, "auto_cpu": routing.select_path(torch.device("cpu")), "log": records}


CASES = {
    "fp32_one_level": lambda: _case_parity("one_level"),
    "fp32_three_levels": lambda: _case_parity("three_levels"),
    "fp64_three_levels": lambda: _case_parity("three_levels", dtype=torch.float64, m=1, dh=3, seed=4),
    "bf16_three_levels": lambda: _case_parity("three_levels", dtype=torch.bfloat16, n=1, dh=4, seed=6),
    "query_blocks": _case_query_blocks,
    "mixed_dtypes": _case_mixed_dtypes,
    "empty": _case_empty,
    "routing": _case_routing,
}


def _child_main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = case()
        except Exception:  # reported to the parent test, which fails with the traceback
            results[name] = {"traceback": traceback.format_exc()}
    print(json.dumps(results))


# --- the tests (this process) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted():
    """Run every case once in a child process with ``TRITON_INTERPRET=1``; their results by name."""
    env = {k: v for k, v in os.environ.items() if k != PATH_ENV}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreted cases failed to run:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _result(interpreted, name):
    result = interpreted[name]
    assert "traceback" not in result, f"case {name} raised:\n{result['traceback']}"
    return result


@needs_triton
@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
def test_triton_matches_reference_fp32(interpreted, shape_set):
    result = _result(interpreted, f"fp32_{shape_set}")
    assert result["grad_fn"] == "_TritonMSDABackward"
    errors = result["errors"]
    assert all(e["dtype"] == "float32" for e in errors.values()), errors
    # against the reference computed in fp64 on the same numbers; gradients w.r.t. locations
    # reach ~10 here (d/dx = map width * value differences): their bound scales with them
    assert all(e["error"] <= 1e-5 * max(1.0, e["scale"]) for e in errors.values()), errors
    # the special points reach the kernel's clamped, outside and border branches: far outside,
    # the location gradient is 0; at x = -1 pixel (one corner inside) it is not
    assert result["far_outside_loc_grad"] == 0.0 and result["border_loc_grad"] > 0.1


@needs_triton
def test_triton_several_query_blocks(interpreted):
    errors = _result(interpreted, "query_blocks")["errors"]
    assert all(e["error"] <= 1e-5 * max(1.0, e["scale"]) for e in errors.values()), errors


@needs_triton
def test_triton_fp64_is_exact_up_to_rounding(interpreted):
    errors = _result(interpreted, "fp64_three_levels")["errors"]
    assert all(e["dtype"] == "float64" and e["error"] <= 1e-12 * max(1.0, e["scale"]) for e in errors.values()), errors


@needs_triton
def test_triton_bf16(interpreted):
    errors = _result(interpreted, "bf16_three_levels")["errors"]
    assert all(e["dtype"] == "bfloat16" for e in errors.values()), errors
    # computed in fp32 from bf16 inputs: what remains is rounding each result to bf16 (2^-8 of it)
    assert all(e["error"] <= 2 ** -7 * e["scale"] for e in errors.values()), errors


@needs_triton
def test_triton_mixed_dtypes(interpreted):
    errors = _result(interpreted, "mixed_dtypes")["errors"]
    assert [e["dtype"] for e in errors.values()] == ["bfloat16", "bfloat16", "float32", "float32"]
    assert errors["sampling_locations"]["error"] <= 1e-5 * max(1.0, errors["sampling_locations"]["scale"])
    assert errors["attention_weights"]["error"] <= 1e-5, errors
    assert errors["output"]["error"] <= 2 ** -7 * errors["output"]["scale"], errors


@needs_triton
def test_triton_empty_queries(interpreted):
    result = _result(interpreted, "empty")
    assert result == {"shape": [1, 0, 8], "grad_value_abs_max": 0.0}


@needs_triton
def test_triton_routing_interpreted(interpreted):
    result = _result(interpreted, "routing")
    assert result["forced"] == ["triton", "triton"]
    # auto keeps CPU tensors on the CPU paths even with the interpreter on
    assert result["auto_cpu"] in ("compiled", "pytorch")
    triton_lines = [line for line in result["log"] if "Triton" in line]
    assert triton_lines == ["MSDeformAttn on cpu: using the Triton kernel (interpreted), forced by UP2_MSDA_PATH."]


@needs_triton
def test_triton_refuses_cpu_tensors_when_jitted_for_gpus(monkeypatch):
    from up2.layers.msda import triton_kernels as tk

    shapes = SHAPE_SETS["one_level"]
    value, loc, attn = _inputs(shapes, n=1, lq=2, m=1, dh=2, p=1)
    monkeypatch.setattr(tk, "INTERPRETED", False)  # as in this process, where TRITON_INTERPRET is not set
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.msda_forward(value, torch.tensor(shapes), loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes"):
        tk.msda_forward(value, torch.tensor(shapes).float(), loc, attn)
    with pytest.raises(ValueError, match="block_q"):
        tk.LaunchConfig(block_q=3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(PATH_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        routing.select_path(torch.device("cpu"))


@needs_triton
def test_triton_routing_devices(monkeypatch):
    cuda = torch.device("cuda")  # a device object: no GPU needed
    monkeypatch.setattr(routing, "_LOGGED", set())
    monkeypatch.setenv(PATH_ENV, "triton")
    assert routing.select_path(cuda) == "triton"
    with pytest.raises(RuntimeError, match="CUDA only"):
        routing.select_path(torch.device("meta"))
    monkeypatch.setenv(PATH_ENV, "auto")
    assert routing.select_path(cuda) == "triton"
    assert routing.select_path(torch.device("cpu")) == (
        "compiled" if library.compiled_unavailable_reason() is None else "pytorch"
    )
    assert routing.select_path(torch.device("meta")) == "pytorch"
    monkeypatch.setenv(PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="triton, compiled_reference"):
        routing.select_path(cuda)


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_gpus(tmp_path, monkeypatch, dtype):
    # what the interpreter does not check: the kernels as Triton compiles them for a GPU (sm_80,
    # ahead of time: no GPU needed), with a level loop, the value gradient's atomic adds
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from up2.layers.msda import triton_kernels as tk

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend to compile for")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    float_ptrs = {"fp32": "*fp32", "bf16": "*bf16"}
    for kernel in (tk._msda_fwd_kernel, tk._msda_bwd_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name == "shapes_ptr":
                signature[name] = "*i64"
            elif name == "grad_value_ptr":
                signature[name] = "*fp32"  # accumulated in fp32 whatever value's dtype
            elif name.endswith("_ptr"):
                signature[name] = float_ptrs[dtype]
            elif name in ("L", "P", "BLOCK_Q", "BLOCK_D", "ACC"):
                signature[name] = "constexpr"
            else:
                signature[name] = "i32"
        constants = {"L": 3, "P": 2, "BLOCK_Q": 16, "BLOCK_D": 8, "ACC": tl.float32}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 80, 32),
                                  options={"num_warps": 2})
        ptx = compiled.asm["ptx"]
        adds = [line for line in ptx.splitlines() if ("red." in line or "atom." in line) and ".add" in line]
        if kernel is tk._msda_bwd_kernel:
            assert adds and all(".f32" in line for line in adds), adds[:4]
        else:
            assert not adds


def test_compiled_reference_path_compiles_the_reference(monkeypatch):
    # torch.compile itself is replaced (Inductor takes ~90 s for this op on 2 CPU cores): the path
    # asks for one full graph of the reference and returns its output in value's dtype
    from up2.layers.msda import function

    requests = []

    def fake_compile(fn, **kwargs):
        requests.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    function._compiled_reference.cache_clear()
    try:
        shapes = SHAPE_SETS["three_levels"]
        value, loc, attn = _inputs(shapes, n=1, lq=4, m=2, dh=3, p=2)
        monkeypatch.setenv(PATH_ENV, "compiled_reference")
        out = ms_deform_attn_core(value.bfloat16(), shapes, None, loc, attn)
        ms_deform_attn_core(value, shapes, None, loc, attn)
    finally:
        function._compiled_reference.cache_clear()
    assert requests == [(ms_deform_attn_core_pytorch, {"fullgraph": True})]  # built once
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_core_pytorch(value.bfloat16().float(), shapes, loc, attn)
    assert (out.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


def test_routing_without_triton(monkeypatch):
    # routing decisions only, with the kernels' import failing
    cuda = torch.device("cuda")
    monkeypatch.setattr(routing, "_LOGGED", set())
    monkeypatch.setattr(routing, "triton_unavailable_reason", lambda: "do not import (test)")
    monkeypatch.setattr(routing, "_inductor_has_triton", lambda: False)
    monkeypatch.setenv(PATH_ENV, "auto")
    assert routing.select_path(cuda) == "pytorch"
    monkeypatch.setenv(PATH_ENV, "triton")
    with pytest.raises(RuntimeError, match=r"unavailable: they do not import \(test\)"):
        routing.select_path(cuda)
    monkeypatch.setenv(PATH_ENV, "compiled_reference")
    with pytest.raises(RuntimeError, match="Inductor needs a working triton"):
        routing.select_path(cuda)
    assert routing.select_path(torch.device("cpu")) == "compiled_reference"
    # a triton too old for the kernels but working for Inductor: torch.compile of the reference
    monkeypatch.setattr(routing, "_inductor_has_triton", lambda: True)
    monkeypatch.setenv(PATH_ENV, "auto")
    assert routing.select_path(cuda) == "compiled_reference"


if __name__ == "__main__":
    _child_main()
