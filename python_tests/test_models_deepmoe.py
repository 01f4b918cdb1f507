"""DeepMoE: the shallow embedding network, the ReLU gate heads, the losses, freezing and forced
densities (condkernels.nn.deepmoe), the DeepMoE ResNets and VGG-16 (condkernels.models.deepmoe),
their optimize_for_inference rules and their sizes against the paper."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condkernels
from condkernels.models import (
    Bottleneck, DeepMoEBasicBlock, DeepMoEBottleneck, ResNet, deepmoe_resnet18, deepmoe_resnet34,
    deepmoe_resnet50, deepmoe_resnet56, deepmoe_resnet110, deepmoe_vgg16, resnet18,
)
from condkernels.nn import DeepMoELosses, GatedConv2d, GateHead, ShallowEmbedding, freeze_gates, gate_heads
from condkernels.utils import MAC_RULES, count_macs, count_params, macs_by_module
from condkernels.utils.flops import conv2d_macs

# Reduced widths; CIFAR nets at 16x16, ImageNet nets and VGG (five 2x2 pools) at 32x32.
BUILDERS = {
    "resnet56": (lambda wide: deepmoe_resnet56(10, wide, base_width=4, embed_width=4), 16),
    "resnet110": (lambda wide: deepmoe_resnet110(10, wide, base_width=2, embed_width=4), 16),
    "resnet18": (lambda wide: deepmoe_resnet18(10, wide, base_width=8, embed_width=4), 32),
    "resnet34": (lambda wide: deepmoe_resnet34(10, wide, base_width=4, embed_width=4), 32),
    "resnet50_A": (lambda wide: deepmoe_resnet50(10, wide, base_width=4, embed_width=4), 32),
    "resnet50_B": (lambda wide: deepmoe_resnet50(10, wide, bottleneck="B", base_width=4, embed_width=4), 32),
    "vgg16": (lambda wide: deepmoe_vgg16(10, wide, base_width=8, embed_width=4), 32),
}
# ResNet-110 has ResNet-56's blocks, twice as many: only its narrow form runs, to keep tests short.
CASES = [pytest.param(name, wide, id=f"{name}-{'wide' if wide else 'narrow'}")
         for name in BUILDERS for wide in (False, True) if not (name == "resnet110" and wide)]
INFERENCE_CASES = [case for case in CASES if case.values[0] != "resnet110"]


def build(name, wide=False, seed=0):
    torch.manual_seed(seed)
    make, size = BUILDERS[name]
    return make(wide), size


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


# --- embedding network and gate heads ------------------------------------------------------------


@pytest.mark.parametrize("num_layers, size", [(4, 32), (5, 64)])
def test_shallow_embedding_shapes(num_layers, size):
    emb = ShallowEmbedding(num_classes=7, num_layers=num_layers, width=4)
    convs = [m for m in emb.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == num_layers
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    assert emb.embed_dim == 4 * 2 ** (num_layers - 1)
    x = torch.randn(2, 3, size, size)
    fmap = emb.features(x)
    assert fmap.shape == (2, emb.embed_dim, size >> num_layers, size >> num_layers)
    e = emb(x)
    assert e.shape == (2, emb.embed_dim)
    assert torch.allclose(e, fmap.mean((2, 3)), atol=1e-6)
    assert emb.last_logits.shape == (2, 7)
    assert torch.allclose(emb.last_logits, e @ emb.classifier.weight.T + emb.classifier.bias, atol=1e-6)


def test_gate_head_is_relu_of_linear_map_of_embedding():
    torch.manual_seed(0)
    head = GateHead(embed_dim=12, channels=9)
    e = torch.randn(5, 12)
    g = head(e)
    want = torch.clamp(e.double() @ head.proj.weight.double().T, min=0)
    assert torch.allclose(g.double(), want, atol=1e-6)
    assert (g == 0).any() and (g > 0).any()  # a real mix of closed and open gates
    assert head.last_gate is g and g.requires_grad
    assert head.open_fraction.item() == pytest.approx((want > 0).double().mean().item())


def test_blocks_feed_their_gates_to_the_gated_convolutions():
    model, size = build("resnet50_A", wide=True)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[1]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, GatedConv2d):
            m.register_forward_hook(record(name))
    x = torch.randn(2, 3, size, size)
    model(x)
    e = model.embedding(x)
    block = model.layer2[1]
    for conv, head in (("conv2", block.gate2), ("conv3", block.gate3)):
        want = torch.clamp(e.double() @ head.proj.weight.double().T, min=0)
        assert torch.allclose(seen[f"layer2.1.{conv}"].double(), want, atol=1e-5)


def test_basic_block_equals_dense_masked_computation():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
    block = DeepMoEBasicBlock(4, 6, 2, down, embed_dim=5, wide=True).double()
    randomize_batchnorm(block)
    block.eval()
    x, e = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    y = block(x, e)
    g = torch.clamp(e @ block.gate2.proj.weight.T, min=0)
    assert (g == 0).any()
    h = F.relu(block.bn1(F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    h = block.bn2(F.conv2d(h * g[:, :, None, None], block.conv2.weight, padding=1))
    want = F.relu(h + down(x))
    assert torch.allclose(y, want, atol=1e-10)


def test_bottleneck_A_equals_dense_masked_computation():
    torch.manual_seed(1)
    block = DeepMoEBottleneck(16, 4, 1, None, embed_dim=5, wide=True, variant="A").double()
    randomize_batchnorm(block)
    block.eval()
    x, e = torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    g2 = torch.clamp(e @ block.gate2.proj.weight.T, min=0)[:, :, None, None]
    g3 = torch.clamp(e @ block.gate3.proj.weight.T, min=0)[:, :, None, None]
    h = F.relu(block.bn1(F.conv2d(x, block.conv1.weight)))
    h = F.relu(block.bn2(F.conv2d(h * g2, block.conv2.weight, padding=1)))
    want = F.relu(block.bn3(F.conv2d(h * g3, block.conv3.weight)) + x)
    assert torch.allclose(block(x, e), want, atol=1e-10)


@pytest.mark.parametrize("variant, gated, mid", [("A", 2, (8, 8)), ("B", 1, (8, 4))])
def test_bottleneck_variants_widen_and_gate_the_documented_layers(variant, gated, mid):
    block = DeepMoEBottleneck(16, 4, 1, None, embed_dim=5, wide=True, variant=variant)
    assert len(gate_heads(block)) == gated
    assert (block.conv1.out_channels, block.conv2.out_channels) == mid
    assert block.conv3.out_channels == 16
    assert isinstance(block.conv3, GatedConv2d) == (variant == "A")


# --- losses, freezing, forced densities ----------------------------------------------------------


def test_losses_against_direct_computation():
    model, size = build("resnet56", wide=True)
    x, target = torch.randn(3, 3, size, size), torch.tensor([1, 7, 3])
    model(x)
    losses = DeepMoELosses(model, lam=0.3, mu=0.7)
    out = losses(target)
    gates = [h.last_gate.double() for h in gate_heads(model)]
    assert len(gates) == 27
    l1 = sum(g.abs().sum() for g in gates) / 3
    assert out["gate_l1"].item() == pytest.approx(0.3 * l1.item(), rel=1e-6)
    logits = model.embedding.last_logits.double()
    ce = -(logits.log_softmax(1)[torch.arange(3), target]).mean()
    assert out["embedding_ce"].item() == pytest.approx(0.7 * ce.item(), rel=1e-6)
    opened = sum((g != 0).sum().item() for g in gates) / sum(g.numel() for g in gates)
    assert losses.density() == pytest.approx(opened)
    assert 0.0 < losses.density() < 1.0
    # Both terms reach their sub-networks.
    (out["gate_l1"] + out["embedding_ce"]).backward()
    assert model.layer1[0].gate2.proj.weight.grad.abs().sum() > 0
    assert model.embedding.classifier.weight.grad.abs().sum() > 0


def test_freeze_gates_freezes_embedding_and_heads():
    model, size = build("resnet18", wide=True)
    freeze_gates(model)
    model.train()
    assert not model.embedding.training  # BatchNorm on running statistics
    gating = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("embedding") or ".gate" in n}
    stats = model.embedding.features[1].running_mean.clone()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in gating}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    y = model(x)
    terms = DeepMoELosses(model, lam=1.0, mu=1.0)(target)
    (F.cross_entropy(y, target) + terms["gate_l1"] + terms["embedding_ce"]).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in gating:
            assert p.grad is None and torch.equal(p, gating[n]), n
    assert torch.equal(model.embedding.features[1].running_mean, stats)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    # An example's gates no longer depend on the rest of the batch.
    g_pair = model.layer1[0].gate2(model.embedding(x))
    g_one = model.layer1[0].gate2(model.embedding(x[:1]))
    assert torch.allclose(g_pair[:1], g_one, atol=1e-6)
    freeze_gates(model, frozen=False)
    model.train()
    assert model.embedding.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_force_density_gives_the_requested_open_fraction(density):
    model, size = build("resnet56", wide=True)
    for head in gate_heads(model):
        head.force_density(density, seed=3)
    model(torch.randn(5, 3, size, size))
    for head in gate_heads(model):
        per_example = (head.last_gate != 0).double().mean(1)
        want = round(density * head.channels) / head.channels
        assert torch.allclose(per_example, torch.full_like(per_example, want))
        assert set(head.last_gate.unique().tolist()) <= {0.0, 1.0}
    assert DeepMoELosses(model).density() == pytest.approx(density)


def test_force_density_is_deterministic_per_example_and_restorable():
    head = GateHead(embed_dim=4, channels=32, index=2)
    head.force_density(0.5, seed=7)
    big = head(torch.randn(6, 4)).clone()
    small = head(torch.randn(2, 4))
    assert torch.equal(big[:2], small)  # same masks for any batch size
    assert not torch.equal(big[0], big[1])  # per example
    other = GateHead(embed_dim=4, channels=32, index=3)
    other.force_density(0.5, seed=7)
    assert not torch.equal(other(torch.randn(6, 4)), big)  # per head
    head.force_density(0.5, seed=8)
    assert not torch.equal(head(torch.randn(6, 4)), big)  # per seed
    head.force_density(None)
    e = torch.randn(3, 4)
    assert torch.allclose(head(e), torch.relu(head.proj(e)))


# --- every builder -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, wide", CASES)
def test_builder_forward_and_backward(name, wide):
    model, size = build(name, wide)
    x, target = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert model.embedding.last_logits.shape == (2, 10)
    terms = DeepMoELosses(model)(target)
    (F.cross_entropy(y, target) + terms["gate_l1"] + terms["embedding_ce"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"


def test_wide_doubles_the_gated_channels_only():
    narrow, _ = build("resnet56", False)
    wide, _ = build("resnet56", True)
    for a, b in zip(gate_heads(narrow), gate_heads(wide)):
        assert b.channels == 2 * a.channels
    assert wide.fc.in_features == narrow.fc.in_features  # the residual stream keeps its width
    vn, _ = build("vgg16", False)
    vw, _ = build("vgg16", True)
    assert len(gate_heads(vn)) == 12  # inputs of convolutions 2..13
    assert [h.channels for h in gate_heads(vw)] == [2 * h.channels for h in gate_heads(vn)]


@pytest.mark.parametrize("name, wide", INFERENCE_CASES)
def test_optimize_for_inference_matches_eval(name, wide):
    model, size = build(name, wide)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
    fast = condkernels.optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in fast.named_modules() if not n.startswith("embedding."))
    assert torch.allclose(fast(x), want, rtol=1e-4, atol=1e-5)
    # With gates forced half shut, the producing convolutions skip the closed channels too.
    for m in (model, fast):
        for head in gate_heads(m):
            head.force_density(0.5, seed=1)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_optimized_block_gates_its_producer():
    model, size = build("resnet18", wide=True)
    randomize_batchnorm(model)
    fast = condkernels.optimize_for_inference(model)
    block = fast.layer1[0]
    assert block.gates_at_producer and isinstance(block.conv1, GatedConv2d)
    seen = {}
    block.conv1.register_forward_hook(lambda m, i, o: seen.update(out_gate=i[2], y=o))
    block.conv2.register_forward_hook(lambda m, i, o: seen.update(in_gate=i[1]))
    fast(torch.randn(2, 3, size, size))
    g = block.gate2.last_gate
    assert torch.equal(seen["out_gate"], g)
    assert torch.equal(seen["in_gate"], (g != 0).float())
    closed = (g == 0)[:, :, None, None].expand_as(seen["y"])
    assert (seen["y"][closed] == 0).all()


@pytest.mark.parametrize("name", ["resnet56", "resnet50_B", "vgg16"])
def test_state_dict_round_trip(name):
    model, size = build(name, True, seed=0)
    randomize_batchnorm(model)
    copy, _ = build(name, True, seed=1)
    copy.load_state_dict(model.state_dict())
    model.eval(), copy.eval()
    x = torch.randn(2, 3, size, size)
    assert torch.equal(model(x), copy(x))
    assert not any("last" in k for k in model.state_dict())


# --- sizes against the paper ---------------------------------------------------------------------


@pytest.fixture
def dense_gated_count(monkeypatch):
    """Counts a GatedConv2d as its dense convolution (every channel open), for these checks only."""
    monkeypatch.setitem(MAC_RULES, GatedConv2d, conv2d_macs)


def test_narrow_resnet18_is_resnet18_plus_gating(dense_gated_count):
    with torch.device("meta"):
        base, model = resnet18(), deepmoe_resnet18()
    gating = count_params(model.embedding) + sum(count_params(h) for h in gate_heads(model))
    assert count_params(model) == count_params(base) + gating
    for head in gate_heads(model):
        head.force_density(1.0)
    by_module = macs_by_module(model, (3, 224, 224))
    emb = sum(v for k, v in by_module.items() if k.startswith("embedding"))
    heads = sum(v for k, v in by_module.items() if ".gate" in k)
    assert sum(by_module.values()) == count_macs(base, (3, 224, 224)) + emb + heads
    # "roughly 2% of the computation of the base models": 3.5% of ResNet-18 with these widths.
    assert 0.01 < emb / count_macs(base, (3, 224, 224)) < 0.04


def test_wide_resnet50_B_parameters_against_resnet101():
    # Paper 5.1.2: wide-DeepMoE-50 with bottleneck-B has "6% less parameters" than ResNet-101.
    with torch.device("meta"):
        wide = deepmoe_resnet50(wide=True, bottleneck="B")
        r101 = ResNet(Bottleneck, (3, 4, 23, 3))
    gating = count_params(wide.embedding) + sum(count_params(h) for h in gate_heads(wide))
    ratio = (count_params(wide) - gating) / count_params(r101)
    assert 0.90 < ratio < 0.96, ratio  # 0.925: base network without the gating


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_errors():
    model, size = build("resnet56")
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 1, size, size))
    with pytest.raises(RuntimeError, match="forward"):
        DeepMoELosses(model)(torch.tensor([0, 1]))
    model(torch.randn(2, 3, size, size))
    with pytest.raises(ValueError, match="target"):
        DeepMoELosses(model)(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lam"):
        DeepMoELosses(model, lam=-1.0)
    with pytest.raises(ValueError, match="ShallowEmbedding"):
        DeepMoELosses(resnet18(num_classes=2))
    with pytest.raises(ValueError, match="freeze_gates"):
        freeze_gates(nn.Linear(2, 2))
    head = gate_heads(model)[0]
    with pytest.raises(ValueError, match="density"):
        head.force_density(1.5)
    with pytest.raises(ValueError, match="e must be"):
        head(torch.randn(2, head.embed_dim + 1))
    with pytest.raises(ValueError, match="bottleneck"):
        deepmoe_resnet50(bottleneck="C")
    with pytest.raises(ValueError, match="base_width"):
        deepmoe_resnet56(base_width=0)
    with pytest.raises(ValueError, match="num_layers"):
        ShallowEmbedding(10, num_layers=0)
