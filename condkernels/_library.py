"""Loads the compiled ops and tells which backends this installation has."""

import contextlib
import importlib.util

import torch

from . import _C  # noqa: F401  (importing the library registers torch.ops.condkernels.*)


def overload(qualified_name: str):
    """The default overload of ``"condkernels::<op>"``."""
    return getattr(torch.ops.condkernels, qualified_name.split("::")[1]).default


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``condkernels::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"condkernels::{op}", dispatch_key)


# Fixed for the life of the process; plain constants keep them free to read under torch.compile.
_CUDA_BUILT = has_kernel("cond_conv2d", "CUDA") or has_kernel("gated_conv2d", "CUDA")
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this installation (a GPU need not be present)."""
    return _CUDA_BUILT


def empty_cpu_cache() -> int:
    """Frees the CPU memory condkernels keeps for reuse and returns how many bytes that was.

    Outputs of 32 MB and more that the CPU kernels allocate on every call (cond_conv2d's
    expert-weight gradient) keep their memory when the tensor dies and the next call of the same
    size reuses it, which saves the page faults of fresh memory on every training step. At most
    ``CONDKERNELS_CPU_OUTPUT_CACHE_MB`` (default 1024; 0 disables the cache) of free buffers are kept.
    The prepared weight copies of :func:`frozen_weights` are freed too (a later call in the context
    makes them again).
    """
    return torch.ops.condkernels._empty_cpu_output_cache() + torch.ops.condkernels._empty_frozen_weight_copies()


@contextlib.contextmanager
def frozen_weights():
    """Within it, the CPU kernels may keep a prepared copy of each weight they read and reuse it
    while the weight is unchanged: for inference with fixed weights.

    :func:`cond_conv2d`'s fused kernel for small planes (batches of 7x7 maps, e.g. CC-ResNet-50's
    last stage) otherwise transposes a piece of every expert into its layout on each call; here the
    experts are laid out once, on the first call, in one more copy of their size, and the kernel is
    taken at every batch size. A copy is reused while its weight keeps the same storage, shape and
    version (``tensor._version``), so in-place updates by PyTorch ops are seen and a changed weight
    is laid out anew. Writes that bypass the version counter (through ``.data``, NumPy or DLPack
    views) are not seen: do not make them to a weight used inside the context. Copies outlive the
    context (a context per request reuses them); those of weights that are gone are freed by the
    next call that makes or reads a copy, and :func:`empty_cpu_cache` frees them all. Contexts nest;
    each thread enters its own. Weights made under ``torch.inference_mode()`` (which have no
    version) are read as they are, without a copy.
    """
    torch.ops.condkernels._enter_frozen_weights()
    try:
        yield
    finally:
        torch.ops.condkernels._exit_frozen_weights()


def cpu_vector_isa() -> str:
    """The instruction set condkernels' hand-written CPU kernels run with: ``"avx512"``, ``"avx2"``
    (with FMA) or ``"none"`` (CPUs without AVX2, and non-x86 CPUs: the ops take their MKL/oneDNN
    paths there).

    It is what the CPU supports, capped by the environment variable ``CONDKERNELS_CPU_ISA``
    (``avx512``, ``avx2`` or ``none``) when that is set, e.g. to time the AVX2 kernels on an AVX-512
    CPU.
    """
    return torch.ops.condkernels._cpu_vector_isa()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def call_op(op, *args):
    """``op(*args)``; with grad mode off (inference, ``torch.no_grad()``) dispatched below the
    autograd key, which is what the op's Python autograd kernel (``torch.library.register_autograd``)
    does then too, after ~15 us of Python a call: a ResNet34-BAS forward at batch 1 makes 32 calls.
    While torch.compile or export traces, the op is called as it is."""
    # Dynamo cannot trace the inference-mode flag: the compile check comes first. Inference mode
    # has left the autograd keys out already.
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
