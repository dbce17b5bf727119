"""The two native builds: CMake + ctest against libtorch, and the installed package layout."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=1500):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    """Configures csrc/ as a libtorch op library, builds it with the C++ tests, and runs them
    with ctest. CPU sources only: the package build (setup.py) already compiles csrc/cuda for
    sm_80 and sm_90 in every CI run, and compiling it twice cost CI ~2.5 minutes."""
    build = tmp_path / "cmake-build"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
          "-DDCVIT_CMAKE_CUDA=OFF"], ROOT)
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], ROOT)
    out = _run(["ctest", "--test-dir", str(build), "--output-on-failure"], ROOT)
    assert "100% tests passed" in out


def test_wheel_installs_kernels_as_a_subpackage(tmp_path):
    """A non-editable build ships kernels/ as dcvit_engine.kernels (no top-level `kernels`)."""
    # A copy of the sources, so this build cannot touch the developer's build/ folder.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "*.so", "cmake-build", "bench_out", ".*cache*"))
    env = dict(os.environ, DCVIT_BUILD_CUDA="0")  # the layout does not depend on CUDA; faster
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path),
          str(src)], src, env=env)
    wheel = next(tmp_path.glob("dcvit_engine-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dcvit_engine/kernels/mlp_block.py" in names
    assert any(n.startswith("dcvit_engine/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith("kernels/") for n in names)
