"""The gradient norm MultiTaskStep logs: computed once per step (the optimizer's own when TBGN or
full-model clipping computes it), and unscaled under a float16 GradScaler."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from up2.data.multitask import MultiTaskLoader, UnmixedTaskSampler
from up2.engine.multitask_step import MultiTaskStep
from up2.engine.trainer import _with_full_model_clipping
from up2.modeling.tasks.base import TaskSpec
from up2.solver import TBGN


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 1)
        self.likelihood = nn.Module()
        self.likelihood.temperature = torch.tensor(0.07)  # MultiTaskStep logs tau

    def forward(self, x, task):
        return {"loss": self.fc2(torch.tanh(self.fc1(x))).pow(2).mean() * 100.0}


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 4, generator=g)


def _expected_norm(net):
    """The L2 norm of the gradients of the first batch, by hand."""
    net = copy.deepcopy(net)
    net(next(_batches()), "A")["loss"].backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters())).item()


def _run_one_step(net, optimizer, grad_scaler=None):
    specs = {"A": TaskSpec(name="A", type="classification", datasets_train=("x",), datasets_test=(),
                           ims_per_batch=8, sampling_ratio=1.0)}
    loader = MultiTaskLoader({"A": _batches()}, UnmixedTaskSampler(["A"], [1.0]))
    step = MultiTaskStep(net, loader, optimizer, specs)
    step.grad_scaler = grad_scaler
    step.iter = 0
    with EventStorage(0) as storage:
        step.run_step()
        return storage.history("grad_norm").latest()


@pytest.fixture
def count_total_norms(monkeypatch):
    calls = []
    real = torch.nn.utils.get_total_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    return calls


@pytest.mark.parametrize("kind", ["tbgn", "clipped_adamw", "sgd"])
def test_logged_norm_is_computed_once(kind, count_total_norms):
    net = _Net()
    expected = _expected_norm(net)
    if kind == "tbgn":
        opt = TBGN(net.parameters(), lr=1e-3)
    elif kind == "clipped_adamw":
        opt = _with_full_model_clipping(torch.optim.AdamW, 0.01, 2.0)(net.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    logged = _run_one_step(net, opt)
    assert logged == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0  # the clipping (0.01) acted: the logged norm is the one before clipping
    # TBGN and full-model clipping compute the norm themselves; the trainer only for plain SGD
    assert len(count_total_norms) == (1 if kind == "sgd" else 0)


def test_clipping_with_another_norm_type_is_not_logged_as_the_l2_norm():
    net = _Net()
    expected = _expected_norm(net)
    opt = _with_full_model_clipping(torch.optim.AdamW, 0.01, float("inf"))(net.parameters(), lr=1e-3)
    assert _run_one_step(net, opt) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["tbgn", "sgd"])
def test_logged_norm_is_unscaled_under_a_grad_scaler(kind):
    """float16 training scales the loss by 2**k; the logged norm is that of the true gradients.
    (float16 autocast is refused on CPU models, so the scaler is given to a float32 step here.)"""
    net = _Net()
    expected = _expected_norm(net)
    opt = TBGN(net.parameters(), lr=1e-3) if kind == "tbgn" else torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in net.parameters()]
    logged = _run_one_step(net, opt, grad_scaler=scaler)
    assert logged == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))  # the step was taken
