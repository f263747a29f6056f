"""Build regfast, with its compiled extension ``regfast._C`` when possible.

    pip install --no-build-isolation -e .

Environment:
  REGFAST_NO_EXT=1        skip the extension entirely (pure-Python install).
  REGFAST_BUILD_CUDA=1|0  force the CUDA kernels on / off; by default they are built when
                          torch has CUDA and a CUDA toolkit is found (no GPU needed).
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (read by torch's build helpers).

The extension is optional: without torch at build time (an isolated build), without the
sources, or when it fails to compile, the package is installed without it and
``regfast.backend()`` says so. A forced CUDA build (REGFAST_BUILD_CUDA=1) that fails is an error.
"""

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/module.cpp", "csrc/cpu_kernels.cpp", "csrc/optim_cpu.cpp", "csrc/optim_cpu_kernels.cpp",
               "csrc/optim_cpu_fma.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cpp", "csrc/norms.cu", "csrc/penalty.cu", "csrc/prox.cu", "csrc/optim.cu"]


def _want_cuda(torch, cpp_extension) -> bool:
    forced = os.environ.get("REGFAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def _extensions():
    if os.environ.get("REGFAST_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("regfast: torch is not importable at build time; installing without regfast._C")
        return [], {}
    if not all(os.path.exists(s) for s in CPU_SOURCES):
        return [], {}
    # The optimizer steps round each operation where the reference does (csrc/optim_cpu_math.h):
    # the compiler must not fuse a·b + c into an fma on its own. Neither errno nor FP traps are
    # observed, and without them sqrt and division vectorize; no result changes.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP region compiled into the extension; torch ships libgomp.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "regfast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("REGFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
            optional=os.environ.get("REGFAST_BUILD_CUDA") != "1",
        )
    else:
        ext = cpp_extension.CppExtension(
            "regfast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            optional=True,
        )
    return [ext], {"build_ext": _optional_build(cpp_extension.BuildExtension).with_options(use_ninja=True)}


def _optional_build(base):
    """``base`` with failures of optional extensions reported instead of raised (torch raises RuntimeError)."""

    class BuildOptionalExtension(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                print(f"regfast: building {ext.name} failed, installing without it: {exc}", file=sys.stderr)

    return BuildOptionalExtension


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
