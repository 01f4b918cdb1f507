"""condkernels.models (MobileNetV1/V2, ResNet-50 and their CondConv versions), the counting
utilities against the CondConv paper's tables, and optimize_for_inference."""

import pytest
import torch
from torch import nn

import condkernels
from condkernels.models import (
    cc_mobilenet_v1, cc_mobilenet_v2, cc_resnet50, mobilenet_v1, mobilenet_v2, resnet18, resnet50,
)
from condkernels.nn import CondConv2d, Router
from condkernels.utils import count_macs, count_params, macs_by_module

BUILDERS = {
    "mobilenet_v1": (lambda: mobilenet_v1(0.25, num_classes=10), 32),
    "cc_mobilenet_v1": (lambda: cc_mobilenet_v1(0.25, 4, num_classes=10), 32),
    "mobilenet_v2": (lambda: mobilenet_v2(0.5, num_classes=10), 32),
    "cc_mobilenet_v2": (lambda: cc_mobilenet_v2(0.5, 4, num_classes=10), 32),
    "resnet50": (lambda: resnet50(num_classes=10), 32),
    "cc_resnet50": (lambda: cc_resnet50(2, num_classes=10), 32),
}


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


def cond_layer_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, CondConv2d))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_forward_and_backward(name):
    build, size = BUILDERS[name]
    torch.manual_seed(0)
    model = build()
    y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"


# --- where CondConv goes -------------------------------------------------------------------------


def test_cc_mobilenet_v1_layout():
    model = cc_mobilenet_v1(0.5, 4, num_classes=10)
    blocks = list(model.features)
    assert len(blocks) == 14  # stem + 13 separable blocks
    for index, block in enumerate(blocks, start=1):
        cond = any(isinstance(m, CondConv2d) for m in block.modules())
        assert cond == (index >= 7), index
        if cond:  # one router per block, shared by the depthwise and the pointwise conv
            assert isinstance(block.router, Router)
            assert isinstance(block.depthwise[0], CondConv2d) and block.depthwise[0].router is None
            assert isinstance(block.pointwise[0], CondConv2d) and block.pointwise[0].router is None
    head = model.classifier[1]
    assert isinstance(head, CondConv2d) and head.kernel_size == (1, 1) and head.router is not None
    assert sum(isinstance(m, Router) for m in model.modules()) == 9


def test_cc_mobilenet_v2_layout():
    model = cc_mobilenet_v2(1.0, 4, num_classes=10)
    features = list(model.features)
    assert len(features) == 19  # stem + 17 blocks + final 1x1 conv
    for index, layer in enumerate(features, start=1):
        convs = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, CondConv2d))]
        assert all(isinstance(c, CondConv2d) for c in convs) == (index >= 13), index
        assert any(isinstance(c, CondConv2d) for c in convs) == (index >= 13), index
    assert all(len([m for m in b.modules() if isinstance(m, CondConv2d)]) == 3 for b in features[12:18])
    assert isinstance(features[18][0].router, Router)  # the final 1x1 conv routes itself
    assert isinstance(model.classifier[1], CondConv2d)
    assert sum(isinstance(m, Router) for m in model.modules()) == 6 + 2


def test_cc_resnet50_layout():
    model = cc_resnet50(2, num_classes=10)
    cond = cond_layer_names(model)
    expected = [f"layer4.{b}.conv{i}" for b in range(3) for i in (1, 2, 3)] + ["fc"]
    assert cond == sorted(expected)
    assert isinstance(model.layer4[0].downsample[0], nn.Conv2d)  # the shortcut stays plain
    shortcut = cc_resnet50(2, num_classes=10, cond_shortcut=True)
    assert "layer4.0.downsample.0" in cond_layer_names(shortcut)


def test_torchvision_module_names():
    keys = set(resnet50().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.weight", "layer4.2.bn3.bias", "fc.weight", "fc.bias"} <= keys
    keys = set(mobilenet_v2().state_dict())
    assert {"features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
            "features.1.conv.1.weight", "features.2.conv.0.0.weight", "features.2.conv.3.bias",
            "features.18.0.weight", "classifier.1.weight"} <= keys


@pytest.mark.parametrize("begin,classifier,cond_count", [(1, True, 1 + 26 + 1), (15, True, 1), (16, True, 0),
                                                         (7, False, 16), (13, True, 5)])
def test_cond_begin_and_classifier(begin, classifier, cond_count):
    model = cc_mobilenet_v1(0.25, 2, num_classes=10, cond_begin=begin, cond_classifier=classifier)
    assert len(cond_layer_names(model)) == cond_count
    if cond_count == 0:
        assert count_params(model) == count_params(mobilenet_v1(0.25, num_classes=10))


@pytest.mark.parametrize("cond_layers,depthwise,pointwise", [("pointwise", False, True), ("depthwise", True, False)])
def test_cond_layers(cond_layers, depthwise, pointwise):
    model = cc_mobilenet_v1(0.25, 2, num_classes=10, cond_layers=cond_layers)
    block = model.features[10]
    assert isinstance(block.depthwise[0], CondConv2d) == depthwise
    assert isinstance(block.pointwise[0], CondConv2d) == pointwise


def captured_routings(model, x):
    """The routing tensor every CondConv2d received, by layer name."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, CondConv2d):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[1])))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("sharing,routers", [("block", 9), ("partial", 5), ("single", 1)])
def test_router_sharing(sharing, routers):
    torch.manual_seed(0)
    model = cc_mobilenet_v1(0.25, 3, num_classes=10, router_sharing=sharing)
    assert sum(isinstance(m, Router) for m in model.modules()) == routers
    seen = captured_routings(model, torch.randn(2, 3, 32, 32))
    distinct = []
    for r in seen.values():
        if not any(r is d for d in distinct):
            distinct.append(r)
    assert len(seen) == 17 and len(distinct) == routers
    # depthwise and pointwise conv of a block always share one routing
    assert seen["features.9.depthwise.0"] is seen["features.9.pointwise.0"]


@pytest.mark.parametrize("hidden,size", [("small", 8), ("medium", 64), ("large", 512), (5, 5)])
def test_router_hidden_sizes(hidden, size):
    model = cc_mobilenet_v1(0.25, 2, num_classes=10, router_hidden=hidden)
    router = model.features[6].router  # block 7, 64 input channels at 0.25x
    assert router.in_channels == 64 and router.hidden.out_features == size


def test_softmax_routing_sums_to_one():
    torch.manual_seed(0)
    model = cc_mobilenet_v1(0.25, 3, num_classes=10, router_activation="softmax", router_temperature=0.5)
    for r in captured_routings(model, torch.randn(2, 3, 32, 32)).values():
        torch.testing.assert_close(r.sum(1), torch.ones(2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(router_sharing="sometimes"), "router_sharing must be one of"),
    (dict(router_activation="tanh"), "router_activation must be one of"),
    (dict(router_hidden="huge"), "router_hidden must be"),
    (dict(cond_begin=0), "cond_begin must be >= 1"),
    (dict(cond_layers="some"), "cond_layers must be one of"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cc_mobilenet_v1(0.25, 2, **kwargs)


# --- counting ------------------------------------------------------------------------------------


def test_count_macs_by_hand():
    """A conv, a CondConv with its own router and a linear layer, counted by the formulas."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        CondConv2d(8, 6, 3, padding=1, groups=2, num_experts=5),  # 4x4, own router
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, 7),
    )
    conv = 8 * 4 * 4 * 3 * 3 * 3
    cond = 6 * 4 * 4 * (8 // 2) * 3 * 3 + 5 * (6 * 4 * 3 * 3 + 6)
    router = 8 * 5
    linear = 6 * 7
    assert count_macs(model, (3, 8, 8)) == conv + cond + router + linear
    assert count_macs(model, (4, 3, 8, 8)) == conv + cond + router + linear  # per example
    by_module = macs_by_module(model, (3, 8, 8))
    assert by_module["1"] == cond and by_module["1.router"] == router
    assert count_params(model) == 3 * 8 * 9 + 5 * 6 * 4 * 9 + 5 * 6 + (8 * 5 + 5) + 6 * 7 + 7


def test_count_macs_restores_training_mode():
    model = cc_mobilenet_v1(0.25, 2, num_classes=10).train()
    model.classifier.eval()
    count_macs(model, (3, 32, 32))
    assert model.training and model.features[3].training and not model.classifier.training


# (builder, paper params M, paper MADDs M, params tolerance) -- CondConv paper Tables 1, 2 and 3.
PAPER = [
    *((f"cc_mobilenet_v1_0.5_{e}", lambda e=e: cc_mobilenet_v1(0.5, e), p, m, 0.03)
      for e, p, m in ((1, 1.3, 151), (2, 2.6, 152), (4, 5.2, 154), (8, 10.4, 160), (16, 20.7, 170), (32, 41.3, 190))),
    ("mobilenet_v1_0.5", lambda: mobilenet_v1(0.5), 1.3, 150, 0.03),
    ("mobilenet_v1_1.0", lambda: mobilenet_v1(1.0), 4.2, 569, 0.03),
    ("mobilenet_v2_0.5", lambda: mobilenet_v2(0.5), 2.0, 97, 0.03),
    ("cc_mobilenet_v2_0.5_8", lambda: cc_mobilenet_v2(0.5, 8), 15.5, 113, 0.08),
    ("mobilenet_v2_1.0", lambda: mobilenet_v2(1.0), 3.5, 301, 0.03),
    ("cc_mobilenet_v2_1.0_8", lambda: cc_mobilenet_v2(1.0, 8), 27.5, 329, 0.08),
    ("mobilenet_v2_1.4", lambda: mobilenet_v2(1.4), 6.1, 583, 0.03),
    ("resnet50", resnet50, 25.6, 4093, 0.03),
    ("cc_resnet50_2", lambda: cc_resnet50(2), 42.6, 4127, 0.08),
    ("cc_resnet50_8", lambda: cc_resnet50(8), 130.2, 4213, 0.03),
]


@pytest.mark.parametrize("name,build,params_m,madds_m,params_tol", PAPER, ids=[p[0] for p in PAPER])
def test_counts_match_the_condconv_paper(name, build, params_m, madds_m, params_tol):
    with torch.device("meta"):
        model = build()
    params = count_params(model) / 1e6
    madds = count_macs(model, (3, 224, 224)) / 1e6
    assert abs(params / params_m - 1) <= params_tol, (params, params_m)
    assert abs(madds / madds_m - 1) <= 0.03, (madds, madds_m)


def test_docs_paper_tables_is_what_the_generator_writes():
    """docs/paper_tables.md is generated (`python -m condkernels.utils.paper_tables`): a change of a
    builder or of the counting that is not regenerated shows here."""
    from pathlib import Path

    from condkernels.utils import paper_tables

    committed = (Path(__file__).resolve().parents[1] / "docs" / "paper_tables.md").read_text(encoding="utf-8")
    assert paper_tables.render_markdown(paper_tables.count_rows()) == committed


def test_kernel_mixing_costs_one_madd_per_expert_parameter():
    """Going from E to 2E experts adds exactly E x (CondConv parameters of one expert) MADDs, plus
    the routers' E more outputs."""
    with torch.device("meta"):
        m4, m8 = cc_mobilenet_v1(0.5, 4), cc_mobilenet_v1(0.5, 8)
    cond_params_4 = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                        for m in m4.modules() if isinstance(m, CondConv2d))
    router_inputs = sum(r.fc.in_features for r in m4.modules() if isinstance(r, Router))
    extra = count_macs(m8) - count_macs(m4)
    assert extra == cond_params_4 + 4 * router_inputs


# --- optimize_for_inference ----------------------------------------------------------------------

INFERENCE_MODELS = {
    "cc_mobilenet_v1": (lambda: cc_mobilenet_v1(0.25, 3, num_classes=10, cond_begin=1), 32),
    "cc_mobilenet_v2": (lambda: cc_mobilenet_v2(0.5, 3, num_classes=10, router_sharing="partial"), 32),
    "cc_resnet50": (lambda: cc_resnet50(2, num_classes=10, cond_shortcut=True), 32),
    "resnet18": (lambda: resnet18(num_classes=10), 32),
}


@pytest.mark.parametrize("name", list(INFERENCE_MODELS))
def test_optimize_for_inference_equals_eval(name):
    build, size = INFERENCE_MODELS[name]
    torch.manual_seed(0)
    model = build()
    randomize_batchnorm(model)
    model.train()
    x = torch.randn(2, 3, size, size)
    fast = condkernels.optimize_for_inference(model)
    assert model.training  # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    assert count_macs(fast, (3, size, size)) == count_macs(model, (3, size, size))


def test_folded_condconv_scales_every_expert():
    torch.manual_seed(0)
    conv = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    bn = nn.BatchNorm2d(6)
    randomize_batchnorm(bn)
    model = condkernels.nn.RoutedSequential(conv, bn).eval()
    fast = condkernels.optimize_for_inference(model)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(fast[0].weight, conv.weight * scale.view(1, -1, 1, 1, 1))
    torch.testing.assert_close(fast[0].bias, conv.bias * scale)
    torch.testing.assert_close(fast[0].shift, bn.bias - bn.running_mean * scale)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# --- torch.compile, torch.export, state_dict -----------------------------------------------------


@pytest.fixture
def small_cc_mobilenet_v1():
    torch.manual_seed(0)
    model = cc_mobilenet_v1(0.25, 4, num_classes=10)
    randomize_batchnorm(model)
    return model.eval(), torch.randn(2, 3, 32, 32)


def test_torch_compile_fullgraph(small_cc_mobilenet_v1):
    model, x = small_cc_mobilenet_v1
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor(small_cc_mobilenet_v1):
    model, x = small_cc_mobilenet_v1
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_torch_export(small_cc_mobilenet_v1):
    model, x = small_cc_mobilenet_v1
    program = torch.export.export(model, (x,))
    cond_conv = torch.ops.condkernels.cond_conv2d.default
    ops = [n for n in program.graph.nodes if n.op == "call_function" and n.target is cond_conv]
    assert len(ops) == 8 * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
    # the optimized model exports too
    fast = condkernels.optimize_for_inference(model)
    torch.testing.assert_close(torch.export.export(fast, (x,)).module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [lambda: cc_mobilenet_v1(0.25, 3, num_classes=10, router_hidden="small"),
                                   lambda: cc_mobilenet_v2(0.5, 2, num_classes=10)])
def test_state_dict_round_trip(build):
    torch.manual_seed(0)
    a = build()
    randomize_batchnorm(a)
    torch.manual_seed(1)
    b = build()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x))
