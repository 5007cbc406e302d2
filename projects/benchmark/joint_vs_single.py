#!/usr/bin/env python
"""Every task trained alone vs all tasks trained jointly, at equal updates per task (paper Tab. 3).

The paper's claim in miniature: the "Single Task" and "All Tasks" rows of paper Tab. 3 (§5.3,
task collaboration and interference) on the synthetic shapes data.

    .venv/bin/python projects/benchmark/joint_vs_single.py --iters 1500
    .venv/bin/python projects/benchmark/joint_vs_single.py --iters 1500 --seeds 0 1
    .venv/bin/python projects/benchmark/joint_vs_single.py --iters 400 --tasks CLASSIFICATION MASKED_LM --seed 1 SOLVER.BASE_LR 2e-4

(``KEY VALUE`` overrides come last, after an option with one value: ``--tasks`` and ``--seeds``
would take them as list items.)

Runs (all from ``--config-file``, default configs/tiny/joint_shapes.yaml, task names and sampling
ratios read from it at run time, then the trailing ``KEY VALUE`` overrides, the same for every run):

    joint        the config as is (the ``--tasks`` subset of its tasks): ``--iters`` N iterations,
                 unmixed task sampling and the optimizer (TBGN) as configured
    single <k>   the same config with only ``TASKS.<k>`` kept (all its keys: IMS_PER_BATCH,
                 LOSS_WEIGHT, IMAGE_SIZE, ...) and its SAMPLING_RATIO set to 1, trained for
                 round(N * s_k / sum_j s_j) iterations: the expected number of updates task k
                 gets in the joint run (the sum runs over the ``--tasks`` subset)

Every run has the same cfg.SEED (``--seeds``: one run of each per seed; the global RNGs are
re-seeded with it before each run, as detectron2's ``default_setup`` does; the task draws and
every task's data order follow DATALOADER.TASK_SAMPLER_SEED, a KEY VALUE override), the same
optimizer and the same learning-rate schedule shape: the lr step at 80 % of each run's OWN
iterations (``learn_shapes.shapes_config``) and the warm-up as configured (SOLVER.WARMUP_ITERS
iterations in every run, not scaled with the run's length: each run starts from fresh weights).
Runs execute one after another in this process (datasets are registered once; nothing else is
shared between runs).

Prints one table (rows = a task's metric: box AP50, mask AP50, top-1, R@1 i2t, R@1 t2i, BLEU-4,
CIDEr, MLM acc, as ablate_sampling.py; columns = single, joint, joint - single, updates (single /
the joint run's actual count of the task, MultiTaskStep.task_counts), training seconds (single /
the whole joint run)); with several seeds a cell holds one value per seed ("35.3 / 37.1").
Writes ``<output>/joint_vs_single.json`` (strict JSON, atomically): the table's values per seed
and every run's full per-task results. Run folders: ``<output>/seed<S>/{joint,single_<TASK>}``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablate_sampling import COLUMNS, TrainClock, seed_cell  # noqa: E402
from learn_shapes import REPO, per_task_results, prepare_shapes, shapes_config  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "tiny", "joint_shapes.yaml")
STEP_AT = 0.8  # the lr step at this fraction of a run's iterations (as learn_shapes.shapes_config)
HEADERS = ["task", "metric", "single", "joint", "joint - single", "updates single / joint", "train s single / joint"]


def joint_config(config_file: str, iters: int, output: str, seed: int, tasks=None, opts=()):
    """The (unfrozen) config of the joint run: ``config_file`` + ``opts`` (``shapes_config``:
    ``iters`` iterations, lr step at 80 %), cfg.SEED ``seed``, only the ``tasks`` (names of
    ``TASKS``; None: all of them, in the config's order), written to ``output``.

    Raises:
        ValueError: ``iters`` < 2 (detectron2's step schedule needs two); a name of ``tasks`` that
            is not a task of the config (the message lists them); a repeated name.
    """
    if iters < 2:
        raise ValueError(f"iters must be >= 2 (the lr schedule steps at 80 % of the run), got {iters}")
    cfg = shapes_config(config_file, iters, output, opts)
    cfg.SEED = seed
    if tasks is not None:
        unknown = [t for t in tasks if t not in cfg.TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in {config_file}; expected some of {list(cfg.TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct, got {list(tasks)}")
        for name in [t for t in cfg.TASKS if t not in tasks]:
            del cfg.TASKS[name]
    return cfg


def single_task_iters(cfg) -> dict:
    """Task -> iterations of its single-task run: ``round(N * s_k / sum_j s_j)`` with N =
    cfg.SOLVER.MAX_ITER and s the tasks' SAMPLING_RATIO (the expected updates of task k in the
    joint run of ``cfg``); Python's round (half to even).

    Raises:
        ValueError: a task that would get fewer than 2 iterations (names it and N; raise N).
    """
    ratios = {name: float(task.SAMPLING_RATIO) for name, task in cfg.TASKS.items()}
    total, n = sum(ratios.values()), cfg.SOLVER.MAX_ITER
    out = {name: round(n * s / total) for name, s in ratios.items()}
    short = {name: i for name, i in out.items() if i < 2}
    if short:
        raise ValueError(f"at {n} joint iterations the single-task runs {short} get fewer than 2 iterations "
                         f"(sampling ratios {ratios}); use more iterations")
    return out


def single_config(cfg, task: str, output: str):
    """The (unfrozen) single-task config of ``task`` derived from the joint config ``cfg``: only
    ``TASKS.<task>`` kept (all its keys), its SAMPLING_RATIO 1.0, MAX_ITER
    ``single_task_iters(cfg)[task]``, the lr step at 80 % of those, OUTPUT_DIR ``output``;
    everything else (seed, optimizer, warm-up, ...) as in ``cfg``, which is not modified.

    Raises:
        ValueError: ``task`` not a task of ``cfg``; see :func:`single_task_iters`.
    """
    if task not in cfg.TASKS:
        raise ValueError(f"task {task!r} is not in the config; expected one of {list(cfg.TASKS)}")
    iters = single_task_iters(cfg)[task]
    single = cfg.clone()
    single.defrost()
    for name in [t for t in single.TASKS if t != task]:
        del single.TASKS[name]
    single.TASKS[task].SAMPLING_RATIO = 1.0
    single.SOLVER.MAX_ITER = iters
    single.SOLVER.STEPS = (int(iters * STEP_AT),)
    single.OUTPUT_DIR = output
    return single


def train_and_evaluate(cfg) -> dict:
    """Train ``cfg`` (frozen or not; frozen here) from fresh weights after re-seeding the global
    RNGs with cfg.SEED, evaluate every task on its test set.

    Returns:
        ``{"iters": int, "train_seconds": float (first to last training step, no evaluation),
        "task_counts": {task: updates}, "results": {task: {dataset: {group: {metric: value}}}}}``
    """
    from detectron2.utils.env import seed_all_rng

    from up2.engine import UP2Trainer

    cfg = cfg.clone()
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_all_rng(cfg.SEED)
    clock = TrainClock()
    trainer = UP2Trainer(cfg)
    trainer.register_hooks([clock])
    trainer.resume_or_load(resume=False)
    trainer.train()
    # detectron2's EvalHook evaluated every task after the last iteration
    results = getattr(trainer, "_last_eval_results", None)
    if results is None:
        results = UP2Trainer.test(cfg, trainer.model)
    out = {"iters": cfg.SOLVER.MAX_ITER, "train_seconds": clock.seconds,
           "task_counts": dict(trainer._trainer.task_counts), "results": per_task_results(cfg, results)}
    del trainer
    gc.collect()  # the next run's model and loaders start with this one's memory returned
    return out


# the settings a reused joint run must share with the joint config it stands for
_SOLVER_KEYS = ("MAX_ITER", "BASE_LR", "OPTIMIZER", "STEPS", "TEXT_ENCODER_MULTIPLIER")
_MODEL_KEYS = (("UNIFIED_DECODER", "INIT_TEMPERATURE"), ("UNIFIED_DECODER", "SPE_INPUT_NORM"), ("TEXT_ENCODER", "FREEZE"),
               ("TEXT_ENCODER", "FROZEN_LAYERS"))
_TASK_KEYS = ("TYPE", "SAMPLING_RATIO", "GRAD_WEIGHT", "LOSS_WEIGHT", "IMS_PER_BATCH", "IMAGE_SIZE")


def _check_same_recipe(folder: str, run_cfg: dict, joint) -> None:
    """ValueError naming the first setting (``_SOLVER_KEYS``, ``_MODEL_KEYS``, the task names,
    ``_TASK_KEYS``) in which the run's config.yaml differs from ``joint`` (a CfgNode)."""
    def differ(key, theirs, ours):
        raise ValueError(f"--joint-from {folder}: its config.yaml has {key} = {theirs!r}, the joint config "
                         f"{ours!r}; reuse a run of the same recipe (or train the joint run)")

    solver = run_cfg.get("SOLVER") or {}
    for key in _SOLVER_KEYS:
        theirs, ours = solver.get(key), joint.SOLVER.get(key)
        if theirs != (list(ours) if isinstance(ours, tuple) else ours):  # YAML has lists, CfgNode tuples
            differ(f"SOLVER.{key}", theirs, ours)
    from detectron2.config import get_cfg

    from up2.config import add_up2_config

    defaults = get_cfg()
    add_up2_config(defaults)
    model = run_cfg.get("MODEL") or {}
    for part, key in _MODEL_KEYS:
        theirs, ours = (model.get(part) or {}).get(key, defaults.MODEL[part][key]), joint.MODEL[part].get(key)
        if theirs != ours:  # a key newer than the run counts with its default
            differ(f"MODEL.{part}.{key}", theirs, ours)
    tasks = run_cfg.get("TASKS") or {}
    if sorted(tasks) != sorted(joint.TASKS):
        differ("the TASKS", sorted(tasks), sorted(joint.TASKS))
    for name, spec in joint.TASKS.items():
        for key in _TASK_KEYS:
            if tasks[name].get(key) != spec.get(key):
                differ(f"TASKS.{name}.{key}", tasks[name].get(key), spec.get(key))


def load_joint_run(folder: str, iters: int, joint=None) -> dict:
    """A finished joint training of the same config (e.g. ``make demo``'s output folder), as
    :func:`train_and_evaluate` returns it: results from ``eval_table.json`` (written by
    ``train_net.py`` after the final evaluation), task counts from detectron2's ``metrics.json``;
    training seconds are not known (None).

    Args:
        joint: the joint config (CfgNode) the run stands for; when given, the run's
            ``config.yaml`` must agree with it in the solver schedule and learning rates, tau,
            g's ``SPE_INPUT_NORM``, the text encoder's freezing, and every task's sampling
            ratio, weights, batch and image size.

    Raises:
        FileNotFoundError: ``folder`` lacks eval_table.json, metrics.json or (with ``joint``)
            config.yaml (names the file).
        ValueError: the run did not train ``iters`` iterations; a setting differs from ``joint``
            (names it); a file that is not what train_net.py writes.
    """
    import json

    import yaml

    names = ("eval_table.json", "metrics.json") + (("config.yaml",) if joint is not None else ())
    paths = [os.path.join(folder, name) for name in names]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--joint-from: {path} does not exist; expected a finished train_net.py run")
    if joint is not None:
        with open(paths[2], encoding="utf-8") as f:
            try:
                run_cfg = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"--joint-from: {paths[2]} is not readable YAML ({e})") from None
        if not isinstance(run_cfg, dict):
            raise ValueError(f"--joint-from: {paths[2]} is not a train_net.py config (no mapping at the top)")
        _check_same_recipe(folder, run_cfg, joint)
    with open(paths[0], encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    results: dict = {}
    for r in rows:
        if r.get("group") is not None and r.get("value") is not None:
            results.setdefault(r["task"], {}).setdefault(r["dataset"], {}).setdefault(r["group"], {})[r["key"]] = r["value"]
    counts, last = {}, -1
    with open(paths[1], encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            found = {k.partition("/")[2]: int(v) for k, v in entry.items() if k.startswith("task_count/")}
            if found:  # a training step's line (the final evaluation logs under iteration MAX_ITER)
                last = max(last, int(entry.get("iteration", -1)))
                counts.update(found)
    if last + 1 != iters:
        raise ValueError(f"--joint-from {folder}: that run trained {last + 1} iterations, not --iters {iters}")
    return {"iters": iters, "train_seconds": None, "task_counts": counts, "results": results}


def task_metrics(results: dict, task: str) -> dict:
    """COLUMNS header -> value (float) of the metrics ``task`` reports in ``results``
    (``{task: {dataset: {group: {metric: value}}}}``); ``{}`` when the task is absent."""
    found = {}
    for res in results.get(task, {}).values():
        for header, group, metric in COLUMNS:
            if metric in res.get(group, {}) and header not in found:
                found[header] = float(res[group][metric])
    return found


def comparison_rows(tasks, seeds, runs: dict, planned: dict) -> list:
    """The table's rows (JSON-able) from the runs of every seed.

    Args:
        tasks: task names, in table order. seeds: the seeds, in the order of the per-seed lists.
        runs: ``{seed: {"joint": run or None, "single": {task: run}}}`` with ``run`` as returned
            by :func:`train_and_evaluate` (a missing run gives None values).
        planned: task -> iterations of its single-task run.
    Returns:
        one dict per (task, metric): ``{"task", "metric", "updates_single", "per_seed": [{"seed",
        "single", "joint", "difference" (joint - single), "updates_joint", "train_s_single",
        "train_s_joint"}, ...]}``; a metric appears when any run of the task reports it.
    """
    rows = []
    for task in tasks:
        per_seed = []
        for seed in seeds:
            joint, single = runs[seed].get("joint"), runs[seed].get("single", {}).get(task)
            per_seed.append((seed, joint, single, task_metrics(joint["results"], task) if joint else {},
                             task_metrics(single["results"], task) if single else {}))
        headers = [h for h, _, _ in COLUMNS if any(h in j or h in s for _, _, _, j, s in per_seed)]
        for header in headers:
            cells = []
            for seed, joint, single, j, s in per_seed:
                jv, sv = j.get(header), s.get(header)
                cells.append({"seed": seed, "single": sv, "joint": jv,
                              "difference": None if jv is None or sv is None else jv - sv,
                              "updates_joint": joint["task_counts"].get(task, 0) if joint else None,
                              "train_s_single": round(single["train_seconds"], 1) if single else None,
                              "train_s_joint": round(joint["train_seconds"], 1) if joint and joint["train_seconds"]
                              is not None else None})
            rows.append({"task": task, "metric": header, "updates_single": planned[task], "per_seed": cells})
    return rows


def table_lines(rows: list) -> list:
    """The printed table (HEADERS) from :func:`comparison_rows`: per-seed cells ("a / b"),
    updates "single / joint seed 1, joint seed 2", training seconds "single / joint"."""
    lines = []
    for r in rows:
        cells = r["per_seed"]
        joint_updates = ", ".join("-" if c["updates_joint"] is None else str(c["updates_joint"]) for c in cells)
        seconds = "; ".join(f"{seed_cell([c['train_s_single']], '.0f')} / {seed_cell([c['train_s_joint']], '.0f')}"
                            for c in cells)
        lines.append([r["task"], r["metric"], seed_cell([c["single"] for c in cells]),
                      seed_cell([c["joint"] for c in cells]), seed_cell([c["difference"] for c in cells], "+.1f"),
                      f"{r['updates_single']} / {joint_updates}", seconds])
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1500, help="iterations of the joint run (N)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0], help="cfg.SEED values: every run once per seed")
    seeds.add_argument("--seed", type=int, help="one seed (same as --seeds S)")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the config's tasks (default: all)")
    parser.add_argument("--config-file", default=CONFIG)
    parser.add_argument("--output", default=os.path.join(REPO, "output/joint_vs_single"))
    parser.add_argument("--only", choices=("single", "joint", "both"), default="both", help="which runs to train")
    parser.add_argument("--joint-from", default=None,
                        help="a finished joint train_net.py run of the same config and --iters (e.g. output/demo) "
                             "used as the joint run instead of training one (one seed)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for every run")
    args = parser.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.joint_from and len(args.seeds) != 1:
        parser.error("--joint-from gives one joint run: use one seed")
    try:  # the configs of every run, before any training: a bad argument fails at once
        configs = {}
        for seed in args.seeds:
            root = os.path.join(args.output, f"seed{seed}")
            joint = joint_config(args.config_file, args.iters, os.path.join(root, "joint"), seed, args.tasks, args.opts)
            singles = {t: single_config(joint, t, os.path.join(root, f"single_{t}")) for t in joint.TASKS}
            configs[seed] = (joint, singles)
    except ValueError as e:
        parser.error(str(e))
    tasks = list(configs[args.seeds[0]][0].TASKS)
    planned = single_task_iters(configs[args.seeds[0]][0])
    joint_from = None
    if args.joint_from:  # checked before any data preparation or training
        try:
            joint_from = load_joint_run(args.joint_from, args.iters, configs[args.seeds[0]][0])
        except (OSError, ValueError) as e:
            parser.error(str(e))

    prepare_shapes()
    from detectron2.utils.logger import setup_logger
    from tabulate import tabulate

    from up2.utils import write_json_atomic

    setup_logger(name="up2")
    runs, log = {}, []
    for seed in args.seeds:
        joint, singles = configs[seed]
        runs[seed] = {"single": {}}
        if args.joint_from:
            runs[seed]["joint"] = joint_from
        elif args.only in ("joint", "both"):
            runs[seed]["joint"] = train_and_evaluate(joint)
            log.append({"seed": seed, "run": "joint", **runs[seed]["joint"]})
        if args.only in ("single", "both"):
            for task, cfg in singles.items():
                runs[seed]["single"][task] = train_and_evaluate(cfg)
                log.append({"seed": seed, "run": f"single_{task}", **runs[seed]["single"][task]})
    rows = comparison_rows(tasks, args.seeds, runs, planned)
    total = sum(float(t.SAMPLING_RATIO) for t in configs[args.seeds[0]][0].TASKS.values())
    expected = {t: args.iters * float(s.SAMPLING_RATIO) / total for t, s in configs[args.seeds[0]][0].TASKS.items()}
    print()
    print(f"Joint vs single on shapes ({os.path.relpath(args.config_file, REPO)}): joint {args.iters} iterations, "
          f"seed{'s' if len(args.seeds) > 1 else ''} {' / '.join(map(str, args.seeds))}")
    print(tabulate(table_lines(rows), headers=HEADERS, tablefmt="github", disable_numparse=True))
    path = os.path.join(args.output, "joint_vs_single.json")
    write_json_atomic({"config_file": args.config_file, "iters": args.iters, "seeds": list(args.seeds),
                       "tasks": tasks, "only": args.only, "opts": list(args.opts), "columns": HEADERS,
                       "updates_single": planned, "updates_joint_expected": expected, "rows": rows, "runs": log}, path)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
