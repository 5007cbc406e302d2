"""Task-Balanced Gradient Normalization (TBGN), the optimizer of paper §4.4.

Shape shorthand: every per-parameter tensor (gradient g, moments m and n) has the
shape and dtype of its parameter p; the task settings s_k, omega_k and the
hyper-parameters are Python floats.

Update when task k (sampling ratio s_k, gradient weight omega_k) is sampled at step t,
written in PyTorch's beta convention (``betas=(b1, b2)`` are the weights of the OLD
moment, exactly as in :class:`torch.optim.AdamW`)::

    g  = omega_k * grad / ||grad||                  (global L2 norm, see below)
    m  = b1 * m + (1 - b1) / s_k * g
    n  = b2 * n + (1 - b2) / s_k * g**2
    m_hat = m / (1 - b1**t_p),  n_hat = n / (1 - b2**t_p)   (t_p: the parameter's own step count)
    p  = p - lr * wd * p                            (decoupled weight decay, as AdamW)
    p  = p - lr * m_hat / (sqrt(n_hat) + eps)

Beta mapping: the paper writes ``m_t = (1 - beta_1) m_{t-1} + beta_1 / s_k g_t``, i.e. its
beta is the weight of the NEW gradient. Hence ``paper beta_i = 1 - b_i`` with ``b_i`` the
PyTorch value passed here: the paper's (0.1, 0.001) is ``betas=(0.9, 0.999)``.

With ``s_k = 1``, ``omega_k = 1`` and ``normalize=False`` the update is exactly AdamW.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from up2.utils.host_sync import cpu_only

__all__ = ["TBGN"]


def _check_hyper(name: str, value, low: float, high: float = math.inf, high_open: bool = False):
    """Raise ValueError unless ``low <= value <= high`` (``< high`` when high_open) and finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"TBGN: {name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and v >= low and (v < high if high_open else v <= high)
    if not ok:
        bound = f"[{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"TBGN: {name} must be finite and in {bound}, got {value!r}")
    return v


# Parameters per foreach call, in elements: bounds the step's temporaries (the scaled gradient
# and the denominator of each parameter in the call) to 2 x 16 MB in float32, so they are reused
# from step to step by the allocator and stay in cache on CPUs, instead of two copies of the model.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(params: List[torch.Tensor], max_elements: int) -> List[List[torch.Tensor]]:
    """Consecutive runs of ``params`` with at most ``max_elements`` elements in all (a larger
    parameter forms a run by itself)."""
    runs: List[List[torch.Tensor]] = []
    size = max_elements
    for p in params:
        if size + p.numel() > max_elements:
            runs.append([])
            size = 0
        runs[-1].append(p)
        size += p.numel()
    return runs


class TBGN(torch.optim.Optimizer):
    """AdamW with Task-Balanced Gradient Normalization (paper §4.4, its AdamW modification).

    Usage, once per iteration (the task is one-shot: each ``step()`` consumes it)::

        task = sampler.task_for_iteration(it)
        loss = model(batch_of(task)); optimizer.zero_grad(set_to_none=True); loss.backward()
        optimizer.set_task(sampling_ratio=sampler.probabilities[task], grad_weight=omega[task])
        optimizer.step()

    Gradient normalisation: ``||grad||`` is the L2 norm over the gradients of ALL parameters,
    across all parameter groups, whose ``.grad`` is not None, taken on the gradients as they are
    when ``step()`` runs, i.e. after DDP has averaged them (so every rank sees the same norm
    and makes the same update). A norm of 0 skips the division (g = omega_k * grad).

    Parameters whose ``.grad`` is None are left untouched: no weight decay, and their moments
    and step count are unchanged. A gradient of zeros DOES count as a gradient (as in AdamW);
    zero gradients with ``set_to_none=True`` so that parameters unused by a task are skipped.

    Args:
        params: iterable of parameters or of parameter-group dicts; groups may override
            ``lr``, ``betas``, ``eps`` and ``weight_decay``.
        lr: learning rate alpha (>= 0).
        betas: (b1, b2) in [0, 1), PyTorch convention (weight of the old moment); the paper's
            beta_i = 1 - b_i.
        eps: added to sqrt(n_hat) (>= 0).
        weight_decay: decoupled weight decay coefficient (>= 0), applied as ``p *= 1 - lr*wd``.
        normalize: False disables the division by the gradient norm (g = omega_k * grad);
            the 1/s_k compensation still applies.

    Raises:
        ValueError: a hyper-parameter out of range (names the field and group).

    State: per parameter ``step`` (0-d float32 tensor), ``exp_avg`` (m) and ``exp_avg_sq`` (n),
    saved by ``state_dict()`` together with the pending task (if ``set_task`` was called and
    ``step`` not yet), so a checkpoint taken at any point resumes identically.
    """

    #: ``step()`` leaves the global L2 gradient norm in :attr:`grad_norm` (read by the trainer)
    reports_grad_norm = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.05,
        normalize: bool = True,
    ):
        if not isinstance(normalize, bool):
            raise ValueError(f"TBGN: normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self._task: Optional[Tuple[float, float]] = None
        self._grad_norm: Optional[torch.Tensor] = None
        self._unchecked_norm = None  # (host copy of a CUDA norm, its copy event): checked at the next step
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ---- configuration ------------------------------------------------------------------
    def add_param_group(self, param_group: Dict) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`) and validate its
        ``lr``, ``betas``, ``eps`` and ``weight_decay``.

        Raises:
            ValueError: a value out of range, naming the field and the group index.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        group["lr"] = _check_hyper(f"{where}.lr", group["lr"], 0.0)
        group["eps"] = _check_hyper(f"{where}.eps", group["eps"], 0.0)
        group["weight_decay"] = _check_hyper(f"{where}.weight_decay", group["weight_decay"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"TBGN: {where}.betas must be a pair (b1, b2), got {betas!r}")
        group["betas"] = tuple(
            _check_hyper(f"{where}.betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(betas)
        )

    def set_task(self, sampling_ratio: float, grad_weight: float) -> None:
        """Declare the task of the coming ``step()`` (consumed by that step).

        Args:
            sampling_ratio: s_k in (0, 1], the task's normalised sampling ratio (sum_k s_k = 1).
            grad_weight: omega_k > 0, the task's gradient weight (paper: 1 for equal tasks).

        Raises:
            ValueError: s_k not in (0, 1] or omega_k not a finite positive number.
        """
        s = _check_hyper("sampling_ratio", sampling_ratio, 0.0, 1.0)
        w = _check_hyper("grad_weight", grad_weight, 0.0)
        if s <= 0.0:
            raise ValueError(f"TBGN: sampling_ratio must be > 0 (normalised ratio of the task), got {sampling_ratio!r}")
        if w <= 0.0:
            raise ValueError(f"TBGN: grad_weight must be > 0, got {grad_weight!r}")
        self._task = (s, w)

    @property
    def pending_task(self) -> Optional[Tuple[float, float]]:
        """(s_k, omega_k) set by :meth:`set_task` and not yet consumed by ``step()``, or None."""
        return self._task

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """The standard optimizer state plus ``"tbgn_pending_task"`` ((s_k, omega_k) or None)."""
        sd = super().state_dict()
        sd["tbgn_pending_task"] = None if self._task is None else list(self._task)
        return sd

    def load_state_dict(self, state_dict: Dict) -> None:
        """Load the standard optimizer state and the pending task (absent key -> no task)."""
        state_dict = dict(state_dict)
        task = state_dict.pop("tbgn_pending_task", None)
        super().load_state_dict(state_dict)
        self._task = None
        if task is not None:
            self.set_task(*task)

    # ---- the update ---------------------------------------------------------------------
    @property
    def grad_norm(self) -> Optional[torch.Tensor]:
        """The global L2 norm of the gradients the last ``step()`` used (0-dim, float32 or wider,
        on the device of the first gradient; unscaled, before the division), or None before the
        first step. Computed with ``normalize=False`` too, so a trainer can log it without
        computing it again; reading it as a number waits for the device."""
        return self._grad_norm

    def _raise_if_not_finite(self, norm: float, when: str) -> None:
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"TBGN: the global gradient norm {when} is {norm} (non-finite gradients); "
                "check the loss of the sampled task or use a GradScaler that skips such steps"
            )

    def _check_previous_norm(self) -> None:
        """Raise for a non-finite norm of the previous step whose check was deferred (CUDA)."""
        if self._unchecked_norm is None:
            return
        host, event = self._unchecked_norm
        self._unchecked_norm = None
        event.synchronize()  # recorded a whole step ago: done by now, no wait for the queue
        self._raise_if_not_finite(float(host), "of the previous step")

    def _defer_finite_check(self, norm: torch.Tensor) -> None:
        """Check ``norm`` now when it is on the CPU; on CUDA copy it to the host without waiting
        and check it at the next ``step()`` (an immediate check would stall the host until the
        whole backward pass has run)."""
        if norm.device.type == "cuda":
            host = norm.detach().to("cpu", non_blocking=True)  # pinned destination: asynchronous
            event = torch.cuda.Event()
            event.record()
            self._unchecked_norm = (host, event)
        else:
            with cpu_only():  # reading a CPU value: free, and a CUDA run takes the branch above
                value = float(norm)
            self._raise_if_not_finite(value, "at this step")

    @staticmethod
    def _global_norm(grads: List[torch.Tensor]) -> torch.Tensor:
        """L2 norm over all ``grads`` (0-dim, on the first gradient's device): one foreach norm
        per (device, dtype) (16-bit gradients accumulated in float32), then one norm of the stack."""
        buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
        for g in grads:
            buckets.setdefault((g.device, g.dtype), []).append(g)
        first = grads[0].device
        norms = []
        for (_, dtype), bucket in buckets.items():
            wide = torch.float32 if torch.finfo(dtype).bits < 32 else None
            norms.extend(n.to(first) for n in torch._foreach_norm(bucket, 2, dtype=wide))
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One TBGN update of every parameter that has a gradient (see the module docstring).

        The update runs as ``torch._foreach_*`` kernels over the parameters of each parameter
        group grouped by device and dtype (in runs of at most 4M elements); the global norm is
        computed once, and divided by on the device (no host synchronisation: a zero norm is
        handled with ``torch.where``).

        Args:
            closure: optional callable re-evaluating the model and returning the loss
                (run with grad enabled, before the update).

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: no task was set with :meth:`set_task` since the previous step;
                a sparse gradient.
            FloatingPointError: non-finite global gradient norm (with ``normalize=True``):
                raised by this step when the gradients are on the CPU; on CUDA the check is
                deferred to the next ``step()`` (the update with that norm has been applied).
        """
        self._check_previous_norm()
        if self._task is None:
            raise RuntimeError(
                "TBGN.step() called with no task: call set_task(sampling_ratio=s_k, grad_weight=omega_k) "
                "before every step"
            )
        sampling_ratio, grad_weight = self._task
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        for g in grads:
            if g.is_sparse:
                raise RuntimeError("TBGN does not support sparse gradients")
        self._task = None
        if not grads:
            self._grad_norm = None
            return loss
        norm = self._global_norm(grads)
        self._grad_norm = norm
        if self.normalize:
            self._defer_finite_check(norm)
            # omega_k / ||grad||, or omega_k when the norm is 0 (on the device: no host sync)
            scale = torch.where(norm > 0, grad_weight / norm, torch.full_like(norm, grad_weight))
        else:
            scale = grad_weight

        for group in self.param_groups:
            buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in buckets.items():
                device_scale = scale.to(device) if torch.is_tensor(scale) else scale
                for chunk in _chunks(params, _CHUNK_ELEMENTS):
                    self._update(chunk, group, sampling_ratio, device_scale)
        return loss

    def _update(self, params: List[torch.Tensor], group: Dict, sampling_ratio: float, scale) -> None:
        """The module docstring's update of ``params`` (one device and dtype, one group), with
        ``scale`` = omega_k / ||grad|| (0-dim tensor on their device, or a float)."""
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        b1, b2 = group["betas"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        m = [s["exp_avg"] for s in states]
        n = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, 1.0)
        # per-parameter step counts (CPU tensors): bias corrections as host scalars
        t = torch.stack(steps).tolist()
        step_size = [-lr / (1.0 - b1**ti) for ti in t]
        bias2_sqrt = [math.sqrt(1.0 - b2**ti) for ti in t]

        g = torch._foreach_mul([p.grad for p in params], scale)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=(1.0 - b1) / sampling_ratio)
        torch._foreach_mul_(n, b2)
        torch._foreach_addcmul_(n, g, g, value=(1.0 - b2) / sampling_ratio)
        del g
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        denom = torch._foreach_sqrt(n)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, step_size)
