"""Build of the dsg_ext._C extension (metadata lives in pyproject.toml).

The CPU ops are always built. The CUDA ops are built whenever torch is a CUDA build and a CUDA
toolkit is found (CUDA_HOME, else /usr/local/cuda); no GPU is needed to compile them.

Environment switches:
  DSG_EXT_CUDA=1 / 0       force the CUDA ops on / off (default: auto)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer)
  MAX_JOBS                 parallel compile jobs (default: the number of CPUs)
  DSG_EXT_DEBUG=1          -O0 -g builds
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc is often a link into the real toolkit
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(torch_cuda_version, cuda_home):
    switch = os.environ.get("DSG_EXT_CUDA", "auto").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return False
    available = torch_cuda_version is not None and cuda_home is not None
    if switch in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "DSG_EXT_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch_cuda_version!r}, CUDA toolkit={cuda_home!r} "
                "(set CUDA_HOME to the toolkit that has bin/nvcc)"
            )
        return True
    return available


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    use_cuda = _want_cuda(torch.version.cuda, cuda_home)
    debug = os.environ.get("DSG_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fno-trapping-math lets the CPU loops vectorise their selects (no FP exceptions are relied on);
    # -ffp-contract=off keeps the fake-quant rounding bitwise equal to torch.
    tuning = ["-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=off"]
    if "DSG_EXT_CXXFLAGS" in os.environ:  # for build experiments: replaces the tuning flags above
        tuning = os.environ["DSG_EXT_CXXFLAGS"].split()
    cxx_flags = opt + tuning + ["-DDSG_EXT_PYTHON_MODULE"]
    extra = {"cxx": cxx_flags}
    ext_cls = CppExtension
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DDSG_EXT_PYTHON_MODULE"]
        extra["cxx"] = cxx_flags + ["-DDSG_EXT_WITH_CUDA"]
        ext_cls = CUDAExtension
    ext = ext_cls(
        name="dsg_ext._C",
        sources=sources,
        extra_compile_args=extra,
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
