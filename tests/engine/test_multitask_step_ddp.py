"""Mixed sampling under DDP (2 gloo processes): MultiTaskStep runs one forward + backward per
task (all but the last under ``no_sync``), and the synchronised step equals a single-process
step on the rank-averaged, s_k-weighted sum of the task losses -- also for parameters that only
an earlier (unsynchronised) task uses.

The workers run through ``distributed_utils.run_gloo_workers`` (file:// store, timeout, and a
barrier + destroy_process_group after the worker returned and its DDP wrapper was released)."""

import torch
from detectron2.utils.events import EventStorage
from torch import nn

from up2.data.multitask import MixedTaskSampler, MultiTaskLoader
from up2.engine.multitask_step import MultiTaskStep
from up2.modeling.tasks.base import TaskSpec

from distributed_utils import run_gloo_workers, save_result

RATIOS = {"A": 1.0, "B": 3.0}  # s_A = 0.25, s_B = 0.75


class Toy(nn.Module):
    """A shared layer and one head per task; task B never touches head ``a`` and vice versa."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
        self.likelihood = nn.Module()
        self.likelihood.temperature = torch.tensor(0.07)  # MultiTaskStep logs tau

    def forward(self, x, task):
        head = self.a if task == "A" else self.b
        return {"loss": head(torch.tanh(self.shared(x))).pow(2).mean()}


def _data(rank, task):
    g = torch.Generator().manual_seed(10 * rank + (task == "B"))
    return torch.randn(4, 3, generator=g)


def _forever(rank, task):
    while True:
        yield _data(rank, task)


def _specs():
    return {n: TaskSpec(name=n, type="classification", datasets_train=("x",), datasets_test=(), ims_per_batch=4,
                        sampling_ratio=r) for n, r in RATIOS.items()}


def _worker(rank, out_path):
    """One rank: one mixed step; rank 0 saves the updated weights. Its locals (the DDP wrapper)
    are released when it returns, before run_gloo_workers destroys the group."""
    model = nn.parallel.DistributedDataParallel(Toy(), find_unused_parameters=True)
    sampler = MixedTaskSampler(list(RATIOS), list(RATIOS.values()))
    loader = MultiTaskLoader({n: _forever(rank, n) for n in RATIOS}, sampler)
    step = MultiTaskStep(model, loader, torch.optim.SGD(model.parameters(), lr=1.0), _specs())
    step.iter = 0
    with EventStorage(0):
        step.run_step()
    if rank == 0:
        save_result({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out_path)
    del step, model  # the DDP wrapper (and its reducer) goes before the process group


def test_mixed_step_under_ddp_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    run_gloo_workers(_worker, tmp_path, args=(str(out),))
    ddp = torch.load(out)

    ref = Toy()
    total = sum(RATIOS[n] / sum(RATIOS.values()) * ref(_data(r, n), n)["loss"] for r in (0, 1) for n in RATIOS) / 2
    total.backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.allclose(ddp[name], p - p.grad, atol=1e-6), name
