"""One table of every task's evaluation (paper §5.1 metrics, the rows of Tab. 2 / Tab. 6 for one model).

:meth:`up2.engine.UP2Trainer.test` returns nested detectron2 results whose shape depends on the
config: ``{task: {dataset: {group: {metric: value}}}}`` with several tasks; with one task,
``{dataset: {group: {metric: value}}}`` for several test datasets, or ``{group: {metric: value}}``
for one. :func:`evaluation_rows` turns any of them into flat rows, :func:`format_evaluation_table`
into a GitHub Markdown table and :func:`write_evaluation_table` writes both to disk.

Groups and metrics (values as the evaluators give them, never rescaled):
    "bbox" / "segm" (detectron2's ``COCOEvaluator``): "AP", "AP50", ..., "AP-<class>", percent.
    "classification" (:class:`~up2.evaluation.ClassificationEvaluator`): "top1", "top5", percent.
    "retrieval" (:class:`~up2.evaluation.RetrievalEvaluator`): "i2t_R@k", "t2i_R@k" and, with
        ``MATCH_IDENTICAL_CAPTIONS``, the paper-protocol "strict_i2t_R@k" / "strict_t2i_R@k", percent.
    "captioning" (:class:`~up2.evaluation.CaptioningEvaluator`): "BLEU-1".."BLEU-4" (x100, i.e.
        percent) and "CIDEr" (CIDEr-D x100, the scale papers report, e.g. 116.5; unitless), plus the
        non-metric "ptb_tokenizer" (1.0 = coco-caption's PTB tokenizer, 0.0 = the pure-Python one).
    "mlm" (:class:`~up2.evaluation.MaskedLMEvaluator`): "accuracy", percent.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from tabulate import tabulate

from up2.utils.atomic import atomic_write, write_json_atomic

__all__ = ["evaluation_rows", "format_evaluation_table", "write_evaluation_table", "TABLE_JSON", "TABLE_MARKDOWN"]

TABLE_JSON = "eval_table.json"  # file names written by write_evaluation_table
TABLE_MARKDOWN = "eval_table.md"
NO_RESULTS = "(no results)"  # metric of the row of a dataset whose evaluator returned nothing

_PERCENT_GROUPS = ("bbox", "segm", "classification", "retrieval", "mlm")
_DIRECTIONS = {"i2t": "image→text", "t2i": "text→image"}

# The headline metrics, first and in this order, per task and dataset; every other metric follows.
_HEADLINE: Tuple[Tuple[str, str], ...] = (
    ("bbox", "AP"), ("bbox", "AP50"), ("segm", "AP"), ("segm", "AP50"),
    ("classification", "top1"), ("classification", "top5"),
    *((("retrieval", f"{prefix}{d}_R@{k}") for prefix in ("", "strict_") for d in _DIRECTIONS for k in (1, 5, 10))),
    ("captioning", "BLEU-4"), ("captioning", "CIDEr"),
    ("mlm", "accuracy"),
)


# Tasks are listed in the order of their headline metrics (then config order): a dumped config
# (OUTPUT_DIR/config.yaml, an exported model's) lists cfg.TASKS alphabetically.
_TYPE_ORDER = ("detection", "instance_segmentation", "classification", "retrieval", "captioning", "masked_lm")


def _label(group: str, key: str) -> str:
    """The readable name of metric ``key`` of result group ``group`` ("box AP50", "R@1 image→text")."""
    if group in ("bbox", "segm"):
        return f"{'box' if group == 'bbox' else 'mask'} {key}"
    if group == "classification" and key.startswith("top") and key[3:].isdigit():
        return f"top-{key[3:]}"
    if group == "retrieval":
        strict = key.startswith("strict_")
        direction, _, rank = key[len("strict_") if strict else 0:].partition("_")
        if direction in _DIRECTIONS and rank.startswith("R@"):
            return f"{'strict ' if strict else ''}{rank} {_DIRECTIONS[direction]}"
    if group == "captioning":
        return "PTB tokenizer (1 = yes)" if key == "ptb_tokenizer" else key
    if group == "mlm" and key == "accuracy":
        return "masked-token accuracy"
    return f"{group}/{key}"


def _unit(group: str, key: str) -> str:
    """"%" for percentages (COCO AP, accuracies, recalls, BLEU x100), else "" (CIDEr x100, flags,
    metrics of groups this module does not know)."""
    if group in _PERCENT_GROUPS or (group == "captioning" and key.startswith("BLEU-")):
        return "%"
    return ""


def _value(value: Any, where: str) -> Optional[float]:
    """``value`` as a float, None when it is not finite (NaN: e.g. COCO AP of a size without ground truth)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    return value if math.isfinite(value) else None


def _is_per_dataset(results: Mapping) -> bool:
    """True for ``{dataset: {group: {metric}}}`` (or ``{dataset: {}}``), False for ``{group: {metric}}``."""
    return bool(results) and all(
        isinstance(v, Mapping) and all(isinstance(x, Mapping) for x in v.values()) for v in results.values())


def _dataset_rows(task: str, task_type: str, dataset: str, results: Mapping) -> List[Dict[str, Any]]:
    """The rows of one dataset's ``{group: {metric: value}}``: headline metrics first, then the rest."""
    if not isinstance(results, Mapping):
        raise TypeError(f"results of task {task!r} on {dataset!r} must be a dict {{group: {{metric: value}}}}, "
                        f"got {type(results).__name__}")
    if not results:
        return [{"task": task, "type": task_type, "dataset": dataset, "metric": NO_RESULTS, "value": None,
                 "unit": "", "group": None, "key": None, "headline": True}]
    found = []
    for group, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"results[{group!r}] of task {task!r} on {dataset!r} must be a dict {{metric: value}}, "
                            f"got {metrics!r:.80}")
        found.extend((str(group), str(key), value) for key, value in metrics.items())
    rank = {k: i for i, k in enumerate(_HEADLINE)}
    ordered = sorted(found, key=lambda f: rank.get(f[:2], len(rank)))  # stable: the rest keep the results' order
    return [{"task": task, "type": task_type, "dataset": dataset, "metric": _label(group, key),
             "value": _value(value, f"results[{group!r}][{key!r}] of task {task!r} on {dataset!r}"),
             "unit": _unit(group, key), "group": group, "key": key, "headline": (group, key) in rank}
            for group, key, value in ordered]


def evaluation_rows(cfg, results: Optional[Mapping]) -> List[Dict[str, Any]]:
    """Flatten the results of :meth:`up2.engine.UP2Trainer.test` into one row per metric.

    Order: tasks by TYPE (detection, instance_segmentation, classification, retrieval,
    captioning, masked_lm, other types), tasks of one TYPE and datasets as in ``results`` (config
    order); per dataset the headline metrics box AP, box AP50, mask AP, mask AP50, top-1, top-5,
    R@1/5/10 image→text, R@1/5/10 text→image, strict R@1/5/10 image→text / text→image (when present), BLEU-4, CIDEr, masked-token accuracy;
    then every other metric in the results' order (AP75, APs, ..., AP-<class>, BLEU-1..3, the
    PTB-tokenizer flag, groups this module does not know). Nothing is dropped; a dataset whose
    evaluator returned ``{}`` gets one row with metric "(no results)" and value None.

    Args:
        cfg: the config that produced ``results`` (its ``TASKS`` name the task and its test datasets).
        results: ``{task: {dataset: {group: {metric: value}}}}`` with several tasks; with one,
            ``{dataset: {group: {metric: value}}}`` or ``{group: {metric: value}}`` (one test
            dataset). Values are numbers. None or ``{}`` gives no row.

    Returns:
        list of dicts with keys "task" (cfg.TASKS name), "type" (task TYPE), "dataset", "metric"
        (readable name), "value" (float as the evaluator gave it, None for NaN / inf), "unit" ("%"
        or "": see the module docstring), "group" and "key" (where the value sits in ``results``;
        None for a "(no results)" row) and "headline" (True for the headline metrics above and
        "(no results)" rows).

    Raises:
        ValueError: a task of ``results`` that ``cfg.TASKS`` does not have, or a dataset that is not
            one of its task's ``DATASETS.TEST``. TypeError: a level of ``results`` that is not a dict,
            or a value that is not a real number.
    """
    from up2.modeling.tasks import task_specs_from_config  # on use: up2.modeling.tasks imports up2.evaluation

    if not results:
        return []
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict (UP2Trainer.test's output), got {type(results).__name__}")
    specs = task_specs_from_config(cfg)
    if len(specs) == 1:
        spec = next(iter(specs.values()))
        if len(spec.datasets_test) == 1 and not _is_per_dataset(results):
            results = {spec.datasets_test[0]: results}
        per_task = {spec.name: results}
    else:
        unknown = [t for t in results if t not in specs]
        if unknown:
            raise ValueError(f"results name task(s) {unknown} that cfg.TASKS does not have; its tasks: {list(specs)}")
        per_task = results
    rows = []
    type_rank = {t: i for i, t in enumerate(_TYPE_ORDER)}
    for task in sorted(per_task, key=lambda t: type_rank.get(specs[t].type, len(type_rank))):  # stable
        per_dataset = per_task[task]
        spec = specs[task]
        if not isinstance(per_dataset, Mapping):
            raise TypeError(f"results of task {task!r} must be a dict {{dataset: results}}, got {per_dataset!r:.80}")
        for dataset, res in per_dataset.items():
            if dataset not in spec.datasets_test:
                raise ValueError(f"results of task {task!r} name dataset {dataset!r}, which is not one of its "
                                 f"DATASETS.TEST {list(spec.datasets_test)}")
            rows.extend(_dataset_rows(task, spec.type, dataset, res))
    return rows


def _format_value(row: Mapping) -> str:
    return "n/a" if row["value"] is None else f"{row['value']:.2f}{row['unit']}"


def format_evaluation_table(rows: List[Mapping], headline_only: bool = True) -> str:
    """The GitHub Markdown table (tabulate, "github") of :func:`evaluation_rows`' rows, columns
    task | dataset | metric | value; values with 2 decimals and their unit ("45.10%"), "n/a" for None.
    ``headline_only``: only the rows marked "headline", followed by a line counting the others
    (kept in eval_table.json). An empty ``rows`` gives the header alone."""
    shown = [r for r in rows if r.get("headline", True)] if headline_only else list(rows)
    table = [(r["task"], r["dataset"], r["metric"], _format_value(r)) for r in shown]
    text = tabulate(table, headers=("task", "dataset", "metric", "value"), tablefmt="github",
                    disable_numparse=True, colalign=("left", "left", "left", "right"))
    if len(shown) < len(rows):
        text += f"\n\n{len(rows) - len(shown)} more metrics (AP75, APs, per-class AP, BLEU-1..3, ...) in {TABLE_JSON}."
    return text


def write_evaluation_table(cfg, results: Optional[Mapping], folder: str) -> Tuple[str, str]:
    """Write the evaluation table of ``results`` (:func:`evaluation_rows`) into ``folder``.

    Files (each written atomically, normal file mode; ``folder`` is created if missing):
        ``eval_table.json``: strict JSON ``{"rows": [...], "config": cfg.OUTPUT_DIR}`` (no NaN:
            missing values are null).
        ``eval_table.md``: :func:`format_evaluation_table`'s text and a final newline.

    Returns:
        (path of eval_table.json, path of eval_table.md).

    Raises:
        as :func:`evaluation_rows`; nothing is written then.
    """
    rows = evaluation_rows(cfg, results)
    json_path, md_path = os.path.join(folder, TABLE_JSON), os.path.join(folder, TABLE_MARKDOWN)
    write_json_atomic({"rows": rows, "config": cfg.OUTPUT_DIR}, json_path)
    with atomic_write(md_path) as f:
        f.write(format_evaluation_table(rows) + "\n")
    return json_path, md_path
