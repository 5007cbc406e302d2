"""The main job's summary has its own file next to detectron2's JSON-lines metrics.json."""
import importlib.util
import json
from pathlib import Path

MAIN_JOB = Path(__file__).resolve().parents[2] / "projects" / "demo" / "main_job.py"


def _main_job():
    spec = importlib.util.spec_from_file_location("main_job", MAIN_JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_does_not_overwrite_detectron2_metrics(tmp_path):
    main_job = _main_job()
    metrics_lines = '{"iteration": 19, "total_loss": 1.5}\n{"iteration": 39, "total_loss": 1.2}\n'
    (tmp_path / "metrics.json").write_text(metrics_lines)
    path = main_job.write_summary(str(tmp_path), {"iterations": 40, "shapes_val": {"bbox": {"AP-circle": float("nan")}}})
    assert Path(path).name == main_job.SUMMARY_FILE == "summary.json"
    assert (tmp_path / "metrics.json").read_text() == metrics_lines

    def refuse(name):
        raise ValueError(name)

    assert json.loads(Path(path).read_text(), parse_constant=refuse) == {
        "iterations": 40, "shapes_val": {"bbox": {"AP-circle": None}}}
