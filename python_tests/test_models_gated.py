"""Channel-gated networks of the batch-shaping paper: ChannelGate, GateLosses, the gated ResNets,
their MAC counting, set_gate_density and optimize_for_inference."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import condkernels
from condkernels.models import (
    GatedBasicBlock, resnet18_bas, resnet20, resnet20_bas, resnet32, resnet32_bas, resnet34, resnet34_bas,
    resnet50, resnet50_bas, resnet56, resnet56_bas,
)
from condkernels.nn import ChannelGate, GatedConv2d, GateLosses
from condkernels.utils import conditional_macs, count_macs, count_params, set_gate_density
from condkernels.utils.flops import gated_conv2d_macs

TAU = 2.0 / 3.0


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (2-d and 1-d BN), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def half_open_gates(model: nn.Module) -> None:
    """Gate biases at 0, so that eval gates depend on the input and about half are closed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChannelGate):
                m.fc2.bias.zero_()


def gate_outputs(model: nn.Module, x: torch.Tensor) -> list:
    outs = []
    handles = [m.register_forward_hook(lambda mod, i, o: outs.append(o.detach().clone()))
               for m in model.modules() if isinstance(m, ChannelGate)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


# --- ChannelGate ---------------------------------------------------------------------------------


def test_channel_gate_init_opens_gates():
    gate = ChannelGate(8, 12).eval()
    assert torch.all(gate.fc2.bias == 3.0)
    assert gate(torch.randn(4, 8, 3, 3)).mean() > 0.9


def test_channel_gate_eval_is_deterministic_threshold():
    torch.manual_seed(0)
    gate = ChannelGate(8, 12)
    randomize_batchnorm(gate)
    with torch.no_grad():
        gate.fc2.bias.zero_()
    gate.eval()
    x = torch.randn(5, 8, 4, 4)
    a, b = gate(x), gate(x)
    assert torch.equal(a, b)
    pooled = x.double().mean((2, 3))
    h = pooled @ gate.fc1.weight.double().T + gate.fc1.bias.double()
    bn = gate.bn
    h = (h - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    h = h * bn.weight.double() + bn.bias.double()
    logits = torch.relu(h) @ gate.fc2.weight.double().T + gate.fc2.bias.double()
    assert torch.equal(a, (logits > 0).float())
    assert 0 < a.mean() < 1


def test_channel_gate_training_hard_with_straight_through_gradient():
    torch.manual_seed(0)
    gate = ChannelGate(6, 10).train()
    with torch.no_grad():
        gate.fc2.bias.zero_()
    x = torch.randn(7, 6, 3, 3)
    torch.manual_seed(123)
    g = gate(x)
    logits = gate.last_logits.detach().double()
    torch.manual_seed(123)  # the same uniform noise as the forward drew
    u = torch.rand(logits.shape, dtype=torch.float32).double()
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / TAU)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(g, (soft > 0.5).float())
    w = torch.randn(g.shape, dtype=torch.float64)
    (g * w.float()).sum().backward()
    # d/d bias_c of sum_b w_bc * gate_bc, gate's backward being that of sigmoid((l + noise) / tau)
    expected = (w * soft * (1 - soft) / TAU).sum(0)
    torch.testing.assert_close(gate.fc2.bias.grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_channel_gate_records_probabilities_and_open_fraction():
    torch.manual_seed(0)
    gate = ChannelGate(6, 10).train()
    g = gate(torch.randn(4, 6, 2, 2))
    assert gate.last_probability.requires_grad
    torch.testing.assert_close(gate.last_probability, torch.sigmoid(gate.last_logits))
    assert not gate.last_open_fraction.requires_grad
    assert gate.last_open_fraction.item() == pytest.approx(g.mean().item())


def test_force_density_exact_deterministic_any_batch():
    gate = ChannelGate(4, 20).eval()
    gate.force_density(0.3, seed=7)
    x = torch.randn(9, 4, 2, 2)
    a = gate(x)
    assert torch.all(a.sum(1) == 6)
    assert torch.equal(gate(x[:4]), a[:4])  # row b depends on (seed, b) only
    assert len({tuple(r.tolist()) for r in a}) > 1  # examples differ
    gate.force_density(0.3, seed=8)
    assert not torch.equal(gate(x), a)
    gate.train()
    gate.force_density(0.3, seed=7)
    assert torch.equal(gate(x), a)  # the forced masks ignore the mode
    gate.force_density(None)
    gate.eval()
    assert torch.all(gate(x) == 1)  # learned gates again (bias 3: open)
    for d in (0.0, 1.0):
        gate.force_density(d)
        assert torch.all(gate(x) == d)


def test_force_density_spreads_over_channels():
    gate = ChannelGate(4, 16).eval()
    gate.force_density(0.5)
    use = gate(torch.randn(256, 4, 1, 1)).mean(0)
    assert use.min() > 0.3 and use.max() < 0.7


# --- GateLosses ----------------------------------------------------------------------------------


def batch_shaping_scipy(p: np.ndarray, a=0.6, b=0.4, eps=1e-6) -> float:
    """Eq. 2 per gate column, float64, with scipy's Beta CDF."""
    n = p.shape[0]
    target = np.arange(1, n + 1)[:, None] / (n + 1)
    cdf = stats.beta.cdf(np.clip(np.sort(p, axis=0), eps, 1 - eps), a, b)
    return float(((target - cdf) ** 2).sum() / n)


@pytest.mark.parametrize("epoch", [0.0, 50.0, 99.5, 150.0, 400.0])
def test_gate_losses_against_direct_computation(epoch):
    torch.manual_seed(0)
    model = resnet20_bas().train()
    half_open_gates(model)
    model(torch.randn(8, 3, 8, 8))
    collector = GateLosses(model, l0_gamma=0.05)
    losses = collector(epoch)
    gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
    assert len(gates) == 9
    lam = 0.75 * max(0.0, 1 - epoch / 100.0)
    gamma = 0.0 if epoch < 100 else 0.05 * min(1.0, (epoch - 100.0) / 200.0)
    bs = sum(batch_shaping_scipy(torch.sigmoid(g.last_logits).detach().double().numpy()) for g in gates)
    l0 = sum(torch.sigmoid(g.last_logits.detach().double()).sum().item() for g in gates) / 8
    assert losses["batch_shaping"].item() == pytest.approx(lam * bs, rel=1e-4, abs=1e-7)
    assert losses["l0"].item() == pytest.approx(gamma * l0, rel=1e-5, abs=1e-9)
    total = losses["batch_shaping"] + losses["l0"]
    assert total.requires_grad
    total.backward()
    grad = gates[0].fc2.bias.grad
    assert grad is not None and (grad.abs().sum() > 0) == (lam > 0 or gamma > 0)


def test_gate_losses_density_and_errors():
    torch.manual_seed(0)
    model = resnet20_bas().eval()
    half_open_gates(model)
    collector = GateLosses(model)
    with pytest.raises(RuntimeError, match="forward"):
        collector(0.0)
    outs = gate_outputs(model, torch.randn(4, 3, 8, 8))
    expected = sum(o.sum().item() for o in outs) / sum(o.numel() for o in outs)
    assert collector.density() == pytest.approx(expected)
    assert 0.05 < expected < 0.95
    with pytest.raises(ValueError, match="ChannelGate"):
        GateLosses(resnet20())
    with pytest.raises(ValueError, match="anneal_epochs"):
        GateLosses(model, bs_anneal_epochs=0.0)
    with pytest.raises(ValueError, match="full_epoch"):
        GateLosses(model, l0_start_epoch=10.0, l0_full_epoch=5.0)


# --- builders ------------------------------------------------------------------------------------

CIFAR = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet20_bas": resnet20_bas,
         "resnet32_bas": resnet32_bas, "resnet56_bas": resnet56_bas,
         "resnet20_bas_B_w2": lambda num_classes: resnet20_bas(num_classes, width=2, shortcut="B")}
IMAGENET = {"resnet18_bas": resnet18_bas, "resnet34_bas": resnet34_bas, "resnet50_bas": resnet50_bas}


@pytest.mark.parametrize("name", list(CIFAR) + list(IMAGENET))
def test_builder_forward_and_backward(name):
    torch.manual_seed(0)
    build, size = (CIFAR[name], 8) if name in CIFAR else (IMAGENET[name], 32)
    model = build(num_classes=10)
    y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"


def test_cifar_layout():
    model = resnet20()
    assert count_params(model) == 269722  # He et al.: 0.27M
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert len(resnet56_bas().layer2) == 9
    assert resnet20(width=2).layer3[0].conv1.out_channels == 128
    block = resnet20_bas().layer2[0]
    assert isinstance(block, GatedBasicBlock) and block.gate.in_channels == 16 and block.gate.gated_channels == 32
    bottleneck = resnet50_bas().layer3[0]
    assert bottleneck.gate.gated_channels == bottleneck.conv1.out_channels == 256


def test_gate_feeds_both_convs_in_eval_only():
    """Eval: the gate is conv1's out_gate and conv2's in_gate (conv1 skips what conv2 would);
    training: conv2's in_gate only (batch BN statistics and the gate's gradient need conv1's all)."""
    torch.manual_seed(0)
    model = resnet20_bas()
    block = model.layer1[0]
    seen = {}
    block.conv1.register_forward_hook(lambda m, a, o: seen.__setitem__("conv1", a))
    block.conv2.register_forward_hook(lambda m, a, o: seen.__setitem__("conv2", a))
    for training in (True, False):
        model.train(training)
        model(torch.randn(2, 3, 8, 8))
        assert seen["conv2"][1] is not None
        assert (seen["conv1"][2] is not None) == (not training)
        if not training:
            assert torch.equal(seen["conv1"][2], seen["conv2"][1])


# --- optimize_for_inference ----------------------------------------------------------------------


@pytest.mark.parametrize("name,size,forced", [
    ("resnet20_bas", 8, False), ("resnet20_bas", 8, True), ("resnet20_bas_B_w2", 8, False),
    ("resnet18_bas", 32, False), ("resnet18_bas", 32, True), ("resnet50_bas", 32, False),
])
def test_optimize_for_inference_equals_eval(name, size, forced):
    torch.manual_seed(0)
    model = (CIFAR.get(name) or IMAGENET[name])(num_classes=10)
    randomize_batchnorm(model)
    half_open_gates(model)
    if forced:
        set_gate_density(model, 0.4, seed=3)
    model.eval()
    x = torch.randn(2, 3, size, size)
    fast = condkernels.optimize_for_inference(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in fast.modules())  # gates' too
    assert fast.layer1[0].conv1.bias is not None
    with torch.no_grad():
        gates_ref, gates_fast = gate_outputs(model, x), gate_outputs(fast, x)
        density = torch.cat([g.flatten() for g in gates_ref]).mean().item()
        assert 0.1 < density < 0.9, density  # gates partly closed
        assert all(torch.equal(a, b) for a, b in zip(gates_ref, gates_fast))
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


# --- set_gate_density and MAC counting -----------------------------------------------------------


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_set_gate_density_before_and_after_optimize(density):
    torch.manual_seed(0)
    model = resnet20_bas().eval()
    x = torch.randn(3, 3, 8, 8)
    assert set_gate_density(model, density, seed=1) == 9
    before = condkernels.optimize_for_inference(model)  # set, then optimized
    after = condkernels.optimize_for_inference(resnet20_bas())
    after.load_state_dict(before.state_dict())
    assert set_gate_density(after, density, seed=1) == 9  # optimized, then set
    for net in (model, before, after):
        outs = gate_outputs(net, x)
        for o in outs:
            assert torch.all(o.sum(1) == round(density * o.shape[1]))
        assert GateLosses(net).density() == pytest.approx(density)
    with torch.no_grad():
        torch.testing.assert_close(before(x), after(x))
    assert conditional_macs(before, x) == conditional_macs(after, x) == conditional_macs(model, x)
    set_gate_density(model, None)
    assert GateLosses(model).gates[0].forced_density is None


def resnet20_bas_macs_by_hand(density: float, hw: int = 8, classes: int = 10) -> int:
    """Per-example MACs of resnet20_bas at a forced density: stem, blocks (gate linears, conv1 with
    k = round(d * c) open outputs, conv2 with k open inputs), classifier."""
    total = 3 * 16 * 9 * hw * hw
    cin = 16
    for c, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            if i == 0:
                hw //= stride
            k = round(density * c)
            total += cin * 16 + 16 * c  # the gate's two linear layers
            total += cin * k * 9 * hw * hw + k * c * 9 * hw * hw
            cin = c
    return total + 64 * classes


@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_conditional_macs_by_hand(density):
    torch.manual_seed(0)
    model = resnet20_bas()
    set_gate_density(model, density)
    x = torch.randn(4, 3, 8, 8)
    assert conditional_macs(model, x) == resnet20_bas_macs_by_hand(density)
    assert conditional_macs(condkernels.optimize_for_inference(model), x) == resnet20_bas_macs_by_hand(density)


def test_count_macs_keeps_its_meaning():
    torch.manual_seed(0)
    model = resnet20_bas()
    assert count_macs(model, (3, 8, 8)) == resnet20_bas_macs_by_hand(1.0)  # fresh gates: open
    half_open_gates(model)
    randomize_batchnorm(model)
    zeros = torch.zeros(1, 3, 8, 8)
    assert count_macs(model, (3, 8, 8)) == conditional_macs(model, zeros) < resnet20_bas_macs_by_hand(1.0)
    assert not model.layer1[0].training or model.training  # modes restored


@pytest.mark.parametrize("plain,gated", [(resnet34, resnet34_bas), (resnet50, resnet50_bas)])
def test_dense_macs_equal_plain_plus_gates(plain, gated):
    with torch.device("meta"):
        p, g = plain(), gated()
    gates = [m for m in g.modules() if isinstance(m, ChannelGate)]
    gate_macs = sum(m.in_channels * 16 + 16 * m.gated_channels for m in gates)
    gate_params = sum(m.in_channels * 16 + 16 + 2 * 16 + 16 * m.gated_channels + m.gated_channels for m in gates)
    assert count_macs(g) == count_macs(p) + gate_macs
    assert count_params(g) == count_params(p) + gate_params


def test_dense_macs_resnet34_bas_real_weights_at_density_one():
    torch.manual_seed(0)
    model = resnet34_bas(num_classes=10)
    half_open_gates(model)
    set_gate_density(model, 1.0)
    gate_macs = sum(m.in_channels * 16 + 16 * m.gated_channels for m in model.modules() if isinstance(m, ChannelGate))
    x = torch.randn(1, 3, 32, 32)
    assert conditional_macs(model, x) == count_macs(resnet34(num_classes=10), (3, 32, 32)) + gate_macs


def test_gated_conv_mac_rule_groups_and_keywords():
    conv = GatedConv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    in_gate = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    out_gate = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    y = conv(x, in_gate, out_gate)
    # per example, per group: open in x open out x 9 x 25
    expected = ((1 * 3 + 2 * 1) + (0 * 0 + 1 * 3)) * 9 * 25
    assert gated_conv2d_macs(conv, (x, in_gate, out_gate), y) == expected
    assert gated_conv2d_macs(conv, (x,), y) == 2 * 6 * 2 * 9 * 25

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x, out_gate=out_gate, in_gate=in_gate)  # keywords reach the rule too

    assert conditional_macs(Wrap(), x) == expected / 2


# --- serialisation, compilation, export ----------------------------------------------------------


def test_state_dict_round_trip_and_plain_weights_load():
    torch.manual_seed(0)
    model = resnet20_bas()
    randomize_batchnorm(model)
    half_open_gates(model)
    model.eval()
    copy = resnet20_bas().eval()
    copy.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
    result = resnet20_bas().load_state_dict(resnet20().state_dict(), strict=False)
    assert not result.unexpected_keys and all(".gate." in k for k in result.missing_keys)


def test_compile_and_export_equal_eager():
    torch.manual_seed(0)
    model = resnet20_bas()
    randomize_batchnorm(model)
    half_open_gates(model)
    model = condkernels.optimize_for_inference(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        exported = torch.export.export(model, (x,)).module()(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-6)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="x must be"):
        ChannelGate(8, 4)(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="gated_channels"):
        ChannelGate(8, 0)
    with pytest.raises(ValueError, match="GatedConv2d: kernel_size must be positive"):
        GatedConv2d(4, 8, (3, 0))
    with pytest.raises(ValueError, match="tau"):
        ChannelGate(8, 4, tau=0.0)
    with pytest.raises(ValueError, match="density"):
        ChannelGate(8, 4).force_density(1.5)
    with pytest.raises(ValueError, match="seed"):
        ChannelGate(8, 4).force_density(0.5, seed=0.5)
    with pytest.raises(ValueError, match="shortcut"):
        resnet20_bas(shortcut="C")
    with pytest.raises(ValueError, match="width"):
        resnet20_bas(width=0)
    with pytest.raises(ValueError, match="width"):
        resnet34_bas(width=-1.0)
    with pytest.raises(ValueError, match="num_experts"):
        GatedBasicBlock(8, 8, num_experts=2)
    with pytest.raises(ValueError, match="density"):
        set_gate_density(resnet20_bas(), 2.0)
    with pytest.raises(TypeError, match="model"):
        set_gate_density("resnet", 0.5)
    with pytest.raises(ValueError, match="x must be"):
        conditional_macs(resnet20_bas(), torch.randn(3, 8, 8))
    assert set_gate_density(resnet20(), 0.5) == 0  # no gates: nothing set


def test_set_gate_density_reaches_deepmoe_gates():
    from condkernels.models import deepmoe_resnet56
    from condkernels.nn import DeepMoELosses, gate_heads

    torch.manual_seed(0)
    model = deepmoe_resnet56(wide=True).eval()
    x = torch.randn(3, 3, 8, 8)
    assert set_gate_density(model, 0.5, seed=2) == len(gate_heads(model)) > 0
    fast = condkernels.optimize_for_inference(model)
    for net in (model, fast):
        with torch.no_grad():
            net(x)
        assert DeepMoELosses(net).density() == pytest.approx(0.5)
    half = conditional_macs(fast, x)
    set_gate_density(fast, 1.0)
    assert half < conditional_macs(fast, x)


def test_inference_max_pool_is_channels_last_and_exact():
    from condkernels.inference import ChannelsLastMaxPool2d

    net = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True))
    opt = condkernels.optimize_for_inference(net)
    assert all(type(m) is ChannelsLastMaxPool2d for m in opt)
    assert all(type(m) is nn.MaxPool2d for m in net)  # the original is left as it is
    x = torch.randn(2, 5, 13, 11)
    x[0, 1, 3, 4] = float("nan")
    x[1, 2] = float("-inf")
    want = net(x)
    got = opt(x)
    assert got.is_contiguous() and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    cl = x.contiguous(memory_format=torch.channels_last)
    got_cl = opt(cl)
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got_cl.nan_to_num(0.0), want.nan_to_num(0.0))
