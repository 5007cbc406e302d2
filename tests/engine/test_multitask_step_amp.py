"""MultiTaskStep's autocast settings: float16 training on a CPU model is refused up front
(it stalls in the first backward instead of failing), bfloat16 trains."""
import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from up2.data.multitask import MultiTaskLoader, UnmixedTaskSampler
from up2.engine.multitask_step import MultiTaskStep
from up2.modeling.tasks.base import TaskSpec


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.likelihood = nn.Module()
        self.likelihood.temperature = torch.tensor(0.07)  # MultiTaskStep logs tau

    def forward(self, x, task):
        return {"loss": self.fc(x).pow(2).mean()}


def _forever():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 4, generator=g)


def _step(amp_dtype):
    net = _Net()
    specs = {"A": TaskSpec(name="A", type="classification", datasets_train=("x",), datasets_test=(),
                           ims_per_batch=8, sampling_ratio=1.0)}
    loader = MultiTaskLoader({"A": _forever()}, UnmixedTaskSampler(["A"], [1.0]))
    return net, MultiTaskStep(net, loader, torch.optim.SGD(net.parameters(), lr=0.1), specs, amp_dtype=amp_dtype)


def test_float16_on_cpu_is_refused_with_the_config_key():
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.DTYPE 'float16' on a CPU model.*bfloat16"):
        _step("float16")


def test_bfloat16_on_cpu_trains():
    net, step = _step("bfloat16")
    before = net.fc.weight.detach().clone()
    step.iter = 0
    with EventStorage(0):
        step.run_step()
    assert torch.isfinite(net.fc.weight).all()
    assert not torch.equal(before, net.fc.weight.detach())


def test_unknown_dtype_names_the_key():
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.DTYPE must be one of"):
        _step("float8")
