"""batch_shaping_loss against a plain float64 numpy/scipy implementation of eq. 2 of the paper."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import condkernels
from conftest import COMPILED_BACKENDS

BACKENDS = COMPILED_BACKENDS + [pytest.param("cpu", "reference", id="reference")]


def oracle(gates, alpha=0.6, beta=0.4, reduction="paper", pdf_clip=(1e-3, 100.0), eps=1e-6,
           prior="beta", prior_params=None):
    """Loss and gradient, one gate column at a time, from the definition (numpy + scipy)."""
    g = np.asarray(gates, dtype=np.float64)
    n = g.shape[0]
    cols = g.reshape(n, -1)
    target = np.arange(1, n + 1) / (n + 1)
    scale = {"paper": 1 / n, "sum": 1.0, "mean": 1 / (n * cols.shape[1])}[reduction]
    loss, grad = 0.0, np.zeros_like(cols)
    for j in range(cols.shape[1]):
        order = np.argsort(cols[:, j], kind="stable")  # sort over the batch, ties in batch order
        x = cols[order, j]
        if prior == "beta":
            x = np.clip(x, eps, 1 - eps)
            cdf, pdf = scipy.special.betainc(alpha, beta, x), scipy.stats.beta.pdf(x, alpha, beta)
        elif prior == "gaussian":
            cdf, pdf = scipy.stats.norm.cdf(x, *prior_params), scipy.stats.norm.pdf(x, *prior_params)
        else:
            lo, hi = prior_params or (0.0, 1.0)
            cdf, pdf = scipy.stats.uniform.cdf(x, lo, hi - lo), scipy.stats.uniform.pdf(x, lo, hi - lo)
        loss += scale * np.sum((target - cdf) ** 2)
        grad[order, j] = -2 * scale * (target - cdf) * np.clip(pdf, *pdf_clip)  # back to own rows
    return loss, grad.reshape(g.shape)


def gates_like(n, shape, seed, dtype=torch.float64, kind="random"):
    gen = torch.Generator().manual_seed(seed)
    g = torch.sigmoid(2 * torch.randn(n, *shape, generator=gen, dtype=torch.float64))
    if kind == "ties":
        g = (g * 4).round() / 4 * 0.98 + 0.01  # few distinct values
    elif kind == "sorted":
        g = g.sort(dim=0).values
    elif kind == "reversed":
        g = g.sort(dim=0, descending=True).values
    return g.to(dtype)


def run(gates, backend, device, **kwargs):
    g = gates.detach().clone().to(device).requires_grad_(True)
    loss = condkernels.batch_shaping_loss(g, backend=backend, **kwargs)
    upstream = 1.7  # a non-unit incoming gradient
    (loss * upstream).backward()
    return loss.detach().cpu(), g.grad.cpu() / upstream


@pytest.mark.parametrize("device,backend", BACKENDS)
# 1024: the CUDA kernel's largest column sorted in one block (its launch must fit the registers)
@pytest.mark.parametrize("n", [1, 2, 7, 256, 1024, 4097])
@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "reversed"])
def test_loss_and_gradient_match_oracle(n, kind, device, backend):
    shape = (3,) if n > 1000 else (2, 3)
    gates = gates_like(n, shape, seed=n, kind=kind)
    loss, grad = run(gates, backend, device)
    want_loss, want_grad = oracle(gates.numpy())
    assert abs(loss.item() - want_loss) <= 1e-12 * max(1.0, want_loss)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["paper", "sum", "mean"])
def test_reductions(reduction, device, backend):
    gates = gates_like(33, (4, 2), seed=3)
    loss, grad = run(gates, backend, device, reduction=reduction)
    want_loss, want_grad = oracle(gates.numpy(), reduction=reduction)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("prior,params", [("gaussian", (0.3, 0.2)), ("uniform", None), ("uniform", (-1.0, 2.0))])
def test_other_priors(prior, params, device, backend):
    gates = gates_like(40, (5,), seed=4)
    if prior == "gaussian":
        gates = gates * 2 - 0.5  # activations, not gates: the gaussian prior does no clamping
    loss, grad = run(gates, backend, device, prior=prior, prior_params=params)
    want_loss, want_grad = oracle(gates.numpy(), prior=prior, prior_params=params)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float32(device, backend):
    gates = gates_like(64, (8,), seed=5, dtype=torch.float32)
    loss, grad = run(gates, backend, device)
    want_loss, want_grad = oracle(gates.double().numpy())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_extremes_are_clamped_and_clipped(device, backend):
    # values at and beyond 0 and 1: evaluated at eps / 1-eps, the density clipped to pdf_clip
    gates = torch.tensor([[0.0], [1.0], [1e-9], [1 - 1e-12], [0.5], [-0.2], [1.3]], dtype=torch.float64)
    for pdf_clip in [(1e-3, 100.0), (0.5, 2.0), None]:
        loss, grad = run(gates, backend, device, pdf_clip=pdf_clip)
        want_loss, want_grad = oracle(gates.numpy(), pdf_clip=pdf_clip or (0, np.inf))
        assert loss.item() == pytest.approx(want_loss, rel=1e-12)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_gates_give_nan_loss(device, backend):
    gates = gates_like(9, (3,), seed=6)
    gates[4, 1] = float("nan")
    loss = condkernels.batch_shaping_loss(gates.to(device), backend=backend)
    assert torch.isnan(loss)
    gates[4, 1] = 0.5  # and finite again without it
    assert torch.isfinite(condkernels.batch_shaping_loss(gates.to(device), backend=backend))


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_gradcheck(device, backend):
    gates = (gates_like(6, (2, 2), seed=7) * 0.9 + 0.05).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g: condkernels.batch_shaping_loss(g, backend=backend), (gates,))
    assert torch.autograd.gradgradcheck is not None  # second derivatives are not provided


def test_large_batch_path_matches_oracle():
    # few columns and a large batch: the kernel splits each column across threads
    gates = gates_like(40000, (2,), seed=8)
    loss, grad = run(gates, "cpu", "cpu")
    want_loss, want_grad = oracle(gates.numpy())
    assert loss.item() == pytest.approx(want_loss, rel=1e-11)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-15)


# float32 columns of up to 256 values are sorted by a bitonic network on AVX-512 CPUs
# (csrc/cpu/small_sort.h), padded to a power of two; longer ones and other CPUs take the radix sort.
# Ties must keep batch order either way (the oracle's stable sort), and the two sorts agree bit for bit.
@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "reversed"])
@pytest.mark.parametrize("n", [2, 3, 8, 9, 16, 17, 100, 255, 256, 257])
def test_float32_column_sorts(n, kind, vector_isa, monkeypatch):
    gates = gates_like(n, (5,), seed=n, dtype=torch.float32, kind=kind)
    gates[n // 2, 1] = gates[0, 1]  # a tie in every kind
    loss, grad = run(gates, "cpu", "cpu")
    want_loss, want_grad = oracle(gates.double().numpy())
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=1e-4, atol=1e-7)
    monkeypatch.setenv("CONDKERNELS_CPU_ISA", "none")  # the radix sort
    radix_loss, radix_grad = run(gates, "cpu", "cpu")
    assert torch.equal(loss, radix_loss) and torch.equal(grad, radix_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha,beta", [(0.6, 0.4), (2.0, 5.0)])
def test_many_gates_table_path_matches_oracle(dtype, alpha, beta):
    # 64 x 512 gates: enough values for the CPU kernel's per-(a, b) table of the beta CDF
    gates = gates_like(64, (512,), seed=9, dtype=dtype)
    gates[0, :4] = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-7], dtype=dtype)  # clamped ends
    loss, grad = run(gates, "cpu", "cpu", alpha=alpha, beta=beta)
    want_loss, want_grad = oracle(gates.double().numpy(), alpha=alpha, beta=beta)
    if dtype == torch.float64:
        assert loss.item() == pytest.approx(want_loss, rel=1e-11)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-16)
    else:
        assert loss.item() == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=1e-4, atol=1e-9)


def test_non_contiguous_gates():
    gates = gates_like(12, (5, 4), seed=9).transpose(1, 2)
    loss, grad = run(gates, "cpu", "cpu")
    want_loss, want_grad = oracle(gates.numpy())
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10)


# --- the mistakes of public copies, each as a formulation the tests above would reject ------------

def _mistake_loss_and_grad(gates, mistake):
    """A re-implementation with one known mistake (numpy), to show the oracle tells it apart."""
    g = gates.numpy()
    n = g.shape[0]
    if mistake == "sort_across_channels":
        loss, grad = oracle(g.T.copy())  # gates of one example shaped together
        return loss, grad.T
    target_denominator = n if mistake == "target_i_over_n" else n + 1
    loss, grad = 0.0, np.zeros_like(g)
    for j in range(g.shape[1]):
        order = np.argsort(g[:, j], kind="stable")
        x = np.clip(g[order, j], 1e-6, 1 - 1e-6)
        cdf, pdf = scipy.special.betainc(0.6, 0.4, x), np.clip(scipy.stats.beta.pdf(x, 0.6, 0.4), 1e-3, 100)
        e = np.arange(1, n + 1) / target_denominator
        loss += np.sum((e - cdf) ** 2) / n
        sorted_grad = -2 / n * (e - cdf) * pdf
        if mistake == "unsort_with_forward_permutation":
            grad[:, j] = sorted_grad[order]
        else:
            grad[order, j] = sorted_grad
    return loss, grad


@pytest.mark.parametrize("mistake", ["sort_across_channels", "target_i_over_n", "unsort_with_forward_permutation"])
def test_known_mistakes_are_not_what_we_compute(mistake):
    gates = gates_like(16, (4,), seed=10)
    loss, grad = run(gates, "cpu", "cpu")
    bad_loss, bad_grad = _mistake_loss_and_grad(gates, mistake)
    differs = abs(loss.item() - bad_loss) > 1e-6 or np.abs(grad.numpy() - bad_grad).max() > 1e-6
    assert differs, mistake
    want_loss, want_grad = oracle(gates.numpy())
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10)


def test_sorting_is_over_the_batch_not_the_channels():
    # one gate always open and one always closed is as far from Beta(0.6, 0.4) as gates get, yet
    # sorting across channels would see a perfectly mixed set per example
    gates = torch.tensor([[0.999, 0.001]] * 8, dtype=torch.float64)
    mixed = torch.stack([torch.linspace(0.05, 0.95, 8)] * 2, dim=1).double()
    assert condkernels.batch_shaping_loss(gates) > 5 * condkernels.batch_shaping_loss(mixed)


def test_target_is_i_over_n_plus_1():
    # one gate at the prior's median: its only target is 1/2, so the loss is exactly zero
    median = scipy.special.betaincinv(0.6, 0.4, 0.5)
    assert condkernels.batch_shaping_loss(torch.tensor([[median]], dtype=torch.float64)).item() < 1e-20


def test_unsorting_uses_the_inverse_permutation():
    # a permutation whose inverse differs from itself (a 3-cycle)
    gates = torch.tensor([[0.9], [0.1], [0.5]], dtype=torch.float64)
    _, grad = run(gates, "cpu", "cpu")
    _, want = oracle(gates.numpy())
    _, wrong = _mistake_loss_and_grad(gates, "unsort_with_forward_permutation")
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12)
    assert np.abs(grad.numpy() - wrong).max() > 1e-3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_incoming_gradient_is_used(device, backend):
    gates = gates_like(10, (3,), seed=11).to(device)
    grads = []
    for upstream in (1.0, -3.0, 0.0):
        g = gates.clone().requires_grad_(True)
        loss = condkernels.batch_shaping_loss(g, backend=backend)
        loss.backward(torch.tensor(upstream, dtype=g.dtype, device=device))
        grads.append(g.grad.cpu())
    torch.testing.assert_close(grads[1], -3.0 * grads[0])
    assert (grads[2] == 0).all()


def test_hard_gates_carry_no_distribution_information():
    # The loss belongs on the soft probabilities: on hard 0/1 gates every value sits at eps or
    # 1-eps, where the density is clipped, so gates with very different logits look the same.
    logits = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hard = condkernels.binary_concrete_gate(logits, training=False)
    harder = condkernels.binary_concrete_gate(logits * 10, training=False)
    assert condkernels.batch_shaping_loss(hard) == condkernels.batch_shaping_loss(harder)
    soft, softer = condkernels.gate_probability(logits), condkernels.gate_probability(logits * 10)
    assert condkernels.batch_shaping_loss(soft) != condkernels.batch_shaping_loss(softer)


# --- registration -------------------------------------------------------------------------------

def test_opcheck():
    gates = gates_like(7, (3, 2), seed=12)
    for requires_grad in (False, True):
        for prior, p0, p1 in [("beta", 0.6, 0.4), ("gaussian", 0.5, 0.3), ("uniform", 0.0, 1.0)]:
            args = (gates.clone().requires_grad_(requires_grad), prior, p0, p1, "paper", 1e-3, 100.0, 1e-6)
            torch.library.opcheck(torch.ops.condkernels.batch_shaping_loss.default, args)
    # the second output is the gradient, already at each value's batch row
    _, grad_gates = torch.ops.condkernels.batch_shaping_loss(gates, "beta", 0.6, 0.4, "paper", 1e-3, 100.0, 1e-6)
    _, want = oracle(gates.numpy().reshape(7, -1))
    np.testing.assert_allclose(grad_gates.numpy().reshape(7, -1), want, rtol=1e-10)


def test_torch_compile_fullgraph():
    gates = gates_like(16, (4,), seed=13, dtype=torch.float32).requires_grad_(True)
    fn = torch.compile(lambda g: 0.75 * condkernels.batch_shaping_loss(g), fullgraph=True, backend="aot_eager")
    loss = fn(gates)
    torch.testing.assert_close(loss, 0.75 * condkernels.batch_shaping_loss(gates))
    loss.backward()
    _, want = oracle(gates.detach().double().numpy())
    np.testing.assert_allclose(gates.grad.double().numpy(), 0.75 * want, rtol=1e-4, atol=1e-7)


# --- bad input ----------------------------------------------------------------------------------

BAD = [
    ("alpha must be a positive number", dict(alpha=0.0)),
    ("beta must be a positive number", dict(beta=-0.4)),
    ("prior must be one of", dict(prior="laplace")),
    ("reduction must be one of", dict(reduction="none")),
    ("at least 1 example", dict(gates=torch.rand(0, 3, dtype=torch.float64))),
    ("at least 1 example", dict(gates=torch.tensor(0.5, dtype=torch.float64))),
    ("at least one gate", dict(gates=torch.rand(4, 0, dtype=torch.float64))),
    ("gates must be floating point", dict(gates=torch.ones(3, 2, dtype=torch.long))),
    ("needs prior_params", dict(prior="gaussian")),
    ("std .* must be positive", dict(prior="gaussian", prior_params=(0.0, 0.0))),
    ("low < high", dict(prior="uniform", prior_params=(1.0, 0.0))),
    ("prior_params is for the gaussian and uniform", dict(prior_params=(0.0, 1.0))),
    ("pdf_clip must be", dict(pdf_clip=(2.0, 1.0))),
    ("eps must be", dict(eps=0.7)),
    ("backend must be one of", dict(backend="scipy")),
    ("process_group was given but torch.distributed has no initialised default group", dict(process_group=object())),
]


@pytest.mark.parametrize("message,change", BAD, ids=[m for m, _ in BAD])
def test_bad_input_names_the_argument(message, change):
    kwargs = dict(gates=gates_like(5, (3,), seed=14))
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        condkernels.batch_shaping_loss(**kwargs)


@pytest.mark.parametrize("message,args", [
    ("alpha must be a positive", ("beta", 0.0, 0.4, "paper")),
    ("prior must be 'beta', 'gaussian' or 'uniform'", ("laplace", 0.6, 0.4, "paper")),
    ("reduction must be 'paper', 'sum' or 'mean'", ("beta", 0.6, 0.4, "none")),
])
def test_compiled_op_checks_its_arguments_too(message, args):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.condkernels.batch_shaping_loss(gates_like(5, (3,), seed=15), *args, 1e-3, 100.0, 1e-6)
    with pytest.raises(RuntimeError, match="at least 1 example"):
        torch.ops.condkernels.batch_shaping_loss(torch.rand(0, 2), "beta", 0.6, 0.4, "paper", 1e-3, 100.0, 1e-6)


def test_triton_opcheck():
    pytest.importorskip("triton")
    from condkernels.triton import batch_shaping_loss as _  # noqa: F401  (registers the ops)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gates = gates_like(6, (3,), seed=16).to(device)
    for requires_grad in (False, True):
        args = (gates.clone().requires_grad_(requires_grad), "beta", 0.6, 0.4, "paper", 1e-3, 100.0, 1e-6)
        torch.library.opcheck(torch.ops.condkernels.batch_shaping_loss_triton.default, args)


def test_autocast_computes_in_float32():
    """Inside torch.autocast the loss runs in float32, as PyTorch's losses do."""
    gates = gates_like(16, (5,), seed=3, dtype=torch.float32).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = condkernels.batch_shaping_loss(gates)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, condkernels.batch_shaping_loss(gates.detach().float()))
    loss.backward()
    assert gates.grad is not None and gates.grad.dtype == torch.bfloat16
