#!/usr/bin/env python
"""The main job (README's first command, ``make demo``): build shapes, train a tiny UP2 on the
CPU, evaluate it with COCOEvaluator, and predict on real photos that scikit-image ships.

Writes to ``--output`` (default output/demo): ``model_final.pth``, ``summary.json`` (COCO
box/mask AP on shapes val, training time, per-photo detections; strict JSON, NaN as null) and
``pictures/*.png``. ``metrics.json`` in the same folder is detectron2's JSON-lines training log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "logo")  # camera is grayscale, logo is RGBA
SUMMARY_FILE = "summary.json"  # not "metrics.json": detectron2's JSONWriter logs training there


def sh(args, env=None):
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=REPO, env=env)


def save_photos(folder: str):
    """scikit-image's bundled photos as PNG files, in their own modes (L for camera, RGBA for logo)."""
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def write_summary(out: str, summary: dict) -> str:
    """Write the main job's summary as strict JSON to ``<out>/summary.json``; returns the path.

    Detectron2's own ``metrics.json`` (one JSON object per logged iteration) in ``out`` is left alone.
    """
    from up2.utils import write_json_atomic

    path = os.path.join(out, SUMMARY_FILE)
    write_json_atomic(summary, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--config-file", default="configs/tiny/inst_shapes.yaml")
    parser.add_argument("--iters", type=int, default=700, help="training iterations (about 1 s each on 2 cores)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UP2_DATASETS=os.path.join(REPO, "datasets"))

    t0 = time.time()
    sh([py, "datasets/prepare_shapes.py", "--out", "datasets/shapes"], env)
    steps = max(1, int(args.iters * 0.8))
    common = ["OUTPUT_DIR", out]
    sh([py, "train_net.py", "--config-file", args.config_file, "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.STEPS", f"({steps},)", "UP2_PROGRESS_BAR", "True", *common], env)
    t_train = time.time() - t0
    weights = os.path.join(out, "model_final.pth")
    sh([py, "train_net.py", "--config-file", args.config_file, "--eval-only", "MODEL.WEIGHTS", weights, *common], env)

    try:  # imported as projects.demo.main_job, or run as a script (then this folder is on sys.path)
        from .demo import run, setup_cfg
    except ImportError:
        from demo import run, setup_cfg

    photos = save_photos(os.path.join(out, "photos"))
    cfg = setup_cfg(args.config_file, ["MODEL.WEIGHTS", weights])
    detections = run(cfg, photos, os.path.join(out, "pictures"), threshold=0.3)

    with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
    summary = {
        "config": args.config_file,
        "iterations": args.iters,
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.time() - t0, 1),
        "shapes_val": evaluation,
        "photos": detections,
    }
    path = write_summary(out, summary)
    print(json.dumps({k: summary[k] for k in ("iterations", "train_seconds", "shapes_val")}, indent=2))
    print(f"\nmain job done: pictures in {os.path.join(out, 'pictures')}, summary in {path}")


if __name__ == "__main__":
    main()
