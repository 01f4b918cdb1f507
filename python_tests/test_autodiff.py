"""Derivatives beyond the first reverse-mode gradient, for every public op: forward mode
(torch.func.jvp, jacfwd, torch.autograd.forward_ad), second derivatives (double backward,
forward over reverse) and the torch.func reverse transforms.

Oracles: PyTorch's own derivatives of the reference formulations (``backend="reference"``, plain
ATen ops), numerical second derivatives (``gradgradcheck``) and scipy's Beta density.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp

import condkernels
from conftest import COMPILED_BACKENDS

D = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def cond_inputs(device):
    g = _gen()
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=D)
    routing = torch.rand(2, 3, generator=g, dtype=D)
    weight = torch.randn(3, 6, 4, 3, 3, generator=g, dtype=D)
    bias = torch.randn(3, 6, generator=g, dtype=D)
    return tuple(t.to(device) for t in (x, routing, weight, bias))


def gated_inputs(device):
    g = _gen(1)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=D)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=D)
    bias = torch.randn(6, generator=g, dtype=D)
    # real-valued gates with closed (exactly zero) channels, as DeepMoE's are
    in_gate = torch.rand(2, 4, generator=g, dtype=D) * (torch.rand(2, 4, generator=g) > 0.4)
    out_gate = torch.rand(2, 6, generator=g, dtype=D) * (torch.rand(2, 6, generator=g) > 0.4)
    return tuple(t.to(device) for t in (x, weight, bias, in_gate, out_gate))


def cond_fn(backend):
    return lambda x, r, w, b: condkernels.cond_conv2d(x, r, w, b, padding=1, backend=backend)


def gated_fn(backend):
    return lambda x, w, b, gi, go: condkernels.gated_conv2d(x, w, b, gi, go, padding=1, backend=backend)


CONV_OPS = [
    pytest.param(cond_fn, cond_inputs, id="cond_conv2d"),
    pytest.param(gated_fn, gated_inputs, id="gated_conv2d"),
]


def squared(fn):
    return lambda *args: fn(*args).square().sum()


def assert_all_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("make_fn,make_inputs", CONV_OPS)
def test_jvp_matches_reference_for_each_argument(make_fn, make_inputs, device, backend):
    primals = make_inputs(device)
    tangents = [torch.randn(p.shape, generator=_gen(9 + i), dtype=D).to(device) for i, p in enumerate(primals)]
    # one argument at a time (zeros elsewhere), then all together
    choices = [[i] for i in range(len(primals))] + [list(range(len(primals)))]
    for chosen in choices:
        t = tuple(tangents[i] if i in chosen else torch.zeros_like(p) for i, p in enumerate(primals))
        out, tangent = jvp(make_fn(backend), primals, t)
        out_ref, tangent_ref = jvp(make_fn("reference"), primals, t)
        assert_all_close((out, tangent), (out_ref, tangent_ref))
        assert tangent.abs().max() > 0


@pytest.mark.parametrize("make_fn,make_inputs", CONV_OPS)
def test_forward_ad_api_under_no_grad(make_fn, make_inputs):
    """torch.no_grad does not stop forward mode; a bias-only tangent is broadcast over the plane."""
    primals = make_inputs("cpu")
    tangent = torch.randn(primals[-1].shape if make_fn is cond_fn else primals[2].shape, dtype=D, generator=_gen(3))
    which = 3 if make_fn is cond_fn else 2  # the bias
    zeros = [torch.zeros_like(p) for p in primals]
    zeros[which] = tangent
    _, expected = jvp(make_fn("reference"), primals, tuple(zeros))
    with fwAD.dual_level(), torch.no_grad():
        args = list(primals)
        args[which] = fwAD.make_dual(primals[which], tangent)
        out = fwAD.unpack_dual(make_fn("cpu")(*args))
    assert out.tangent is not None
    torch.testing.assert_close(out.tangent, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make_fn,make_inputs", CONV_OPS)
def test_double_backward_against_numerical(make_fn, make_inputs):
    primals = [p.clone().requires_grad_() for p in make_inputs("cpu")]
    assert torch.autograd.gradgradcheck(make_fn("cpu"), primals)


@pytest.mark.parametrize("make_fn,make_inputs", CONV_OPS)
def test_gradient_penalty_matches_reference(make_fn, make_inputs):
    """The gradient of a squared-gradient norm (WGAN-GP, R1): second derivatives through the op."""
    results = []
    for backend in ("cpu", "reference"):
        primals = [p.clone().requires_grad_() for p in make_inputs("cpu")]
        grads = torch.autograd.grad(squared(make_fn(backend))(*primals), primals, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, primals))
    assert_all_close(*results)


@pytest.mark.parametrize("make_fn,make_inputs", CONV_OPS)
def test_forward_over_reverse_and_func_grad(make_fn, make_inputs):
    primals = make_inputs("cpu")
    tangents = tuple(torch.randn(p.shape, generator=_gen(5 + i), dtype=D) for i, p in enumerate(primals))
    argnums = tuple(range(len(primals)))
    hvp = jvp(grad(squared(make_fn("cpu")), argnums=argnums), primals, tangents)[1]
    hvp_ref = jvp(grad(squared(make_fn("reference")), argnums=argnums), primals, tangents)[1]
    assert_all_close(hvp, hvp_ref)
    # torch.func.grad against the plain autograd gradient of the compiled op
    leaves = [p.clone().requires_grad_() for p in primals]
    expected = torch.autograd.grad(squared(make_fn("cpu"))(*leaves), leaves)
    assert_all_close(grad(squared(make_fn("cpu")), argnums=argnums)(*primals), expected)
    # forward mode over torch.autograd.grad, on tensors that require grad
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.clone().requires_grad_(), t) for p, t in zip(primals, tangents)]
        first = torch.autograd.grad(squared(make_fn("cpu"))(*duals), duals)
        assert_all_close([fwAD.unpack_dual(g).tangent for g in first], hvp_ref)


def test_jacfwd_hessian_and_nested_jvp_of_cond_conv2d():
    x, routing, weight, bias = cond_inputs("cpu")
    f = lambda r, backend="cpu": cond_fn(backend)(x, r, weight, bias)  # noqa: E731
    torch.testing.assert_close(jacfwd(f)(routing), jacrev(lambda r: f(r, "reference"))(routing))
    loss = lambda r, backend="cpu": f(r, backend).square().sum()  # noqa: E731
    torch.testing.assert_close(
        jacfwd(jacrev(loss))(routing), jacfwd(jacrev(lambda r: loss(r, "reference")))(routing)
    )
    t = torch.randn_like(routing)
    nested = jvp(lambda r: jvp(f, (r,), (t,))[1], (routing,), (t,))[1]
    # f is linear in the routing: its second directional derivative is zero
    torch.testing.assert_close(nested, torch.zeros_like(nested))


# --- beta_cdf: the derivatives are the Beta density and its derivative ----------------------


def test_beta_cdf_forward_mode_and_second_derivative_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = 0.6, 0.4
    x = torch.rand(9, dtype=D, generator=_gen()) * 0.9 + 0.05
    pdf = torch.from_numpy(stats.beta.pdf(x.numpy(), a, b))
    dpdf = pdf * ((a - 1) / x - (b - 1) / (1 - x))
    f = lambda t: condkernels.beta_cdf(t, a, b)  # noqa: E731
    t = torch.randn(9, dtype=D, generator=_gen(1))
    torch.testing.assert_close(jvp(f, (x,), (t,))[1], pdf * t)
    with fwAD.dual_level(), torch.no_grad():
        torch.testing.assert_close(fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent, pdf * t)
    torch.testing.assert_close(torch.vmap(grad(grad(f)))(x), dpdf)
    leaf = x.clone().requires_grad_()
    (first,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), leaf)
    torch.testing.assert_close(first, pdf)
    torch.testing.assert_close(second, dpdf)


def test_beta_cdf_tangent_in_a_parameter_raises():
    x = torch.rand(5, dtype=D)
    a = torch.full((5,), 0.6, dtype=D)
    with pytest.raises(RuntimeError, match="derivative with respect to a is not implemented"):
        jvp(lambda p: condkernels.beta_cdf(x, p, 0.4), (a,), (torch.ones_like(a),))


# --- batch_shaping_loss and pooled_mlp ------------------------------------------------------


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_batch_shaping_loss_jvp_is_the_gradient_dotted_with_the_tangent(device, backend):
    gates = torch.rand(16, 5, dtype=D, generator=_gen()).to(device)
    t = torch.randn(16, 5, dtype=D, generator=_gen(1)).to(device)
    loss = lambda g: condkernels.batch_shaping_loss(g, backend=backend)  # noqa: E731
    leaf = gates.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(loss(leaf), leaf)
    value, tangent = jvp(loss, (gates,), (t,))
    torch.testing.assert_close(value, loss(gates))
    torch.testing.assert_close(tangent, (expected_grad * t).sum())
    torch.testing.assert_close(grad(loss)(gates), expected_grad)


def pooled_mlp_composition(x, w1, b1, w2, b2):
    return F.linear(F.linear(x.mean((2, 3)), w1, b1).relu(), w2, b2)


def test_pooled_mlp_forward_mode_and_second_derivatives():
    g = _gen()
    args = (torch.randn(3, 4, 5, 5, generator=g, dtype=D), torch.randn(6, 4, generator=g, dtype=D),
            torch.randn(6, generator=g, dtype=D), torch.randn(2, 6, generator=g, dtype=D),
            torch.randn(2, generator=g, dtype=D))
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=D) for a in args)
    assert_all_close(jvp(condkernels.pooled_mlp, args, tangents), jvp(pooled_mlp_composition, args, tangents))
    assert torch.autograd.gradgradcheck(condkernels.pooled_mlp, [a.clone().requires_grad_() for a in args])
    argnums = tuple(range(5))
    assert_all_close(
        grad(squared(condkernels.pooled_mlp), argnums=argnums)(*args),
        grad(squared(pooled_mlp_composition), argnums=argnums)(*args),
    )


# --- the networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    pytest.param(lambda: condkernels.models.cc_mobilenet_v1(width_mult=0.25, num_classes=4), id="cc_mobilenet_v1"),
    pytest.param(lambda: condkernels.models.resnet18_bas(num_classes=4), id="resnet18_bas"),
])
def test_per_example_gradients_of_a_network(build):
    """vmap(grad) over a CondConv or gated network (eval mode) gives each example's own gradient."""
    model = build().eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=_gen())
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, example):
        return torch.func.functional_call(model, (p, buffers), (example[None],)).square().sum()

    per_example = torch.vmap(grad(loss), in_dims=(None, 0))(params, x)
    for k in range(2):
        expected = torch.autograd.grad(  # unused: the gates' layers, whose hard 0/1 output has no gradient
            loss(dict(model.named_parameters()), x[k]), list(model.parameters()), allow_unused=True
        )
        for (name, p), want in zip(model.named_parameters(), expected):
            want = torch.zeros_like(p) if want is None else want
            torch.testing.assert_close(per_example[name][k], want, rtol=1e-9, atol=1e-12)
