"""The CUDA kernels' launch resources, read from the built library: no GPU needed.

A kernel launched with more threads than its registers allow on one multiprocessor is refused at
launch ("too many resources requested for launch"), on the first GPU that runs it and only for the
inputs that ask for such a block. So every kernel declares its largest block (``__launch_bounds__``,
which the launch sites keep to), and the registers it was compiled to must fit that block.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

import condkernels

REGISTERS_PER_MULTIPROCESSOR = 64 * 1024  # sm_80 and sm_90
MAX_BLOCK = 1024


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, else the copy Triton ships."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def kernel_resources(elf_dump: str) -> dict:
    """{(arch, kernel): (registers, max threads or None)} from ``cuobjdump -elf``'s text."""
    out = {}
    for chunk in elf_dump.split("Fatbin elf code:")[1:]:
        arch = re.search(r"arch = (\S+)", chunk).group(1)
        counts = re.finditer(r"function: (\S+)\(0x[0-9a-f]+\)\s+register count: (\d+)", chunk)
        registers = {m[1]: int(m[2]) for m in counts}
        bounds = {}
        for m in re.finditer(r"^\.nv\.info\.(\S+)\n(.*?)(?=^\.|\Z)", chunk, re.M | re.S):
            t = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)",
                          m[2])
            if t:
                bounds[m[1]] = int(t[1], 16) * int(t[2], 16) * int(t[3], 16)
        for name, regs in registers.items():
            out[(arch, name)] = (regs, bounds.get(name))
    return out


def _demangled(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return list(names)
    return subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")


def test_every_cuda_kernel_declares_a_block_its_registers_fit():
    if not condkernels.cuda_built():
        pytest.skip("condkernels was built without its CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    dump = subprocess.run([tool, "-elf", condkernels._C.__file__], capture_output=True, text=True, check=True).stdout
    resources = kernel_resources(dump)
    assert len({name for _, name in resources}) >= 20, "expected the kernels of all four .cu files"
    unbounded = sorted({name for (_, name), (_, threads) in resources.items() if threads is None})
    assert not unbounded, "kernels without __launch_bounds__:\n" + "\n".join(_demangled(unbounded))
    too_big = []
    for (arch, name), (regs, threads) in resources.items():
        allocated = -(-regs // 8) * 8  # registers are allocated in steps of 8 a thread (256 a warp)
        if threads > MAX_BLOCK or allocated * threads > REGISTERS_PER_MULTIPROCESSOR:
            too_big.append(f"{arch} {_demangled([name])[0]}: {regs} registers x {threads} threads")
    assert not too_big, "\n".join(too_big)


def test_resource_parser_reads_a_dump():
    """The parser against a hand-written excerpt of cuobjdump's format: a bounded kernel and one without."""
    dump = """
Fatbin elf code:
================
arch = sm_90
.nv.info
	Attribute:	EIATTR_REGCOUNT
	Format:	EIFMT_SVAL
	Value:	function: _Z6boundedPf(0x4)	register count: 72
	Attribute:	EIATTR_REGCOUNT
	Format:	EIFMT_SVAL
	Value:	function: _Z4openPf(0x5)	register count: 80
.nv.info._Z6boundedPf
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	0x100 0x1 0x1 
.nv.info._Z4openPf
	Attribute:	EIATTR_CRS_STACK_SIZE
	Format:	EIFMT_SVAL
	Value:	0x0 
"""
    assert kernel_resources(dump) == {("sm_90", "_Z6boundedPf"): (72, 256), ("sm_90", "_Z4openPf"): (80, None)}
