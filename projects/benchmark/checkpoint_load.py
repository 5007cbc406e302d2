#!/usr/bin/env python
"""Sizes and load times of a run's training checkpoint (model_final.pth) and its inference
checkpoint (model_final_inference/, up2.checkpoint).

    .venv/bin/python train_net.py --config-file configs/tiny/joint_shapes.yaml SOLVER.MAX_ITER 4 OUTPUT_DIR /tmp/run
    .venv/bin/python projects/benchmark/checkpoint_load.py /tmp/run --repeats 3

Load times, median of ``--repeats`` alternating runs in this process: reading the file alone
(``torch.load(weights_only=True)`` / safetensors), and building a ready predictor
(``GeneralistPredictor.from_config_file(OUTPUT_DIR/config.yaml, model_final.pth)`` /
``GeneralistPredictor.from_pretrained(folder)``), on the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="OUTPUT_DIR of a finished training run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    import up2  # noqa: F401
    from up2.checkpoint import FINAL_FOLDER
    from up2.predictor import GeneralistPredictor

    final = os.path.join(args.output_dir, "model_final.pth")
    folder = os.path.join(args.output_dir, FINAL_FOLDER)
    config = os.path.join(args.output_dir, "config.yaml")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    print(f"weights: {len(weights)} tensors, {sum(t.nbytes for t in weights.values()) / 1e6:.1f} MB")
    print(f"training checkpoint {final}: {_size(final) / 1e6:.1f} MB")
    print(f"inference checkpoint {folder}: {_size(folder) / 1e6:.1f} MB "
          f"(model.safetensors {_size(os.path.join(folder, 'model.safetensors')) / 1e6:.1f} MB)")
    runs = {k: [] for k in ("read .pth", "read .safetensors", "predictor from .pth", "predictor from folder")}
    for _ in range(args.repeats):
        runs["read .pth"].append(_timed(lambda: torch.load(final, map_location="cpu", weights_only=True)))
        runs["read .safetensors"].append(_timed(lambda: load_file(os.path.join(folder, "model.safetensors"))))
        runs["predictor from .pth"].append(_timed(
            lambda: GeneralistPredictor.from_config_file(config, final, opts=["MODEL.DEVICE", "cpu"])))
        runs["predictor from folder"].append(_timed(lambda: GeneralistPredictor.from_pretrained(folder, device="cpu")))
    for name, times in runs.items():
        print(f"{name}: median {statistics.median(times):.2f} s of {[round(t, 2) for t in times]}")


if __name__ == "__main__":
    main()
