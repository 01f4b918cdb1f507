"""torch.vmap of every op with a batching rule, against one call per vmapped slice. The rule must
be what runs: it calls the op once (PyTorch's per-slice fallback calls it once a slice, and warns
for the ops defined in Python, a warning being an error here)."""

import warnings

import pytest
import torch
from torch.func import jacfwd, jacrev
from torch.profiler import ProfilerActivity, profile

import condkernels
from conftest import COMPILED_BACKENDS

D = torch.float64
N = 3  # the vmapped size


@pytest.fixture(autouse=True)
def fallback_warning_fails():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        yield


def _gen():
    return torch.Generator().manual_seed(0)


def vmapped_against_slices(fn, args, in_dims, calls=1):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = torch.vmap(fn, in_dims=in_dims)(*args)
    ops = [e.name for e in prof.events() if e.name.startswith("condkernels::")]
    assert len(ops) == 1 + calls, ops  # the batched call, then the rule's calls of the op
    slices = [fn(*(a.select(d, k) if d is not None else a for a, d in zip(args, in_dims))) for k in range(N)]
    torch.testing.assert_close(out, torch.stack(slices), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_cond_conv2d(device, backend):
    g = _gen()
    x = torch.randn(N, 2, 4, 5, 5, generator=g, dtype=D).to(device)
    routing = torch.rand(N, 2, 3, generator=g, dtype=D).to(device)
    weight = torch.randn(3, 6, 4, 3, 3, generator=g, dtype=D).to(device)
    bias = torch.randn(3, 6, generator=g, dtype=D).to(device)
    ensemble = torch.randn(N, 3, 6, 4, 3, 3, generator=g, dtype=D).to(device)
    f = lambda x, r, w: condkernels.cond_conv2d(x, r, w, bias, padding=1, backend=backend)  # noqa: E731
    vmapped_against_slices(f, (x, routing, weight), (0, 0, None))
    vmapped_against_slices(f, (x.transpose(0, 1), routing[0], weight), (1, None, None))  # x alone, at dim 1
    vmapped_against_slices(f, (x[0], routing, weight), (None, 0, None))  # the routing alone
    vmapped_against_slices(f, (x, routing[0], ensemble), (0, None, 0), calls=N)  # stacked weights: a call a slice


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_gated_conv2d(device, backend):
    g = _gen()
    x = torch.randn(N, 2, 4, 5, 5, generator=g, dtype=D).to(device)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=D).to(device)
    in_gate = (torch.rand(N, 2, 4, generator=g, dtype=D) * (torch.rand(N, 2, 4, generator=g) > 0.3)).to(device)
    out_gate = (torch.rand(N, 2, 6, generator=g) > 0.5).to(D).to(device)
    f = lambda x, gi, go, w: condkernels.gated_conv2d(x, w, None, gi, go, padding=1, backend=backend)  # noqa: E731
    vmapped_against_slices(f, (x, in_gate, out_gate, weight), (0, 0, 0, None))
    vmapped_against_slices(f, (x[0], in_gate, out_gate[0], weight), (None, 0, None, None))
    ensemble = torch.randn(N, 6, 4, 3, 3, generator=g, dtype=D).to(device)
    vmapped_against_slices(f, (x, in_gate, out_gate, ensemble), (0, 0, 0, 0), calls=N)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_beta_cdf_broadcasts_each_vmapped_argument(device, backend):
    g = _gen()
    x = (torch.rand(N, 7, generator=g, dtype=D) * 0.9 + 0.05).to(device)
    a = (torch.rand(N, 1, generator=g, dtype=D) + 0.3).to(device)
    f = lambda x, a: condkernels.beta_cdf(x, a, 0.4, backend=backend)  # noqa: E731
    vmapped_against_slices(f, (x, a), (0, 0))
    vmapped_against_slices(f, (x[0], a), (None, 0))  # a (1,) against x (7,): the slices are (7,)
    vmapped_against_slices(f, (x.t(), a[0]), (1, None))


def test_pooled_mlp():
    g = _gen()
    x = torch.randn(N, 2, 4, 5, 5, generator=g, dtype=D)
    w1 = torch.randn(5, 4, generator=g, dtype=D)
    w2 = torch.randn(N, 3, 5, generator=g, dtype=D)
    vmapped_against_slices(lambda x, w2: condkernels.pooled_mlp(x, w1, None, w2), (x, w2[0]), (0, None))
    vmapped_against_slices(lambda x, w2: condkernels.pooled_mlp(x, w1, None, w2), (x, w2), (0, 0), calls=N)


def test_jacfwd_batches_its_tangents_through_the_rule():
    g = _gen()
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=D)
    routing = torch.rand(2, 3, generator=g, dtype=D)
    weight = torch.randn(3, 6, 4, 3, 3, generator=g, dtype=D)
    f = lambda r, backend="cpu": condkernels.cond_conv2d(x, r, weight, padding=1, backend=backend)  # noqa: E731
    torch.testing.assert_close(jacfwd(f)(routing), jacrev(lambda r: f(r, "reference"))(routing))
