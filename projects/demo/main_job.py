#!/usr/bin/env python
"""The main job (README's first command, ``make demo``): one UP2 checkpoint learns every task.

Builds the synthetic shapes data, trains ONE tiny UP2 on the CPU on every task type at once
(instance segmentation, which gives detection too, classification, image-text retrieval,
captioning and masked language modelling; unmixed task sampling and TBGN, paper §4.4) with
``configs/tiny/joint_shapes.yaml``, evaluates that checkpoint on every task of shapes val, and
draws picture sheets of its predictions.

Writes to ``--output`` (default output/demo):

- ``model_final_inference/``: the shareable checkpoint (``GeneralistPredictor.from_pretrained``);
  ``model_final.pth``: detectron2's training checkpoint.
- ``eval_table.md`` / ``eval_table.json``: the combined evaluation table (box / mask AP and
  AP50, top-1 / top-5, R@1/5/10 both ways, BLEU-4, CIDEr, masked-token accuracy).
- ``pictures/index.html``: one sheet per shapes val image (boxes and masks, generated caption,
  top-3 classes, rank of the true caption among all val captions), and two real photos whose
  title says the model learned only synthetic shapes.
- ``summary.json``: timings and the table (strict JSON). ``metrics.json`` is detectron2's
  JSON-lines training log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/tiny/joint_shapes.yaml"
PHOTOS = ("astronaut", "coffee")  # scikit-image's bundled photos
SUMMARY_FILE = "summary.json"  # not "metrics.json": detectron2's JSONWriter logs training there


def sh(args, env=None):
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=REPO, env=env)


def save_photos(folder: str):
    """scikit-image's bundled photos as PNG files; returns their paths."""
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
    parser.add_argument("--config-file", default=CONFIG)
    parser.add_argument("--iters", type=int, default=0,
                        help="training iterations (0: the config's SOLVER.MAX_ITER, lr step at its SOLVER.STEPS)")
    parser.add_argument("--sheets", type=int, default=8, help="shapes val images drawn as picture sheets")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UP2_DATASETS=os.path.join(REPO, "datasets"))

    t0 = time.time()
    sh([py, "datasets/prepare_shapes.py", "--out", "datasets/shapes"], env)
    schedule = []
    if args.iters:
        schedule = ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", f"({max(1, int(args.iters * 0.8))},)"]
    # training ends with the evaluation of every task, which train_net.py prints as one table and
    # writes to eval_table.{md,json}, and with the inference checkpoint model_final_inference/
    sh([py, "train_net.py", "--config-file", args.config_file, *schedule, "UP2_PROGRESS_BAR", "True",
        "OUTPUT_DIR", out], env)
    t_train = time.time() - t0

    os.environ.update(env)
    sys.path.insert(0, REPO)
    from up2.data.datasets.builtin import register_all_builtin
    from up2.predictor import GeneralistPredictor

    try:  # imported as projects.demo.main_job, or run as a script (then this folder is on sys.path)
        from .sheets import write_sheets
    except ImportError:
        from sheets import write_sheets

    register_all_builtin(env["UP2_DATASETS"])
    with open(os.path.join(out, "eval_table.json"), encoding="utf-8") as f:
        table = json.load(f)
    predictor = GeneralistPredictor.from_pretrained(os.path.join(out, "model_final_inference"))
    photos = save_photos(os.path.join(out, "photos"))
    page = write_sheets(predictor, "shapes_val", os.path.join(out, "pictures"), num_images=args.sheets,
                        photos=photos, table_rows=table["rows"], threshold=0.25)

    summary = {
        "config": args.config_file,
        "train_and_evaluate_seconds": round(t_train, 1),
        "total_seconds": round(time.time() - t0, 1),
        "evaluation": table["rows"],
        "pictures": page,
    }
    path = write_summary(out, summary)
    with open(os.path.join(out, "eval_table.md"), encoding="utf-8") as f:
        print("\n" + f.read())
    print(f"main job done in {summary['total_seconds'] / 60:.1f} min: one checkpoint, every task.\n"
          f"  pictures:   {page}\n  checkpoint: {os.path.join(out, 'model_final_inference')}\n"
          f"  table:      {os.path.join(out, 'eval_table.md')}\n  summary:    {path}")


if __name__ == "__main__":
    main()
