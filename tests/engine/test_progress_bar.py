"""The training progress bar (``up2.engine.hooks.ProgressBar``) names the task sampled at each
iteration and that task's loss (``MultiTaskStep.last_task_losses``); a trainer without per-task
losses shows its total loss. tqdm writes to stderr, captured here."""
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from up2.data.multitask import MultiTaskLoader, UnmixedTaskSampler
from up2.engine.hooks import ProgressBar
from up2.engine.multitask_step import MultiTaskStep
from up2.modeling.tasks.base import TaskSpec


class _Net(nn.Module):
    """Two losses per task, the task's own scale; ``seen`` records (task, summed loss) of each call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)
        self.likelihood = nn.Module()
        self.likelihood.temperature = torch.tensor(0.07)  # MultiTaskStep logs tau
        self.seen = []

    def forward(self, x, task):
        base = self.fc(x).pow(2).mean()
        scale = {"CLS": 1.0, "DET": 10.0}[task]
        losses = {"loss_a": scale * base, "loss_b": 2 * scale * base + 0.5}
        self.seen.append((task, sum(v.item() for v in losses.values())))
        return losses


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 4, generator=g)


class _Trainer:
    """What the hook reads of detectron2's trainer: start_iter, storage, and the step (``_trainer``)."""

    def __init__(self, step):
        self._trainer, self.start_iter, self.storage = step, 0, None


def _sampler():
    """Two tasks; a seed whose first two iterations draw different tasks."""
    seed = next(s for s in range(100)
                if len({UnmixedTaskSampler(["CLS", "DET"], [1.0, 1.0], seed=s).task_for_iteration(i) for i in (0, 1)}) == 2)
    return UnmixedTaskSampler(["CLS", "DET"], [1.0, 1.0], seed=seed)


def test_postfix_names_the_sampled_task_and_its_loss(capsys):
    net = _Net()
    specs = {n: TaskSpec(name=n, type="classification", datasets_train=("x",), datasets_test=(), ims_per_batch=8)
             for n in ("CLS", "DET")}
    loader = MultiTaskLoader({"CLS": _batches(0), "DET": _batches(1)}, _sampler())
    step = MultiTaskStep(net, loader, torch.optim.SGD(net.parameters(), lr=0.01), specs)
    hook = ProgressBar(max_iter=2)
    hook.trainer = _Trainer(step)
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        hook.before_train()
        hook._bar.mininterval = 0  # draw at every update (the default draws at most every 0.1 s)
        capsys.readouterr()
        lines = []
        for it in range(2):
            step.iter = storage.iter = it
            step.run_step()
            hook.after_step()
            lines.append(capsys.readouterr().err)
            storage.step()
        hook.after_train()
    assert sorted(t for t, _ in net.seen) == ["CLS", "DET"]  # one of each task
    for (task, loss), line in zip(net.seen, lines):
        assert f"task={task} loss={loss:.3f}" in line, line  # this iteration's values, not the previous one's
    task, loss = net.seen[-1]
    assert step.last_task_losses.keys() == {task}
    assert abs(step.last_task_losses[task] - loss) < 1e-5
    assert hook._bar is None  # closed


def test_without_task_losses_the_total_loss_is_shown(capsys):
    hook = ProgressBar(max_iter=1)
    hook.trainer = _Trainer(step=None)  # e.g. detectron2's SimpleTrainer: no last_task_losses
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        storage.put_scalar("total_loss", 1.23456)
        hook.before_train()
        hook.after_step()
        hook.after_train()
    err = capsys.readouterr().err
    assert "loss=1.235" in err and "task=" not in err
