"""The index arithmetic of gated_conv2d's CUDA kernels, run on the host (no GPU needed).

The kernels' channel-list slots and GEMM operand loaders / stores are host+device functions
(csrc/common/gated_lists.h, csrc/common/gated_conv2d_operands.h). A C++ program builds the lists as
the warp-ballot kernel does and evaluates the three implicit GEMMs over whole tiles, then compares
with a naive dense masked convolution and its gradients (python_tests/cpp/gated_conv2d_operands_test.cpp).
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "python_tests" / "cpp" / "gated_conv2d_operands_test.cpp"


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_device_index_math_on_the_host(tmp_path):
    exe = tmp_path / "gated_conv2d_operands_test"
    subprocess.run(
        ["c++", "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
