"""The Triton kernels compile for sm_80 and sm_90 at the block sizes the ops choose, within the shared
memory of a multiprocessor: python_tests/triton_gpu_compile.py, one process per architecture
(the interpreter the other Triton tests use never compiles a kernel)."""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("triton_gpu_compile.py")
ROOT = SCRIPT.parents[1]


def _can_compile_for_nvidia() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _can_compile_for_nvidia(), reason="Triton without its NVIDIA backend")
def test_every_triton_launch_compiles_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    runs = {cc: subprocess.Popen([sys.executable, str(SCRIPT), cc], env=env, cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cc in ("80", "90")}
    for cc, run in runs.items():
        out, _ = run.communicate(timeout=1800)
        assert run.returncode == 0, out[-6000:]
        last = out.strip().splitlines()[-1]
        assert last.endswith(" launches, 0 failed compilations") and int(last.split()[0]) >= 50, last
