#!/usr/bin/env python
"""Learning check: train a tiny UP2 on the synthetic shapes data for a fixed number of
iterations on the CPU, then evaluate on shapes val with detectron2's COCOEvaluator.

    .venv/bin/python projects/benchmark/learn_shapes.py --iters 800
    .venv/bin/python projects/benchmark/learn_shapes.py --config-file configs/tiny/det_shapes.yaml

Prints one table: box AP, AP50, mask AP, mask AP50, iterations, training seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UP2_DATASETS", os.path.join(REPO, "datasets"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/tiny/inst_shapes.yaml"))
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--output", default=os.path.join(REPO, "output/learn_shapes"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    import subprocess

    subprocess.run([sys.executable, os.path.join(REPO, "datasets/prepare_shapes.py"), "--out",
                    os.path.join(REPO, "datasets/shapes")], check=True)
    import up2  # noqa: F401
    from up2.data.datasets.builtin import register_all_builtin

    register_all_builtin(os.path.join(REPO, "datasets"))
    from detectron2.config import get_cfg
    from detectron2.utils.logger import setup_logger
    from tabulate import tabulate

    from up2 import add_up2_config
    from up2.engine import UP2Trainer

    setup_logger(name="up2")
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.SOLVER.MAX_ITER = args.iters
    cfg.SOLVER.STEPS = (int(args.iters * 0.8),)
    cfg.OUTPUT_DIR = args.output
    cfg.UP2_PROGRESS_BAR = True
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)

    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    results = UP2Trainer.test(cfg, trainer.model)
    rows = []
    for dataset, res in (results.items() if results and isinstance(next(iter(results.values())), dict) and "bbox" not in results else [("shapes_val", results)]):
        bbox, segm = res.get("bbox", {}), res.get("segm", {})
        rows.append([dataset, bbox.get("AP"), bbox.get("AP50"), segm.get("AP"), segm.get("AP50"), args.iters, round(seconds)])
    print()
    print(tabulate(rows, headers=["dataset", "box AP", "box AP50", "mask AP", "mask AP50", "iters", "train s"],
                   floatfmt=".1f", tablefmt="github"))


if __name__ == "__main__":
    main()
