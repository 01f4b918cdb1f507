"""gated_conv2d against an independent float64 oracle (the dense masked formulation, one example at
a time), on every backend that runs here, through both CPU paths (compacted GEMMs and dense)."""

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

import condkernels
from condkernels.ops._conv_args import same_padding
from conftest import COMPILED_BACKENDS, triton_interpreted

DENSE_ABOVE = "CONDKERNELS_GATED_DENSE_ABOVE"
# The CPU kernels' two paths: "compacted" never takes the dense path, "dense" always does.
PATHS = {"compacted": "2", "dense": "-1"}


def oracle(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups):
    """y[b] = out_gate[b] * (conv2d(in_gate[b] * x[b], weight) + bias), one example at a time, float64.

    ``padding`` is (h_begin, h_end, w_begin, w_end).
    """
    h0, h1, w0, w1 = padding
    x, weight = x.double(), weight.double()
    bias = bias.double() if bias is not None else None
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        if in_gate is not None:
            xb = xb * in_gate[b].double()[None, :, None, None]
        yb = F.conv2d(F.pad(xb, (w0, w1, h0, h1)), weight, bias, stride, 0, dilation, groups)
        if out_gate is not None:
            yb = yb * out_gate[b].double()[None, :, None, None]
        out.append(yb)
    return torch.cat(out)


def make_gate(kind, batch, channels, gen, dtype=torch.float64):
    """Gates of one kind; rows 0 and 1 are all-closed and all-open examples when batch > 2."""
    if kind.startswith("binary"):
        density = float(kind.split("-")[1])
        gate = (torch.rand(batch, channels, generator=gen) < density).to(dtype)
    elif kind == "relu":  # DeepMoE: ReLU of a projection, real values with exact zeros
        gate = torch.relu(torch.randn(batch, channels, generator=gen, dtype=dtype))
    else:
        raise ValueError(kind)
    if batch > 2:
        gate[0] = 0
        gate[1] = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    return gate.to(dtype)


def pad4(padding, hw, k, stride, dilation):
    if padding == "same":
        return (*same_padding(hw[0], k, stride, dilation), *same_padding(hw[1], k, stride, dilation))
    if isinstance(padding, tuple):  # (height, width)
        return (padding[0], padding[0], padding[1], padding[1])
    return (padding,) * 4


LAYERS = [  # (name, cin, cout, groups, k)
    ("pointwise", 8, 12, 1, 1),
    ("dense_k3", 6, 10, 1, 3),
    ("grouped_k3", 8, 12, 4, 3),
    ("grouped_k1", 6, 4, 2, 1),
]
GATES = ["binary-0.1", "binary-0.5", "binary-0.9", "relu"]
WHICH = ["in", "out", "both"]


def random_configs(n, seed):
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        name, cin, cout, groups, k = LAYERS[i % len(LAYERS)]
        configs.append(dict(
            layer=name, cin=cin, cout=cout, groups=groups, k=k,
            gates=GATES[(i // len(LAYERS)) % len(GATES)], which=WHICH[i % len(WHICH)],
            batch=rng.choice([1, 3, 5]), hw=(rng.randint(5, 9), rng.randint(5, 9)),
            stride=rng.choice([1, 2]), dilation=rng.choice([1, 1, 2]) if k > 1 else 1,
            padding=rng.choice([0, 1, "same"]) if k > 1 else rng.choice([0, "same"]),
            bias=rng.random() < 0.6, channels_last=rng.random() < 0.25,
        ))
    return configs


CONFIGS = random_configs(24, seed=4321)


def config_id(c):
    return "{layer}-{which}-{gates}-B{batch}-s{stride}-d{dilation}-p{padding}-{b}{cl}".format(
        b="bias" if c["bias"] else "nobias", cl="-cl" if c["channels_last"] else "", **c
    )


def make_inputs(cfg, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["batch"], cfg["cin"], *cfg["hw"], generator=gen, dtype=dtype)
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], cfg["k"], cfg["k"], generator=gen, dtype=dtype)
    b = torch.randn(cfg["cout"], generator=gen, dtype=dtype) if cfg["bias"] else None
    ig = make_gate(cfg["gates"], cfg["batch"], cfg["cin"], gen, dtype) if cfg["which"] in ("in", "both") else None
    og = make_gate(cfg["gates"], cfg["batch"], cfg["cout"], gen, dtype) if cfg["which"] in ("out", "both") else None
    if cfg.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b, ig, og


def call(backend, *args, **kwargs):
    """gated_conv2d, skipping backends whose gated_conv2d kernels are not part of this build."""
    try:
        return condkernels.gated_conv2d(*args, backend=backend, **kwargs)
    except RuntimeError as e:
        if "is not implemented" in str(e):
            pytest.skip(str(e))
        raise


def conv_kwargs(cfg):
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])


def oracle_for(cfg, x, w, b, ig, og):
    p4 = pad4(cfg["padding"], cfg["hw"], cfg["k"], cfg["stride"], cfg["dilation"])
    return oracle(x, w, b, ig, og, cfg["stride"], p4, cfg["dilation"], cfg["groups"])


def backend_params():
    params = []
    for p in COMPILED_BACKENDS:
        device, backend = p.values
        if backend == "cpu":
            for path, value in PATHS.items():
                params.append(pytest.param(device, backend, value, id=f"cpu-{path}", marks=p.marks))
        else:
            params.append(pytest.param(device, backend, None, id=p.id, marks=p.marks))
    return params + [pytest.param("cpu", "reference", None, id="reference")]


BACKENDS = backend_params()


@pytest.fixture
def path(request, monkeypatch):
    value = request.node.callspec.params.get("dense_above")
    if value is not None:
        monkeypatch.setenv(DENSE_ABOVE, value)
    return value


@pytest.mark.parametrize("device,backend,dense_above", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_forward_and_every_gradient_match_oracle(cfg, device, backend, dense_above, path):
    inputs = [t.to(device) if t is not None else None for t in make_inputs(cfg)]
    leaves = [t.requires_grad_(True) for t in inputs if t is not None]
    y = call(backend, *inputs, **conv_kwargs(cfg))
    ref_inputs = [t.detach().cpu().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y_ref = oracle_for(cfg, *ref_inputs)
    assert y.shape == y_ref.shape
    if cfg["channels_last"] and backend != "reference":
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), rtol=1e-9, atol=1e-9)

    grad = torch.randn_like(y_ref)
    (y * grad.to(y.device)).sum().backward()
    (y_ref * grad).sum().backward()
    names = [n for n, t in zip("x weight bias in_gate out_gate".split(), inputs) if t is not None]
    refs = [t for t in ref_inputs if t is not None]
    for name, got, want in zip(names, leaves, refs):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device,backend,dense_above", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS[:8], ids=config_id)
def test_inference_and_detached_gates(cfg, device, backend, dense_above, path):
    """Gates that need no gradient take the inference form: same values, same x/weight/bias grads."""
    x, w, b, ig, og = [t.to(device) if t is not None else None for t in make_inputs(cfg, seed=1)]
    y_ref = oracle_for(cfg, x.cpu(), w.cpu(), None if b is None else b.cpu(),
                       None if ig is None else ig.cpu(), None if og is None else og.cpu())
    with torch.no_grad():
        y = call(backend, x, w, b, ig, og, **conv_kwargs(cfg)).cpu()
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    y = call(backend, x, w, b, ig, og, **conv_kwargs(cfg))
    grads = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.detach().cpu().clone().requires_grad_(True) for t in leaves]
    rx, rw = ref_leaves[:2]
    rb = ref_leaves[2] if b is not None else None
    ref = oracle_for(cfg, rx, rw, rb, None if ig is None else ig.cpu(), None if og is None else og.cpu())
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device,backend,dense_above", [p for p in BACKENDS if p.id != "reference"])
@pytest.mark.parametrize("layer", ["pointwise", "dense_k3", "grouped_k3"])
def test_gradcheck(layer, device, backend, dense_above, path):
    _, cin, cout, groups, k = next(l for l in LAYERS if l[0] == layer)
    cfg = dict(batch=3, cin=cin, cout=cout, groups=groups, k=k, hw=(5, 6), bias=True, gates="relu", which="both")
    inputs = [t.to(device).requires_grad_(True) for t in make_inputs(cfg, seed=7)]
    fn = lambda *a: call(backend, *a, stride=2, padding="same", groups=groups)  # noqa: E731
    # Under the interpreter every Triton launch runs in Python: fast mode checks random projections
    # of the same Jacobians instead of one launch pair per input element.
    fast = backend == "triton" and triton_interpreted()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_nan_and_negative_gates_stay_in_their_example(dense_above, monkeypatch):
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    cfg = dict(batch=4, cin=6, cout=8, groups=1, k=3, hw=(6, 6), bias=True, gates="binary-0.5", which="both")
    x, w, b, ig, og = make_inputs(cfg, seed=3)
    ig[0, 1], og[0, 2] = float("nan"), float("nan")  # example 0: NaN gates
    ig[1] = -ig[1].abs() - 0.5  # example 1: negative gates
    og[1, ::2] = -2.0
    leaves = [t.requires_grad_(True) for t in (x, w, b, ig, og)]
    y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
    y_ref = oracle(x.detach(), w.detach(), b.detach(), ig.detach(), og.detach(), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    # example 0 is NaN wherever the dense formula makes it NaN, except in its closed output
    # channels, which are skipped and written as 0; the other examples are untouched
    y_ref[0, og[0] == 0] = 0
    assert torch.equal(torch.isnan(y[0]), torch.isnan(y_ref[0]))
    assert torch.isnan(y[0]).any() and (y[0, og[0] == 0] == 0).all()
    torch.testing.assert_close(y[1:], y_ref[1:], rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    gx, gig, gog = torch.autograd.grad((y * g).sum(), (x, ig, og))
    rl = [t.detach().clone().requires_grad_(True) for t in leaves]
    ry = oracle(*rl, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    rgx, rgig, rgog = torch.autograd.grad((ry * g).sum(), (rl[0], rl[3], rl[4]))
    for got, want in ((gx, rgx), (gig, rgig), (gog, rgog)):
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-9, atol=1e-9)
        assert torch.isfinite(got[1:]).all()


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_tiny_float64_gates_are_open(dense_above, monkeypatch):
    """Only an exact 0 closes a channel: float64 gates far below float32's range still scale it."""
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    cfg = dict(batch=2, cin=4, cout=5, groups=1, k=3, hw=(5, 5), bias=False, gates="binary-0.5", which="both")
    x, w, _, ig, og = make_inputs(cfg, seed=11)
    ig[0], og[0] = 0.0, 1.0  # example 0: only input channel 0 open, at 1e-300
    ig[0, 0] = 1e-300
    ig[1], og[1], og[1, 1] = 1.0, 0.0, 1e-300  # example 1: only output channel 1 open, at 1e-300
    y = condkernels.gated_conv2d(x, w, None, ig, og, padding=1)
    want = oracle(x, w, None, ig, og, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert (want[:, :].abs().amax(dim=(1, 2, 3)) > 0).all()
    torch.testing.assert_close(y * 1e300, want * 1e300, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_closed_gates_still_learn(dense_above, monkeypatch):
    """A gate at 0 gets the gradient of its ungated channel: <grad_y, conv + bias> for out_gate,
    <x, d(in_gate * x)> for in_gate; skipping that work would freeze closed gates shut."""
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    cfg = dict(batch=2, cin=4, cout=5, groups=1, k=3, hw=(6, 6), bias=True, gates="binary-0.5", which="both")
    x, w, b, _, _ = make_inputs(cfg)
    ig = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=x.dtype, requires_grad=True)
    og = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0, 1.0]], dtype=x.dtype, requires_grad=True)
    y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
    g = torch.randn_like(y)
    gig, gog = torch.autograd.grad((y * g).sum(), (ig, og))
    z = oracle(x, w, b, ig.detach(), None, 1, (1, 1, 1, 1), 1, 1)
    torch.testing.assert_close(gog, (g * z).sum((2, 3)))
    assert (gog[og == 0] != 0).all() and (gig[ig == 0] != 0).all()


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_closed_input_channels_are_not_read(dense_above, monkeypatch):
    """A closed input channel is skipped, so even inf/NaN there cannot reach the output."""
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    cfg = dict(batch=2, cin=4, cout=5, groups=1, k=3, hw=(6, 6), bias=False, gates="binary-0.5", which="in")
    x, w, _, _, _ = make_inputs(cfg)
    ig = torch.ones(2, 4, dtype=torch.float64)
    ig[0, 2] = 0
    x[0, 2] = float("inf")
    x[0, 2, 0, 0] = float("nan")
    y = condkernels.gated_conv2d(x, w, None, ig, None, padding=1)
    x_clean = x.clone()
    x_clean[0, 2] = 0
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, oracle(x_clean, w, None, ig, None, 1, (1, 1, 1, 1), 1, 1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
@pytest.mark.parametrize("layer", ["pointwise", "dense_k3", "grouped_k3"])
def test_low_precision_cpu(layer, dtype, tol, dense_above, monkeypatch):
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    _, cin, cout, groups, k = next(l for l in LAYERS if l[0] == layer)
    cfg = dict(batch=4, cin=cin, cout=cout, groups=groups, k=k, hw=(9, 9), bias=True, gates="relu", which="both")
    inputs = make_inputs(cfg, dtype=dtype, seed=3)
    leaves = [t.requires_grad_(True) for t in inputs]
    y = condkernels.gated_conv2d(*inputs, padding=k // 2, groups=groups)
    assert y.dtype == dtype
    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    y_ref = oracle(*ref_leaves, 1, (k // 2,) * 4, 1, groups)
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < tol
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * g.to(dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((y_ref * g).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12) < tol


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_batch_sizes_zero_and_one_and_asymmetric_padding(dense_above, monkeypatch):
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    cfg = dict(batch=1, cin=4, cout=6, groups=1, k=3, hw=(8, 8), bias=True, gates="binary-0.5", which="both")
    x, w, b, ig, og = make_inputs(cfg, seed=2)
    y = condkernels.gated_conv2d(x, w, b, ig, og, stride=2, padding="same")  # pads (0, 1, 0, 1)
    assert y.shape == (1, 6, 4, 4)
    torch.testing.assert_close(y, oracle(x, w, b, ig, og, 2, (0, 1, 0, 1), 1, 1))
    leaves = [t[:0].clone().requires_grad_(True) for t in (x, ig, og)]
    y0 = condkernels.gated_conv2d(leaves[0], w, b, leaves[1], leaves[2], padding=1)
    assert y0.shape == (0, 6, 8, 8)
    y0.sum().backward()
    assert all(t.grad.shape == t.shape for t in leaves)


GEMM_POSITIONS = "CONDKERNELS_GATED_GEMM_POSITIONS"
INDIRECT_POSITIONS = "CONDKERNELS_GATED_INDIRECT_POSITIONS"
PADDED_POSITIONS = "CONDKERNELS_GATED_PADDED_POSITIONS"


@pytest.mark.parametrize("gemm_positions", ["0", "1000000"], ids=["onednn", "gemm"])
@pytest.mark.parametrize("which", ["in", "out", "both", "none"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_example_spatial_paths(gemm_positions, which, groups, dtype, monkeypatch):
    # Batch 1 has its own spatial paths: oneDNN's result returned as y (no output gate), the input
    # read in place (every input open), im2col + GEMM on small planes. Both kernels, every gate mix.
    monkeypatch.setenv(DENSE_ABOVE, "2")
    monkeypatch.setenv(GEMM_POSITIONS, gemm_positions)
    monkeypatch.setenv(INDIRECT_POSITIONS, "0")  # float32 would take the indirect GEMM instead
    gen = torch.Generator().manual_seed(5)
    cin, cout = 32, 48
    x = torch.randn(1, cin, 9, 9, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin // groups, 3, 3, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype)
    ig = (torch.rand(1, cin, generator=gen) < 0.5).to(dtype) if which in ("in", "both") else None
    og = (torch.rand(1, cout, generator=gen) < 0.5).to(dtype) if which in ("out", "both") else None
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for stride in (1, 2):
        y = condkernels.gated_conv2d(x, w, b, ig, og, stride=stride, padding=1, groups=groups)
        want = oracle(x, w, b, ig, og, stride, (1, 1, 1, 1), 1, groups)
        torch.testing.assert_close(y.double(), want, **tol)
    if ig is not None:  # every input closed: the bias alone (times out_gate)
        y = condkernels.gated_conv2d(x, w, b, torch.zeros_like(ig), og, padding=1, groups=groups)
        torch.testing.assert_close(y.double(), oracle(x, w, b, torch.zeros_like(ig), og, 1, (1, 1, 1, 1), 1, groups),
                                   **tol)


def assert_float32_inference(y, want, og, channels_last):
    """y against the float64 oracle, in x's memory format, with closed outputs exactly 0."""
    assert y.dtype == torch.float32 and y.shape == want.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    if og is not None:
        assert (y.permute(1, 0, 2, 3)[(og == 0).T] == 0).all()


# float32 inference with an in_gate on planes up to 16x16 (any gates under 8x8) takes the indirect
# GEMM on AVX-512 and AVX2 CPUs (each instruction set's build is tested where the CPU has it): odd
# channel counts (row blocks of every height), planes of 1 to 4 pixel vectors and their tails,
# strided and padded.
INDIRECT_SHAPES = [  # (batch, cin, cout, hw, stride, padding)
    (1, 37, 21, 7, 1, 1),
    (5, 19, 50, 7, 1, 1),
    (3, 24, 13, 14, 1, 1),
    (4, 9, 17, 16, 1, 1),
    (2, 33, 7, 9, 2, 1),
    (6, 16, 29, 3, 1, 0),
    (3, 12, 8, 6, 1, "same"),
]


@pytest.mark.parametrize("shape", INDIRECT_SHAPES, ids=lambda s: "B{}-{}to{}-{}x-s{}-p{}".format(*s))
@pytest.mark.parametrize("which", ["in", "out", "both", "none"])
@pytest.mark.parametrize("indirect", ["on", "off", "small-runs"])
def test_float32_inference_indirect_gemm(shape, which, indirect, vector_isa, monkeypatch):
    batch, cin, cout, hw, stride, padding = shape
    monkeypatch.setenv(DENSE_ABOVE, "2")
    if indirect == "off":
        monkeypatch.setenv(INDIRECT_POSITIONS, "0")
    elif indirect == "small-runs":  # one example per run, row chunks that split the row blocks
        monkeypatch.setenv("CONDKERNELS_GATED_INDIRECT_RUN_BYTES", "1")
        monkeypatch.setenv("CONDKERNELS_GATED_INDIRECT_ROW_CHUNK", "5")
    cfg = dict(batch=batch, cin=cin, cout=cout, groups=1, k=3, hw=(hw, hw), bias=True, gates="binary-0.4",
               which=which, channels_last=batch % 2 == 0)
    x, w, b, ig, og = make_inputs(cfg, dtype=torch.float32, seed=batch + cin)
    if ig is not None and batch > 3:
        ig[3] = torch.randn(cin) * (torch.rand(cin) < 0.5)  # real-valued, negative, exact zeros
    with torch.no_grad():
        y = condkernels.gated_conv2d(x, w, b, ig, og, stride=stride, padding=padding)
    want = oracle_for(dict(cfg, stride=stride, padding=padding, dilation=1), x, w, b, ig, og)
    assert_float32_inference(y, want, og, cfg["channels_last"])


# float32 inference on larger planes reads zero-padded planes in place (padded_forward), split into
# phases when strided: tiles of whole output rows with a short last tile, padding of every form,
# dilation, strides (2, 3, unequal, with dilation, planes not a multiple of the stride), kernels
# other than 3x3, few examples (tiles and channel chunks split across threads) and many (whole examples).
PADDED_SHAPES = [  # (batch, cin, cout, hw, k, padding, dilation, stride)
    (1, 37, 21, 30, 3, 1, 1, 1),
    (3, 19, 50, 21, 3, 2, 2, 1),
    (5, 24, 13, 17, 3, "same", 1, 1),
    (2, 9, 17, 20, 2, "same", 1, 1),
    (1, 6, 30, 23, 5, (2, 1), 1, 1),
    (6, 16, 29, 19, 3, 0, 1, 1),
    (1, 40, 70, 14, 3, 1, 1, 1),
    (1, 21, 34, 29, 3, 1, 1, 2),
    (4, 13, 18, 24, 3, 1, 1, 2),
    (3, 10, 15, 25, 3, "same", 1, 2),
    (1, 8, 19, 31, 5, 2, 2, 3),
    (2, 11, 12, 27, 2, 0, 1, (2, 1)),
    (1, 7, 23, 26, 4, (1, 2), 1, (1, 3)),
]


@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=lambda s: "B{}-{}to{}-{}x-k{}-p{}-d{}-s{}".format(*s))
@pytest.mark.parametrize("which", ["in", "out", "both", "none"])
@pytest.mark.parametrize("padded", ["on", "off"])
def test_float32_inference_padded_planes(shape, which, padded, vector_isa, monkeypatch):
    batch, cin, cout, hw, k, padding, dilation, stride = shape
    monkeypatch.setenv(DENSE_ABOVE, "2")
    monkeypatch.setenv(PADDED_POSITIONS, "0" if padded == "on" else "1000000000")
    cfg = dict(batch=batch, cin=cin, cout=cout, groups=1, k=k, hw=(hw, hw), bias=True, gates="binary-0.4",
               which=which, channels_last=batch % 2 == 0, stride=stride, padding=padding, dilation=dilation)
    x, w, b, ig, og = make_inputs(cfg, dtype=torch.float32, seed=batch + cin + k)
    if ig is not None and batch > 2:
        ig[2] = torch.randn(cin) * (torch.rand(cin) < 0.5)  # real-valued, negative, exact zeros
    if ig is not None:
        ig[0] = 0  # example 0: every input closed: the bias alone (times out_gate)
    with torch.no_grad():
        y = condkernels.gated_conv2d(x, w, b, ig, og, stride=stride, padding=padding, dilation=dilation)
    want = oracle_for(cfg, x, w, b, ig, og)
    assert_float32_inference(y, want, og, cfg["channels_last"])


@pytest.fixture(params=["indirect", "padded"])
def sparse_float32_kernel(request, monkeypatch):
    """Forces float32 inference onto one of its sparse kernels: the indirect GEMM or the padded planes."""
    monkeypatch.setenv(DENSE_ABOVE, "2")
    monkeypatch.setenv(PADDED_POSITIONS, "0" if request.param == "padded" else "1000000000")
    return request.param


def test_float32_inference_every_open_row_count(sparse_float32_kernel, vector_isa):
    """1 to 20 open outputs: the indirect GEMM's row blocks of every height, a short last block, and
    the last max_rows + 1 or + 2 rows split in two; planes of one and of several pixel vectors."""
    gen = torch.Generator().manual_seed(11)
    cout = 20
    w = torch.randn(cout, 6, 3, 3, generator=gen)
    b = torch.randn(cout, generator=gen)
    ig = torch.ones(1, 6)
    ig[0, 2] = 0  # an in_gate: the indirect GEMM's condition on planes from 8x8
    for hw in (3, 11):  # one pixel vector; several, split into blocks of 2 and 1 vectors
        x = torch.randn(1, 6, hw, hw, generator=gen)
        for open_rows in range(1, cout + 1):
            og = torch.zeros(1, cout)
            og[0, torch.randperm(cout, generator=gen)[:open_rows]] = 1
            with torch.no_grad():
                y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
            want = oracle(x.double(), w.double(), b.double(), ig.double(), og.double(), 1, (1, 1, 1, 1), 1, 1)
            assert_float32_inference(y, want, og, channels_last=False)


def test_float32_inference_every_plane_width(sparse_float32_kernel, vector_isa):
    """Output rows 1 to 18 pixels wide: a last pixel vector of every lane count, and on padded
    planes every pattern of stored lanes per vector (the columns past each row are dropped)."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(9, 5, 3, 3, generator=gen)
    b = torch.randn(9, generator=gen)
    ig = torch.ones(2, 5)
    ig[:, 1] = 0
    og = (torch.rand(2, 9, generator=gen) < 0.6).float()
    for width in range(1, 19):
        x = torch.randn(2, 5, 3, width, generator=gen)
        with torch.no_grad():
            y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
        want = oracle(x.double(), w.double(), b.double(), ig.double(), og.double(), 1, (1, 1, 1, 1), 1, 1)
        assert_float32_inference(y, want, og, channels_last=False)


def test_float32_inference_gates_stay_in_their_example(sparse_float32_kernel, vector_isa):
    """NaN and negative gates, and inf in a closed input channel, on the float32 inference paths."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 20, 7, 7, generator=gen)
    w = torch.randn(22, 20, 3, 3, generator=gen)
    b = torch.randn(22, generator=gen)
    ig = (torch.rand(4, 20, generator=gen) < 0.5).float()
    og = (torch.rand(4, 22, generator=gen) < 0.5).float()
    ig[0], og[0] = 0, 1  # example 0: every input closed: the bias alone
    ig[1] = 1  # example 1: every input open
    og[1] = 0  # ... and every output closed
    ig[2, 3], ig[2, 4], og[2, 5] = float("nan"), 0.0, float("nan")  # example 2: NaN gates
    og[2, 6] = 0.0
    x[2, 4] = float("inf")  # closed input channel: never read
    ig[3] = -ig[3] * 2  # example 3: negative gates
    og[3, ::3] = -1.5
    with torch.no_grad():
        y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
    x_clean = x.clone()
    x_clean[2, 4] = 0
    want = oracle(x_clean, w, b, ig, og, 1, (1, 1, 1, 1), 1, 1)
    want[2, og[2] == 0] = 0  # closed outputs are skipped, not NaN * 0
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.isnan(y[2]).any() and (y[2, 6] == 0).all() and (y[1] == 0).all()
    ok = ~torch.isnan(want)
    torch.testing.assert_close(y.double()[ok], want[ok], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[0], (b[:, None, None] * og[0, :, None, None]).expand(22, 7, 7))


def test_backends_without_gated_kernels_say_so():
    x, w, b, ig, og = _small()
    has_cuda = condkernels._library.has_kernel("gated_conv2d", "CUDA")
    try:
        has_triton = importlib.util.find_spec("condkernels.triton.gated_conv2d") is not None
    except ModuleNotFoundError:
        has_triton = False
    for backend, present in (("triton", has_triton), ("cuda", has_cuda)):
        if present:
            continue
        # either this op's "is not implemented" or the package-wide "built without its CUDA kernels"
        with pytest.raises(RuntimeError, match=f"backend='{backend}' (is not implemented|was asked for)"):
            condkernels.gated_conv2d(x, w, b, ig, og, padding=1, backend=backend)


def _op_args(seed=11, requires_grad=False, cl=False, bias=True, which="both", gates="binary-0.5"):
    cfg = dict(batch=3, cin=4, cout=6, groups=2, k=3, hw=(5, 5), bias=bias, gates=gates, which=which)
    x, w, b, ig, og = make_inputs(cfg, seed=seed)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [t.clone().requires_grad_(requires_grad) if t is not None else None for t in (x, w, b, ig, og)]
    return (*args, [1, 1], [1, 2, 1, 1], [1, 1], 2)


@pytest.mark.parametrize("dense_above", list(PATHS.values()), ids=list(PATHS))
def test_opcheck(dense_above, monkeypatch):
    monkeypatch.setenv(DENSE_ABOVE, dense_above)
    for op in (torch.ops.condkernels.gated_conv2d.default, torch.ops.condkernels._gated_conv2d_with_ungated.default):
        for requires_grad, cl, bias, which in [(False, False, True, "both"), (True, True, True, "both"),
                                               (True, False, False, "in"), (True, False, True, "out")]:
            torch.library.opcheck(op, _op_args(requires_grad=requires_grad, cl=cl, bias=bias, which=which))


def test_backward_op_opcheck():
    x, w, b, ig, og, *conv = _op_args()
    g = torch.randn(3, 6, 6, 5, dtype=torch.float64)
    ungated = torch.randn(3, 6, 6, 5, dtype=torch.float64)
    for mask in ([True] * 5, [False, True, False, False, True], [True, False, True, True, False]):
        for u in (None, ungated):
            torch.library.opcheck(torch.ops.condkernels._gated_conv2d_backward.default,
                                  (g, x, w, b, ig, og, u, *conv, mask))


@pytest.mark.parametrize("gates_learn", [False, True])
def test_torch_compile_fullgraph(gates_learn):
    cfg = dict(batch=3, cin=4, cout=6, groups=1, k=3, hw=(6, 6), bias=True, gates="relu", which="both")
    inputs = make_inputs(cfg, dtype=torch.float32)
    for i, t in enumerate(inputs):
        t.requires_grad_(i < 3 or gates_learn)
    fn = torch.compile(lambda *a: condkernels.gated_conv2d(*a, padding="same"), fullgraph=True, backend="aot_eager")
    y = fn(*inputs)
    torch.testing.assert_close(y, condkernels.gated_conv2d(*inputs, padding="same"))
    y.sum().backward()
    assert all((t.grad is not None) == t.requires_grad for t in inputs)


def test_torch_compile_inductor():
    cfg = dict(batch=2, cin=4, cout=6, groups=1, k=3, hw=(6, 6), bias=True, gates="binary-0.5", which="both")
    inputs = make_inputs(cfg, dtype=torch.float32)
    fn = torch.compile(lambda *a: torch.relu(condkernels.gated_conv2d(*a, padding=1)), fullgraph=True)
    torch.testing.assert_close(fn(*inputs), torch.relu(condkernels.gated_conv2d(*inputs, padding=1)))


# --- bad input: a clear error that names the argument -------------------------------------------

BAD_INPUTS = [
    ("x must be a 4-D", lambda x, w, b, ig, og: dict(x=x[0])),
    ("weight must be a 4-D", lambda x, w, b, ig, og: dict(weight=w[0])),
    ("in_gate must have shape \\(B, Cin\\) = \\(2, 4\\)", lambda x, w, b, ig, og: dict(in_gate=ig[:, :3])),
    ("in_gate must have shape \\(B, Cin\\)", lambda x, w, b, ig, og: dict(in_gate=ig[:1])),
    ("out_gate must have shape \\(B, Cout\\) = \\(2, 6\\)", lambda x, w, b, ig, og: dict(out_gate=og.t())),
    ("out_gate must have shape \\(B, Cout\\)", lambda x, w, b, ig, og: dict(out_gate=og[0])),
    ("in_gate has dtype torch.float32", lambda x, w, b, ig, og: dict(in_gate=ig.float())),
    ("out_gate has dtype torch.float16", lambda x, w, b, ig, og: dict(out_gate=og.half())),
    ("in_gate is on meta", lambda x, w, b, ig, og: dict(in_gate=ig.to("meta"))),
    ("out_gate is on meta", lambda x, w, b, ig, og: dict(out_gate=og.to("meta"))),
    ("weight has dtype torch.float32", lambda x, w, b, ig, og: dict(weight=w.float())),
    ("bias must have shape", lambda x, w, b, ig, og: dict(bias=b[:2])),
    ("weight has 3 input channels per group",
     lambda x, w, b, ig, og: dict(weight=torch.randn(6, 3, 3, 3, dtype=w.dtype))),
    ("in_channels \\(4\\) is not divisible by groups \\(3\\)", lambda x, w, b, ig, og: dict(groups=3)),
    ("larger than the padded input",
     lambda x, w, b, ig, og: dict(weight=torch.randn(6, 4, 9, 9, dtype=w.dtype), padding=0)),
    ("weight's kernel must be at least 1x1",
     lambda x, w, b, ig, og: dict(weight=torch.randn(6, 4, 3, 0, dtype=w.dtype))),
    ("stride must be positive", lambda x, w, b, ig, og: dict(stride=0)),
    ("padding must be non-negative", lambda x, w, b, ig, og: dict(padding=-1)),
    ("backend must be one of", lambda x, w, b, ig, og: dict(backend="mkl")),
    ("groups must be a positive int", lambda x, w, b, ig, og: dict(groups=0)),
    ("groups must be a positive int", lambda x, w, b, ig, og: dict(groups=True)),
    ("stride must be an int or a pair", lambda x, w, b, ig, og: dict(stride=(True, 1))),
    ("padding must be an int or a pair", lambda x, w, b, ig, og: dict(padding=True)),
]


def _small():
    return make_inputs(dict(batch=2, cin=4, cout=6, groups=1, k=3, hw=(6, 6), bias=True, gates="binary-0.5",
                            which="both"))


@pytest.mark.parametrize("message,change", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_names_the_argument(message, change):
    x, w, b, ig, og = _small()
    kwargs = dict(x=x, weight=w, bias=b, in_gate=ig, out_gate=og, padding=1)
    condkernels.gated_conv2d(**kwargs)  # a good call first: what its checks concluded is remembered
    kwargs.update(change(x, w, b, ig, og))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        condkernels.gated_conv2d(**kwargs)


@pytest.mark.parametrize("op", ["gated_conv2d", "_gated_conv2d_with_ungated"])
@pytest.mark.parametrize(
    "message,args",
    [
        ("in_gate must have shape \\(B, Cin\\)", lambda x, w, b, ig, og: (x, w, b, ig[:, :3], og)),
        ("out_gate must have shape \\(B, Cout\\)", lambda x, w, b, ig, og: (x, w, b, ig, og[:1])),
        ("in_gate has dtype", lambda x, w, b, ig, og: (x, w, b, ig.float(), og)),
        ("out_gate has dtype", lambda x, w, b, ig, og: (x, w, b, ig, og.float())),
        ("bias must have shape", lambda x, w, b, ig, og: (x, w, b[:1], ig, og)),
        ("weight must be 4-D", lambda x, w, b, ig, og: (x, w[0], b, ig, og)),
        ("kernel must be at least 1x1", lambda x, w, b, ig, og: (x, w[:, :, :0], b, ig, og)),
    ],
)
def test_compiled_op_checks_its_arguments_too(op, message, args):
    """torch.ops.condkernels.gated_conv2d called directly must not crash on bad input either."""
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.condkernels, op)(*args(*_small()), [1, 1], [1, 1, 1, 1], [1, 1], 1)


def test_compiled_backward_checks_grad_out():
    x, w, b, ig, og = _small()
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.condkernels._gated_conv2d_backward(
            torch.zeros(2, 6, 5, 5, dtype=x.dtype), x, w, b, ig, og, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, [True] * 5
        )
    with pytest.raises(RuntimeError, match="ungated must have shape"):
        torch.ops.condkernels._gated_conv2d_backward(
            torch.zeros(2, 6, 6, 6, dtype=x.dtype), x, w, b, ig, og, torch.zeros(1, dtype=x.dtype),
            [1, 1], [1, 1, 1, 1], [1, 1], 1, [True] * 5
        )


def test_cpu_vector_isa_cap(monkeypatch):
    """CONDKERNELS_CPU_ISA=none takes the library paths, still exact; a value it does not know is named."""
    monkeypatch.setenv(DENSE_ABOVE, "2")
    monkeypatch.setenv(PADDED_POSITIONS, "0")
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 12, 10, 10, generator=gen), torch.randn(14, 12, 3, 3, generator=gen)
    ig = (torch.rand(2, 12, generator=gen) < 0.5).float()
    monkeypatch.setenv("CONDKERNELS_CPU_ISA", "none")
    assert condkernels.cpu_vector_isa() == "none"
    with torch.no_grad():
        y = condkernels.gated_conv2d(x, w, None, ig, None, padding=1)
    torch.testing.assert_close(y.double(), oracle(x, w, None, ig, None, 1, (1, 1, 1, 1), 1, 1), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("CONDKERNELS_CPU_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="CONDKERNELS_CPU_ISA must be avx512, avx2 or none"):
        condkernels.gated_conv2d(x, w, None, ig, None, padding=1)


@pytest.mark.parametrize("kernel", ["padded", "indirect", "per_example", "dense", "float64"])
def test_every_path_under_inference_mode(kernel, monkeypatch):
    """Under torch.inference_mode (inference tensors, ATen calls from worker threads) every CPU path
    gives what it gives outside it."""
    monkeypatch.setenv(DENSE_ABOVE, "0" if kernel == "dense" else "2")
    monkeypatch.setenv(PADDED_POSITIONS, "0" if kernel == "padded" else "1000000000")
    monkeypatch.setenv(INDIRECT_POSITIONS, "1000000" if kernel == "indirect" else "0")
    dtype = torch.float64 if kernel == "float64" else torch.float32
    gen = torch.Generator().manual_seed(11)
    batch = max(4, 2 * torch.get_num_threads())
    x = torch.randn(batch, 12, 9, 9, generator=gen, dtype=dtype)
    w = torch.randn(10, 12, 3, 3, generator=gen, dtype=dtype)
    b = torch.randn(10, generator=gen, dtype=dtype)
    ig = (torch.rand(batch, 12, generator=gen) < 0.5).to(dtype)
    og = (torch.rand(batch, 10, generator=gen) < 0.5).to(dtype)
    want = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
    with torch.inference_mode():
        got = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
        got_inside = condkernels.gated_conv2d(x.clone(), w.clone(), b.clone(), ig.clone(), og.clone(), padding=1)
    assert got.is_inference() and got_inside.is_inference()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_inside, want, rtol=1e-6, atol=1e-6)


def test_autocast_runs_in_the_region_dtype():
    """Inside torch.autocast the op runs in bfloat16 as conv2d does, gates cast too; float32 leaves
    get float32 gradients through the casts."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 7, 7, generator=gen, requires_grad=True)
    w = torch.randn(8, 6, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(8, generator=gen, requires_grad=True)
    ig = (torch.rand(3, 6, generator=gen) < 0.5).float().requires_grad_(True)
    og = (torch.rand(3, 8, generator=gen) < 0.5).float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condkernels.gated_conv2d(x, w, b, ig, og, padding=1)
    assert y.dtype == torch.bfloat16
    # The same path as the region's (an out_gate requiring grad computes every output channel).
    want = condkernels.gated_conv2d(*(t.detach().bfloat16().requires_grad_(True) for t in (x, w, b, ig, og)),
                                    padding=1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().sum().backward()
    for leaf in (x, w, b, ig, og):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32
