#!/usr/bin/env python
"""Paired A/B of each inference rewrite of ``up2.modeling.inference.prepare_for_inference``.

    .venv/bin/python projects/benchmark/inference_rewrites.py                  # the A/B table
    .venv/bin/python projects/benchmark/inference_rewrites.py --against /work/wt-base   # vs. another checkout

The model: configs/up2_R50.yaml (Conditional MoE on) with one instance-segmentation task over
COCO's 80 class names, the small "minilm" text encoder, random weights (seed 0), eval mode,
float32, ``torch.inference_mode``, CPU with ``--threads`` threads. The input: one 800x1067
image (a seeded smooth random picture, uint8), timed as the whole-model call
``model([{"image", "height", "width"}])`` (target embeddings cached after the warm-up).

A/B: one model prepared with every rewrite ("with") and, per rewrite, a copy of the same
weights prepared with every rewrite but that one ("without"); each round times "with" then each
"without" (interleaved, so load changes hit both sides), after ``--warmup`` untimed rounds.
Printed, for wall time and process CPU time (user + system, all threads: steadier than wall
time on a shared machine): medians over ``--repeats`` rounds, the change of the medians and
the median of the per-round ratios (without / with - 1: positive = the rewrite saves time).

``--against DIR`` times the prepared model of this checkout and the model of another checkout
(built as that code builds it for inference: ``prepare_for_inference`` when it has one),
each in its own worker process with ``cwd`` set to its checkout, interleaved round by round
(alternating which goes first); prints the same table for this vs. the other.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build(root: str, size):
    """(eval model of checkout ``root`` without inference preparation, its inputs)."""
    sys.path.insert(0, root)
    import torch
    import torch.nn.functional as F
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    import up2  # noqa: F401
    from up2 import add_up2_config

    assert os.path.realpath(up2.__file__).startswith(os.path.realpath(root)), up2.__file__
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(os.path.join(root, "configs", "up2_R50.yaml"))
    cfg.MODEL.TEXT_ENCODER.NAME = "minilm"
    cfg.MODEL.DEVICE = "cpu"
    names = list(MetadataCatalog.get("coco_2017_val").thing_classes)
    cfg.TASKS = CfgNode({"SEG": {"TYPE": "instance_segmentation", "CLASS_NAMES": names,
                                 "DATASETS": {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}}})
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h, w = size
    g = torch.Generator().manual_seed(0)
    img = F.interpolate(torch.rand(1, 3, h // 16, w // 16, generator=g) * 255, size=(h, w), mode="bilinear")
    return model, [{"image": img[0].to(torch.uint8), "height": h, "width": w}]


def timed(model, inputs):
    """(wall seconds, process CPU seconds) of one whole-model call."""
    import torch

    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model(inputs)
    return time.perf_counter() - start, time.process_time() - cpu


def table(rows, times, header):
    """Markdown rows ``name | median base | median other | change of medians | median per-round change``
    for wall and CPU time; ``rows`` = [(name, base key, other key, index slice of the base)]."""
    lines = []
    for kind, col in (("wall", 0), ("CPU", 1)):
        lines += [f"\n{kind} time (s)\n", header, "|---|---|---|---|---|"]
        for name, base, other, part in rows:
            a = [t[col] for t in times[base][part]]
            b = [t[col] for t in times[other]]
            paired = statistics.median(y / x - 1 for x, y in zip(a, b))
            ma, mb = statistics.median(a), statistics.median(b)
            lines.append(f"| {name} | {ma:.3f} | {mb:.3f} | {100 * (mb / ma - 1):+.1f}% | {100 * paired:+.1f}% |")
    return "\n".join(lines)


def prepared(model, rewrites=None):
    """``model`` as its checkout prepares it for inference (unchanged without prepare_for_inference)."""
    try:
        from up2.modeling.inference import prepare_for_inference
    except ImportError:
        return model
    return prepare_for_inference(model, rewrites)


def worker(args) -> None:
    """Build this cwd's model, prepare it, then time one forward per "run" line on stdin."""
    import torch

    torch.set_num_threads(args.threads)
    model, inputs = build(os.getcwd(), args.size)
    model = prepared(model)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print("%.6f %.6f" % timed(model, inputs), flush=True)


def against(args) -> None:
    """This checkout's prepared model vs. ``args.against``'s, interleaved worker processes."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads),
           "--size", f"{args.size[0]}x{args.size[1]}"]
    procs = {}
    for name, root in (("this", here), ("other", args.against)):  # one at a time: builds do not overlap
        procs[name] = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert procs[name].stdout.readline().strip() == "ready", f"worker in {root} failed"

    def run(name):
        procs[name].stdin.write("run\n")
        procs[name].stdin.flush()
        return tuple(float(v) for v in procs[name].stdout.readline().split())

    times = {"this": [], "other": []}
    for r in range(args.warmup + args.repeats):
        pair = {name: run(name) for name in (("this", "other") if r % 2 == 0 else ("other", "this"))}
        if r >= args.warmup:
            for name, t in pair.items():
                times[name].append(t)
            print(f"round {r - args.warmup}: this {pair['this'][0]:.3f} s, other {pair['other'][0]:.3f} s "
                  f"(CPU {pair['this'][1]:.2f} / {pair['other'][1]:.2f} s)", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"\n{args.repeats} rounds, {args.threads} threads, {args.size[0]}x{args.size[1]} float32; "
          f"this = {here}, other = {args.against}")
    print(table([("this vs. other", "other", "this", slice(None))], times,
                "| comparison | median other | median this | change of medians | median per-round change |"))


def ab(args) -> None:
    """The A/B table of every rewrite (module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base, inputs = build(here, args.size)
    from up2.modeling.inference import REWRITES

    names = args.rewrites or list(REWRITES)
    variants = {"with": prepared(copy.deepcopy(base))}
    for name in names:
        variants[name] = prepared(copy.deepcopy(base), [r for r in REWRITES if r != name])
    del base
    times = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        for name in names:  # "with" before every "without": pairs measured side by side
            t_with, t_without = timed(variants["with"], inputs), timed(variants[name], inputs)
            if r >= args.warmup:
                times["with"].append(t_with)
                times[name].append(t_without)
        if r >= args.warmup:
            print(f"round {r - args.warmup}: " + ", ".join(f"{k} {v[-1][0]:.3f}" for k, v in times.items()), flush=True)
    print(f"\n{args.repeats} rounds, {args.threads} threads, {args.size[0]}x{args.size[1]} float32")
    rows = [(name, "with", name, slice(i, None, len(names))) for i, name in enumerate(names)]
    print(table(rows, times, "| rewrite | median with | median without | change of medians | median per-round change |"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(800, 1067),
                        help="HxW of the input image (pixels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--rewrites", nargs="*", help="rewrites to A/B (default: all of REWRITES)")
    parser.add_argument("--against", help="another checkout: time its model against this one's")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.against:
        against(args)
    else:
        ab(args)


if __name__ == "__main__":
    main()
