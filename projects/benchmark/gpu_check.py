#!/usr/bin/env python
"""One prepared check of up2 on a GPU: environment, deformable attention, a paper-size training
step per task, host syncs, inference speed and a DDP step, run once within a time budget.

    . tools/gpu_install.sh && PYTHONUNBUFFERED=1 python3 projects/benchmark/gpu_check.py   # GPU machine
    .venv/bin/python projects/benchmark/gpu_check.py --reduced                             # CPU, tiny

docs/gpu.md says how to carry the code and wheels to an offline GPU machine. Everything uses
random weights (nothing is downloaded or carried): the backbone random, the text encoder
RoBERTa-base's architecture and a 50,265-token tokenizer (``random_roberta.py``).

Sections (``--sections``; each runs in its own process on CUDA, ``--isolate``, so that a crash
or a poisoned CUDA context stays in its section; a failure prints the traceback and
``RESULT section=<name> status=failed``, and the next section runs):

  env     versions (torch, triton, CUDA, cuDNN, transformers, detectron2), GPU name and memory,
          up2's commit (git, else $UP2_COMMIT) and a digest of its sources.
  msda    ``ms_deform_attn_core`` on its auto path (``UP2_MSDA_PATH`` unset) and any
          ``--msda-paths`` forced, vs the PyTorch reference ``ms_deform_attn_core_pytorch``, at
          paper shapes: encoder = every pixel of a 1024x1024 LSJ image at strides 8/16/32 (21,504
          queries), batch 2, d=256, 8 heads, 4 points; decoder = 300 queries on the same value.
          fp32, and bf16 (value and attention weights bf16, locations fp32 as MSDeformAttn passes
          them; ``reference`` computes that in fp32, ``reference_bf16`` all in bf16). Per path:
          forward ms (no grad), forward+backward ms, peak MB above the inputs, and the max
          |difference| of the output and the three gradients from the fp32 reference on the
          same (rounded) inputs.
  train   one training iteration per task of ``--config`` (as ``MultiTaskStep`` runs it:
          autocast ``--dtype``, backward, TBGN step) at the per-GPU batch IMS_PER_BATCH /
          ``--num-gpus``, halved on out-of-memory (said so): s/iter (median after a warm-up
          step), images/s, peak GB. One GPU encodes a task's whole target set (8 ranks would
          shard it).
  sync    ``torch.cuda.set_sync_debug_mode("warn")`` over one training step per task (batch
          ``--sync-batch``, after an uncounted one) and one inference forward: the number of
          synchronising CUDA calls and their most frequent call sites in this repository.
  ddp     one DDP step per task at batch 1 with world size 1 (NCCL on localhost, wrapped as the
          trainer wraps: find_unused_parameters, no buffer broadcast): the warnings, and the
          parameters left without a gradient (per task, and by every task).
  infer   eval-mode forward of each localization task (prepared as the predictors prepare it)
          on random 800x1333 images, fp32 and bf16 (``TEST.AMP``): images/s, ms, peak GB.

Reduced mode (``--reduced``; automatic without CUDA): the tiny model of
``configs/tiny/Base-tiny.yaml`` (a 2-layer random RoBERTa-shaped text encoder, 1,000 tokens)
with the config's tasks and their first 20 class names, 128-px images, batches of at most 2,
one step per task, and training in fp32 on a CPU (``--dtype auto``); ``sync`` (and ``ddp`` on
NCCL; ``--ddp-backend gloo`` runs it) report ``skipped: no CUDA`` on a CPU.

Time: each section has a limit (``LIMITS_S``), and no section starts after ``--budget-s``
(450 s; reduced 170 s), so that the whole check ends well inside a 10-minute command.

Output: ``RESULT`` lines (formats in ``check_harness.py``), the whole log appended to
``$OUT/gpu_check.log`` (``--out``), the RESULT lines as strict JSON in ``$OUT/gpu_check.json``.
Exit status 1 when a section failed.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:  # imported as projects.benchmark.gpu_check, or run as a script (then this folder is on sys.path)
    from . import check_harness, gpu_sections
except ImportError:
    import check_harness, gpu_sections  # noqa: E401

REPO = check_harness.REPO
SECTIONS = tuple(gpu_sections.SECTION_FNS)
# per-section time limits (s), full / reduced; the whole run also stops starting sections at --budget-s
LIMITS_S = {"env": 60, "msda": 150, "train": 240, "sync": 120, "ddp": 120, "infer": 150}
REDUCED_LIMITS_S = {"env": 30, "msda": 60, "train": 120, "sync": 60, "ddp": 90, "infer": 60}


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--reduced", action="store_true", help="tiny model and shapes (automatic without CUDA)")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "up2_R50.yaml"))
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks of the config")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs the config's IMS_PER_BATCH is split over")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training autocast; auto: bf16 on CUDA, fp32 on a CPU (bf16 autocast there is slower)")
    parser.add_argument("--msda-paths", nargs="*", default=[], help="UP2_MSDA_PATH values to force besides auto "
                        "(e.g. triton pytorch)")
    parser.add_argument("--sync-batch", type=int, default=2, help="images per step in the sync count")
    parser.add_argument("--infer-size", default=None, help="HxW of the inference images (800x1333; reduced 128x192)")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=None, help="default 1 4 (reduced: 1)")
    parser.add_argument("--ddp-backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--budget-s", type=float, default=None, help="start no section after this (450; reduced 170)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each section in its own process (default: on with CUDA)")
    parser.add_argument("--out", default=None, help="folder of gpu_check.log / .json (default $OUT; none: no files)")
    parser.add_argument("--cpu", action="store_true", help="ignore CUDA")
    parser.add_argument("--text-encoder", default=None, help=argparse.SUPPRESS)  # a folder written by a parent run
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one section for an --isolate parent
    parser.add_argument("--inject-failure", nargs="*", default=[], choices=SECTIONS,
                        help="make these sections raise at their start (checks that the others go on)")
    args = parser.parse_args(argv)
    return args


def _fill_defaults(args, cuda: bool):
    if not cuda and not args.reduced:
        print("gpu_check: no CUDA device: reduced mode (--reduced)", flush=True)
        args.reduced = True
    size = args.infer_size or ("128x192" if args.reduced else "800x1333")
    try:
        args.infer_size = tuple(int(v) for v in size.lower().split("x"))
        if len(args.infer_size) != 2 or min(args.infer_size) < 32:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--infer-size: expected HxW, at least 32 px each, got {size!r}")
    args.infer_batches = args.infer_batches or ([1] if args.reduced else [1, 4])
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    args.budget_s = args.budget_s or (170.0 if args.reduced else 450.0)
    if args.isolate is None:
        args.isolate = cuda and not args.child


def child_argv(args, name: str, limit_s: float, text_encoder=None) -> list:
    """The command line of one section in its own process (``--isolate``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--no-isolate", "--sections", name,
           "--config", args.config, "--num-gpus", str(args.num_gpus), "--dtype", args.dtype,
           "--sync-batch", str(args.sync_batch), "--infer-size", "x".join(map(str, args.infer_size)),
           "--ddp-backend", args.ddp_backend, "--budget-s", str(limit_s), "--infer-batches", *map(str, args.infer_batches)]
    if text_encoder:
        cmd += ["--text-encoder", text_encoder]
    cmd += ["--reduced"] * args.reduced + ["--cpu"] * args.cpu
    for flag, values in (("--tasks", args.tasks), ("--msda-paths", args.msda_paths),
                         ("--inject-failure", [s for s in args.inject_failure if s == name])):
        if values:
            cmd += [flag, *values]
    return cmd


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or os.environ.get("OUT")
    log = os.path.join(out, "gpu_check.log") if out and not args.child else None
    report = check_harness.Report()
    start = time.perf_counter()
    with check_harness.tee_to(log):
        import torch

        _fill_defaults(args, torch.cuda.is_available() and not args.cpu)
        print(f"gpu_check: sections {' '.join(args.sections)}; {'reduced' if args.reduced else 'full'} mode; "
              f"{'one process per section' if args.isolate else 'one process'}; budget {args.budget_s:.0f} s; "
              f"log {log or '(stdout only)'}", flush=True)
        ck = gpu_sections.Check(args, report)
        limits = REDUCED_LIMITS_S if args.reduced else LIMITS_S
        for name in args.sections:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 10:
                report.status(name, "skipped", f"time budget of {args.budget_s:.0f} s spent")
                continue
            limit = min(limits[name], left)
            if args.isolate:
                text = ck.text_encoder() if name not in ("env", "msda") else None
                print(f"\n===== section {name} (own process, limit {limit:.0f} s) =====", flush=True)
                check_harness.run_child(report, name, child_argv(args, name, limit, text), limit + 30)
                continue

            def run(name=name):
                if name in args.inject_failure:
                    raise RuntimeError(f"failure injected into section {name} (--inject-failure)")
                gpu_sections.SECTION_FNS[name](ck)

            check_harness.run_section(report, name, run, limit)
            gc.collect()
            if ck.cuda:
                torch.cuda.empty_cache()
        statuses = report.statuses()
        if not args.child:
            counts = Counter(statuses.values())
            print(f"\ngpu_check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
                  f"{time.perf_counter() - start:.0f} s: " + ", ".join(f"{k}={v}" for k, v in statuses.items()))
            if out:
                report.to_json(os.path.join(out, "gpu_check.json"))
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
