"""TBGN's foreach update against the per-parameter loop it replaced (paper §4.4).

``_LoopTBGN`` is the implementation TBGN had before its update was written with
``torch._foreach_*``: one Python iteration (about ten kernels) per parameter and a host read of
the global norm. It is kept here, unchanged, as the independent reference.
"""
import math

import pytest
import torch

from up2.solver import TBGN
from up2.solver import tbgn as tbgn_module


class _LoopTBGN(TBGN):
    """TBGN's former per-parameter loop (same hyper-parameters, task and state layout)."""

    def _loop_scale(self, grads, grad_weight):
        if not self.normalize:
            return grad_weight
        total = torch.nn.utils.get_total_norm([g.float() if g.element_size() < 4 else g for g in grads])
        norm = float(total)
        if not math.isfinite(norm):
            raise FloatingPointError(f"TBGN: the global gradient norm is {norm} (non-finite gradients)")
        return grad_weight if norm == 0.0 else grad_weight / norm

    @torch.no_grad()
    def step(self, closure=None):
        sampling_ratio, grad_weight = self._task
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self._task = None
        if not grads:
            return None
        scale = self._loop_scale(grads, grad_weight)
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
        return None


SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (16,), (2, 3, 3, 3), (6,)]
# (s_k, omega_k, indices of the parameters WITHOUT a gradient at that step, zero gradients?)
STEPS = [
    (0.4, 1.0, (), False),
    (0.2, 2.0, (1, 4), False),
    (0.3, 0.5, (0,), False),
    (0.1, 1.0, (), True),  # all gradients zero: the norm-0 rule (no division)
    (0.4, 1.0, (2, 5, 6), False),  # a whole group without gradients (parameters 4..6 in group 1)
    (0.2, 3.0, (3,), False),
    (0.3, 0.7, (), False),
]


def _params(dtypes):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in zip(SHAPES, dtypes)]


def _groups(params):
    return [
        {"params": params[:4], "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[4:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95), "eps": 1e-6},
    ]


def _run(opt_cls, dtypes, normalize=True):
    """Run STEPS with seeded gradients; returns the parameters and the optimizer after each step."""
    params = _params(dtypes)
    opt = opt_cls(_groups(params), betas=(0.9, 0.999), eps=1e-8, normalize=normalize)
    gen = torch.Generator().manual_seed(1)
    snapshots = []
    for s_k, omega, without, zero in STEPS:
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen) * (10.0 ** (i % 3 - 1))  # norms over three decades
            p.grad = None if i in without else (torch.zeros_like(g) if zero else g).to(p.dtype)
        opt.set_task(s_k, omega)
        opt.step()
        snapshots.append([(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params])
    return snapshots


@pytest.mark.parametrize("normalize,chunk", [(True, None), (False, None), (True, 20)])
def test_foreach_update_matches_the_per_parameter_loop(normalize, chunk, monkeypatch):
    if chunk is not None:  # several foreach calls per bucket (runs of <= 20 elements)
        monkeypatch.setattr(tbgn_module, "_CHUNK_ELEMENTS", chunk)
    dtypes = [torch.float32] * len(SHAPES)
    new, old = _run(TBGN, dtypes, normalize), _run(_LoopTBGN, dtypes, normalize)
    for step, (snap_new, snap_old) in enumerate(zip(new, old)):
        for i, ((p_new, st_new), (p_old, st_old)) in enumerate(zip(snap_new, snap_old)):
            where = f"step {step}, parameter {i}"
            torch.testing.assert_close(p_new, p_old, rtol=0, atol=1e-6, msg=lambda m: f"{where}: {m}")
            assert st_new.keys() == st_old.keys(), where
            for key in st_old:
                torch.testing.assert_close(st_new[key], st_old[key], rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{where}, {key}: {m}")
    # the per-parameter step counts follow the gradients each parameter had
    expected = [sum(i not in without for _, _, without, _ in STEPS) for i in range(len(SHAPES))]
    assert [int(st["step"]) for _, st in new[-1]] == expected
    assert expected[0] == 6 and expected[4] == 6 and expected[6] == 6


def test_mixed_dtypes_in_one_group_match_the_loop():
    """float32, float64 and bfloat16 parameters share the groups: one foreach bucket per dtype."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    new, old = _run(TBGN, dtypes)[-1], _run(_LoopTBGN, dtypes)[-1]
    for i, ((p_new, st_new), (p_old, st_old)) in enumerate(zip(new, old)):
        assert p_new.dtype == dtypes[i] and st_new["exp_avg"].dtype == dtypes[i]
        # bf16: the scale is applied in float32 by both, rounding to bf16 may land one ulp apart
        tol = 1e-2 if dtypes[i] == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p_new, p_old, rtol=tol, atol=tol, msg=lambda m: f"parameter {i}: {m}")
        torch.testing.assert_close(st_new["exp_avg_sq"], st_old["exp_avg_sq"], rtol=tol, atol=tol)


def test_grad_norm_is_the_global_norm_of_the_step():
    params = _params([torch.float32] * len(SHAPES))
    opt = TBGN(_groups(params))
    assert opt.grad_norm is None
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[2].grad = None
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    opt.set_task(0.5, 1.0)
    opt.step()
    assert opt.grad_norm.dim() == 0 and opt.grad_norm.dtype == torch.float32
    torch.testing.assert_close(opt.grad_norm.double(), expected, rtol=1e-6, atol=0)
    for p in params:
        p.grad = None
    opt.set_task(0.5, 1.0)
    opt.step()  # nothing to update
    assert opt.grad_norm is None


def test_step_reads_no_scalar_but_for_the_finite_check(monkeypatch):
    """The division by the norm (and the norm-0 rule) runs on the device: with the finite check
    (which reads the norm only when it is on the CPU) taken out, a step reads no tensor value
    on the host (the CPU step counters are read with one ``tolist`` per bucket)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    params = _params([torch.float32] * len(SHAPES))
    opt = TBGN(_groups(params))
    for p in params:
        p.grad = torch.ones_like(p)
    checks = []
    monkeypatch.setattr(opt, "_defer_finite_check", lambda norm: checks.append(norm))
    opt.set_task(0.5, 1.0)
    with CountScalarReads() as mode:
        opt.step()
    assert len(checks) == 1 and checks[0] is opt.grad_norm
    assert mode.reads == []


def test_non_finite_norm_raises_on_cpu():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = TBGN([p])
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    opt.set_task(0.5, 1.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
