"""Binary-concrete gates, the L0 gate loss and the schedules of the batch-shaping paper."""

import math

import pytest
import torch

import condkernels


def test_training_gate_is_hard_with_sigmoid_backward():
    logits = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    gate = condkernels.binary_concrete_gate(logits, tau=2 / 3, generator=gen)
    assert set(gate.detach().unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn_like(gate)
    (gate * weights).sum().backward()
    # the same noise, by hand: backward of sigmoid((logits + noise) / tau)
    u = torch.rand(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(3))
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits.detach() + noise) / (2 / 3))
    torch.testing.assert_close(gate.detach(), (soft > 0.5).double())
    torch.testing.assert_close(logits.grad, weights * soft * (1 - soft) / (2 / 3))


def test_training_gate_opens_with_probability_sigmoid_logits():
    logits = torch.full((200000,), 0.8, dtype=torch.float64)
    gate = condkernels.binary_concrete_gate(logits, generator=torch.Generator().manual_seed(0))
    assert gate.mean().item() == pytest.approx(1 / (1 + math.exp(-0.8)), abs=5e-3)


def test_soft_training_gate_and_inference():
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0])
    soft = condkernels.binary_concrete_gate(logits, hard=False, generator=torch.Generator().manual_seed(1))
    assert ((soft > 0) & (soft < 1)).all()
    # inference: deterministic, no noise
    for _ in range(3):
        torch.testing.assert_close(condkernels.binary_concrete_gate(logits, training=False),
                                   torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(condkernels.binary_concrete_gate(logits, tau=0.5, hard=False, training=False),
                               torch.sigmoid(logits / 0.5))


def test_gate_probability_is_the_soft_value():
    logits = torch.randn(10, 3)
    torch.testing.assert_close(condkernels.gate_probability(logits), torch.sigmoid(logits))


@pytest.mark.parametrize("reduction,divisor", [("mean_over_batch", 6), ("sum", 1)])
def test_l0_gate_loss(reduction, divisor):
    logits = torch.randn(6, 4, 2, dtype=torch.float64, requires_grad=True)
    loss = condkernels.l0_gate_loss(logits, gamma=0.05, reduction=reduction)
    torch.testing.assert_close(loss, 0.05 * torch.sigmoid(logits).sum() / divisor)
    loss.backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, 0.05 * s * (1 - s) / divisor)


def test_schedules_follow_the_paper():
    # CIFAR-10: lambda 0.75 -> 0 by epoch 100; L0 from epoch 100, full at 300
    assert condkernels.batch_shaping_lambda(0, 100) == 0.75
    assert condkernels.batch_shaping_lambda(50, 100) == pytest.approx(0.375)
    assert condkernels.batch_shaping_lambda(100, 100) == 0.0
    assert condkernels.batch_shaping_lambda(250, 100) == 0.0
    assert condkernels.l0_gamma(99.5, 0.1, 100, 300) == 0.0
    assert condkernels.l0_gamma(100, 0.1, 100, 300) == 0.0
    assert condkernels.l0_gamma(200, 0.1, 100, 300) == pytest.approx(0.05)
    assert condkernels.l0_gamma(300, 0.1, 100, 300) == pytest.approx(0.1)
    assert condkernels.l0_gamma(450, 0.1, 100, 300) == pytest.approx(0.1)
    assert condkernels.l0_gamma(30, 0.2, 30, 30) == 0.2  # no warm-up


@pytest.mark.parametrize("call,message", [
    (lambda: condkernels.binary_concrete_gate(torch.zeros(3), tau=0), "tau must be a positive"),
    (lambda: condkernels.binary_concrete_gate(torch.zeros(3, dtype=torch.long)), "logits must be a floating point"),
    (lambda: condkernels.l0_gate_loss(torch.zeros(3), gamma=-1), "gamma must be a non-negative"),
    (lambda: condkernels.l0_gate_loss(torch.zeros(3), gamma=1, reduction="mean"), "reduction must be one of"),
    (lambda: condkernels.batch_shaping_lambda(-1, 100), "epoch must be a non-negative"),
    (lambda: condkernels.batch_shaping_lambda(1, 0), "anneal_epochs must be positive"),
    (lambda: condkernels.l0_gamma(1, 0.1, 300, 100), "must not come before start_epoch"),
])
def test_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
