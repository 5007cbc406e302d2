"""Exact resume: train, stop after a checkpoint, --resume, continue == an uninterrupted run
(CPU, NUM_WORKERS=0, same config). The stop is a crash raised by a hook, as a killed job would."""
import pytest
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from conftest import tiny_cfg
from up2.engine import UP2Trainer


class Crash(Exception):
    pass


class CrashAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise Crash(f"killed at iteration {self.iteration}")


def _trainer(out_dir, resume, crash_at=None):
    cfg = tiny_cfg(**{"OUTPUT_DIR": str(out_dir), "SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 3,
                      "SEED": 7, "SOLVER.OPTIMIZER": "TBGN", "DATALOADER.NUM_WORKERS": 0})
    cfg.freeze()
    seed_all_rng(cfg.SEED)
    trainer = UP2Trainer(cfg)
    if crash_at is not None:
        trainer.register_hooks([CrashAt(crash_at)])
    trainer.resume_or_load(resume=resume)
    return trainer


def _losses(trainer):
    return {it: v for v, it in trainer.storage.history("total_loss").values()}


def test_resume_continues_exactly(shapes_datasets, tmp_path):
    full = _trainer(tmp_path / "full", resume=False)
    full.train()
    crashed = _trainer(tmp_path / "part", resume=False, crash_at=4)  # checkpoint after iteration 2
    with pytest.raises(Crash):
        crashed.train()
    resumed = _trainer(tmp_path / "part", resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [3, 4, 5]
    for it in (3, 4, 5):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=1e-6), it
