"""Export a training checkpoint as a shareable inference checkpoint (``up2.checkpoint``).

    python -m up2.export --config-file output/tiny_joint_shapes/config.yaml \
        MODEL.WEIGHTS output/tiny_joint_shapes/model_0004999.pth --output shared/my_model

The config is the one training wrote to ``OUTPUT_DIR/config.yaml`` (it carries the class names
and vocabularies; the checkpoint carries them too, and the training datasets are read only if
neither does). ``KEY VALUE`` pairs override the config as in ``train_net.py``. The output folder
holds model.safetensors, config.yaml, task_data.json, text_encoder/, up2_checkpoint.json and the
model card README.md; its metrics come from ``--metrics`` (``eval_results.json`` of
``train_net.py --eval-only``, or a ``metrics.json``), else from an ``eval_results.json`` or
``metrics.json`` next to the checkpoint. The model is built on the CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Tuple

__all__ = ["export", "read_metrics", "main"]

# result groups of detectron2's COCOEvaluator and up2's evaluators (first key of a one-task,
# one-dataset result); with several tasks / datasets, keys start with the task / dataset name
_RESULT_GROUPS = ("bbox", "segm", "keypoints", "classification", "retrieval", "captioning", "mlm")


def _is_eval_key(key: str, datasets) -> bool:
    parts = key.split("/")
    return parts[0] in _RESULT_GROUPS or any(p in datasets for p in parts)


def read_metrics(path: str, cfg) -> Optional[dict]:
    """The evaluation results in ``path``.

    Args:
        path: ``eval_results.json`` (one JSON object, ``UP2Trainer.test``'s nested results) or
            detectron2's ``metrics.json`` (one JSON object per line: the last line with evaluation
            scalars is used; evaluation scalars are the keys that name a test dataset of ``cfg``
            or start with an evaluator's result group such as ``bbox/``).
        cfg: the model's config (its test datasets).

    Returns:
        a (nested or flat) dict of numbers, or None when the file holds no evaluation.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: it is not JSON / JSON lines.
    """
    from up2.modeling.tasks.base import task_specs_from_config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--metrics {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return whole or None
    datasets = {d for s in task_specs_from_config(cfg).values() for d in s.datasets_test}
    found = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e}); expected eval_results.json or "
                             "metrics.json") from e
        if not isinstance(record, dict):
            continue
        evaluation = {k: v for k, v in record.items() if _is_eval_key(k, datasets)}
        if evaluation:
            found = evaluation
    return found


def _default_metrics_file(weights: str) -> Optional[str]:
    folder = os.path.dirname(os.path.abspath(weights))
    for name in ("eval_results.json", "metrics.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def export(config_file: str, output: str, opts: List[str] = (), metrics_file: Optional[str] = None) -> Tuple[str, dict]:
    """Write the inference checkpoint of the training checkpoint ``MODEL.WEIGHTS`` (in ``opts``
    or the config) to ``output``.

    Returns:
        (output folder, {"weights", "iteration", "metrics_file"}: what was exported).

    Raises:
        ValueError: MODEL.WEIGHTS empty, a checkpoint that lacks some of the model's weights or
            has them in other shapes (not a complete up2 model), a task without its class names
            or vocabulary in the config, the checkpoint and the registered datasets.
        PickleRefusedError: a ``.pkl`` checkpoint without MODEL.ALLOW_PICKLE_WEIGHTS True.
        FileNotFoundError: a missing config, checkpoint or metrics file.
    """
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import up2  # noqa: F401  (registers the model, tasks and datasets)
    from up2.checkpoint import UP2Checkpointer, config_for_weights, save_inference_checkpoint
    from up2.config import add_up2_config
    from up2.modeling.tasks import resolve_task_data
    from up2.utils.paths import expand_path

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r}: no such file")
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = expand_path(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: name the training checkpoint to export "
                         "(e.g. `MODEL.WEIGHTS output/<run>/model_final.pth`)")
    weights = cfg.MODEL.WEIGHTS
    cfg = resolve_task_data(config_for_weights(cfg), use_checkpoint=True)
    build = cfg.clone()
    build.defrost()
    build.MODEL.DEVICE = "cpu"
    build.MODEL.TEXT_ENCODER.RANDOM_INIT = True  # every weight comes from the checkpoint (checked below)
    torch.manual_seed(0)
    model = build_model(build)
    checkpointer = UP2Checkpointer(model, allow_pickle=cfg.MODEL.ALLOW_PICKLE_WEIGHTS)
    extra = checkpointer.load(weights)
    bad = checkpointer.last_incompatible
    if bad is not None and (bad.missing_keys or bad.incorrect_shapes):
        missing = list(bad.missing_keys) + [k for k, *_ in bad.incorrect_shapes]
        raise ValueError(f"MODEL.WEIGHTS={weights!r} is not a complete checkpoint of this config's model: "
                         f"{len(missing)} weights missing or of another shape (e.g. {missing[:5]}); export the "
                         "checkpoint that training wrote for this config")
    metrics_file = metrics_file or _default_metrics_file(weights)
    metrics = read_metrics(metrics_file, cfg) if metrics_file else None
    iteration = extra.get("iteration")
    iteration = int(iteration) + 1 if isinstance(iteration, int) else None  # detectron2 saves the last step's index
    folder = save_inference_checkpoint(model, cfg, output, metrics=metrics, iteration=iteration, source=weights)
    return folder, {"weights": weights, "iteration": iteration, "metrics_file": metrics_file if metrics else None}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m up2.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the training config (OUTPUT_DIR/config.yaml)")
    parser.add_argument("--output", required=True, help="the inference checkpoint folder to write")
    parser.add_argument("--metrics", default=None, help="eval_results.json or metrics.json for the model card")
    parser.add_argument("opts", nargs="*",
                        help="KEY VALUE overrides, MODEL.WEIGHTS <checkpoint> among them (before or after the options)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder, what = export(args.config_file, args.output, args.opts, args.metrics)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    print(f"wrote {folder} ({size / 1e6:.1f} MB) from {what['weights']}"
          + (f", metrics from {what['metrics_file']}" if what["metrics_file"] else ", no metrics"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
