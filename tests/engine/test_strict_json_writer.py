"""detectron2's JSON-lines metrics.json, written by up2's trainer, is strict JSON."""
import json

import pytest
from detectron2.utils.events import EventStorage

from up2.engine.writers import StrictJSONWriter


def _strict(line: str):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_scalars_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    writer = StrictJSONWriter(str(path))
    with EventStorage(0) as storage:
        storage.put_scalars(loss=0.5, ap=float("nan"), big=float("inf"), smoothing_hint=False)
        writer.write()
        storage.iter = 1
        storage.put_scalars(loss=0.25, smoothing_hint=False)
        writer.write()
    writer.close()
    lines = [_strict(line) for line in path.read_text().splitlines()]
    assert lines == [{"ap": None, "big": None, "iteration": 0, "loss": 0.5}, {"iteration": 1, "loss": 0.25}]
    with pytest.raises(ValueError, match="NaN"):
        _strict(json.dumps({"ap": float("nan")}))  # what detectron2's JSONWriter alone would have written


def test_trainer_uses_the_strict_writer(shapes_datasets, tmp_path):
    from conftest import tiny_cfg
    from up2.engine import UP2Trainer

    cfg = tiny_cfg(**{"OUTPUT_DIR": str(tmp_path), "SOLVER.MAX_ITER": 1})
    trainer = UP2Trainer(cfg)
    writers = trainer.build_writers()
    try:
        assert any(type(w) is StrictJSONWriter for w in writers)
        assert not any(type(w).__name__ == "JSONWriter" for w in writers)
    finally:
        for w in writers:
            w.close()
