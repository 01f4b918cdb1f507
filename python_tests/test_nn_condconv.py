"""condkernels.nn: CondConv2d, Router and the routed containers, against naive references."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from condkernels.nn import CondConv2d, RoutedSequential, Router

HAS_TIMM = importlib.util.find_spec("timm") is not None


def per_example_reference(x, routing, weight, bias, stride, padding, dilation, groups):
    """One conv2d per example with its own mixed kernel, in float64; ``padding`` is (h0, h1, w0, w1)."""
    x, routing, weight = x.double(), routing.double(), weight.double()
    h0, h1, w0, w1 = padding
    outs = []
    for b in range(x.shape[0]):
        w_b = (routing[b].view(-1, 1, 1, 1, 1) * weight).sum(0)
        b_b = None if bias is None else routing[b] @ bias.double()
        outs.append(F.conv2d(F.pad(x[b:b + 1], (w0, w1, h0, h1)), w_b, b_b, stride, 0, dilation, groups))
    return torch.cat(outs)


# (Cin, Cout, kernel, stride, padding for the module, explicit padding (h0, h1, w0, w1), dilation, groups, bias)
CONFIGS = [
    (4, 6, 3, 1, 1, (1, 1, 1, 1), 1, 1, True),
    (4, 6, 3, 2, 1, (1, 1, 1, 1), 1, 2, False),
    (6, 6, 3, 2, 1, (1, 1, 1, 1), 1, 6, True),  # depthwise
    (4, 5, 1, 1, 0, (0, 0, 0, 0), 1, 1, True),  # pointwise
    (4, 6, (3, 5), 1, (1, 2), (1, 1, 2, 2), 2, 1, True),
    # TensorFlow SAME at stride 2 on a 7x7 input with a 3x3 kernel: total pad 2 -> (1, 1); dilation 2 -> (2, 2).
    (4, 6, 3, 2, "same", (1, 1, 1, 1), 1, 1, True),
    (4, 6, 4, 2, "same", (1, 2, 1, 2), 1, 1, False),  # odd total pad: the extra pixel bottom/right
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,explicit,dilation,groups,bias", CONFIGS)
def test_condconv2d_equals_per_example_reference(cin, cout, k, stride, padding, explicit, dilation, groups, bias):
    torch.manual_seed(0)
    layer = CondConv2d(cin, cout, k, stride, padding, dilation, groups, bias, num_experts=3, router=False)
    layer = layer.double()
    x = torch.randn(3, cin, 7, 7, dtype=torch.float64)
    routing = torch.rand(3, 3, dtype=torch.float64) * 2 - 0.5  # any real values, not normalised
    y = layer(x, routing)
    ref = per_example_reference(x, routing, layer.weight, layer.bias, stride, explicit, dilation, groups)
    torch.testing.assert_close(y, ref)


def test_condconv2d_with_own_router_routes_itself():
    torch.manual_seed(1)
    layer = CondConv2d(5, 7, 3, padding=1, num_experts=4).double()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    routing = torch.sigmoid(x.mean((2, 3)) @ layer.router.fc.weight.T + layer.router.fc.bias)
    ref = per_example_reference(x, routing, layer.weight, layer.bias, 1, (1, 1, 1, 1), 1, 1)
    torch.testing.assert_close(layer(x), ref)
    y = layer(x)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_condconv2d_shapes_and_drop_in_arguments():
    layer = CondConv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=True, num_experts=5)
    assert layer.weight.shape == (5, 16, 4, 3, 3)
    assert layer.bias.shape == (5, 16)
    assert layer(torch.randn(2, 8, 9, 9)).shape == torch.Size([2, 16, 5, 5])
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    assert layer(torch.randn(1, 8, 9, 9)).shape == conv(torch.randn(1, 8, 9, 9)).shape
    double = CondConv2d(3, 4, 1, num_experts=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())


def test_condconv2d_init_is_per_expert_conv_init():
    torch.manual_seed(0)
    layer = CondConv2d(16, 32, 3, num_experts=8)
    bound = 1 / math.sqrt(16 * 9)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    # U(-b, b) has std b / sqrt(3); every expert is drawn independently.
    assert abs(layer.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_condconv2d_without_router_needs_routing():
    layer = CondConv2d(3, 4, 1, num_experts=2, router=False)
    with pytest.raises(ValueError, match="routing is required"):
        layer(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding="full"), "padding must be"),
    (dict(groups=2, in_channels=3), "groups"),
    (dict(num_experts=0), "num_experts must be positive"),
    (dict(kernel_size=0), "kernel_size must be positive"),
    (dict(stride=(1, 0)), "stride must be positive"),
    (dict(dilation=-1), "dilation must be positive"),
    (dict(padding=-2), "padding must be non-negative"),
])
def test_condconv2d_bad_arguments(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        CondConv2d(**args)


def test_routing_of_the_wrong_size_names_the_argument():
    layer = CondConv2d(3, 4, 1, num_experts=2, router=False)
    with pytest.raises(ValueError, match="routing has 3 experts"):
        layer(torch.randn(2, 3, 4, 4), torch.rand(2, 3))


# --- Router --------------------------------------------------------------------------------------


def test_router_sigmoid_matches_formula():
    torch.manual_seed(0)
    router = Router(6, 4).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    r = router(x)
    assert r.shape == (3, 4)
    expected = 1 / (1 + torch.exp(-(x.mean((2, 3)) @ router.fc.weight.T + router.fc.bias)))
    torch.testing.assert_close(r, expected)


def test_router_softmax_hidden_and_temperature():
    torch.manual_seed(0)
    router = Router(6, 5, activation="softmax", hidden=3, temperature=2.0).double()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    r = router(x)
    h = torch.clamp(x.mean((2, 3)) @ router.hidden.weight.T + router.hidden.bias, min=0)
    logits = (h @ router.fc.weight.T + router.fc.bias) / 2.0
    expected = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(r.sum(1), torch.ones(4, dtype=torch.float64))
    assert router.hidden.out_features == 3 and router.fc.in_features == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="relu"), "activation must be one of"),
    (dict(hidden=0), "hidden must be"),
    (dict(temperature=0.0), "temperature must be positive"),
])
def test_router_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Router(4, 2, **kwargs)


def test_router_checks_its_input():
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, H, W\)"):
        Router(4, 2)(torch.randn(2, 3, 5, 5))


def test_one_router_feeds_several_layers():
    torch.manual_seed(0)
    first = CondConv2d(4, 6, 3, padding=1, num_experts=3).double()  # owns the router
    second = CondConv2d(6, 5, 1, num_experts=3, router=False).double()  # reuses its routing
    chain = RoutedSequential(first, torch.nn.ReLU(), second)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    routing = first.router(x)
    expected = second(torch.relu(first(x, routing)), routing)
    torch.testing.assert_close(chain(x), expected)
    out, last_routing = chain.forward_routed(x)
    assert torch.equal(last_routing, routing)


# --- state_dict ----------------------------------------------------------------------------------


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    torch.manual_seed(1)
    b = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    x = torch.randn(2, 4, 5, 5)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


def test_loads_a_state_dict_in_timms_flat_layout():
    torch.manual_seed(0)
    experts, cout, cin, groups, k = 4, 6, 8, 2, 3
    flat = torch.randn(experts, cout * (cin // groups) * k * k, dtype=torch.float64)
    bias = torch.randn(experts, cout, dtype=torch.float64)
    layer = CondConv2d(cin, cout, k, padding=1, groups=groups, num_experts=experts, router=False).double()
    layer.load_state_dict({"weight": flat, "bias": bias})
    assert layer.weight.shape == (experts, cout, cin // groups, k, k)
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    routing = torch.rand(2, experts, dtype=torch.float64)
    # timm's convention: the flat row of expert e is its (Cout, Cin/groups, kh, kw) kernel in C order.
    kernels = flat.view(experts, cout, cin // groups, k, k)
    ref = per_example_reference(x, routing, kernels, bias, 1, (1, 1, 1, 1), 1, groups)
    torch.testing.assert_close(layer(x, routing), ref)
    # The saved state is ours (5-D) and loads back.
    assert layer.state_dict()["weight"].dim() == 5


def test_a_flat_weight_of_the_wrong_size_is_rejected():
    layer = CondConv2d(4, 6, 3, num_experts=2, router=False)
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict({"weight": torch.randn(2, 7), "bias": torch.randn(2, 6)})


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_condconv2d_state_dict_gives_the_same_output():
    from timm.layers import CondConv2d as TimmCondConv2d

    torch.manual_seed(0)
    theirs = TimmCondConv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=True, num_experts=4).eval()
    ours = CondConv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=True, num_experts=4, router=False)
    ours.load_state_dict(theirs.state_dict())
    x, routing = torch.randn(3, 8, 9, 9), torch.rand(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, routing), theirs(x, routing), rtol=1e-4, atol=1e-5)
