"""Build regfast, with its compiled extension ``regfast._C`` when possible.

    pip install --no-build-isolation -e .

Environment:
  REGFAST_NO_EXT=1        skip the extension entirely (pure-Python install).
  REGFAST_REQUIRE_EXT=1   any failure to build the extension is an error (default: installed without it).
  REGFAST_BUILD_CUDA=1|0  force the CUDA kernels on / off; by default they are built when
                          torch has CUDA and a CUDA toolkit is found (no GPU needed). A forced CUDA
                          build that fails is an error.
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (read by torch's build helpers).

The extension is optional: without torch at build time (an isolated build), without the
sources, or when it fails to compile, the package is installed without it. Every build writes
``regfast/_build_info.py``: the torch (and CUDA) version the extension was built against, or why
it was not built (the compiler's error when it failed), which ``regfast.backend()`` reports, and
which keeps an extension built for another torch from being loaded.
"""

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext

CPU_SOURCES = ["csrc/module.cpp", "csrc/host_path.cpp", "csrc/norms_cpu.cpp", "csrc/penalty_cpu.cpp",
               "csrc/prox_cpu.cpp", "csrc/cpu_passes_baseline.cpp", "csrc/cpu_passes_avx2.cpp",
               "csrc/cpu_passes_avx512.cpp", "csrc/optim_cpu.cpp",
               "csrc/optim_cpu_baseline.cpp", "csrc/optim_cpu_fma.cpp",
               "csrc/optim_cpu_avx512.cpp", "csrc/optim_common.cpp"]
CUDA_SOURCES = ["csrc/cuda_tables.cpp", "csrc/norms_cuda.cpp", "csrc/penalty_cuda.cpp", "csrc/prox_cuda.cpp",
                "csrc/optim_cuda.cpp", "csrc/norms.cu", "csrc/group_norms.cu", "csrc/penalty.cu", "csrc/prox.cu",
                "csrc/optim.cu"]
BUILD_INFO = "_build_info.py"
REBUILD = "pip install --no-build-isolation -e . (or pip install --no-build-isolation regfast)"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _want_cuda(torch, cpp_extension) -> bool:
    forced = os.environ.get("REGFAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def _compile_errors(message: str, limit: int = 5) -> str:
    """The compiler's error lines of a failed build's message (its first lines if none say ``error``)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE) and "Error compiling" not in line]
    return " | ".join((errors or lines)[:limit])[:2000]


@contextlib.contextmanager
def _output_copied_to(lines: list[str]):
    """Within the block, what is written to file descriptor 1 (the compilers' output) is also kept in ``lines``."""
    sys.stdout.flush()
    with tempfile.TemporaryFile() as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            log.seek(0)
            output = log.read().decode(errors="replace")
            sys.stdout.write(output)
            sys.stdout.flush()
            lines.extend(output.splitlines())


def _build_command(base, torch_version: str | None, cuda_version: str | None, not_built: str | None):
    """``base`` (a build_ext) that records the outcome in ``regfast/_build_info.py``, and, for an optional
    extension that fails, reports the failure instead of raising (unless REGFAST_REQUIRE_EXT=1)."""

    class RecordingBuildExt(base):
        def run(self):
            self._not_built = not_built
            try:
                super().run()
            finally:
                self._write_build_info()

        def build_extension(self, ext):
            output: list[str] = []
            try:
                with _output_copied_to(output):
                    super().build_extension(ext)
            except Exception as exc:
                self._not_built = f"regfast._C failed to build: {_compile_errors(chr(10).join(output + [str(exc)]))}"
                print(f"regfast: {self._not_built}", file=sys.stderr)
                if not ext.optional or _env_flag("REGFAST_REQUIRE_EXT"):
                    raise
                print("regfast: installing without regfast._C (REGFAST_REQUIRE_EXT=1 makes this an error)",
                      file=sys.stderr)

        def _write_build_info(self):
            with_cuda = any("REGFAST_WITH_CUDA" in dict(e.define_macros or []) for e in self.extensions)
            text = ('"""How regfast._C was built (written by setup.py at build time)."""\n\n'
                    f"TORCH_VERSION = {torch_version!r}\n"
                    f"CUDA_VERSION = {cuda_version if with_cuda else None!r}\n"
                    f"NOT_BUILT = {self._not_built!r}\n")
            targets = [Path(self.build_lib) / "regfast"]
            if self.inplace or getattr(self, "editable_mode", False):
                targets.append(Path(__file__).resolve().parent / "regfast")
            for target in targets:
                target.mkdir(parents=True, exist_ok=True)
                (target / BUILD_INFO).write_text(text)

    return RecordingBuildExt


def _extensions():
    """(ext_modules, cmdclass) of this build."""
    if _env_flag("REGFAST_NO_EXT"):
        reason = "regfast._C was not built (REGFAST_NO_EXT=1 at install time)"
        return [], {"build_ext": _build_command(setuptools_build_ext, None, None, reason)}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        reason = f"torch was not importable when regfast was built (an isolated build?): reinstall with {REBUILD}"
        print(f"regfast: {reason}", file=sys.stderr)
        if _env_flag("REGFAST_REQUIRE_EXT"):
            raise SystemExit(f"regfast: REGFAST_REQUIRE_EXT=1 but {reason}") from None
        return [], {"build_ext": _build_command(setuptools_build_ext, None, None, reason)}
    here = Path(__file__).resolve().parent
    missing = [s for s in CPU_SOURCES if not (here / s).exists()]
    if missing:
        reason = f"regfast._C was not built: its sources are missing ({', '.join(missing)})"
        print(f"regfast: {reason}", file=sys.stderr)
        if _env_flag("REGFAST_REQUIRE_EXT"):
            raise SystemExit(f"regfast: REGFAST_REQUIRE_EXT=1 but {reason}")
        return [], {"build_ext": _build_command(setuptools_build_ext, torch.__version__, None, reason)}
    # The optimizer steps round each operation where the reference does (csrc/optim_cpu_math.h):
    # the compiler must not fuse a·b + c into an fma on its own. Neither errno nor FP traps are
    # observed, and without them sqrt and division vectorize; no result changes. The CPU kernels'
    # lane vectors (csrc/cpu_kernels.h) pass between inlined helpers, never across an ABI boundary.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP region compiled into the extension; torch ships libgomp.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # -Xptxas -v: registers, spills and shared memory of every kernel in the build log
        # (scripts/cuda_build_check.sh turns them into a table). -fmad=false: as on the CPU, no a·b + c
        # is fused into an fma unless the source says fma (csrc/optim_math.h: torch's CUDA roundings).
        ext = cpp_extension.CUDAExtension(
            "regfast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("REGFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-fmad=false", "-lineinfo", "-Xptxas", "-v"]},
            extra_link_args=link_flags,
            optional=os.environ.get("REGFAST_BUILD_CUDA") != "1",
        )
    else:
        ext = cpp_extension.CppExtension(
            "regfast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            optional=True,
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": _build_command(base, torch.__version__, torch.version.cuda, None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
