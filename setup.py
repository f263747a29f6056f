"""Build regfast, with its compiled extension ``regfast._C`` when possible.

Environment:
  REGFAST_NO_EXT=1        skip the extension entirely (pure-Python install).
  REGFAST_BUILD_CUDA=1|0  force the CUDA kernels on / off; by default they are built when
                          torch has CUDA and a CUDA toolkit is found (no GPU needed).
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (read by torch's build helpers).

Without torch at build time (an isolated build), or without the sources, the package is
installed without the extension; ``regfast.backend()`` then says so.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("REGFAST_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("regfast: torch is not importable at build time; installing without regfast._C")
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    build_cuda = os.environ.get("REGFAST_BUILD_CUDA")
    if build_cuda is None:
        with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    else:
        with_cuda = build_cuda == "1"
    cxx_flags = ["-O3", "-std=c++17"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "regfast._C",
            cpp_sources + cuda_sources,
            define_macros=[("REGFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = cpp_extension.CppExtension("regfast._C", cpp_sources, extra_compile_args=cxx_flags)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
