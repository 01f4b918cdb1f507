"""CMakeLists.txt builds the same ops into a plain library that torch.ops.load_library loads."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch.utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: this one already has the ops registered by condkernels._C.
CHECK = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    torch.ops.load_library(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    r = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, 4, 3, 3, generator=g, dtype=torch.float64)
    y = torch.ops.condkernels.cond_conv2d(x, r, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    want = torch.cat([F.conv2d(x[b:b+1], torch.einsum("e,eoikl->oikl", r[b], w), padding=1) for b in range(3)])
    torch.testing.assert_close(y, want)
    print("ok")
    """
)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    library = build / "libcondkernels_ops.so"
    assert library.exists()
    done = subprocess.run([sys.executable, "-c", CHECK, str(library)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
