import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_projection

from up2.modeling.likelihood import Likelihood


def test_logits_are_cosine_over_tau_by_hand():
    lik = Likelihood(init_temperature=0.5)
    x = torch.tensor([[3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    logits = lik(x, y)
    expected = torch.tensor([[0.6, 0.8, -0.6]]) / 0.5
    assert torch.allclose(logits, expected, atol=1e-6)
    assert logits.dtype == torch.float32


def test_loss_is_weighted_cross_entropy_and_zero_when_empty():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    by_hand = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(1 / (2 + math.e))) / 2
    assert Likelihood.loss(logits, target, weight=3.0).item() == pytest.approx(3 * by_hand, rel=1e-6)
    empty = Likelihood.loss(logits[:0], target[:0])
    assert empty.item() == 0.0 and empty.requires_grad


def test_temperature_is_clamped_and_learnable():
    lik = Likelihood(init_temperature=0.07)
    with torch.no_grad():
        lik.log_inv_tau.fill_(50.0)
    assert lik.temperature.item() == pytest.approx(0.01, rel=1e-5)
    lik = Likelihood(init_temperature=0.07)
    g = torch.Generator().manual_seed(0)
    logits = lik(F.normalize(torch.randn(4, 8, generator=g), dim=-1), torch.randn(3, 8, generator=g))
    objective = random_projection(logits)
    objective.backward()
    # logits = cos / tau = cos * exp(log_inv_tau): d objective / d log_inv_tau = objective itself
    assert abs(objective.item()) > 1.0
    torch.testing.assert_close(lik.log_inv_tau.grad, objective.detach(), rtol=1e-5, atol=1e-6)
    # clamped (tau at its 0.01 floor): the temperature no longer learns
    lik.zero_grad()
    with torch.no_grad():
        lik.log_inv_tau.fill_(50.0)
    random_projection(lik(F.normalize(torch.randn(4, 8, generator=g), dim=-1), torch.randn(3, 8, generator=g))).backward()
    assert lik.log_inv_tau.grad == 0


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="INIT_TEMPERATURE"):
        Likelihood(init_temperature=0.0)
