#!/usr/bin/env python
"""Multi-scale deformable attention speed: transformers' reference vs up2's two paths, one run.

    .venv/bin/python projects/benchmark/msda_speed.py                  # 800x1333, batch 1
    .venv/bin/python projects/benchmark/msda_speed.py --backward --repeats 3

Size: an encoder layer at a HxW input with levels at strides 8/16/32/64 (ceil(H/s) x ceil(W/s);
800x1333 gives 100x167, 50x84, 25x42, 13x21 = 22,223 tokens), d=256, 8 heads, 4 levels,
4 points; every token is a query (as in the pixel-decoder encoder), its reference point the
centre of its pixel; offsets = Deformable DETR's initial ring (1..P pixels) plus N(0, 1) pixel
noise, attention = softmax of N(0, 1) logits (random weights: nothing is downloaded).

Rows (CPU, fp32, ``torch.inference_mode`` unless ``--backward``):
  op      transformers ``MultiScaleDeformableAttention`` (pure PyTorch, the reference),
          ``ms_deform_attn_core`` with ``UP2_MSDA_PATH=pytorch`` and ``=compiled``;
  module  transformers ``DeformableDetrMultiscaleDeformableAttention`` (same weights) and
          up2 ``MSDeformAttn`` on each path (projections + op);
  --backward adds forward+backward of the op on each path.
Each row: ``--warmup`` untimed calls, then the median (and min) of ``--repeats`` timed calls in
ms, and the reference's time divided by the row's ("x faster"). Thread count: ``--threads``
(default: every core this process may use). The load average is printed: other processes on
shared cores inflate all rows, the ratios less so.
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


def make_inputs(shapes, batch, dim, heads, points, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, lv = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, s, heads, dim // heads, generator=g)
    ring = MSDeformAttn(dim, heads, lv, points).sampling_offsets.bias.detach().view(heads, lv, points, 2)
    offsets = ring + torch.randn(batch, s, heads, lv, points, 2, generator=g)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    loc = reference_points(shapes, batch)[:, :, None, :, None, :] + offsets / wh[:, None, :]
    attn = torch.randn(batch, s, heads, lv * points, generator=g).softmax(-1).view(batch, s, heads, lv, points)
    return value, loc, attn


def timed(fn, warmup: int, repeats: int):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


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
    args = parser.parse_args(argv)

    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    shapes = level_shapes(height, width, [int(s) for s in args.strides.split(",")])
    lv, s = len(shapes), sum(h * w for h, w in shapes)
    shapes_t = torch.tensor(shapes)
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]]).cumsum(0)
    value, loc, attn = make_inputs(shapes, args.batch, args.dim, args.heads, args.points)
    paths = ["pytorch"] + (["compiled"] if fast_path_available() else [])
    print(f"MSDA {height}x{width}: levels {shapes} = {s} tokens, d={args.dim}, {args.heads} heads, {lv} levels, "
          f"{args.points} points, batch {args.batch}; threads {args.threads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}")
    if "compiled" not in paths:
        print("compiled kernel not built (run tools/install.sh or python -m up2.layers.build_kernels msda): "
              "pytorch only")

    hf_op = hf.MultiScaleDeformableAttention()
    rows = []  # (name, median, min, reference name)
    with torch.inference_mode():
        ref_out = hf_op(value, shapes_t, shapes, starts, loc, attn, 64)
        rows.append(("op  transformers (reference)", *timed(
            lambda: hf_op(value, shapes_t, shapes, starts, loc, attn, 64), args.warmup, args.repeats), "op"))
        for path in paths:
            fn = with_path(path, lambda: ms_deform_attn_core(value, shapes_t, starts, loc, attn))
            diff = (fn() - ref_out).abs().max().item()
            rows.append((f"op  up2 {path} (max|diff| {diff:.1e})", *timed(fn, args.warmup, args.repeats), "op"))

        if not args.skip_module:
            torch.manual_seed(0)
            ours = MSDeformAttn(args.dim, args.heads, lv, args.points).eval()
            cfg = DeformableDetrConfig(d_model=args.dim, num_feature_levels=lv, disable_custom_kernels=True)
            theirs = hf.DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=args.heads, n_points=args.points)
            theirs.load_state_dict(ours.state_dict())
            theirs.eval()
            query = torch.randn(args.batch, s, args.dim)
            feats = torch.randn(args.batch, s, args.dim)
            ref_pts = reference_points(shapes, args.batch)

            def run_theirs():
                return theirs(query, encoder_hidden_states=feats, reference_points=ref_pts, spatial_shapes=shapes_t,
                              spatial_shapes_list=shapes, level_start_index=starts)[0]

            rows.append(("module  transformers (reference)", *timed(run_theirs, args.warmup, args.repeats), "module"))
            for path in paths:
                fn = with_path(path, lambda: ours(query, ref_pts, feats, shapes_t, starts))
                rows.append((f"module  up2 {path}", *timed(fn, args.warmup, args.repeats), "module"))

    if args.backward:
        grad = torch.randn_like(ref_out)

        def fwd_bwd(op):
            leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
            torch.autograd.grad(op(*leaves), leaves, grad)

        rows.append(("fwd+bwd  transformers (reference)", *timed(
            lambda: fwd_bwd(lambda v, xy, a: hf_op(v, shapes_t, shapes, starts, xy, a, 64)), args.warmup, args.repeats),
            "fwd+bwd"))
        for path in paths:
            fn = with_path(path, lambda: fwd_bwd(lambda v, xy, a: ms_deform_attn_core(v, shapes_t, starts, xy, a)))
            rows.append((f"fwd+bwd  up2 {path}", *timed(fn, args.warmup, args.repeats), "fwd+bwd"))

    ref_ms = {group: med for name, med, _, group in rows if "reference" in name}
    print(f"\n| {'row':<44} | median ms | min ms | x faster than reference |")
    print(f"|{'-' * 46}|-----------|--------|-------------------------|")
    for name, med, low, group in rows:
        print(f"| {name:<44} | {med:9.1f} | {low:6.1f} | {ref_ms[group] / med:23.1f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
