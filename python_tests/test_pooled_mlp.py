"""pooled_mlp against its float64 formula (mean over H, W, then the linear layers), its gradients
by gradcheck, its registration by opcheck, and the modules that call it."""

import pytest
import torch
import torch.nn.functional as F

import condkernels
from conftest import HAS_GPU

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU"))]


def oracle(x, w1, b1, w2, b2):
    d = lambda t: None if t is None else t.double()
    h = F.linear(x.double().mean((2, 3)), d(w1), d(b1))
    return h if w2 is None else F.linear(h.relu(), d(w2), d(b2))


def make(batch, channels, hw, hidden, outputs, *, b1=True, w2=True, b2=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    x = r(batch, channels, *hw)
    args = [x, r(hidden, channels), r(hidden) if b1 else None, r(outputs, hidden) if w2 else None,
            r(outputs) if (w2 and b2) else None]
    return args


LAYOUTS = ["nchw", "channels_last", "strided"]
SHAPES = [  # (batch, channels, (h, w), hidden, outputs)
    (1, 64, (56, 56), 16, 64),  # a ResNet-34 gate at batch 1: the threads split the channels
    (3, 37, (5, 7), 9, 21),
    (2, 19, (1, 1), 4, 3),
    (17, 12, (3, 3), 5, 6),  # from 16 examples the layers are BLAS products
    (0, 8, (4, 4), 3, 2),
]


def layout(x, which):
    if which == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if which == "strided":  # neither layout: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-{}x{}".format(s[0], s[1], *s[2]))
@pytest.mark.parametrize("which", LAYOUTS)
@pytest.mark.parametrize("form", ["two_layers", "no_biases", "one_layer"])
def test_matches_formula(device, dtype, shape, which, form):
    batch, channels, hw, hidden, outputs = shape
    args = make(batch, channels, hw, hidden, outputs, dtype=dtype, b1=form != "no_biases",
                w2=form != "one_layer", b2=form != "no_biases", seed=batch + channels)
    args[0] = layout(args[0], which)
    args = [None if a is None else a.to(device) for a in args]
    with torch.no_grad():
        got = condkernels.pooled_mlp(*args)
    want = oracle(*[None if a is None else a.cpu() for a in args])
    assert got.dtype == dtype and got.shape == want.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    scale = max([1.0, *want.abs().flatten().tolist()])
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale)


def test_nan_and_empty_planes():
    """A NaN in one example stays in that example; a 0x0 plane gives NaN means, as torch.mean does."""
    x, w1, b1, w2, b2 = make(3, 10, (4, 4), 6, 5)
    x[1, 3, 2, 2] = float("nan")
    y = condkernels.pooled_mlp(x, w1, b1, w2, b2)
    assert torch.isnan(y[1]).any() and not torch.isnan(y[[0, 2]]).any()
    empty = torch.zeros(2, 10, 0, 3)
    torch.testing.assert_close(condkernels.pooled_mlp(empty, w1, b1), F.linear(empty.mean((2, 3)), w1, b1),
                               equal_nan=True)


@pytest.mark.parametrize("form", ["two_layers", "no_biases", "one_layer"])
@pytest.mark.parametrize("which", ["nchw", "channels_last"])
def test_gradcheck(form, which):
    args = make(2, 5, (3, 4), 4, 3, dtype=torch.float64, b1=form != "no_biases", w2=form != "one_layer",
                b2=form != "no_biases", seed=5)
    args[0] = layout(args[0], which)
    args = [None if a is None else a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(condkernels.pooled_mlp, args)
    assert torch.autograd.gradgradcheck(condkernels.pooled_mlp, args)


def test_opcheck():
    for batch in (2, 20):
        for grad in (False, True):
            args = make(batch, 6, (3, 3), 4, 5, dtype=torch.float64, seed=batch)
            args = [a.requires_grad_(grad) for a in args]
            torch.library.opcheck(torch.ops.condkernels.pooled_mlp.default, tuple(args))
    args = make(2, 6, (3, 3), 4, 5, w2=False, seed=3)
    torch.library.opcheck(torch.ops.condkernels.pooled_mlp.default, tuple(args))


def test_compile_fullgraph():
    args = make(2, 6, (3, 3), 4, 5, seed=4)
    compiled = torch.compile(condkernels.pooled_mlp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), condkernels.pooled_mlp(*args))


BAD = [
    ("x must be floating point", lambda a: [a[0].long(), *a[1:]]),
    ("x must be \\(B, C, H, W\\)", lambda a: [a[0][0], *a[1:]]),
    ("w1 must be \\(out_features, 6\\)", lambda a: [a[0], a[1][:, :5], *a[2:]]),
    ("b1 must be \\(4,\\)", lambda a: [a[0], a[1], a[2][:3], *a[3:]]),
    ("w2 must be \\(out_features, 4\\)", lambda a: [*a[:3], a[3][:, :3], a[4]]),
    ("b2 must be \\(5,\\)", lambda a: [*a[:4], a[4][:2]]),
    ("b2 given without w2", lambda a: [*a[:3], None, a[4]]),
    ("w1 has dtype", lambda a: [a[0], a[1].double(), *a[2:]]),
    ("b2 has dtype", lambda a: [*a[:4], a[4].double()]),
]


@pytest.mark.parametrize("message,edit", BAD, ids=[m for m, _ in BAD])
def test_bad_input_names_the_argument(message, edit):
    args = make(2, 6, (3, 3), 4, 5, seed=6)
    with pytest.raises(RuntimeError, match=message):
        condkernels.pooled_mlp(*edit(args))


def test_modules_use_it_and_count_their_macs():
    """Router and the folded ChannelGate give their layers' formula; count_macs still sees their layers."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5)
    router = condkernels.nn.Router(8, 4, hidden=6)
    want = torch.sigmoid(router.fc(F.relu(router.hidden(x.mean((2, 3))))))
    torch.testing.assert_close(router(x), want)
    gate = condkernels.nn.ChannelGate(8, 10).eval()
    folded = condkernels.optimize_for_inference(torch.nn.Sequential(gate))[0]
    assert isinstance(folded.bn, torch.nn.Identity)
    torch.testing.assert_close(folded.logits(x), gate.logits(x), rtol=1e-5, atol=1e-5)
    assert condkernels.utils.count_macs(router, (8, 5, 5)) == 8 * 6 + 6 * 4
