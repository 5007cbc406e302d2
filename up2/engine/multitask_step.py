"""One training iteration of the multi-task mix (paper §4.4, Fig. 2).

Unmixed sampling (paper default): the sampler draws ONE task k for the iteration (the same on
every rank), its loader gives the batch, the loss is that task's loss, and TBGN steps with
(s_k, omega_k). Mixed sampling (ablation): every task every iteration, losses summed with s_k.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from typing import Dict, Mapping

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from up2.data.multitask import MixedTaskSampler, MultiTaskLoader
from up2.modeling.tasks.base import TaskSpec
from up2.solver.tbgn import TBGN

__all__ = ["MultiTaskStep"]

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class MultiTaskStep(SimpleTrainer):
    """detectron2's SimpleTrainer with a task-aware ``run_step``.

    Args:
        model: UniPerceiverV2 (possibly DDP-wrapped); called as ``model(batch, task=name)``.
        loader: MultiTaskLoader (its sampler decides unmixed vs mixed).
        optimizer: TBGN or any torch optimizer.
        specs: task name -> TaskSpec (s_k, omega_k).
        amp_dtype: None, "bfloat16" or "float16" (autocast; fp16 also uses a GradScaler).

    Raises:
        ValueError: (at construction) an unknown ``amp_dtype``, or "float16" for a model on the CPU.
        FloatingPointError: (in run_step, after the iteration's update, as detectron2 checks) a
            non-finite loss, naming the task, the loss and the iteration.
    """

    def __init__(self, model, loader: MultiTaskLoader, optimizer, specs: Mapping[str, TaskSpec], amp_dtype=None):
        super().__init__(model, loader, optimizer)
        self.loader = loader
        self.specs = dict(specs)
        self.last_task_losses: Dict[str, float] = {}  # task -> its summed loss at the last step
        self.sampling = loader.sampler.probabilities  # normalised s_k
        if amp_dtype is not None and amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(_AMP_DTYPES)}, got {amp_dtype!r}")
        self.amp_dtype = _AMP_DTYPES.get(amp_dtype) if amp_dtype else None
        if self.amp_dtype == torch.float16 and next(model.parameters()).device.type == "cpu":
            # measured here: one iteration of configs/tiny/cls_shapes.yaml did not finish in 100 s
            # under fp16 autocast (it sat in the first backward); bf16 and fp32 take under a second
            raise ValueError(
                "SOLVER.AMP.DTYPE 'float16' on a CPU model: float16 autocast training on CPU is impractically slow "
                "(it stalls in the first backward); use SOLVER.AMP.DTYPE 'bfloat16' or SOLVER.AMP.ENABLED False"
            )
        self.grad_scaler = torch.amp.GradScaler() if self.amp_dtype == torch.float16 else None
        self.task_counts: Counter = Counter()

    @property
    def _data_loader_iter(self):  # SimpleTrainer's iterator is not used: the loader is task-aware
        raise AttributeError("MultiTaskStep draws batches through MultiTaskLoader")

    def _forward(self, batch, name: str):
        device = next(self.model.parameters()).device.type
        with torch.autocast(device_type=device, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            return self.model(batch, task=name)

    def _optimizer_reports_grad_norm(self) -> bool:
        """Whether ``optimizer.step()`` leaves the global L2 gradient norm in ``optimizer.grad_norm``
        (``reports_grad_norm``: TBGN, full-model clipping) and is sure to run (no GradScaler)."""
        return self.grad_scaler is None and getattr(self.optimizer, "reports_grad_norm", False)

    def _grad_norm(self):
        """Global L2 norm of the model's gradients (0-dim tensor), or 0.0 when none has one."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else 0.0

    def run_step(self):
        assert self.model.training, "[MultiTaskStep] model was changed to eval mode!"
        start = time.perf_counter()
        mixed = isinstance(self.loader.sampler, MixedTaskSampler)
        batches = self.loader.next_batches(self.iter) if mixed else dict([self.loader.next_batch(self.iter)])
        data_time = time.perf_counter() - start

        self.optimizer.zero_grad(set_to_none=True)
        logged = {}
        names = list(batches)
        for i, name in enumerate(names):
            # Mixed: one forward + backward per task, gradients accumulate (= the backward of the
            # s_k-weighted sum). DDP allows one forward per synchronised backward, so all but the
            # last task run under no_sync(); the last backward all-reduces the accumulated grads.
            last = i == len(names) - 1
            sync = last or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss_dict = self._forward(batches[name], name)
                task_loss = sum(loss_dict.values())
                loss = self.sampling[name] * task_loss if mixed else task_loss
                (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
            logged.update({f"{name}/{k}": v.detach() for k, v in loss_dict.items()})
            self.task_counts[name] += 1
        self.after_backward()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # the logged norm is that of the true gradients
        # the optimizer's own norm (TBGN, full-model clipping) when it computes one, else ours; under
        # a GradScaler the optimizer may skip its step, so the norm is taken here
        grad_norm = None if self._optimizer_reports_grad_norm() else self._grad_norm()

        if isinstance(self.optimizer, TBGN):
            # unmixed: the sampled task's (s_k, omega_k); mixed: one joint step (s = 1, omega = 1)
            name = next(iter(batches))
            s_k, w_k = (1.0, 1.0) if mixed else (self.sampling[name], self.specs[name].grad_weight)
            self.optimizer.set_task(s_k, w_k)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

        if grad_norm is None:
            grad_norm = self.optimizer.grad_norm if self.optimizer.grad_norm is not None else 0.0

        # The iteration's one copy to the host: every loss, the gradient norm and tau together
        # (read one by one, each would be a host synchronisation on a GPU).
        model = self.model.module if hasattr(self.model, "module") else self.model
        device_values = list(logged.values())
        device_values.append(torch.as_tensor(grad_norm, device=device_values[0].device))
        device_values.append(model.likelihood.temperature.detach())
        host = torch.stack([v.detach().float().reshape(()) for v in device_values]).cpu()
        logged = dict(zip(logged, host[: len(logged)]))
        grad_norm, tau = float(host[-2]), float(host[-1])
        for key, value in logged.items():  # as detectron2 checks its losses: after the step
            if not math.isfinite(float(value)):
                task, _, loss = key.partition("/")
                raise FloatingPointError(f"non-finite loss {loss}={float(value)} in task {task!r} at iteration {self.iter}")

        # the sampled task(s) of this iteration and each one's summed loss (the progress bar shows them)
        self.last_task_losses = {name: sum(float(v) for k, v in logged.items() if k.partition("/")[0] == name)
                                 for name in names}
        self._write_metrics(logged, data_time)
        storage = get_event_storage()
        if len(logged) == 1 and comm.is_main_process():
            # detectron2 writes a lone loss only as total_loss (its rank average); keep the task's key too
            (key,) = logged
            storage.put_scalar(key, storage.history("total_loss").latest())
        storage.put_scalar("grad_norm", grad_norm, smoothing_hint=False)
        tasks = getattr(model, "tasks", {})
        for name in batches:
            storage.put_scalar(f"task_count/{name}", self.task_counts[name], smoothing_hint=False)
            if name in tasks:
                tasks[name].log_batch(batches[name], storage)
        storage.put_scalar("tau", tau, smoothing_hint=False)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        ret["task_counts"] = dict(self.task_counts)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self.task_counts = Counter(state_dict.get("task_counts", {}))
