"""projects/benchmark/joint_vs_single.py: the single-task configs keep one task at sampling
ratio 1 for its expected share of the joint run's updates; a short run of two tasks writes the
comparison table."""
import json

import pytest

from projects.benchmark import joint_vs_single as jvs

# the tiny test model (conftest.tiny_cfg's sizes) on the 64 px test shapes data
SHRINK = [
    "MODEL.PROPOSAL.HIDDEN_DIM", "32", "MODEL.PROPOSAL.NHEADS", "2", "MODEL.PROPOSAL.ENC_LAYERS", "1",
    "MODEL.PROPOSAL.DEC_LAYERS", "2", "MODEL.PROPOSAL.NUM_QUERIES", "12", "MODEL.PROPOSAL.DN_NUM", "8",
    "MODEL.PROPOSAL.TRAIN_NUM_POINTS", "256", "MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS", "8",
    "MODEL.UNIFIED_DECODER.EMBED_DIM", "32", "MODEL.UNIFIED_DECODER.NUM_HEADS", "2",
    "MODEL.UNIFIED_DECODER.FFN_DIM", "64", "MODEL.UNIFIED_DECODER.NUM_LAYERS", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
]


def test_single_task_configs(tmp_path):
    joint = jvs.joint_config(jvs.CONFIG, 1000, str(tmp_path / "joint"), seed=3, opts=["SOLVER.WARMUP_ITERS", "7"])
    ratios = {name: float(task.SAMPLING_RATIO) for name, task in joint.TASKS.items()}  # as the config says now
    assert len(ratios) >= 2
    before = joint.dump()
    for name, s in ratios.items():
        single = jvs.single_config(joint, name, str(tmp_path / name))
        n = round(1000 * s / sum(ratios.values()))
        assert list(single.TASKS) == [name]
        assert single.TASKS[name].SAMPLING_RATIO == 1.0
        others = {k: v for k, v in single.TASKS[name].items() if k != "SAMPLING_RATIO"}
        assert others == {k: v for k, v in joint.TASKS[name].items() if k != "SAMPLING_RATIO"}
        assert single.SOLVER.MAX_ITER == n == jvs.single_task_iters(joint)[name]
        assert tuple(single.SOLVER.STEPS) == (int(0.8 * n),)
        assert (single.SEED, single.SOLVER.OPTIMIZER, single.SOLVER.WARMUP_ITERS, single.SOLVER.BASE_LR) == (
            3, joint.SOLVER.OPTIMIZER, 7, joint.SOLVER.BASE_LR)
        assert single.OUTPUT_DIR == str(tmp_path / name)
    assert joint.dump() == before  # the joint config is left as it was
    assert joint.SOLVER.MAX_ITER == 1000 and tuple(joint.SOLVER.STEPS) == (800,)


def test_task_subset_and_bad_input(tmp_path):
    names = list(jvs.joint_config(jvs.CONFIG, 100, str(tmp_path), 0).TASKS)
    pair = names[-1:] + names[:1]
    joint = jvs.joint_config(jvs.CONFIG, 100, str(tmp_path), 0, tasks=pair)
    assert sorted(joint.TASKS) == sorted(pair)
    total = sum(float(joint.TASKS[t].SAMPLING_RATIO) for t in pair)
    assert jvs.single_task_iters(joint) == {t: round(100 * float(joint.TASKS[t].SAMPLING_RATIO) / total) for t in pair}
    with pytest.raises(ValueError, match="NOT_A_TASK"):
        jvs.joint_config(jvs.CONFIG, 100, str(tmp_path), 0, tasks=["NOT_A_TASK"])
    with pytest.raises(ValueError, match="distinct"):
        jvs.joint_config(jvs.CONFIG, 100, str(tmp_path), 0, tasks=pair[:1] * 2)
    with pytest.raises(ValueError, match="iters must be >= 2"):
        jvs.joint_config(jvs.CONFIG, 1, str(tmp_path), 0)
    with pytest.raises(ValueError, match="fewer than 2 iterations"):  # 3 joint iterations over two tasks
        jvs.single_task_iters(jvs.joint_config(jvs.CONFIG, 3, str(tmp_path), 0, tasks=pair))
    with pytest.raises(ValueError, match="NOT_A_TASK"):
        jvs.single_config(joint, "NOT_A_TASK", str(tmp_path))


def test_short_run_writes_the_table(shapes_datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jvs, "prepare_shapes", lambda: None)  # the test data is registered by the fixture
    opts = SHRINK + [
        "TASKS.CLASSIFICATION.DATASETS.TRAIN", "['test_shapes_cls_train']",
        "TASKS.CLASSIFICATION.DATASETS.TEST", "['test_shapes_cls_val']",
        "TASKS.MASKED_LM.DATASETS.TRAIN", "['test_shapes_text_train']",
        "TASKS.MASKED_LM.DATASETS.TEST", "['test_shapes_text_val']",
        "TASKS.CLASSIFICATION.IMS_PER_BATCH", "4", "TASKS.MASKED_LM.IMS_PER_BATCH", "4",
        "TASKS.CLASSIFICATION.SAMPLING_RATIO", "0.5", "TASKS.MASKED_LM.SAMPLING_RATIO", "0.5",
    ]
    # the KEY VALUE overrides come after an option that takes one value (--tasks would take them as task names)
    jvs.main(["--iters", "4", "--tasks", "CLASSIFICATION", "MASKED_LM", "--seed", "0", "--output", str(tmp_path)]
             + opts)

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    out = json.loads((tmp_path / "joint_vs_single.json").read_text(), parse_constant=refuse)
    assert out["columns"] == jvs.HEADERS and out["seeds"] == [0] and out["iters"] == 4
    assert out["tasks"] == ["CLASSIFICATION", "MASKED_LM"]
    assert out["updates_single"] == {"CLASSIFICATION": 2, "MASKED_LM": 2}
    assert [(r["task"], r["metric"]) for r in out["rows"]] == [("CLASSIFICATION", "top-1"), ("MASKED_LM", "MLM acc")]
    joint_counts = []
    for row in out["rows"]:
        assert row["updates_single"] == 2
        (cell,) = row["per_seed"]
        assert cell["seed"] == 0
        assert 0.0 <= cell["single"] <= 100.0 and 0.0 <= cell["joint"] <= 100.0
        assert cell["difference"] == pytest.approx(cell["joint"] - cell["single"])
        assert cell["train_s_single"] > 0 and cell["train_s_joint"] > 0
        joint_counts.append(cell["updates_joint"])
    assert sum(joint_counts) == 4  # one task per joint iteration
    runs = {r["run"]: r for r in out["runs"]}
    assert sorted(runs) == ["joint", "single_CLASSIFICATION", "single_MASKED_LM"]
    assert runs["joint"]["task_counts"] == {t: c for t, c in zip(out["tasks"], joint_counts) if c}
    assert runs["single_CLASSIFICATION"]["task_counts"] == {"CLASSIFICATION": 2}
    assert runs["single_MASKED_LM"]["task_counts"] == {"MASKED_LM": 2}
    assert set(runs["single_MASKED_LM"]["results"]) == {"MASKED_LM"}
    assert (tmp_path / "seed0" / "single_CLASSIFICATION" / "model_final.pth").is_file()
    printed = capsys.readouterr().out.rsplit("Joint vs single on shapes", 1)[1]  # the table, after the runs' logs
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(out["rows"])
    assert lines[0] == jvs.HEADERS
    cls = out["rows"][0]["per_seed"][0]
    assert lines[2][:4] == ["CLASSIFICATION", "top-1", f"{cls['single']:.1f}", f"{cls['joint']:.1f}"]
    assert lines[2][5] == f"2 / {cls['updates_joint']}"


def _run(results, counts, seconds):
    return {"iters": sum(counts.values()), "train_seconds": seconds, "task_counts": counts, "results": results}


def test_table_with_two_seeds_and_missing_runs():
    cls = lambda top1: {"CLS": {"cls_val": {"classification": {"top1": top1, "top5": 100.0}}}}  # noqa: E731
    mlm = {"MLM": {"text_val": {"mlm": {"accuracy": 50.0}}}}
    runs = {
        0: {"joint": _run({**cls(40.0), **mlm}, {"CLS": 6, "MLM": 4}, 20.04),
            "single": {"CLS": _run(cls(35.25), {"CLS": 5}, 9.0)}},
        1: {"joint": _run({**cls(42.0), **mlm}, {"CLS": 5, "MLM": 5}, 21.0),
            "single": {"CLS": _run(cls(38.0), {"CLS": 5}, 9.5)}},
    }
    rows = jvs.comparison_rows(["CLS", "MLM"], [0, 1], runs, {"CLS": 5, "MLM": 5})
    assert [(r["task"], r["metric"], r["updates_single"]) for r in rows] == [("CLS", "top-1", 5), ("MLM", "MLM acc", 5)]
    first = rows[0]["per_seed"][0]
    assert first["seed"] == 0 and first["single"] == 35.25 and first["joint"] == 40.0
    assert first["difference"] == pytest.approx(4.75) and first["updates_joint"] == 6
    no_single = rows[1]["per_seed"][1]  # MLM was not trained alone
    assert no_single["single"] is None and no_single["difference"] is None
    assert jvs.table_lines(rows) == [
        ["CLS", "top-1", "35.2 / 38.0", "40.0 / 42.0", "+4.8 / +4.0", "5 / 6, 5", "9 / 20; 10 / 21"],
        ["MLM", "MLM acc", "- / -", "50.0 / 50.0", "- / -", "5 / 4, 5", "- / 20; - / 21"],
    ]


def test_joint_run_read_from_a_finished_training_folder(tmp_path):
    """--joint-from: the results come from train_net.py's eval_table.json, the updates from the
    last task_count of each task in metrics.json; a run of another length is refused."""
    rows = [{"task": "CLS", "dataset": "cls_val", "group": "classification", "key": "top1", "value": 91.5},
            {"task": "CLS", "dataset": "cls_val", "group": "classification", "key": "top5", "value": None},
            {"task": "MLM", "dataset": "text_val", "group": None, "key": None, "value": None}]
    (tmp_path / "eval_table.json").write_text(json.dumps({"rows": rows, "config": "x"}))
    log = [{"iteration": 9, "task_count/CLS": 4, "task_count/MLM": 6},
           {"iteration": 19, "task_count/CLS": 11}, {"iteration": 19, "task_count/MLM": 9},
           {"iteration": 20, "CLS/top1": 91.5}]  # detectron2 logs the final evaluation under iteration MAX_ITER
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(e) for e in log) + "\n")
    run = jvs.load_joint_run(str(tmp_path), 20)
    assert run["task_counts"] == {"CLS": 11, "MLM": 9} and run["train_seconds"] is None
    assert run["results"] == {"CLS": {"cls_val": {"classification": {"top1": 91.5}}}}
    assert jvs.task_metrics(run["results"], "CLS") == {"top-1": 91.5}
    with pytest.raises(ValueError, match="trained 20 iterations, not --iters 30"):
        jvs.load_joint_run(str(tmp_path), 30)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        jvs.load_joint_run(str(tmp_path), 20)


def _finished_run(folder, cfg, iters):
    """The files train_net.py leaves: config.yaml, eval_table.json, metrics.json (one task count)."""
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(cfg.dump())
    (folder / "eval_table.json").write_text(json.dumps({"rows": []}))
    name = next(iter(cfg.TASKS))
    (folder / "metrics.json").write_text(json.dumps({"iteration": iters - 1, f"task_count/{name}": 3}) + "\n")


def test_a_reused_joint_run_must_be_of_the_same_recipe(tmp_path):
    joint = jvs.joint_config(jvs.CONFIG, 40, str(tmp_path / "joint"), seed=0)
    _finished_run(tmp_path / "same", joint, 40)
    assert jvs.load_joint_run(str(tmp_path / "same"), 40, joint)["iters"] == 40

    older = joint.clone()  # written before MODEL.TEXT_ENCODER.FROZEN_LAYERS existed: its default applies
    del older.MODEL.TEXT_ENCODER["FROZEN_LAYERS"]
    _finished_run(tmp_path / "older", older, 40)
    assert jvs.load_joint_run(str(tmp_path / "older"), 40, joint)["iters"] == 40

    name = next(iter(joint.TASKS))
    other = joint.clone()
    other.TASKS[name].GRAD_WEIGHT = float(joint.TASKS[name].GRAD_WEIGHT) + 1.0
    _finished_run(tmp_path / "other", other, 40)
    with pytest.raises(ValueError, match=f"TASKS.{name}.GRAD_WEIGHT"):
        jvs.load_joint_run(str(tmp_path / "other"), 40, joint)
    sharper = joint.clone()
    sharper.MODEL.UNIFIED_DECODER.INIT_TEMPERATURE = 0.5 * joint.MODEL.UNIFIED_DECODER.INIT_TEMPERATURE
    _finished_run(tmp_path / "sharper", sharper, 40)
    with pytest.raises(ValueError, match="MODEL.UNIFIED_DECODER.INIT_TEMPERATURE"):
        jvs.load_joint_run(str(tmp_path / "sharper"), 40, joint)
    before_spe = joint.clone()  # written before SPE_INPUT_NORM existed: trained with [SPE] normalised (its default)
    del before_spe.MODEL.UNIFIED_DECODER["SPE_INPUT_NORM"]
    _finished_run(tmp_path / "before_spe", before_spe, 40)
    with pytest.raises(ValueError, match="MODEL.UNIFIED_DECODER.SPE_INPUT_NORM = True"):
        jvs.load_joint_run(str(tmp_path / "before_spe"), 40, joint)
    fewer = joint.clone()
    del fewer.TASKS[name]
    _finished_run(tmp_path / "fewer", fewer, 40)
    with pytest.raises(ValueError, match="the TASKS"):
        jvs.load_joint_run(str(tmp_path / "fewer"), 40, joint)
    (tmp_path / "same" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        jvs.load_joint_run(str(tmp_path / "same"), 40, joint)


def test_a_bad_joint_run_is_refused_before_any_data_or_training(tmp_path, monkeypatch, capsys):
    def fail():
        raise AssertionError("prepare_shapes ran before --joint-from was checked")

    monkeypatch.setattr(jvs, "prepare_shapes", fail)
    joint = jvs.joint_config(jvs.CONFIG, 40, str(tmp_path / "joint"), seed=0)
    _finished_run(tmp_path / "short", joint, 30)  # trained 30 iterations, not 40
    with pytest.raises(SystemExit) as exit_info:
        jvs.main(["--iters", "40", "--seed", "0", "--only", "single", "--joint-from", str(tmp_path / "short"),
                  "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "trained 30 iterations, not --iters 40" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
