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
    def _grad_scale(self, grads: List[torch.Tensor], grad_weight: float) -> float:
        """omega_k / ||grads|| (global L2 norm), or omega_k when not normalising or the norm is 0.

        Raises:
            FloatingPointError: the gradient norm is NaN or infinite.
        """
        if not self.normalize:
            return grad_weight
        # one norm over all parameters (grouped by device/dtype by torch itself), at least fp32
        total = torch.nn.utils.get_total_norm([g.float() if g.element_size() < 4 else g for g in grads])
        norm = float(total)  # one host sync per step
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"TBGN: the global gradient norm is {norm} (non-finite gradients); "
                "check the loss of the sampled task or use a GradScaler that skips such steps"
            )
        return grad_weight if norm == 0.0 else grad_weight / norm

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One TBGN update of every parameter that has a gradient (see the module docstring).

        Args:
            closure: optional callable re-evaluating the model and returning the loss
                (run with grad enabled, before the update).

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: no task was set with :meth:`set_task` since the previous step;
                a sparse gradient.
            FloatingPointError: non-finite global gradient norm (with ``normalize=True``).
        """
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
            return loss
        scale = self._grad_scale(grads, grad_weight)

        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, n = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = float(state["step"])

                g = p.grad.mul(scale)
                m.mul_(b1).add_(g, alpha=(1.0 - b1) / sampling_ratio)
                n.mul_(b2).addcmul_(g, g, value=(1.0 - b2) / sampling_ratio)

                bias1 = 1.0 - b1**t
                bias2 = 1.0 - b2**t
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                denom = (n.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
        return loss
