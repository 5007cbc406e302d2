#!/usr/bin/env python
"""Multi-scale deformable attention speed: transformers' reference vs up2's paths, one run.

    .venv/bin/python projects/benchmark/msda_speed.py                  # 800x1333, batch 1, CPU
    .venv/bin/python projects/benchmark/msda_speed.py --backward --repeats 3
    .venv/bin/python projects/benchmark/msda_speed.py --device cuda --backward --dtype bf16

Size: an encoder layer at a HxW input with levels at strides 8/16/32/64 (ceil(H/s) x ceil(W/s);
800x1333 gives 100x167, 50x84, 25x42, 13x21 = 22,223 tokens), d=256, 8 heads, 4 levels,
4 points; every token is a query (as in the pixel-decoder encoder), its reference point the
centre of its pixel; offsets = Deformable DETR's initial ring (1..P pixels) plus N(0, 1) pixel
noise, attention = softmax of N(0, 1) logits (random weights: nothing is downloaded).

Rows (``--dtype``, default fp32, for all three inputs; ``torch.inference_mode`` unless
``--backward``):
  op      transformers ``MultiScaleDeformableAttention`` (pure PyTorch, the reference),
          ``ms_deform_attn_core`` on each up2 path: ``UP2_MSDA_PATH=pytorch`` and, on the CPU,
          ``=compiled`` (when built); on CUDA ``=triton`` (when triton imports) and, with
          ``--compiled-reference``, ``=compiled_reference`` (``torch.compile`` of the reference);
  module  transformers ``DeformableDetrMultiscaleDeformableAttention`` (same weights) and
          up2 ``MSDeformAttn`` on each path (projections + op);
  --backward adds forward+backward of the op on each path.
Each row: ``--warmup`` untimed calls (on CUDA they include the Triton kernels' autotuning), then
the median (and min) of ``--repeats`` timed calls in ms (CUDA: synchronised before and after
each), the reference's time divided by the row's ("x faster"), and on CUDA the peak memory
allocated during the row's timed calls. ``max|diff|`` is against the reference's output. Thread
count: ``--threads`` (default: every core this process may use). The load average is printed:
other processes on shared cores inflate all rows, the ratios less so.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from up2.layers import MSDeformAttn, fast_path_available, ms_deform_attn_core  # noqa: E402
from up2.layers.msda import PATH_ENV  # noqa: E402
from up2.layers.msda.routing import triton_unavailable_reason  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def available_paths(device: torch.device, compiled_reference: bool = False):
    """The up2 paths to time for tensors on ``device``: the reference and the kernels that can run there."""
    if device.type == "cpu":
        return ["pytorch"] + (["compiled"] if fast_path_available() else [])
    paths = ["pytorch"]
    if device.type == "cuda" and triton_unavailable_reason() is None:
        paths.append("triton")
    if compiled_reference:
        paths.append("compiled_reference")
    return paths


def level_shapes(height: int, width: int, strides):
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def reference_points(shapes, batch: int) -> torch.Tensor:
    """(N, S, L, 2) normalised pixel centres of every token, repeated over the L levels."""
    pts = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        pts.append(torch.stack((xs.flatten(), ys.flatten()), -1))
    ref = torch.cat(pts)  # (S, 2)
    return ref[None, :, None, :].expand(batch, -1, len(shapes), -1).contiguous()


def make_inputs(shapes, batch, dim, heads, points, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, lv = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, s, heads, dim // heads, generator=g)
    ring = MSDeformAttn(dim, heads, lv, points).sampling_offsets.bias.detach().view(heads, lv, points, 2)
    offsets = ring + torch.randn(batch, s, heads, lv, points, 2, generator=g)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    loc = reference_points(shapes, batch)[:, :, None, :, None, :] + offsets / wh[:, None, :]
    attn = torch.randn(batch, s, heads, lv * points, generator=g).softmax(-1).view(batch, s, heads, lv, points)
    return tuple(t.to(device=device, dtype=dtype) for t in (value, loc, attn))


def timed(fn, warmup: int, repeats: int, device: torch.device):
    """(median ms, min ms, peak MB allocated during the timed calls or None off CUDA)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if cuda else None
    return statistics.median(ts), min(ts), peak


def with_path(path: str, fn):
    def run():
        old = os.environ.get(PATH_ENV)
        os.environ[PATH_ENV] = path
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(PATH_ENV)
            else:
                os.environ[PATH_ENV] = old
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="800x1333", help="input HxW in pixels")
    parser.add_argument("--strides", default="8,16,32,64")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--backward", action="store_true", help="also time forward+backward of the op")
    parser.add_argument("--skip-module", action="store_true", help="only the op rows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="dtype of the op's inputs and of the modules")
    parser.add_argument("--compiled-reference", action="store_true",
                        help="on CUDA, also time torch.compile of the reference (compiles on the first call)")
    args = parser.parse_args(argv)

    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    height, width = (int(v) for v in args.size.lower().split("x"))
    shapes = level_shapes(height, width, [int(s) for s in args.strides.split(",")])
    lv, s = len(shapes), sum(h * w for h, w in shapes)
    shapes_t = torch.tensor(shapes, device=device)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]], device=device).cumsum(0)
    value, loc, attn = make_inputs(shapes, args.batch, args.dim, args.heads, args.points, device=device, dtype=dtype)
    paths = available_paths(device, args.compiled_reference)
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, threads {args.threads}"
    print(f"MSDA {height}x{width}: levels {shapes} = {s} tokens, d={args.dim}, {args.heads} heads, {lv} levels, "
          f"{args.points} points, batch {args.batch}, {args.dtype}; {where}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}")
    if device.type == "cpu" and "compiled" not in paths:
        print("compiled kernel not built (run tools/install.sh or python -m up2.layers.build_kernels msda): "
              "pytorch only")
    if device.type == "cuda" and "triton" not in paths:
        print(f"Triton kernels unavailable: they {triton_unavailable_reason()}")

    hf_op = hf.MultiScaleDeformableAttention()
    rows = []  # (name, median, min, peak MB, reference name)
    with torch.inference_mode():
        ref_out = hf_op(value, shapes_t, shapes, starts, loc, attn, 64)
        rows.append(("op  transformers (reference)", *timed(
            lambda: hf_op(value, shapes_t, shapes, starts, loc, attn, 64), args.warmup, args.repeats, device), "op"))
        for path in paths:
            fn = with_path(path, lambda: ms_deform_attn_core(value, shapes_t, starts, loc, attn))
            diff = (fn().float() - ref_out.float()).abs().max().item()
            rows.append((f"op  up2 {path} (max|diff| {diff:.1e})", *timed(fn, args.warmup, args.repeats, device),
                         "op"))

        if not args.skip_module:
            torch.manual_seed(0)
            ours = MSDeformAttn(args.dim, args.heads, lv, args.points).eval()
            cfg = DeformableDetrConfig(d_model=args.dim, num_feature_levels=lv, disable_custom_kernels=True)
            theirs = hf.DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=args.heads, n_points=args.points)
            theirs.load_state_dict(ours.state_dict())
            ours.to(device=device, dtype=dtype)
            theirs.to(device=device, dtype=dtype).eval()
            query = torch.randn(args.batch, s, args.dim, device=device, dtype=dtype)
            feats = torch.randn(args.batch, s, args.dim, device=device, dtype=dtype)
            ref_pts = reference_points(shapes, args.batch).to(device=device, dtype=dtype)

            def run_theirs():
                return theirs(query, encoder_hidden_states=feats, reference_points=ref_pts, spatial_shapes=shapes_t,
                              spatial_shapes_list=shapes, level_start_index=starts)[0]

            rows.append(("module  transformers (reference)", *timed(run_theirs, args.warmup, args.repeats, device),
                         "module"))
            for path in paths:
                fn = with_path(path, lambda: ours(query, ref_pts, feats, shapes_t, starts))
                rows.append((f"module  up2 {path}", *timed(fn, args.warmup, args.repeats, device), "module"))

    if args.backward:
        grad = torch.randn_like(ref_out)

        def fwd_bwd(op):
            leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
            torch.autograd.grad(op(*leaves), leaves, grad)

        rows.append(("fwd+bwd  transformers (reference)", *timed(
            lambda: fwd_bwd(lambda v, xy, a: hf_op(v, shapes_t, shapes, starts, xy, a, 64)), args.warmup, args.repeats,
            device), "fwd+bwd"))
        for path in paths:
            fn = with_path(path, lambda: fwd_bwd(lambda v, xy, a: ms_deform_attn_core(v, shapes_t, starts, xy, a)))
            rows.append((f"fwd+bwd  up2 {path}", *timed(fn, args.warmup, args.repeats, device), "fwd+bwd"))

    ref_ms = {group: med for name, med, _, _, group in rows if "reference" in name}
    print(f"\n| {'row':<44} | median ms | min ms | x faster than reference | peak MB |")
    print(f"|{'-' * 46}|-----------|--------|-------------------------|---------|")
    for name, med, low, peak, group in rows:
        mb = f"{peak:7.0f}" if peak is not None else f"{'-':>7}"
        print(f"| {name:<44} | {med:9.1f} | {low:6.1f} | {ref_ms[group] / med:23.1f} | {mb} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
