#!/usr/bin/env python
"""Overfit check on real photos: train the tiny UP2 on 16 coco128 images and evaluate box /
mask AP on the same 16 images (COCOEvaluator). A model that learns shows AP clearly above 0.

    .venv/bin/python projects/benchmark/overfit_coco128.py --iters 400

coco128 is looked up at ../shared/data/coco128 (override with --coco128).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_subset(src_json: str, out_json: str, num_images: int) -> None:
    """The first ``num_images`` images that have non-crowd annotations, with all categories."""
    from up2.utils import write_json_atomic

    data = json.load(open(src_json))
    has_ann = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    images = [im for im in data["images"] if im["id"] in has_ann][:num_images]
    ids = {im["id"] for im in images}
    subset = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    write_json_atomic(subset, out_json)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco128", default=os.path.join(REPO, "..", "shared", "data", "coco128"))
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/tiny/Base-tiny.yaml"))
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--output", default=os.path.join(REPO, "output/overfit_coco128"))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.coco128, "instances.json")):
        sys.exit(f"coco128 not found at {args.coco128}")

    import up2  # noqa: F401
    from detectron2.config import CfgNode, get_cfg
    from detectron2.utils.logger import setup_logger
    from tabulate import tabulate

    from up2 import add_up2_config
    from up2.data import register_coco_instances_checked
    from up2.engine import UP2Trainer

    setup_logger(name="up2")
    os.makedirs(args.output, exist_ok=True)
    subset = os.path.join(args.output, f"coco128_first{args.num_images}.json")
    write_subset(os.path.join(args.coco128, "instances.json"), subset, args.num_images)
    register_coco_instances_checked("coco128_subset", subset, os.path.join(args.coco128, "images"))

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.TASKS.INSTANCE_SEGMENTATION = CfgNode({"TYPE": "instance_segmentation", "IMS_PER_BATCH": 8, "LOSS_WEIGHT": 4.0,
                                               "DATASETS": {"TRAIN": ["coco128_subset"], "TEST": ["coco128_subset"]}})
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", (160,), "INPUT.MAX_SIZE_TRAIN", 224, "INPUT.MIN_SIZE_TEST", 160,
                         "INPUT.MAX_SIZE_TEST", 224, "INPUT.RANDOM_FLIP", "none", "MODEL.PROPOSAL.TEST_TOPK", 100])
    cfg.merge_from_list(args.opts)
    cfg.SOLVER.MAX_ITER = args.iters
    cfg.SOLVER.STEPS = (int(args.iters * 0.8),)
    cfg.OUTPUT_DIR = args.output
    cfg.UP2_PROGRESS_BAR = True
    cfg.freeze()

    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    res = UP2Trainer.test(cfg, trainer.model)
    row = [args.num_images, args.iters, res["bbox"]["AP"], res["bbox"]["AP50"], res["segm"]["AP"], res["segm"]["AP50"], round(seconds)]
    print()
    print(tabulate([row], headers=["train images", "iters", "box AP", "box AP50", "mask AP", "mask AP50", "train s"],
                   floatfmt=".1f", tablefmt="github"))


if __name__ == "__main__":
    main()
