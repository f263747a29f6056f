"""The CUDA sources compile for sm_80 and sm_90 with the CUDA toolkit alone (no GPU needed).

The kernels (csrc/*.cu) include only CUDA headers, so nvcc compiles each of them to an object.
The CUDA host code (csrc/cuda_tables.cpp and each op's csrc/*_cuda.cpp) needs torch's CUDA headers;
a CPU-only torch ships them without the generated c10/cuda/impl/cuda_cmake_macros.h, which this test
provides, and then checks the host code's syntax with the host compiler. Skipped when nvcc is not found.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")


def _cuda_home() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return Path(c)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


CUDA_HOME = _cuda_home()
pytestmark = pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (set CUDA_HOME or install a CUDA toolkit)")


def _nvcc_flags() -> list[str]:
    """The extension's nvcc flags that change code (setup.py's list, without -lineinfo and -Xptxas -v)."""
    match = re.search(r'"nvcc": \[([^\]]*)\]', (ROOT / "setup.py").read_text())
    assert match, "setup.py names no nvcc flags"
    flags = re.findall(r'"([^"]+)"', match.group(1))
    return [f for f in flags if f not in ("-lineinfo", "-Xptxas", "-v")]


NVCC_FLAGS = _nvcc_flags()


def _run(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert {s.name for s in sources} >= {"norms.cu", "group_norms.cu", "penalty.cu", "prox.cu", "optim.cu"}
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmds = [[str(CUDA_HOME / "bin" / "nvcc"), "-std=c++17", *NVCC_FLAGS, *gencode, "-Werror", "all-warnings", "-Xptxas",
             "-v", "-c", str(s), "-o", str(tmp_path / (s.stem + ".o"))] for s in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        results = list(pool.map(_run, cmds))
    spec = importlib.util.spec_from_file_location("cuda_build_check", ROOT / "scripts" / "cuda_build_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for cmd, r in results:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        # ptxas's report, as scripts/cuda_build_check.py reads it from a build log: every kernel, both archs.
        rows = check.ptxas_table(r.stdout + r.stderr)
        assert rows and {row["arch"] for row in rows} == {f"sm_{a}" for a in ARCHS}, cmd[-3]
        assert all(row["registers"] > 0 for row in rows), rows
        assert "regs" in check.format_table(rows)
        obj = Path(cmd[-1])
        assert obj.stat().st_size > 0
        cuobjdump = CUDA_HOME / "bin" / "cuobjdump"
        if cuobjdump.exists():
            listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True)
            for arch in ARCHS:
                assert f"sm_{arch}" in listing.stdout, f"{obj.name} has no sm_{arch} code:\n{listing.stdout}"


def test_cuda_host_code_compiles(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    if not (CUDA_HOME / "include" / "cuda_runtime.h").exists():
        pytest.skip("the CUDA toolkit has no cuda_runtime.h")
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    sources = sorted(CSRC.glob("*_cuda.cpp")) + [CSRC / "cuda_tables.cpp"]
    assert {s.name for s in sources} >= {"norms_cuda.cpp", "penalty_cuda.cpp", "prox_cuda.cpp", "optim_cuda.cpp"}
    cmds = [[cxx, std, "-fsyntax-only", "-DREGFAST_WITH_CUDA", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
             f"-I{CUDA_HOME / 'include'}", str(s)] for s in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        for cmd, r in pool.map(_run, cmds):
            assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"


# Float arithmetic in PTX: a rounding mode (.rn) forbids ptxas to fuse the op with another; without one
# (mul.f32, add.f32…) ptxas may contract a·b + c into an fma, and .approx / .full are not IEEE.
_FLOAT_OP = re.compile(
    r"^\s*(?:@%p\d+\s+)?(add|sub|mul|div|sqrt|rcp|fma|rsqrt|ex2|lg2|sin|cos)((?:\.\w+)*)\.f(32|64)\b", re.MULTILINE)


def test_kernels_round_every_float_op_as_written(tmp_path):
    """Every kernel compiled with the extension's flags (-fmad=false) rounds each add, multiply, division and
    square root on its own, in IEEE round-to-nearest: an fma appears only where the source writes one, so that
    the element math computes what tests/test_cuda_math.py checks on the host."""
    assert "-fmad=false" in NVCC_FLAGS
    sources = sorted(CSRC.glob("*.cu"))
    cmds = [[str(CUDA_HOME / "bin" / "nvcc"), "-std=c++17", *NVCC_FLAGS, "-arch=sm_90", "-ptx", str(s), "-o",
             str(tmp_path / (s.stem + ".ptx"))] for s in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        results = list(pool.map(_run, cmds))
    counts = {}
    for cmd, r in results:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        ptx = Path(cmd[-1]).read_text()
        ops = _FLOAT_OP.findall(ptx)
        assert ops, cmd[-3]
        loose = sorted({f"{op}{mods}.f{bits}" for op, mods, bits in ops if not mods.startswith(".rn")})
        assert not loose, f"{Path(cmd[-3]).name}: float ops without IEEE rounding: {loose}"
        for op, _, _ in ops:
            counts[op] = counts.get(op, 0) + 1
    # The optimizer's explicit fmas (optim_math.h) and the sums' divisions and roots are there.
    assert counts.get("fma", 0) > 0 and counts.get("div", 0) > 0 and counts.get("sqrt", 0) > 0, counts
