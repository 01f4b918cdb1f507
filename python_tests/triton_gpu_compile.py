"""Compiles every Triton kernel of the package for real GPUs, as the ops launch them; no GPU needed.

Without a GPU the tests run the Triton kernels in Triton's interpreter, which never compiles them:
a kernel that the GPU compiler rejects, or that asks for more shared memory than a multiprocessor
has, would first fail on a GPU. This script calls each op's Triton backend on CPU tensors with the
launch replaced by a recorder (nothing runs), at shapes large enough for every block size to reach
its cap, then compiles each distinct launch for sm_80 and sm_90 and checks its shared memory.
Run in its own process, without TRITON_INTERPRET (python_tests/test_triton_gpu_compile.py), with
the compute capabilities to compile for as arguments (default 80 90). Prints one line per compiled
launch and exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

assert os.environ.get("TRITON_INTERPRET") != "1", "the kernels must be JIT functions here"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import condkernels  # noqa: E402

# Largest dynamic shared memory of a block (the opt-in limit), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                  torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass(frozen=True)
class Launch:
    kernel: JITFunction
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    options: tuple  # ((name, value), ...)

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        types = ",".join(t for _, t in self.signature if t != "constexpr")
        return f"{self.kernel.fn.__name__}({types}; {consts})"


LAUNCHES: dict[Launch, None] = {}


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _record(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = [], []
    for param in self.params:
        value = bound.get(param.name)
        if param.is_constexpr:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
        elif value is None:  # a None argument is specialised as a constant
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, None))
        elif isinstance(value, torch.Tensor):
            signature.append((param.name, _POINTER_TYPES[value.dtype]))
        else:
            signature.append((param.name, _scalar_type(value)))
    LAUNCHES[Launch(self, tuple(signature), tuple(constexprs), tuple(sorted(options.items())))] = None


def record_launches() -> None:
    """Each op's Triton backend, forward and backward, on the paths and dtypes it has."""
    JITFunction.run = _record
    # cond_conv2d's Triton backend refuses CPU tensors unless interpreted; here they only carry the
    # launches' arguments to the recorder.
    import condkernels.triton.cond_conv2d as triton_cond_conv2d

    triton_cond_conv2d._check_device = lambda x: None
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

    def backward(out, *inputs):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad([o for o in outs if o.requires_grad], [t for t in inputs if t.requires_grad],
                            [torch.ones_like(o) for o in outs if o.requires_grad], allow_unused=True)

    for dtype in dtypes:
        def t(*shape):
            return torch.rand(*shape, dtype=dtype, requires_grad=True)

        # cond_conv2d: 1x1, depthwise, dense/grouped k x k (small and large planes: mixed on load
        # and premixed), strided, dilated, NHWC; then tiny layers, whose blocks are the smallest
        for (cin, cout, groups, k, hw, stride, dilation, nhwc) in [
            (256, 256, 1, 1, 14, 1, 1, False), (256, 256, 1, 1, 14, 2, 1, False),
            (256, 256, 256, 3, 14, 1, 1, False), (256, 256, 256, 5, 14, 2, 1, True),
            (128, 128, 1, 3, 7, 1, 1, False), (128, 128, 1, 3, 28, 1, 1, True),
            (128, 128, 4, 3, 14, 2, 2, False),
            (3, 5, 1, 1, 3, 1, 1, False), (4, 4, 4, 3, 3, 1, 1, False), (3, 5, 1, 3, 2, 1, 1, False),
        ]:
            x = t(4, cin, hw, hw)
            if nhwc:
                x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
            routing, weight, bias = t(4, 8), t(8, cout, cin // groups, k, k), t(8, cout)
            y = condkernels.cond_conv2d(x, routing, weight, bias, stride=stride, padding="same",
                                        dilation=dilation, groups=groups, backend="triton")
            backward(y, x, routing, weight, bias)
        # gated_conv2d: in and out gates, with and without gradients of the gates
        for (cin, cout, groups, k, stride, hw, gates_grad) in [
            (128, 128, 1, 3, 1, 14, True), (128, 256, 2, 3, 2, 14, False), (256, 128, 1, 1, 1, 14, True),
            (3, 5, 1, 3, 1, 3, True),
        ]:
            x, weight, bias = t(4, cin, hw, hw), t(cout, cin // groups, k, k), t(cout)
            in_gate = (torch.rand(4, cin) < 0.5).to(dtype).requires_grad_(gates_grad)
            out_gate = (torch.rand(4, cout) < 0.5).to(dtype).requires_grad_(gates_grad)
            y = condkernels.gated_conv2d(x, weight, bias, in_gate, out_gate, stride=stride, padding=k // 2,
                                         groups=groups, backend="triton")
            backward(y, x, weight, bias, in_gate, out_gate)
    for dtype in (torch.float32, torch.float64):
        gates = torch.rand(512, 16, dtype=dtype, requires_grad=True)
        backward(condkernels.batch_shaping_loss(gates, backend="triton"), gates)
        x = torch.rand(1000, dtype=dtype, requires_grad=True)
        backward(condkernels.beta_cdf(x, 0.6, 0.4, backend="triton"), x)
        backward(condkernels.beta_cdf(x, torch.rand(1000, dtype=dtype) + 0.5, 2.0, backend="triton"), x)


def compile_for(launch: Launch, capability: int):
    src = ASTSource(fn=launch.kernel, signature=dict(launch.signature), constexprs=dict(launch.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(launch.options))


def main(capabilities: list[int]) -> int:
    record_launches()
    failed = 0
    for launch in LAUNCHES:
        for capability in capabilities:
            try:
                shared = compile_for(launch, capability).metadata.shared
                ok = shared <= SHARED_LIMIT[capability]
                note = f"shared {shared} B" + ("" if ok else f" > {SHARED_LIMIT[capability]}")
            except Exception as e:  # noqa: BLE001 -- reported, then the next launch
                ok, note = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            failed += not ok
            print(f"{'ok ' if ok else 'FAIL'} sm_{capability} {launch.describe()}: {note}", flush=True)
    print(f"{len(LAUNCHES)} launches, {failed} failed compilations")
    return 1 if failed or not LAUNCHES else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or sorted(SHARED_LIMIT)))
