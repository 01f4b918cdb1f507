"""beta_cdf against scipy.special.betainc (an independent implementation), on every backend here."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import condkernels
from conftest import COMPILED_BACKENDS, triton_interpreted

BACKENDS = COMPILED_BACKENDS + [pytest.param("cpu", "reference", id="reference")]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6}


def random_points(n, seed, low=0.05, high=50.0):
    """(x, a, b) with a, b log-uniform in [low, high] and x spread over (0, 1), tails included."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.uniform(np.log(low), np.log(high), n))
    b = np.exp(rng.uniform(np.log(low), np.log(high), n))
    x = np.concatenate([rng.uniform(0, 1, n - n // 4), 10.0 ** rng.uniform(-12, -1, n // 8),
                        1 - 10.0 ** rng.uniform(-12, -1, n - (n - n // 4) - n // 8)])
    return x, a, b


def _size(backend, n):
    return min(n, 256) if backend == "triton" and triton_interpreted() else n


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_scipy_with_tensor_parameters(device, backend, dtype):
    x, a, b = random_points(_size(backend, 4000), seed=1)
    want = scipy.special.betainc(a, b, torch.tensor(x, dtype=dtype).double().numpy())
    t = lambda v: torch.tensor(v, dtype=dtype, device=device)
    got = condkernels.beta_cdf(t(x), t(a).to(dtype), t(b).to(dtype), backend=backend)
    # the reference of float32 parameters is evaluated at the float32-rounded a and b
    want = scipy.special.betainc(t(a).double().cpu().numpy(), t(b).double().cpu().numpy(), t(x).double().cpu().numpy())
    assert got.dtype == dtype
    err = np.abs(got.double().cpu().numpy() - want).max()
    assert err <= TOLERANCE[dtype], err


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "a,b", [(0.6, 0.4), (0.05, 0.05), (50.0, 50.0), (0.05, 50.0), (50.0, 0.05), (2.0, 5.0), (1.0, 1.0)])
def test_matches_scipy_with_number_parameters(device, backend, dtype, a, b):
    x = torch.tensor(random_points(_size(backend, 2000), seed=2)[0], dtype=dtype, device=device)
    got = condkernels.beta_cdf(x, a, b, backend=backend)
    want = scipy.special.betainc(a, b, x.double().cpu().numpy())
    err = np.abs(got.double().cpu().numpy() - want).max()
    assert err <= TOLERANCE[dtype], err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("a,b", [(0.6, 0.4), (0.05, 0.05), (50.0, 50.0), (0.05, 50.0), (50.0, 0.05), (2.0, 5.0),
                                 (0.5, 30.0), (7.3, 0.9)])
def test_many_values_table_path_matches_scipy(dtype, a, b):
    # 2^15 values with one (a, b): the CPU kernel replaces the continued fraction by a per-(a, b)
    # polynomial table; it must keep the accuracy of the exact path, tails and both sides included
    x, _, _ = random_points(1 << 15, seed=3)
    x[:4] = [0.0, 1.0, (a + 1) / (a + b + 2), np.nextafter((a + 1) / (a + b + 2), 1)]  # ends, flip point
    xt = torch.tensor(x, dtype=dtype)
    got = condkernels.beta_cdf(xt, a, b, backend="cpu").double().numpy()
    want = scipy.special.betainc(a, b, xt.double().numpy())
    err = np.abs(got - want).max()
    assert err <= {torch.float64: 1e-13, torch.float32: 2e-7}[dtype], err  # f32: the output's rounding
    # and it agrees with the exact continued fraction of a small call, value for value
    small = condkernels.beta_cdf(xt[:4096], a, b, backend="cpu").double().numpy()
    assert np.abs(got[:4096] - small).max() <= {torch.float64: 1e-13, torch.float32: 1.2e-7}[dtype]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_edges_and_nan(device, backend):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, float("nan"), float("-inf"), float("inf"), 0.5], dtype=torch.float64,
                     device=device)
    got = condkernels.beta_cdf(x, 0.6, 0.4, backend=backend).cpu()
    torch.testing.assert_close(got[:4], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(got[4])
    assert got[5] == 0 and got[6] == 1
    # a parameter tensor with a non-positive entry gives NaN there, not a crash
    a = torch.tensor([0.6, 0.0, -1.0], dtype=torch.float64, device=device)
    y = condkernels.beta_cdf(x[-1:].expand(3), a, 0.4, backend=backend)
    assert torch.isfinite(y[0]) and torch.isnan(y[1:]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_broadcasting(device, backend):
    x = torch.rand(5, 1, 3, dtype=torch.float64, device=device)
    a = torch.tensor([[0.5], [2.0], [7.0], [0.1]], dtype=torch.float64, device=device)  # (4, 1)
    got = condkernels.beta_cdf(x, a, 3.0, backend=backend)
    assert got.shape == (5, 4, 3)
    xs, as_ = torch.broadcast_tensors(x, a)
    want = scipy.special.betainc(as_.cpu().numpy(), 3.0, xs.cpu().numpy())
    np.testing.assert_allclose(got.cpu().numpy(), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_gradient_is_the_beta_pdf(device, backend):
    x = torch.linspace(0.001, 0.999, 97, dtype=torch.float64, device=device, requires_grad=True)
    condkernels.beta_cdf(x, 0.6, 0.4, backend=backend).sum().backward()
    want = scipy.stats.beta.pdf(x.detach().cpu().numpy(), 0.6, 0.4)
    np.testing.assert_allclose(x.grad.cpu().numpy(), want, rtol=1e-11)
    # outside [0, 1] the CDF is flat
    xo = torch.tensor([-0.5, 1.5], dtype=torch.float64, device=device, requires_grad=True)
    condkernels.beta_cdf(xo, 2.0, 3.0, backend=backend).sum().backward()
    assert (xo.grad == 0).all()


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_gradcheck_with_broadcast_parameters(device, backend):
    x = (torch.rand(3, 4, dtype=torch.float64, device=device) * 0.9 + 0.05).requires_grad_(True)
    a = torch.tensor([0.6, 1.5, 3.0, 10.0], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: condkernels.beta_cdf(t, a, 0.4, backend=backend), (x,))
    # broadcasting x against a larger a: the gradient is summed back to x's shape
    x1 = (torch.rand(4, dtype=torch.float64, device=device) * 0.9 + 0.05).requires_grad_(True)
    a2 = torch.tensor([[0.6], [2.0]], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: condkernels.beta_cdf(t, a2, 1.5, backend=backend), (x1,))


@pytest.mark.parametrize("which", ["a", "b"])
def test_gradient_in_parameters_raises(which):
    x = torch.rand(5, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    args = dict(a=p, b=0.4) if which == "a" else dict(a=0.6, b=p)
    y = condkernels.beta_cdf(x, **args)
    with pytest.raises(RuntimeError, match=f"derivative with respect to {which} is not implemented"):
        y.sum().backward()


def test_opcheck():
    x = torch.rand(4, 3, dtype=torch.float64)
    for a, b in [(torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)),
                 (torch.rand(3, dtype=torch.float64) + 0.1, torch.tensor([[2.0]], dtype=torch.float64))]:
        for requires_grad in (False, True):
            torch.library.opcheck(torch.ops.condkernels.beta_cdf.default,
                                  (x.clone().requires_grad_(requires_grad), a, b))
    grad = torch.rand(4, 3, dtype=torch.float64)
    a, b = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.condkernels._beta_cdf_backward.default, (grad, x, a, b))


def test_torch_compile_fullgraph():
    x = torch.rand(64, dtype=torch.float32, requires_grad=True)
    fn = torch.compile(lambda t: condkernels.beta_cdf(t, 0.6, 0.4) * 2, fullgraph=True, backend="aot_eager")
    y = fn(x)
    torch.testing.assert_close(y, condkernels.beta_cdf(x, 0.6, 0.4) * 2)
    y.sum().backward()
    density = scipy.stats.beta.pdf(x.detach().double().numpy(), 0.6, 0.4)
    torch.testing.assert_close(x.grad, torch.from_numpy(2 * density).float(), rtol=1e-5, atol=1e-5)


def test_half_precision_inputs():
    x = torch.rand(100)
    for dtype in (torch.float16, torch.bfloat16):
        got = condkernels.beta_cdf(x.to(dtype), 2.0, 3.0)
        assert got.dtype == dtype
        want = scipy.special.betainc(2.0, 3.0, x.to(dtype).double().numpy())
        assert np.abs(got.double().numpy() - want).max() < 1e-2


BAD = [
    ("a must be positive", dict(a=0.0)),
    ("b must be positive", dict(b=-1.0)),
    ("a must be a positive number or a tensor", dict(a="0.6")),
    ("x must be floating point", dict(x=torch.arange(3))),
    ("a must be a floating point tensor", dict(a=torch.tensor([1, 2, 3]))),
    ("do not broadcast", dict(a=torch.rand(4, dtype=torch.float64))),
    ("backend must be one of", dict(backend="scipy")),
]


@pytest.mark.parametrize("message,change", BAD, ids=[m for m, _ in BAD])
def test_bad_input_names_the_argument(message, change):
    kwargs = dict(x=torch.rand(3, dtype=torch.float64), a=0.6, b=0.4)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        condkernels.beta_cdf(**kwargs)


def test_compiled_op_checks_its_arguments_too():
    x = torch.rand(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="a has dtype"):
        torch.ops.condkernels.beta_cdf(x, torch.tensor(0.6), torch.tensor(0.4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="b of shape"):
        torch.ops.condkernels.beta_cdf(x, torch.tensor(0.6, dtype=torch.float64), torch.rand(4, dtype=torch.float64))


def test_triton_opcheck():
    pytest.importorskip("triton")
    from condkernels.triton import beta_cdf as _  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.rand(5, 3, dtype=torch.float64, device=device)
    a = torch.tensor(0.6, dtype=torch.float64, device=device)
    b = torch.rand(3, dtype=torch.float64, device=device) + 0.2
    for requires_grad in (False, True):
        torch.library.opcheck(torch.ops.condkernels.beta_cdf_triton.default,
                              (x.clone().requires_grad_(requires_grad), a, b))
