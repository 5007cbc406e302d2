#!/usr/bin/env python
"""Learning check: train a tiny UP2 on the synthetic shapes data for a fixed number of
iterations on the CPU, then evaluate every task of the config on shapes val.

    .venv/bin/python projects/benchmark/learn_shapes.py --task inst --iters 900
    .venv/bin/python projects/benchmark/learn_shapes.py --task cls --iters 2000
    .venv/bin/python projects/benchmark/learn_shapes.py --joint --iters 3000

Tasks: det, inst (box/mask AP via COCOEvaluator), cls (top-1/top-5), retrieval (R@1/5/10 both
ways), caption (BLEU-4, CIDEr), mlm (masked-token accuracy); --joint trains all of them together.
Prints one table: task, dataset, metric, value, iterations, training seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"det": "det_shapes", "inst": "inst_shapes", "cls": "cls_shapes", "retrieval": "retrieval_shapes",
           "caption": "caption_shapes", "mlm": "mlm_shapes"}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UP2_DATASETS", os.path.join(REPO, "datasets"))


def prepare_shapes() -> None:
    """Write ``datasets/shapes`` (a no-op when it is up to date) and register the ``shapes_*``
    datasets of every task in this process."""
    import subprocess

    subprocess.run([sys.executable, os.path.join(REPO, "datasets/prepare_shapes.py"), "--out",
                    os.path.join(REPO, "datasets/shapes")], check=True)
    import up2  # noqa: F401
    from up2.data.datasets.builtin import register_all_builtin

    register_all_builtin(os.path.join(REPO, "datasets"))


def shapes_config(config_file: str, iters: int, output: str, opts=()):
    """The (unfrozen) config of a learning run: ``config_file`` + ``opts`` (KEY VALUE ...), then
    ``iters`` iterations with the lr step at 80 % of them, no periodic evaluation, written to
    ``output``."""
    from detectron2.config import get_cfg

    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.STEPS = (int(iters * 0.8),)
    cfg.TEST.EVAL_PERIOD = 0  # the script evaluates once after training (detectron2 would also at the end)
    cfg.OUTPUT_DIR = output
    return cfg


def per_task_results(cfg, results) -> dict:
    """``UP2Trainer.test`` output as ``{task: {dataset: {group: {metric: value}}}}`` also for a
    single-task config (where detectron2's shape ``{group: {metric: value}}`` is returned)."""
    if len(cfg.TASKS) == 1:
        (name,), (spec,) = list(cfg.TASKS.keys()), list(cfg.TASKS.values())
        return {name: {spec.DATASETS.TEST[0]: results}}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(CONFIGS), default="inst")
    parser.add_argument("--joint", action="store_true", help="every task together (configs/tiny/joint_shapes.yaml)")
    parser.add_argument("--config-file", default=None, help="overrides --task / --joint")
    parser.add_argument("--iters", type=int, default=900)
    parser.add_argument("--output", default=os.path.join(REPO, "output/learn_shapes"))
    parser.add_argument("--seed", type=int, default=0,
                        help="cfg.SEED (model init, data order); compare code changes over several seeds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    prepare_shapes()
    from detectron2.utils.logger import setup_logger
    from tabulate import tabulate

    from up2.engine import UP2Trainer

    setup_logger(name="up2")
    config_file = args.config_file or os.path.join(
        REPO, "configs", "tiny", ("joint_shapes" if args.joint else CONFIGS[args.task]) + ".yaml")
    cfg = shapes_config(config_file, args.iters, args.output, ["SEED", str(args.seed)] + list(args.opts))
    cfg.UP2_PROGRESS_BAR = True
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)

    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED)  # as train_net.py's default_setup: model init and data order follow --seed
    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    results = per_task_results(cfg, UP2Trainer.test(cfg, trainer.model))
    rows = []
    for task, per_dataset in results.items():
        for dataset, res in per_dataset.items():
            for group, metrics in res.items():
                for metric, value in metrics.items():
                    if metric in KEEP.get(group, ()):
                        rows.append([task, dataset, f"{group} {metric}", value, args.iters, round(seconds)])
    from up2.modeling.tasks import TASK_REGISTRY
    from up2.modeling.tasks.task import TaskFamily

    for name, spec in cfg.TASKS.items():
        if TASK_REGISTRY.get(spec.TYPE).family is TaskFamily.CLASSIFICATION:
            rows.append([name, spec.DATASETS.TEST[0], "GeneralistPredictor.classify correct %",
                         predictor_accuracy(cfg, spec.DATASETS.TEST[0]), args.iters, round(seconds)])
    print()
    print(tabulate(rows, headers=["task", "dataset", "metric", "value", "iters", "train s"],
                   floatfmt=".1f", tablefmt="github"))


def predictor_accuracy(cfg, dataset: str) -> float:
    """Share (%) of ``dataset`` images whose true class GeneralistPredictor.classify ranks first,
    with the class names passed at call time."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from up2.predictor import GeneralistPredictor

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    predictor = GeneralistPredictor(cfg)
    names = list(MetadataCatalog.get(dataset).thing_classes)
    records = DatasetCatalog.get(dataset)
    correct = sum(predictor.classify(r["file_name"], names)["label"] == names[r["class_id"]] for r in records)
    return 100.0 * correct / len(records)


KEEP = {"bbox": ("AP", "AP50"), "segm": ("AP", "AP50"), "classification": ("top1", "top5"),
        "retrieval": ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"), "captioning": ("BLEU-4", "CIDEr", "ptb_tokenizer"),
        "mlm": ("accuracy",)}


if __name__ == "__main__":
    main()
