"""The combined evaluation table (up2.evaluation.report) and its use by train_net.py."""
import importlib.util
import json
import math
import os
import stat

import pytest

from conftest import REPO_ROOT, add_task, tiny_cfg
from up2.evaluation import evaluation_rows, format_evaluation_table, write_evaluation_table


def _strict_load(path):
    def refuse(name):
        raise ValueError(f"{path} holds the non-JSON constant {name}")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def _joint_cfg(out="output/joint"):
    cfg = tiny_cfg(None, **{"OUTPUT_DIR": str(out)})
    add_task(cfg, "INST", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    add_task(cfg, "RET", "retrieval", "test_shapes_caption_train", "test_shapes_caption_val")
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val")
    add_task(cfg, "MLM", "masked_lm", "test_shapes_text_train", "test_shapes_text_val")
    return cfg


def _coco(ap, ap50):
    """COCOEvaluator's keys in its order: summary, then per class (APs NaN: no small object)."""
    return {"AP": ap, "AP50": ap50, "AP75": ap - 5.0, "APs": float("nan"), "APm": ap + 1.0, "APl": ap + 2.0,
            "AP-circle": ap + 3.0, "AP-square": ap - 3.0}


def _joint_results():
    recalls = {f"{d}_R@{k}": 9.0 * k + (1.0 if d == "t2i" else 0.0) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    strict = {f"strict_{k}": v - 2.0 for k, v in recalls.items()}  # MATCH_IDENTICAL_CAPTIONS keeps these
    return {
        "INST": {"test_shapes_val": {"bbox": _coco(40.0, 60.0), "segm": _coco(30.0, 50.0)}},
        "CLS": {"test_shapes_cls_val": {"classification": {"top1": 75.0, "top5": 99.5}}},
        "RET": {"test_shapes_caption_val": {"retrieval": {**recalls, **strict}}},
        "CAP": {"test_shapes_caption_val": {"captioning": {
            "BLEU-1": 70.0, "BLEU-2": 50.0, "BLEU-3": 40.0, "BLEU-4": 31.5, "CIDEr": 104.25, "ptb_tokenizer": 0.0,
            "SPICE": 20.0}}},  # SPICE: a metric this module does not know
        "MLM": {"test_shapes_text_val": {"mlm": {"accuracy": 55.5}, "perplexity": {"value": 3.5}}},  # unknown group
    }


def test_rows_of_a_joint_model_in_order_with_units():
    rows = evaluation_rows(_joint_cfg(), _joint_results())
    got = [(r["task"], r["metric"]) for r in rows]
    assert got[:6] == [("INST", "box AP"), ("INST", "box AP50"), ("INST", "mask AP"), ("INST", "mask AP50"),
                       ("INST", "box AP75"), ("INST", "box APs")]  # headline first, then the results' order
    assert [m for t, m in got if t == "INST"][4:] == [
        "box AP75", "box APs", "box APm", "box APl", "box AP-circle", "box AP-square",
        "mask AP75", "mask APs", "mask APm", "mask APl", "mask AP-circle", "mask AP-square"]
    assert [m for t, m in got if t == "CLS"] == ["top-1", "top-5"]
    assert [m for t, m in got if t == "RET"] == [
        "R@1 image→text", "R@5 image→text", "R@10 image→text",
        "R@1 text→image", "R@5 text→image", "R@10 text→image",
        "strict R@1 image→text", "strict R@5 image→text", "strict R@10 image→text",
        "strict R@1 text→image", "strict R@5 text→image", "strict R@10 text→image"]
    assert [m for t, m in got if t == "CAP"] == [
        "BLEU-4", "CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "PTB tokenizer (1 = yes)", "SPICE"]
    assert [m for t, m in got if t == "MLM"] == ["masked-token accuracy", "perplexity/value"]
    assert [t for t, _ in got] == sorted((t for t, _ in got), key=["INST", "CLS", "RET", "CAP", "MLM"].index)
    shuffled = dict(reversed(list(_joint_results().items())))  # e.g. a dumped config: tasks in alphabetical order
    assert evaluation_rows(_joint_cfg(), shuffled) == rows  # tasks ordered by type

    by = {(r["task"], r["metric"]): r for r in rows}
    assert by[("INST", "box APs")]["value"] is None and by[("INST", "box APs")]["key"] == "APs"  # NaN -> None
    assert by[("INST", "mask AP50")] == {"task": "INST", "type": "instance_segmentation", "dataset": "test_shapes_val",
                                         "metric": "mask AP50", "value": 50.0, "unit": "%", "group": "segm",
                                         "key": "AP50", "headline": True}
    assert by[("INST", "box AP75")]["headline"] is False
    assert by[("RET", "strict R@5 text→image")]["value"] == 44.0 and by[("RET", "R@5 text→image")]["value"] == 46.0
    assert by[("CAP", "BLEU-4")]["value"] == 31.5 and by[("CAP", "CIDEr")]["value"] == 104.25  # as given (x100)
    units = {(r["task"], r["metric"]): r["unit"] for r in rows}
    assert units[("CAP", "BLEU-4")] == "%" and units[("CAP", "CIDEr")] == "" and units[("CAP", "SPICE")] == ""
    for percent in (("CLS", "top-5"), ("RET", "strict R@1 image→text"), ("MLM", "masked-token accuracy")):
        assert units[percent] == "%"
    assert units[("MLM", "perplexity/value")] == ""
    assert {r["type"] for r in rows if r["task"] == "MLM"} == {"masked_lm"}


def test_single_task_shapes_one_and_several_datasets():
    cfg = tiny_cfg("detection")
    one = evaluation_rows(cfg, {"bbox": {"AP": 12.5, "AP50": 30.0, "AP75": 5.0}})  # one dataset: {group: ...}
    assert [(r["task"], r["type"], r["dataset"], r["metric"], r["value"]) for r in one] == [
        ("TASK", "detection", "test_shapes_val", "box AP", 12.5),
        ("TASK", "detection", "test_shapes_val", "box AP50", 30.0),
        ("TASK", "detection", "test_shapes_val", "box AP75", 5.0)]
    assert evaluation_rows(cfg, {"test_shapes_val": {"bbox": {"AP": 12.5}}})[0]["metric"] == "box AP"  # also accepted
    assert evaluation_rows(cfg, {}) == [] and evaluation_rows(cfg, None) == []

    cfg.TASKS.TASK.DATASETS.TEST = ["test_shapes_val", "test_shapes_train"]
    rows = evaluation_rows(cfg, {"test_shapes_val": {"bbox": {"AP50": 30.0, "AP": 12.5}},
                                 "test_shapes_train": {}})  # an evaluator that saw nothing
    assert [(r["dataset"], r["metric"], r["value"]) for r in rows] == [
        ("test_shapes_val", "box AP", 12.5), ("test_shapes_val", "box AP50", 30.0),
        ("test_shapes_train", "(no results)", None)]


def test_bad_results_name_the_value():
    with pytest.raises(ValueError, match=r"task\(s\) \['OTHER'\].*'INST'"):
        evaluation_rows(_joint_cfg(), {"OTHER": {"x": {"bbox": {"AP": 1.0}}}})
    with pytest.raises(ValueError, match="dataset 'coco_val'.*'test_shapes_val'"):
        evaluation_rows(tiny_cfg("detection"), {"coco_val": {"bbox": {"AP": 1.0}}, "other": {}})
    with pytest.raises(TypeError, match=r"results\['bbox'\]\['AP'\] of task 'TASK'.*'high'"):
        evaluation_rows(tiny_cfg("detection"), {"bbox": {"AP": "high"}})


def test_written_files_are_strict_json_and_markdown(tmp_path):
    cfg = _joint_cfg(tmp_path)
    json_path, md_path = write_evaluation_table(cfg, _joint_results(), str(tmp_path / "eval"))
    assert json_path == str(tmp_path / "eval" / "eval_table.json")
    assert md_path == str(tmp_path / "eval" / "eval_table.md")
    data = _strict_load(json_path)
    assert data["config"] == str(tmp_path) and data["rows"] == evaluation_rows(cfg, _joint_results())
    assert sorted(os.listdir(tmp_path / "eval")) == ["eval_table.json", "eval_table.md"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    for path in (json_path, md_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask

    md = open(md_path, encoding="utf-8").read()
    lines = md.splitlines()
    assert md.endswith("\n") and md.rstrip("\n") == format_evaluation_table(data["rows"])
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["task", "dataset", "metric", "value"]
    assert set(lines[1]) <= set("|-: ")  # GitHub's separator row
    headline = [r for r in data["rows"] if r["headline"]]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2 : 2 + len(headline)]]
    assert {(r["task"], r["key"]) for r in headline} == {
        *(("INST", k) for k in ("AP", "AP50")), ("CLS", "top1"), ("CLS", "top5"), ("CAP", "BLEU-4"), ("CAP", "CIDEr"),
        ("MLM", "accuracy"), *(("RET", f"{p}{d}_R@{k}") for p in ("", "strict_") for d in ("i2t", "t2i") for k in (1, 5, 10))}
    assert lines[2 + len(headline):] == ["", f"{len(data['rows']) - len(headline)} more metrics (AP75, APs, per-class AP, "
                                             "BLEU-1..3, ...) in eval_table.json."]
    assert cells[0] == ["INST", "test_shapes_val", "box AP", "40.00%"]
    assert ["INST", "test_shapes_val", "box APs", "n/a"] not in cells
    full = format_evaluation_table(data["rows"], headline_only=False).splitlines()
    assert len(full) == 2 + len(data["rows"]) and "| box APs " in "\n".join(full)
    assert ["CAP", "test_shapes_caption_val", "CIDEr", "104.25"] in cells
    assert ["RET", "test_shapes_caption_val", "strict R@10 text→image", "89.00%"] in cells


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net_report_test", REPO_ROOT / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_net_eval_only_prints_and_writes_the_table(shapes_datasets, tmp_path, monkeypatch, capsys):
    """``--eval-only`` through ``train_net.main``; the evaluation itself is stubbed (its own tests are
    elsewhere): its output must reach eval_results.json unchanged and the table."""
    import torch

    train_net = _train_net()
    results = {"bbox": {"AP": 41.0, "AP50": 61.0, "APs": float("nan")}}
    monkeypatch.setattr(train_net.UP2Trainer, "build_model", classmethod(lambda cls, cfg: torch.nn.Linear(2, 2)))
    monkeypatch.setattr(train_net.UP2Trainer, "test", classmethod(lambda cls, cfg, model: results))
    config = tmp_path / "det.yaml"
    config.write_text(tiny_cfg("detection").dump())
    out = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "OUTPUT_DIR", str(out)])
    assert train_net.main(args) is results
    printed = capsys.readouterr().out
    table = format_evaluation_table(evaluation_rows(tiny_cfg("detection"), results))
    assert table in printed and "| box AP50 " in table and "61.00%" in table
    assert _strict_load(out / "eval_results.json") == {"bbox": {"AP": 41.0, "AP50": 61.0, "APs": None}}
    assert [r["metric"] for r in _strict_load(out / "eval_table.json")["rows"]] == ["box AP", "box AP50", "box APs"]
    assert (out / "eval_table.md").read_text(encoding="utf-8") == table + "\n"


def test_train_net_training_reports_the_final_evaluation(shapes_datasets, tmp_path, capsys):
    """A real 1-iteration training: ``UP2Trainer.train`` returns the final evaluation's results,
    which train_net.main prints and writes as the table."""
    train_net = _train_net()
    config = tmp_path / "det.yaml"
    config.write_text(tiny_cfg("detection").dump())
    out = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(config), "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1", "UP2_PROGRESS_BAR", "False"])
    results = train_net.main(args)
    assert set(results) == {"bbox"} and math.isfinite(results["bbox"]["AP50"])
    rows = _strict_load(out / "eval_table.json")["rows"]
    assert [r["metric"] for r in rows[:2]] == ["box AP", "box AP50"]
    assert rows[1]["value"] == pytest.approx(results["bbox"]["AP50"])
    assert (out / "eval_table.md").read_text(encoding="utf-8") in capsys.readouterr().out + "\n"
    assert not (out / "eval_results.json").exists()  # written by --eval-only only, as before


def test_train_net_report_skips_an_empty_training_evaluation(tmp_path, capsys):
    train_net = _train_net()
    cfg = _joint_cfg(tmp_path)
    train_net.report_evaluation(cfg, None, skip_empty=True)
    train_net.report_evaluation(cfg, {name: {} for name in cfg.TASKS}, skip_empty=True)  # no test dataset
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""
