"""Builds csrc/cuda/'s kernels for the host with emulated CUDA (emulated_cuda.h) into a library
whose ops, ``torch.ops.condkernels_emulated.<op>``, take CPU tensors.

Each .cu file is rewritten only where C++ cannot read it: the CUDA headers give way to the
emulation header, each launch ``k<<<grid, block, shared, stream>>>(args)`` becomes
``::emu::launch(::emu::Config(grid, block, shared, stream), k, args)``, shared memory (each
``__shared__`` declaration and the dynamic buffer) is the running block's own, and the CUDA
registrations become CPU ones of the same schemas under the namespace ``condkernels_emulated``
(copied from the loaded ``condkernels`` ops). The kernels' bodies, the shared host/device headers
and the host code that plans the launches are compiled as they are.
"""

from __future__ import annotations

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
NAMESPACE = "condkernels_emulated"
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))  # every CUDA file; each must register its ops

_CUDA_INCLUDE = re.compile(r"^#include <(ATen/cuda/|c10/cuda/)[^>]*>\n", re.M)
_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")
_SHARED = re.compile(r"__shared__ ([\w:<>, ]+?) (\w+)((?:\[[^\]]+\])*);")
_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(condkernels, CUDA, m\) \{(.*?)\n\}", re.S)
_IMPL = re.compile(r'm\.impl\("(\w+)"')


def emulated_source(cu: str) -> tuple[str, list[str]]:
    """The host-compilable text of one .cu file and the ops it registers."""
    text = _CUDA_INCLUDE.sub("", cu)
    # The emulation's macros come after every header the file includes.
    includes = list(re.finditer(r"^#include .*\n", text, re.M))
    at = includes[-1].end()
    text = text[:at] + '#include "emulated_cuda.h"\n' + text[at:]
    text, launches = _LAUNCH.subn(r"::emu::launch(::emu::Config(\2), \1, ", text)
    assert launches > 0, "no kernel launch found"
    text = _DYNAMIC_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_shared();", text)
    text = _SHARED.sub(r"auto& \2 = ::emu::block_shared<\1\3, __LINE__>();", text)
    registration = _REGISTRATION.search(text)
    assert registration is not None, "no CUDA registration found"
    ops = _IMPL.findall(registration.group(1))
    text = text.replace("TORCH_LIBRARY_IMPL(condkernels, CUDA, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
    return text, ops


def schema_definitions(ops: list[str]) -> str:
    """TORCH_LIBRARY(condkernels_emulated) with the schemas of the given condkernels ops."""
    import condkernels  # noqa: F401  (loads the ops whose schemas are copied)

    lines = [f"TORCH_LIBRARY({NAMESPACE}, m) {{"]
    for op in ops:
        schema = str(getattr(torch.ops.condkernels, op).default._schema)
        assert schema.startswith(f"condkernels::{op}(")
        lines.append(f'  m.def(R"({schema[len("condkernels::"):]})");')
    lines.append("}")
    return "#include <torch/library.h>\n\n" + "\n".join(lines) + "\n"


def build(build_dir: pathlib.Path, verbose: bool = False):
    """Compiles and loads the library (cached in build_dir); returns torch.ops.condkernels_emulated."""
    from torch.utils import cpp_extension

    import condkernels

    # The host code shared with the CPU ops (argument checks, geometry) comes from the loaded library.
    library = pathlib.Path(condkernels._library._C.__file__).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    sources, ops = [], []
    for source in SOURCES:
        text, file_ops = emulated_source(source.read_text())
        ops += file_ops
        path = build_dir / (source.stem + "_emulated.cpp")
        if not path.exists() or path.read_text() != text:  # unchanged files keep their objects
            path.write_text(text)
        sources.append(str(path))
    schemas = build_dir / "schemas.cpp"
    text = schema_definitions(ops)
    if not schemas.exists() or schemas.read_text() != text:
        schemas.write_text(text)
    sources.append(str(schemas))
    cpp_extension.load(
        name="condkernels_emulated",
        sources=sources,
        extra_include_paths=[str(ROOT / "csrc"), str(HERE)],
        extra_cflags=["-std=c++20", "-O1", "-pthread"],
        extra_ldflags=["-pthread", str(library)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return getattr(torch.ops, NAMESPACE)
