"""MaskedLMEvaluator: accuracy by hand, ignore index, errors."""
import logging

import pytest
import torch

from up2.evaluation import IGNORE_INDEX, MaskedLMEvaluator


def test_hand_example():
    ev = MaskedLMEvaluator()
    ev.process(
        [{"mlm_labels": torch.tensor([-100, 5, -100, 7])}, {"mlm_labels": torch.tensor([3, -100])}],
        [{"mlm_predictions": torch.tensor([0, 5, 3, 8])}, {"mlm_predictions": torch.tensor([3, 1])}],
    )
    ev.process([{"mlm_labels": torch.tensor([2, 2, 2])}], [{"mlm_predictions": torch.tensor([2, 0, 0])}])
    # masked: 5 (ok), 7 (wrong), 3 (ok), 2 (ok), 2, 2 (wrong) -> 3 / 6
    assert ev.evaluate() == {"mlm": {"accuracy": 50.0}}
    ev.reset()
    ev.process([{"mlm_labels": [1, IGNORE_INDEX]}], [{"mlm_predictions": [1, 9]}])  # lists are accepted
    assert ev.evaluate() == {"mlm": {"accuracy": 100.0}}


def test_matches_direct_count_on_random_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 20, (8, 16), generator=g)
    labels[torch.rand(8, 16, generator=g) > 0.15] = IGNORE_INDEX
    preds = torch.where(torch.rand(8, 16, generator=g) > 0.5, labels, torch.randint(0, 20, (8, 16), generator=g))
    ev = MaskedLMEvaluator(distributed=False)
    ev.process([{"mlm_labels": x} for x in labels], [{"mlm_predictions": x} for x in preds])
    correct = total = 0
    for i in range(8):
        for j in range(16):
            if labels[i, j] != IGNORE_INDEX:
                total += 1
                correct += int(preds[i, j] == labels[i, j])
    assert ev.evaluate()["mlm"]["accuracy"] == pytest.approx(100.0 * correct / total)


def test_nothing_masked_warns(caplog):
    ev = MaskedLMEvaluator()
    ev.process([{"mlm_labels": torch.full((4,), IGNORE_INDEX)}], [{"mlm_predictions": torch.zeros(4).long()}])
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.mlm"):
        assert ev.evaluate() == {}
    assert "did not receive any masked token" in caplog.text


@pytest.mark.parametrize(
    "inputs, outputs, match",
    [
        ([{"mlm_labels": torch.zeros(4, dtype=torch.long)}], [{"mlm_predictions": torch.zeros(5, dtype=torch.long)}],
         r"'mlm_predictions' \(5,\) and 'mlm_labels' \(4,\)"),
        ([{}], [{"mlm_predictions": torch.zeros(4, dtype=torch.long)}], "mlm_labels"),
        ([{"mlm_labels": torch.zeros(4, dtype=torch.long)}], [{}], "mlm_predictions"),
        ([{"mlm_labels": torch.zeros(4).long()}], [{"mlm_predictions": torch.zeros(4)}], "integer token ids"),
    ],
)
def test_bad_input(inputs, outputs, match):
    with pytest.raises(ValueError, match=match):
        MaskedLMEvaluator().process(inputs, outputs)
