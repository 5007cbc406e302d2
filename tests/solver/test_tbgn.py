"""TBGN (paper §4.4): hand computation, AdamW parity, resume, bad input."""
import copy
import io
import math

import pytest
import torch

from up2.solver import TBGN


def _hand_update(p, g, m, n, t, *, lr, wd, b1, b2, eps, s, scale):
    """Reference TBGN update of one parameter, written out with plain tensor ops (float64)."""
    g = scale * g
    m = b1 * m + (1 - b1) / s * g
    n = b2 * n + (1 - b2) / s * g * g
    m_hat = m / (1 - b1**t)
    n_hat = n / (1 - b2**t)
    p = p - lr * wd * p
    p = p - lr * m_hat / (torch.sqrt(n_hat) + eps)
    return p, m, n


def test_two_steps_two_tasks_match_hand_computation():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    h1 = dict(lr=0.1, wd=0.05, b1=0.9, b2=0.99, eps=1e-8)
    h2 = dict(lr=0.01, wd=0.0, b1=0.8, b2=0.95, eps=1e-6)
    opt = TBGN(
        [
            {"params": [p1], "lr": h1["lr"], "weight_decay": h1["wd"], "betas": (h1["b1"], h1["b2"]), "eps": h1["eps"]},
            {"params": [p2], "lr": h2["lr"], "weight_decay": h2["wd"], "betas": (h2["b1"], h2["b2"]), "eps": h2["eps"]},
        ]
    )
    r1, r2 = p1.detach().clone(), p2.detach().clone()
    m1, n1 = torch.zeros_like(r1), torch.zeros_like(r1)
    m2, n2 = torch.zeros_like(r2), torch.zeros_like(r2)

    # step 1: task A (s=0.25, omega=2), both parameters have gradients
    g1 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    g2 = torch.tensor([[0.5, 0.0], [-0.7, 4.0]], dtype=torch.float64)
    p1.grad, p2.grad = g1.clone(), g2.clone()
    opt.set_task(sampling_ratio=0.25, grad_weight=2.0)
    opt.step()
    norm = torch.sqrt((g1 * g1).sum() + (g2 * g2).sum())  # global over both groups
    r1, m1, n1 = _hand_update(r1, g1, m1, n1, 1, s=0.25, scale=2.0 / norm, **h1)
    r2, m2, n2 = _hand_update(r2, g2, m2, n2, 1, s=0.25, scale=2.0 / norm, **h2)
    torch.testing.assert_close(p1.detach(), r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p2.detach(), r2, rtol=1e-12, atol=1e-12)

    # step 2: task B (s=0.6, omega=0.5), p2 has no gradient -> untouched, norm over p1 only
    g1 = torch.tensor([-0.1, 0.4, 0.2], dtype=torch.float64)
    p1.grad, p2.grad = g1.clone(), None
    state2 = copy.deepcopy(opt.state[p2])
    p2_before = p2.detach().clone()
    opt.set_task(0.6, 0.5)
    opt.step()
    norm = torch.sqrt((g1 * g1).sum())
    r1, m1, n1 = _hand_update(r1, g1, m1, n1, 2, s=0.6, scale=0.5 / norm, **h1)
    torch.testing.assert_close(p1.detach(), r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p1]["exp_avg"], m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p1]["exp_avg_sq"], n1, rtol=1e-12, atol=1e-12)
    assert float(opt.state[p1]["step"]) == 2.0
    assert torch.equal(p2.detach(), p2_before)
    assert float(opt.state[p2]["step"]) == 1.0
    assert torch.equal(opt.state[p2]["exp_avg"], state2["exp_avg"])
    assert torch.equal(opt.state[p2]["exp_avg_sq"], state2["exp_avg_sq"])


def _model_and_groups(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.0},
    ]
    return model, groups


def _loss(model, it, scale=1.0):
    gen = torch.Generator().manual_seed(100 + it)
    x, y = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)
    return scale * ((model(x) - y) ** 2).mean()


def test_equals_adamw_without_normalisation_and_unit_task():
    model_a, groups_a = _model_and_groups()
    model_b, groups_b = _model_and_groups()
    adamw = torch.optim.AdamW(groups_a, betas=(0.9, 0.999), eps=1e-8)
    tbgn = TBGN(groups_b, betas=(0.9, 0.999), eps=1e-8, normalize=False)
    for it in range(5):
        for model, opt in ((model_a, adamw), (model_b, tbgn)):
            opt.zero_grad(set_to_none=True)
            _loss(model, it).backward()
            if opt is tbgn:
                opt.set_task(1.0, 1.0)
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_normalised_update_is_invariant_to_loss_scale():
    """With normalisation the update only depends on the gradient direction and omega_k."""
    model_a, groups_a = _model_and_groups()
    model_b, groups_b = _model_and_groups()
    opt_a, opt_b = TBGN(groups_a), TBGN(groups_b)
    for it in range(3):
        for model, opt, scale in ((model_a, opt_a, 1.0), (model_b, opt_b, 1000.0)):
            opt.zero_grad(set_to_none=True)
            _loss(model, it, scale).backward()
            opt.set_task(0.3, 1.5)
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    tasks = [(0.5, 1.0), (0.2, 2.0), (0.3, 0.5), (0.2, 2.0), (0.5, 1.0)]

    def run(model, opt, its):
        for it in its:
            opt.zero_grad(set_to_none=True)
            _loss(model, it).backward()
            opt.set_task(*tasks[it])
            opt.step()

    model_a, groups_a = _model_and_groups()
    opt_a = TBGN(groups_a)
    run(model_a, opt_a, range(3))
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    run(model_a, opt_a, range(3, 5))

    model_b, groups_b = _model_and_groups(seed=123)  # different init, overwritten by the checkpoint
    opt_b = TBGN(groups_b)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.pending_task is None
    assert [g["lr"] for g in opt_b.param_groups] == [1e-2, 3e-3]
    run(model_b, opt_b, range(3, 5))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_pending_task_survives_state_dict_and_is_consumed_by_step():
    model, groups = _model_and_groups()
    opt = TBGN(groups)
    opt.set_task(0.4, 2.0)
    opt2 = TBGN(_model_and_groups()[1])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.pending_task == (0.4, 2.0)
    _loss(model, 0).backward()
    opt.step()
    assert opt.pending_task is None
    with pytest.raises(RuntimeError, match="set_task"):
        opt.step()


def test_zero_gradient_skips_normalisation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = TBGN([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(2)
    opt.set_task(0.5, 1.0)
    opt.step()  # no division by zero: only the weight decay moves p
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5))
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0


def test_bf16_parameters_step():
    p = torch.nn.Parameter(torch.randn(5).bfloat16())
    opt = TBGN([p])
    p.grad = torch.randn(5).bfloat16()
    opt.set_task(0.5, 1.0)
    opt.step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()


@pytest.mark.parametrize(
    "ratio,weight,match",
    [(0.0, 1.0, "sampling_ratio"), (-0.1, 1.0, "sampling_ratio"), (1.5, 1.0, "sampling_ratio"),
     (math.nan, 1.0, "sampling_ratio"), (0.5, 0.0, "grad_weight"), (0.5, -1.0, "grad_weight"),
     (0.5, math.inf, "grad_weight"), ("a", 1.0, "sampling_ratio")],
)
def test_bad_task_raises(ratio, weight, match):
    opt = TBGN([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=match):
        opt.set_task(ratio, weight)


def test_bad_hyperparameters_and_usage_raise():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr"):
        TBGN([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        TBGN([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas"):
        TBGN([p], betas=(0.9,))
    with pytest.raises(ValueError, match="eps"):
        TBGN([p], eps=-1e-8)
    with pytest.raises(ValueError, match=r"param_groups\[1\].weight_decay"):
        TBGN([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": -0.1}])
    with pytest.raises(ValueError, match="normalize"):
        TBGN([p], normalize="yes")
    opt = TBGN([p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="no task"):
        opt.step()
    p.grad = torch.tensor([1.0, math.nan])
    opt.set_task(0.5, 1.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
