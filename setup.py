"""Builds dcvit_engine and its compiled op library `dcvit_engine._C`.

The C++ CPU implementations are always built. The CUDA sources in csrc/cuda are added
whenever a CUDA toolkit and a CUDA-enabled torch are present, even on a machine with no
GPU, so every CI run compiles them. DCVIT_BUILD_CUDA=0 skips them; the arch list follows
TORCH_CUDA_ARCH_LIST and defaults to sm_80 and sm_90 (A100, H100/H200).

Install with `pip install --no-build-isolation -e .` after torch: the extension must be
compiled against the torch it will run with.
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a full toolkit. torch guesses it from `which nvcc`, which is
    wrong when nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.isfile(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries torch was installed with (nvidia-* wheels). A minimal
    toolkit has nvcc and cudart but not cusparse.h / cublas_v2.h, which ATen's CUDA headers
    include. Added after the toolkit's own include dir so the toolkit's headers win."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += [d for d in sorted(glob.glob(os.path.join(root, "*", "include"))) if os.path.isdir(d)]
    return dirs


_locate_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda() -> tuple[bool, str]:
    import torch

    if os.environ.get("DCVIT_BUILD_CUDA", "1") == "0":
        return False, "DCVIT_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, f"CUDA toolkit at {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda, why = _want_cuda()
    print(f"dcvit_engine: CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")
    cxx_flags = ["-O3"]
    if not use_cuda:
        return cpp_extension.CppExtension(
            "dcvit_engine._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # the archs compiled, readable as dcvit_engine._C.cuda_archs (`dcvit doctor` prints them):
    # "8.0;9.0" -> 80_90, a token the compiler command line carries without quoting
    archs = "_".join(a.replace(".", "").replace("+", "") for a in
                     re.split(r"[;, ]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a)
    cxx_flags += [f"-DDCVIT_CUDA_ARCHS={archs}"]
    nvcc_flags = ["-O3", "-lineinfo", "-DDCVIT_WITH_CUDA"]
    for include_dir in _pip_cuda_include_dirs():
        cxx_flags += ["-idirafter", include_dir]
        nvcc_flags += ["-isystem", include_dir]
    return cpp_extension.CUDAExtension(
        "dcvit_engine._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DDCVIT_WITH_CUDA"], "nvcc": nvcc_flags},
    )


setup(
    packages=find_packages(include=["dcvit_engine", "dcvit_engine.*"]) + ["dcvit_engine.kernels"],
    package_dir={"dcvit_engine.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
