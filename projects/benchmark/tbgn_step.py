#!/usr/bin/env python
"""TBGN's optimizer step on the CPU: the foreach update against the per-parameter loop it replaced.

    UP2_DATASETS=/path/with/shapes .venv/bin/python projects/benchmark/tbgn_step.py [--sets tiny r50] [--repeats 5] [--threads N]

Parameter sets: the parameters of ``configs/tiny/joint_shapes.yaml`` ("tiny"; its shapes datasets
must be registered, ``make shapes``) and of ``configs/up2_R50.yaml`` ("r50", 414M parameters with
the 8 experts of every MoE layer), built on the meta device as ``count_params.py`` does (r50 with
roberta-base's architecture), then materialised on the CPU as random float32 tensors with random
gradients on every parameter. The parameter groups are ``build_optimizer``'s (backbone and text
encoder lr multipliers, weight-decay exclusions).

The old step is ``_LoopTBGN`` of ``tests/solver/test_tbgn_foreach.py`` (the former per-parameter
loop, the parity reference). Both optimizers update the same parameters and share one set of
moments (the time of a step does not depend on their values), so r50 needs about 7 GB. They are
timed round-robin after one untimed step each (``timing.measure``): both see the same machine
load. Prints one row per set: tensors, parameters, median seconds per step, old / new.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {"tiny": "configs/tiny/joint_shapes.yaml", "r50": "configs/up2_R50.yaml"}


def _loop_tbgn_class():
    """The former per-parameter TBGN, from the parity test (one copy of it in the repository)."""
    path = os.path.join(REPO, "tests", "solver", "test_tbgn_foreach.py")
    spec = importlib.util.spec_from_file_location("_tbgn_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._LoopTBGN


def _cfg(config_path: str, text_folder):
    from detectron2.config import get_cfg

    from up2 import add_up2_config
    from up2.modeling.tasks import resolve_task_data

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config_path))
    if text_folder is not None:  # roberta-base's architecture (count_params.py)
        cfg.MODEL.TEXT_ENCODER.NAME = text_folder
    cfg.MODEL.TEXT_ENCODER.RANDOM_INIT = True  # the architecture only: no weights are loaded
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.RANDOM_INIT = True
    cfg.MODEL.DEVICE = "meta"
    cfg.SOLVER.OPTIMIZER = "TBGN"
    return resolve_task_data(cfg)


def random_cpu_model(cfg, seed: int = 0):
    """``cfg``'s model built on the meta device, then given random CPU weights and gradients."""
    import torch
    from detectron2.modeling import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model


def time_set(name: str, text_folder: str, repeats: int) -> dict:
    import torch

    from timing import measure
    from up2.engine.trainer import build_optimizer

    cfg = _cfg(CONFIGS[name], text_folder if name == "r50" else None)
    model = random_cpu_model(cfg)
    new = build_optimizer(cfg, model)
    old = _loop_tbgn_class()(new.param_groups, normalize=new.normalize)
    old.state = new.state  # one set of moments for both (see the module docstring)

    def step(opt):
        def run():
            opt.set_task(0.4, 1.0)
            opt.step()
        return run

    res = measure([step(old), step(new)], "cpu", [1, 1], repeats)
    params = [p for g in new.param_groups for p in g["params"]]
    return {"set": name, "tensors": len(params), "parameters": sum(p.numel() for p in params),
            "groups": len(new.param_groups), "old_s": res[0]["median_s"], "new_s": res[1]["median_s"],
            "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["tiny", "r50"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import up2  # noqa: F401  (registers the model and the datasets)
    from count_params import write_roberta_base_config

    rows = []
    with tempfile.TemporaryDirectory() as roberta:
        write_roberta_base_config(roberta)
        for name in args.sets:
            r = time_set(name, roberta, args.repeats)
            rows.append(r)
            print(f"RESULT set={r['set']} tensors={r['tensors']} groups={r['groups']} parameters={r['parameters']} "
                  f"threads={r['threads']} old_s={r['old_s']:.4f} new_s={r['new_s']:.4f} "
                  f"old/new={r['old_s'] / r['new_s']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
