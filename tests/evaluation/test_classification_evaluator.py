"""ClassificationEvaluator: top-k by hand, against torch.topk, ties, errors."""
import logging

import pytest
import torch
from detectron2.utils import comm

from up2.evaluation import ClassificationEvaluator


def _run(ev, scores, labels, batch=3):
    ev.reset()
    for s in range(0, len(labels), batch):
        ev.process(
            [{"class_id": int(c)} for c in labels[s : s + batch]],
            [{"pred_class_scores": x} for x in scores[s : s + batch]],
        )
    return ev.evaluate()


def test_hand_example():
    scores = torch.tensor(
        [
            [0.1, 0.7, 0.2, 0.0, 0.0, 0.0],  # label 1: best -> rank 0
            [0.5, 0.3, 0.2, 0.9, 0.0, 0.0],  # label 2: 0.5, 0.3, 0.9 above -> rank 3
            [0.2, 0.2, 0.6, 0.1, 0.1, 0.1],  # label 0: tie with class 1 + class 2 -> rank 2
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: last of 6 -> rank 5
        ]
    )
    res = _run(ClassificationEvaluator(topk=(1, 3, 5)), scores, [1, 2, 0, 0])
    # top1: 1 of 4; top3: ranks 0, 2 -> 2 of 4; top5: ranks 0, 3, 2 -> 3 of 4
    assert res == {"classification": {"top1": 25.0, "top3": 50.0, "top5": 75.0}}


def test_matches_torch_topk_on_random_scores():
    g = torch.Generator().manual_seed(0)
    n, c = 50, 10
    scores = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    assert comm.get_world_size() == 1  # the default distributed=True path with one process
    res = _run(ClassificationEvaluator(topk=(1, 5)), scores, labels)["classification"]
    for k in (1, 5):
        top = scores.topk(k, dim=1).indices
        ref = 100.0 * sum(int(labels[i]) in top[i].tolist() for i in range(n)) / n
        assert res[f"top{k}"] == pytest.approx(ref)


def test_ties_count_against_the_model_and_k_is_capped():
    scores = torch.zeros(4, 3)  # a model that says nothing
    res = _run(ClassificationEvaluator(topk=(1, 2, 5), distributed=False), scores, [0, 1, 2, 0])
    assert res["classification"] == {"top1": 0.0, "top2": 0.0, "top5": 100.0}


def test_bf16_scores():
    scores = torch.eye(4, dtype=torch.bfloat16)
    res = _run(ClassificationEvaluator(), scores, [0, 1, 2, 3])
    assert res["classification"]["top1"] == 100.0


def test_empty_warns(caplog):
    ev = ClassificationEvaluator()
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.classification"):
        assert ev.evaluate() == {}
    assert "did not receive any prediction" in caplog.text


@pytest.mark.parametrize(
    "inputs, outputs, match",
    [
        ([{}], [{"pred_class_scores": torch.zeros(3)}], "class_id"),
        ([{"class_id": 0}], [{}], "pred_class_scores"),
        ([{"class_id": 0}], [{"pred_class_scores": torch.zeros(2, 3)}], r"pred_class_scores.*\(C,\)"),
        ([{"class_id": 3}], [{"pred_class_scores": torch.zeros(3)}], "class_id' 3 is outside"),
        ([{"class_id": 0}], [{"pred_class_scores": torch.tensor([float("nan"), 0.0])}], "NaN"),
        ([{"class_id": 0}] * 2, [{"pred_class_scores": torch.zeros(3)}, {"pred_class_scores": torch.zeros(4)}], "C=4"),
        ([{"class_id": 0}], [], "1 inputs but 0 outputs"),
    ],
)
def test_bad_input(inputs, outputs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationEvaluator().process(inputs, outputs)


def test_bad_topk():
    with pytest.raises(ValueError, match="topk"):
        ClassificationEvaluator(topk=(0,))
