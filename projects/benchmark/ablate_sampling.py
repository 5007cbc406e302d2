#!/usr/bin/env python
"""Tab. 4 of the paper on shapes: task sampling, Gather Feature and TBGN (paper §4.4, §5.3).

    .venv/bin/python projects/benchmark/ablate_sampling.py --iters 1500
    .venv/bin/python projects/benchmark/ablate_sampling.py --iters 10 --rows unmixed unmixed+gather --seeds 0

Four runs of configs/tiny/joint_shapes.yaml (every task) with the same iterations, seed and
initial weights, then every task evaluated on shapes val; every row runs once per seed of
``--seeds`` (default 0 1: cfg.SEED, i.e. initial weights and augmentation; the task draws and
data order follow DATALOADER.TASK_SAMPLER_SEED, a KEY VALUE override) so the run-to-run noise
is visible next to the differences between rows:

    mixed                 every task every iteration, losses summed with s_k; no gather; AdamW
    unmixed               one task per iteration for all ranks (paper); no gather; AdamW
    unmixed+gather        + retrieval negatives gathered from all ranks (Gather Feature)
    unmixed+gather+tbgn   + Task-Balanced Gradient Normalization instead of AdamW (the paper's setting)

Every row runs 2 processes (detectron2 ``launch``; gloo on the CPU, NCCL on GPUs): with one
process Gather Feature is a no-op, and rows differ only in the setting they ablate, so all of
them use the same world size and the same global batch of each task (the config's
IMS_PER_BATCH, split over the 2 ranks).

Budget of the mixed row: the paper's mixed strategy splits one iteration's batch among the
tasks; here (``--mixed-batch scaled``, default) task k's batch is its unmixed batch times its
normalised sampling ratio s_k (rounded to a multiple of the world size, at least one image per
rank), so every row trains on the same expected number of images of each task per iteration
(and costs about the same). ``--mixed-batch full`` gives the mixed row every task's full batch
every iteration instead (K times the data and compute of an unmixed iteration).

Prints one table (rows = settings; columns = box AP50, mask AP50, top-1, R@1 i2t, R@1 t2i,
BLEU-4, CIDEr, MLM acc, training seconds; each cell one value per seed, "35.3 / 37.1") and
writes it to ``<output>/ablate_sampling.json`` (atomically; every row's values per seed). Training
seconds exclude process start-up and evaluation. Run folders: ``<output>/seed<S>/<row>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detectron2.engine import HookBase  # noqa: E402
from learn_shapes import REPO, per_task_results, prepare_shapes, shapes_config  # noqa: E402

WORLD = 2
ROWS = {  # name -> (DATALOADER.TASK_SAMPLING, retrieval GATHER_FEATURES, SOLVER.OPTIMIZER)
    "mixed": ("mixed", False, "ADAMW"),
    "unmixed": ("unmixed", False, "ADAMW"),
    "unmixed+gather": ("unmixed", True, "ADAMW"),
    "unmixed+gather+tbgn": ("unmixed", True, "TBGN"),
}
COLUMNS = [  # header, result group, metric (the first task reporting the group is used)
    ("box AP50", "bbox", "AP50"), ("mask AP50", "segm", "AP50"), ("top-1", "classification", "top1"),
    ("R@1 i2t", "retrieval", "i2t_R@1"), ("R@1 t2i", "retrieval", "t2i_R@1"),
    ("BLEU-4", "captioning", "BLEU-4"), ("CIDEr", "captioning", "CIDEr"), ("MLM acc", "mlm", "accuracy"),
]
CONFIG = os.path.join(REPO, "configs", "tiny", "joint_shapes.yaml")


def row_config(row: str, iters: int, output: str, seed: int, mixed_batch: str = "scaled", opts=()):
    """The frozen config of one ablation row (module docstring).

    Raises:
        ValueError: unknown ``row`` or ``mixed_batch``; a task batch not divisible by the world size.
    """
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; expected one of {list(ROWS)}")
    if mixed_batch not in ("scaled", "full"):
        raise ValueError(f"mixed_batch must be 'scaled' or 'full', got {mixed_batch!r}")
    sampling, gather, optimizer = ROWS[row]
    cfg = shapes_config(CONFIG, iters, os.path.join(output, row), opts)
    cfg.DATALOADER.TASK_SAMPLING = sampling
    cfg.SOLVER.OPTIMIZER = optimizer
    cfg.SEED = seed
    total = sum(float(t.SAMPLING_RATIO) for t in cfg.TASKS.values())
    from up2.modeling.tasks import TASK_REGISTRY
    from up2.modeling.tasks.task import TaskFamily

    for name, task in cfg.TASKS.items():
        if TASK_REGISTRY.get(task.TYPE).family is TaskFamily.RETRIEVAL:
            task.GATHER_FEATURES = gather
        if sampling == "mixed" and mixed_batch == "scaled":
            share = task.IMS_PER_BATCH * float(task.SAMPLING_RATIO) / total
            task.IMS_PER_BATCH = max(WORLD, WORLD * round(share / WORLD))
        if task.IMS_PER_BATCH % WORLD:
            raise ValueError(f"cfg.TASKS.{name}.IMS_PER_BATCH={task.IMS_PER_BATCH} is not a multiple of {WORLD} ranks")
    cfg.freeze()
    return cfg


def table_row(results: dict) -> list:
    """The COLUMNS values (float or None) from ``{task: {dataset: {group: {metric: value}}}}``."""
    values = []
    for _, group, metric in COLUMNS:
        found = [res[group][metric] for per_dataset in results.values() for res in per_dataset.values()
                 if metric in res.get(group, {})]
        values.append(float(found[0]) if found else None)
    return values


def seed_cell(values, fmt: str = ".1f") -> str:
    """One table cell holding one value per seed: ``[35.26, 37.1]`` -> ``"35.3 / 37.1"``; a
    missing value (None) is ``"-"``."""
    return " / ".join("-" if v is None else format(v, fmt) for v in values)


def seed_table(rows: list, headers: list) -> list:
    """Table lines from the JSON rows (``{"row": name, "per_seed": [{header: value, ...}, ...]}``):
    the row name, then for every header of ``headers[1:]`` the per-seed cell (:func:`seed_cell`)."""
    return [[r["row"]] + [seed_cell([s.get(h) for s in r["per_seed"]]) for h in headers[1:]] for r in rows]


class TrainClock(HookBase):
    """Seconds from the first to the end of the last training step (no evaluation): ``seconds``."""

    def before_train(self):
        self.start, self.seconds = time.perf_counter(), 0.0

    def after_step(self):
        self.seconds = time.perf_counter() - self.start


def _worker(row: str, args: argparse.Namespace, seed: int, result_file: str) -> None:
    """One rank of one row: train, evaluate every task (distributed), rank 0 writes ``result_file``."""
    import torch
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    import up2  # noqa: F401  (registers shapes_* from $UP2_DATASETS)
    from up2.engine import UP2Trainer
    from up2.utils import write_json_atomic

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    cfg = row_config(row, args.iters, os.path.join(args.output, f"seed{seed}"), seed, args.mixed_batch, args.opts)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="up2")
    seed_all_rng(cfg.SEED + comm.get_rank())  # as detectron2's default_setup

    clock = TrainClock()
    trainer = UP2Trainer(cfg)
    trainer.register_hooks([clock])
    trainer.resume_or_load(resume=False)
    trainer.train()
    # detectron2's EvalHook evaluated every task after the last iteration (all ranks; rank 0 holds them)
    # (decided on attribute presence, never on the value: a rank-dependent choice would hang the other rank)
    if hasattr(trainer, "_last_eval_results"):
        results = trainer._last_eval_results
    else:
        results = UP2Trainer.test(cfg, trainer.model)
    if comm.is_main_process():
        results = per_task_results(cfg, results)
        write_json_atomic({"row": row, "results": results, "train_seconds": clock.seconds,
                           "task_counts": dict(trainer._trainer.task_counts),
                           "ims_per_batch": {n: t.IMS_PER_BATCH for n, t in cfg.TASKS.items()}}, result_file)


def run_row(row: str, args: argparse.Namespace, seed: int) -> dict:
    """Launch the 2 processes of ``row`` with cfg.SEED ``seed`` and return what its rank 0 wrote.

    up2's ``launch`` (detectron2's, plus a teardown in every worker): when ``_worker`` returned,
    its trainer (and DDP wrapper) is released, the ranks meet at a barrier and the process group
    is destroyed, so no rank aborts at exit after its results were written."""
    from up2.utils.distributed import launch

    result_file = os.path.join(args.output, f"seed{seed}", row, "row_results.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    start = time.time()
    launch(_worker, WORLD, dist_url="auto", args=(row, args, seed, result_file))
    with open(result_file, "r", encoding="utf-8") as f:
        out = json.load(f)
    out["wall_seconds"] = time.time() - start
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1500, help="training iterations of every row")
    parser.add_argument("--output", default=os.path.join(REPO, "output/ablate_sampling"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="a subset of the rows")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                       help="cfg.SEED values (initial weights, augmentation): every row runs once per seed")
    seeds.add_argument("--seed", type=int, help="one seed (same as --seeds S)")
    parser.add_argument("--mixed-batch", choices=("scaled", "full"), default="scaled",
                        help="per-task batch of the mixed row (module docstring)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for every row")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    if args.seed is not None:
        args.seeds = [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")

    prepare_shapes()
    from tabulate import tabulate

    from up2.utils import write_json_atomic

    table = [{"row": row, "per_seed": []} for row in args.rows]
    for seed in args.seeds:  # seed-major: a complete table of the first seed comes first
        for entry in table:
            out = run_row(entry["row"], args, seed)
            entry["ims_per_batch"] = out["ims_per_batch"]
            values = dict(zip([c[0] for c in COLUMNS], table_row(out["results"])))
            entry["per_seed"].append({"seed": seed, **values, "train s": round(out["train_seconds"], 1),
                                      "wall s": round(out["wall_seconds"], 1), "task_counts": out["task_counts"]})
    headers = ["setting"] + [c[0] for c in COLUMNS] + ["train s"]
    print()
    print(f"Tab. 4 on shapes: {args.iters} iterations per row, {WORLD} processes, "
          f"seed{'s' if len(args.seeds) > 1 else ''} {' / '.join(map(str, args.seeds))}")
    print(tabulate(seed_table(table, headers), headers=headers, tablefmt="github", disable_numparse=True))
    path = os.path.join(args.output, "ablate_sampling.json")
    write_json_atomic({"iters": args.iters, "world_size": WORLD, "seeds": list(args.seeds),
                       "mixed_batch": args.mixed_batch, "opts": list(args.opts), "columns": headers, "rows": table}, path)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
