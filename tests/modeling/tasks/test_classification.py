"""Image classification through the public API (``model(inputs, task="CLS")`` and
``ClassificationEvaluator``): finite losses that a few optimiser steps lower, and eval scores
that are a distribution over the class names whose order the evaluator's top-k agrees with."""
import copy

import pytest
import torch

from task_models import mapped_inputs, tiny_model
from up2.evaluation import ClassificationEvaluator


@pytest.fixture(scope="module")
def cls_model(shapes_datasets):
    return tiny_model({"CLS": ("classification", {})})


def _loss(model, inputs, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for every call
    return model(inputs, task="CLS")["loss_cls"]


def test_training_loss_is_finite_and_reaches_the_image_side(cls_model):
    cfg, model = cls_model
    model.train()
    torch.manual_seed(0)
    inputs = mapped_inputs(cfg, model, "CLS", n=4, is_train=True)
    losses = model(inputs, task="CLS")
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].dim() == 0 and torch.isfinite(losses["loss_cls"])
    losses["loss_cls"].backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.norm() for g in grads) > 1e-6
    model.zero_grad(set_to_none=True)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(cls_model):
    cfg, model = cls_model
    model = copy.deepcopy(model).train()
    torch.manual_seed(1)
    inputs = mapped_inputs(cfg, model, "CLS", n=4, is_train=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = _loss(model, inputs).item()
    for _ in range(3):
        opt.zero_grad()
        _loss(model, inputs).backward()
        opt.step()
    after = _loss(model, inputs).item()
    assert after < 0.9 * before, (before, after)


def test_eval_scores_are_a_distribution_over_the_class_names(cls_model):
    cfg, model = cls_model
    inputs = mapped_inputs(cfg, model, "CLS", n=4)
    model.eval()
    with torch.no_grad():
        out = model(inputs, task="CLS")
        renamed = model(inputs, task="CLS", class_names=["oval", "rhombus"])
    num_classes = len(cfg.TASKS.CLS.CLASS_NAMES)
    assert num_classes >= 3 and len(out) == len(inputs)
    for o in out:
        s = o["pred_class_scores"]
        assert s.shape == (num_classes,) and s.dtype == torch.float32 and (s >= 0).all()
        assert abs(s.sum().item() - 1.0) < 1e-5
        assert o["pred_class"] == int(s.argmax())
    assert all(o["pred_class_scores"].shape == (2,) for o in renamed)  # open vocabulary: the given names


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_evaluator_top_k_follows_the_score_order(cls_model, rank):
    """Give each image as its true class the class with the (rank+1)-th highest score: top-k is
    100% exactly for k > rank (the scores of random weights have no ties)."""
    cfg, model = cls_model
    inputs = mapped_inputs(cfg, model, "CLS", n=4)
    model.eval()
    with torch.no_grad():
        out = model(inputs, task="CLS")
    truth = [{"class_id": int(o["pred_class_scores"].argsort(descending=True)[rank])} for o in out]
    ev = ClassificationEvaluator(topk=(1, 2, 3), distributed=False)
    ev.reset()
    ev.process(truth, out)
    res = ev.evaluate()["classification"]
    for k in (1, 2, 3):
        assert res[f"top{k}"] == pytest.approx(100.0 if k > rank else 0.0)
