"""cond_conv2d against an independent float64 oracle, on every backend that runs here."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import condkernels
from condkernels.ops._conv_args import same_padding
from conftest import COMPILED_BACKENDS, HAS_GPU, triton_interpreted


def per_example_oracle(x, routing, weight, bias, stride, padding, dilation, groups):
    """y[b] = conv2d(x[b], sum_e r[b,e] W_e): the definition, one example at a time, in float64.

    ``padding`` is (h_begin, h_end, w_begin, w_end).
    """
    x, routing, weight = x.double(), routing.double(), weight.double()
    h0, h1, w0, w1 = padding
    out = []
    for b in range(x.shape[0]):
        w_b = torch.einsum("e,eoikl->oikl", routing[b], weight)
        b_b = routing[b] @ bias.double() if bias is not None else None
        xb = F.pad(x[b : b + 1], (w0, w1, h0, h1))
        out.append(F.conv2d(xb, w_b, b_b, stride, 0, dilation, groups))
    return torch.cat(out)


def make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(batch, cin, *hw, generator=gen, dtype=dtype)
    routing = torch.randn(batch, experts, generator=gen, dtype=dtype)
    weight = torch.randn(experts, cout, cin // groups, kh, kw, generator=gen, dtype=dtype)
    b = torch.randn(experts, cout, generator=gen, dtype=dtype) if bias else None
    move = lambda t: None if t is None else t.to(device)
    return move(x), move(routing), move(weight), move(b)


def pad4(padding, hw, k, stride, dilation):
    k = (k, k) if isinstance(k, int) else k
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        return (*same_padding(hw[0], k[0], stride, dilation), *same_padding(hw[1], k[1], stride, dilation))
    return (padding, padding, padding, padding)


# (name, cin, cout, groups, k): the three kernel families and the shapes between them.
LAYERS = [
    ("pointwise", 8, 12, 1, 1),
    ("depthwise", 8, 8, 8, 3),
    ("depthwise_k5", 6, 6, 6, 5),
    ("grouped", 8, 12, 4, 3),
    ("dense_k3", 6, 10, 1, 3),
    ("dense_k5", 4, 6, 1, 5),
    ("dense_k7", 3, 5, 1, 7),
    ("rect_1x3", 4, 6, 1, (1, 3)),
]


def random_configs(n, seed):
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        name, cin, cout, groups, k = LAYERS[i % len(LAYERS)]
        kmax = max((k, k) if isinstance(k, int) else k)
        configs.append(
            dict(
                layer=name, cin=cin, cout=cout, groups=groups, k=k,
                batch=rng.choice([1, 2, 5]), experts=rng.choice([1, 3, 4]),
                hw=(rng.randint(7, 12), rng.randint(7, 12)), stride=rng.choice([1, 2]),
                dilation=rng.choice([1, 1, 2]) if kmax <= 5 else 1, padding=rng.choice([0, 1, "same", "valid"]),
                bias=rng.random() < 0.6, channels_last=rng.random() < 0.3,
            )
        )
    return configs


CONFIGS = random_configs(24, seed=1234)


def config_id(c):
    return "{layer}-B{batch}-E{experts}-s{stride}-d{dilation}-p{padding}-{b}{cl}".format(
        b="bias" if c["bias"] else "nobias", cl="-cl" if c["channels_last"] else "", **c
    )


def run_case(cfg, device, backend, dtype=torch.float64):
    x, r, w, b = make_inputs(cfg["batch"], cfg["cin"], cfg["cout"], cfg["experts"], cfg["k"], cfg["hw"],
                             cfg["groups"], cfg["bias"], dtype=dtype, device=device)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t for t in (x, r, w, b) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    y = condkernels.cond_conv2d(x, r, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"],
                                backend=backend)
    return inputs, (x, r, w, b), y


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_forward_and_gradients_match_oracle(cfg, device, backend):
    if backend == "triton" and triton_interpreted() and cfg["hw"][0] * cfg["hw"][1] > 100:
        cfg = dict(cfg, hw=(7, 8))  # the interpreter is slow
    inputs, (x, r, w, b), y = run_case(cfg, device, backend)
    ref_inputs = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    rx, rr, rw = ref_inputs[:3]
    rb = ref_inputs[3] if b is not None else None
    p4 = pad4(cfg["padding"], cfg["hw"], cfg["k"], cfg["stride"], cfg["dilation"])
    y_ref = per_example_oracle(rx, rr, rw, rb, cfg["stride"], p4, cfg["dilation"], cfg["groups"])
    assert y.shape == y_ref.shape
    if cfg["channels_last"]:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.detach().cpu(), y_ref.detach(), rtol=1e-9, atol=1e-9)

    grad = torch.randn_like(y_ref)
    (y * grad.to(y.device)).sum().backward()
    (y_ref * grad).sum().backward()
    for name, got, want in zip("x routing weight bias".split(), inputs, ref_inputs):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


# Small enough that finite differences over every input element stay cheap.
GRADCHECK_LAYERS = {"pointwise": (4, 6, 1, 1), "depthwise": (4, 4, 4, 3), "dense_k3": (3, 4, 1, 3),
                    "grouped": (4, 6, 2, 3)}


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("layer", sorted(GRADCHECK_LAYERS))
def test_gradcheck(layer, device, backend):
    cin, cout, groups, k = GRADCHECK_LAYERS[layer]
    x, r, w, b = make_inputs(2, cin, cout, 3, k, (5, 4), groups, True, device=device, seed=7)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    fn = lambda *a: condkernels.cond_conv2d(*a, stride=2, padding="same", groups=groups, backend=backend)
    # The interpreter runs each Triton launch in Python: full gradcheck (two launches per input
    # element) would take minutes, fast mode checks random projections of the same Jacobians.
    fast = backend == "triton" and triton_interpreted()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("layer", ["pointwise", "depthwise", "dense_k3"])
def test_low_precision_cpu(layer, dtype, tol):
    _, cin, cout, groups, k = next(l for l in LAYERS if l[0] == layer)
    x, r, w, b = make_inputs(3, cin, cout, 4, k, (9, 9), groups, True, dtype=dtype, seed=3)
    y = condkernels.cond_conv2d(x, r, w, b, padding=1 if k == 3 else 0, groups=groups)
    assert y.dtype == dtype
    y_ref = per_example_oracle(x, r, w, b, (1, 1), (1, 1, 1, 1) if k == 3 else (0, 0, 0, 0), (1, 1), groups)
    scale = y_ref.abs().max()
    assert ((y.double() - y_ref).abs().max() / scale) < tol


def test_batch_sizes_zero_and_one():
    x, r, w, b = make_inputs(1, 4, 6, 3, 3, (6, 6), 1, True)
    y = condkernels.cond_conv2d(x, r, w, b, padding=1)
    torch.testing.assert_close(y, per_example_oracle(x, r, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    y0 = condkernels.cond_conv2d(x[:0], r[:0], w, b, padding=1)
    assert y0.shape == (0, 6, 6, 6)


def test_timm_weight_layout_is_a_view():
    """timm's CondConv2d stores experts as (E, Cout*Cin/groups*kh*kw); ours is a view of it."""
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 2, True)
    timm_weight = w.reshape(3, -1)
    w5 = timm_weight.view(3, 6, 2, 3, 3)
    assert w5.data_ptr() == timm_weight.data_ptr()
    # timm's own formulation: mix, fold the batch into groups, one grouped conv.
    mixed = (r @ timm_weight).view(2 * 6, 2, 3, 3)
    y_timm = F.conv2d(x.reshape(1, 8, 6, 6), mixed, (r @ b).view(-1), 1, 1, 1, 2 * 2).view(2, 6, 6, 6)
    torch.testing.assert_close(condkernels.cond_conv2d(x, r, w5, b, padding=1, groups=2), y_timm)


def test_same_padding_matches_tensorflow_rule():
    # odd total pad (k=3, stride 2, even input): 0 before, 1 after
    assert same_padding(8, 3, 2, 1) == (0, 1)
    assert same_padding(7, 3, 2, 1) == (1, 1)
    assert same_padding(8, 5, 1, 1) == (2, 2)
    assert same_padding(8, 4, 1, 1) == (1, 2)
    x, r, w, b = make_inputs(1, 3, 4, 2, 3, (8, 8), 1, False)
    y = condkernels.cond_conv2d(x, r, w, None, stride=2, padding="same")
    assert y.shape[-2:] == (4, 4)
    torch.testing.assert_close(y, per_example_oracle(x, r, w, None, (2, 2), (0, 1, 0, 1), (1, 1), 1))


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_opcheck(device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from condkernels.triton import cond_conv2d as tk
        op = tk.triton_forward_op()
    else:
        op = torch.ops.condkernels.cond_conv2d.default
    for layer, bias, cl in [("pointwise", True, False), ("depthwise", False, True), ("dense_k3", True, True)]:
        _, cin, cout, groups, k = next(l for l in LAYERS if l[0] == layer)
        x, r, w, b = make_inputs(2, cin, cout, 3, k, (5, 5), groups, bias, device=device, seed=11)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        pad = [k // 2, k // 2 + 1, k // 2, k // 2] if k > 1 else [0, 0, 0, 0]
        for requires_grad in (False, True):
            args = [t.clone().requires_grad_(requires_grad) if t is not None else None for t in (x, r, w, b)]
            torch.library.opcheck(op, (*args, [1, 1], pad, [1, 1], groups))


def test_backward_op_opcheck():
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (5, 5), 2, True, seed=5)
    g = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    for mask in ([True, True, True, True], [False, True, False, False], [True, False, True, False]):
        torch.library.opcheck(
            torch.ops.condkernels._cond_conv2d_backward.default, (g, x, r, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 2, mask)
        )


def test_torch_compile_fullgraph():
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 1, True, dtype=torch.float32)
    fn = torch.compile(lambda *a: condkernels.cond_conv2d(*a, padding="same"), fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = fn(*inputs)
    torch.testing.assert_close(y, condkernels.cond_conv2d(x, r, w, b, padding="same"))
    y.sum().backward()
    assert all(t.grad is not None for t in inputs)


def test_torch_compile_inductor():
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 1, True, dtype=torch.float32)
    fn = torch.compile(lambda *a: torch.relu(condkernels.cond_conv2d(*a, padding=1)), fullgraph=True)
    torch.testing.assert_close(fn(x, r, w, b), torch.relu(condkernels.cond_conv2d(x, r, w, b, padding=1)))


def test_torch_export_keeps_one_node():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 6, 4, 3, 3))
            self.bias = torch.nn.Parameter(torch.randn(3, 6))
            self.router = torch.nn.Linear(4, 3)

        def forward(self, x):
            r = torch.sigmoid(self.router(x.mean((2, 3))))
            return condkernels.cond_conv2d(x, r, self.weight, self.bias, padding=1)

    m, x = Block().eval(), torch.randn(2, 4, 6, 6)
    ep = torch.export.export(m, (x,))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "cond_conv2d" in str(n.target)]
    assert len(nodes) == 1 and nodes[0].target is torch.ops.condkernels.cond_conv2d.default
    torch.testing.assert_close(ep.module()(x), m(x))


# --- bad input: a clear error that names the argument -------------------------------------------

BAD_INPUTS = [
    ("x must be a 4-D", lambda x, r, w, b: dict(x=x[0])),
    ("routing must be a 2-D", lambda x, r, w, b: dict(routing=r[0])),
    ("routing has 3 rows", lambda x, r, w, b: dict(routing=torch.cat([r, r[:1]]))),
    ("routing has 2 experts", lambda x, r, w, b: dict(routing=r[:, :2])),
    ("weight must be a 5-D", lambda x, r, w, b: dict(weight=w[0])),
    ("weight has 3 input channels per group",
     lambda x, r, w, b: dict(weight=torch.randn(3, 6, 3, 3, 3, dtype=w.dtype))),
    ("in_channels (4) is not divisible by groups (3)", lambda x, r, w, b: dict(groups=3)),
    ("out_channels (6) is not divisible by groups (4)",
     lambda x, r, w, b: dict(groups=4, weight=torch.randn(3, 6, 1, 3, 3, dtype=w.dtype))),
    ("bias must have shape", lambda x, r, w, b: dict(bias=b[:, :2])),
    ("routing has dtype torch.float32", lambda x, r, w, b: dict(routing=r.float())),
    ("weight has dtype torch.float32", lambda x, r, w, b: dict(weight=w.float())),
    ("larger than the padded input",
     lambda x, r, w, b: dict(weight=torch.randn(3, 6, 4, 9, 9, dtype=w.dtype), padding=0)),
    ("stride must be positive", lambda x, r, w, b: dict(stride=0)),
    ("dilation must be positive", lambda x, r, w, b: dict(dilation=(1, -1))),
    ("padding must be an int, a pair, 'valid' or 'same'", lambda x, r, w, b: dict(padding="full")),
    ("padding must be non-negative", lambda x, r, w, b: dict(padding=-1)),
    ("backend must be one of", lambda x, r, w, b: dict(backend="mkl")),
    ("groups must be a positive int", lambda x, r, w, b: dict(groups=0)),
    ("groups must be a positive int", lambda x, r, w, b: dict(groups=True)),
    ("stride must be an int or a pair", lambda x, r, w, b: dict(stride=(True, 1))),
    ("padding must be an int or a pair", lambda x, r, w, b: dict(padding=True)),
    # empty channels or kernels: the kernels' block arithmetic would divide by zero
    ("weight must have at least one output channel",
     lambda x, r, w, b: dict(weight=torch.randn(3, 0, 4, 3, 3, dtype=w.dtype), bias=None)),
    ("x must have at least one channel",
     lambda x, r, w, b: dict(x=x[:, :0], weight=torch.randn(3, 6, 0, 3, 3, dtype=w.dtype))),
    ("weight's kernel must be at least 1x1", lambda x, r, w, b: dict(weight=torch.randn(3, 6, 4, 0, 3, dtype=w.dtype))),
]


@pytest.mark.parametrize("message,change", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_names_the_argument(message, change):
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 1, True)
    kwargs = dict(x=x, routing=r, weight=w, bias=b, padding=1)
    condkernels.cond_conv2d(**kwargs)  # a good call first: what its checks concluded is remembered
    kwargs.update(change(x, r, w, b))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        condkernels.cond_conv2d(**kwargs)


@pytest.mark.parametrize(
    "message,args",
    [
        ("routing has 3 rows", lambda x, r, w, b: (x, torch.cat([r, r[:1]]), w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("weight has dtype", lambda x, r, w, b: (x, r, w.float(), b, [1, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("larger than the padded input", lambda x, r, w, b: (x, r, w, b, [1, 1], [0, 0, 0, 0], [4, 4], 1)),
        ("stride must be positive", lambda x, r, w, b: (x, r, w, b, [0, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("padding must be non-negative", lambda x, r, w, b: (x, r, w, b, [1, 1], [1, -1, 1, 1], [1, 1], 1)),
        ("weight must have at least one output channel",
         lambda x, r, w, b: (x, r, w[:, :0], None, [1, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("x must have at least one channel",
         lambda x, r, w, b: (x[:, :0], r, w[:, :, :0], b, [1, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("kernel must be at least 1x1", lambda x, r, w, b: (x, r, w[:, :, :, :0], b, [1, 1], [1, 1, 1, 1], [1, 1], 1)),
        ("the CPU kernels take float32, float64 and bfloat16",
         lambda x, r, w, b: (x.half(), r.half(), w.half(), b.half(), [1, 1], [1, 1, 1, 1], [1, 1], 1)),
    ],
)
def test_compiled_op_checks_its_arguments_too(message, args):
    """torch.ops.condkernels.cond_conv2d called directly must not crash on bad input either."""
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 1, True)
    with pytest.raises((RuntimeError, TypeError), match=message):  # TypeError: a dtype the device lacks
        torch.ops.condkernels.cond_conv2d(*args(x, r, w, b))


def test_cpu_tensors_with_cuda_backend_error():
    x, r, w, b = make_inputs(2, 4, 6, 3, 3, (6, 6), 1, True)
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        condkernels.cond_conv2d(x, r, w, b, backend="cuda")


def test_autocast_runs_in_the_region_dtype():
    """Inside torch.autocast the op runs in bfloat16 as conv2d does; float32 leaves get float32
    gradients through the casts; float64 arguments are left alone."""
    x, r, w, b = make_inputs(3, 6, 8, 4, 3, (7, 7), 1, True, dtype=torch.float32, seed=5)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condkernels.cond_conv2d(*leaves, padding=1)
    assert y.dtype == torch.bfloat16
    want = condkernels.cond_conv2d(*(t.bfloat16() for t in (x, r, w, b)), padding=1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32
    x64, r64, w64, b64 = make_inputs(2, 4, 4, 2, 1, (3, 3), 1, True, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert condkernels.cond_conv2d(x64, r64, w64, b64).dtype == torch.float64
