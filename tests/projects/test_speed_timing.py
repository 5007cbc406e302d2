"""projects/benchmark/timing.py calls what it times in the documented order (warm-ups, then
round-robin rounds), and speed.py parses its --sizes (no timings are asserted)."""
import argparse

import pytest

from projects.benchmark import timing
from projects.benchmark.speed import parse_sizes


def test_measure_warms_up_then_runs_round_robin():
    calls = []
    res = timing.measure([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", [2, 0], 3)
    assert calls == ["a", "a", "a", "b", "a", "b", "a", "b"]
    assert [len(r["times_s"]) for r in res] == [3, 3]
    assert res[0]["first_s"] >= 0 and res[0]["median_s"] in res[0]["times_s"]


def test_paired_ratios_pair_calls_of_one_round():
    calls = []
    ratios = timing.paired_ratios(lambda: calls.append("ref"), {"x": lambda: calls.append("x")}, "cpu", 2)
    assert calls == ["ref", "x"] * 3 and list(ratios) == ["x"] and ratios["x"] > 0


def test_sizes():
    assert parse_sizes("800x1067,512X683") == [(800, 1067), (512, 683)]
    for bad in ("800", "16x16", "axb", "800x1067,"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)
