"""projects/benchmark/ablate_sampling.py prints one value per seed in every cell."""
from projects.benchmark import ablate_sampling


def test_seed_cells():
    assert ablate_sampling.seed_cell([35.25, 37.1]) == "35.2 / 37.1"  # format() rounds half to even on the binary value
    assert ablate_sampling.seed_cell([4.0]) == "4.0"
    assert ablate_sampling.seed_cell([None, 2.46]) == "- / 2.5"
    assert ablate_sampling.seed_cell([1.0, -0.25], "+.2f") == "+1.00 / -0.25"


def test_seed_table_one_line_per_row():
    rows = [{"row": "mixed", "per_seed": [{"seed": 0, "top-1": 40.5, "train s": 675.0},
                                         {"seed": 1, "top-1": None, "train s": 680.4}]},
            {"row": "unmixed", "per_seed": [{"seed": 0, "top-1": 47.0, "train s": 392.0},
                                           {"seed": 1, "top-1": 45.04, "train s": 390.0}]}]
    assert ablate_sampling.seed_table(rows, ["setting", "top-1", "train s"]) == [
        ["mixed", "40.5 / -", "675.0 / 680.4"], ["unmixed", "47.0 / 45.0", "392.0 / 390.0"]]
