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
from triton_offline import NARROWING

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


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Every kernel source compiled to an object for sm_80 and sm_90 with the extension's nvcc flags:
    (command, result) per source."""
    out = tmp_path_factory.mktemp("cuda_objects")
    sources = sorted(CSRC.glob("*.cu"))
    assert {s.name for s in sources} >= {"norms.cu", "group_norms.cu", "penalty.cu", "prox.cu", "optim.cu"}
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmds = [[str(CUDA_HOME / "bin" / "nvcc"), "-std=c++17", *NVCC_FLAGS, *gencode, "-Werror", "all-warnings",
             "-Xptxas", "-v", "-c", str(s), "-o", str(out / (s.stem + ".o"))] for s in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
        return list(pool.map(_run, cmds))


def test_every_kernel_compiles_for_sm80_and_sm90(objects):
    spec = importlib.util.spec_from_file_location("cuda_build_check", ROOT / "scripts" / "cuda_build_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for cmd, r in objects:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        # ptxas's report, as scripts/cuda_build_check.py reads it from a build log: every kernel, both archs.
        rows = check.ptxas_table(r.stdout + r.stderr)
        assert rows and {row["arch"] for row in rows} == {f"sm_{a}" for a in ARCHS}, cmd[-3]
        assert all(row["registers"] > 0 for row in rows), rows
        spilled = [(row["kernel"], row["arch"]) for row in rows if row["spill_stores"] or row["spill_loads"]]
        assert not spilled, f"kernels that spill registers to local memory: {spilled}"
        assert "regs" in check.format_table(rows)
        obj = Path(cmd[-1])
        assert obj.stat().st_size > 0
        cuobjdump = _cuobjdump()
        if cuobjdump is not None:
            listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True)
            for arch in ARCHS:
                assert f"sm_{arch}" in listing.stdout, f"{obj.name} has no sm_{arch} code:\n{listing.stdout}"


def _cuobjdump() -> Path | None:
    """The toolkit's cuobjdump, else the one Triton ships beside its ptxas."""
    candidates = [CUDA_HOME / "bin" / "cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((c for c in candidates if c.exists()), None)


def _sass_functions(obj: Path, cuobjdump: Path) -> dict[str, str]:
    """sm_90 SASS of each kernel of an object, by demangled name."""
    text = subprocess.run([str(cuobjdump), "-sass", "-arch", "sm_90", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    names, bodies = parts[1::2], parts[2::2]
    filt = shutil.which("c++filt")
    if filt is not None:
        demangled = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        names = demangled[:len(names)] if len(demangled) >= len(names) else names
    return dict(zip(names, bodies))


@pytest.fixture(scope="module")
def sass(objects):
    """The sm_90 SASS of every kernel of every object, by demangled name."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None or shutil.which("c++filt") is None:
        pytest.skip("needs cuobjdump (the CUDA toolkit's or Triton's) and c++filt")
    kernels = {}
    for cmd, r in objects:
        assert r.returncode == 0, r.stderr
        kernels.update(_sass_functions(Path(cmd[-1]), cuobjdump))
    return kernels


_VEC_LOAD = re.compile(r"\bLDG?\.E\.128\b")
_VEC_STORE = re.compile(r"\bSTG?\.E\.128\b")


def test_multi_tensor_kernels_move_16_bytes_per_access(sass):
    """In the SASS, every multi-tensor kernel (norms, penalty gradient, prox, optimizer steps) loads through
    16-byte vectors, and the optimizer steps read and write each of their streams so: the param, its grad and
    every state (two 16-byte pieces per vector of a float16 / bfloat16 param's float32 state; a float64 AdamW
    moves its states element by element, see optim.cu)."""
    multi = {name: body for name, body in sass.items() if "multi_tensor_kernel<" in name}
    assert len(multi) >= 40, sorted(sass)
    scalar_only = [name for name, body in multi.items() if not _VEC_LOAD.search(body)]
    assert not scalar_only, f"multi-tensor kernels without a 16-byte load: {scalar_only}"
    steps = 0
    for name, body in multi.items():
        m = re.search(r"(SgdFunctor|AdamWFunctor)<(\w+), ([^>]+)>", name)
        if m is None:
            continue
        steps += 1
        pieces = 2 if m.group(2) in ("__half", "__nv_bfloat16") else 1  # 16-byte pieces of a state vector
        if m.group(1) == "AdamWFunctor":
            states = (3 if m.group(3) == "true" else 2) if m.group(2) != "double" else 0  # float64: 8-byte states
            want_loads, want_stores = 2 + states * pieces, 1 + states * pieces
        else:
            mode = int(re.search(r"(\d)\)?$", m.group(3)).group(1))  # Momentum: 0 none, 1 init, 2 update
            want_loads, want_stores = 2 + (pieces if mode == 2 else 0), 1 + (pieces if mode else 0)
        loads, stores = len(_VEC_LOAD.findall(body)), len(_VEC_STORE.findall(body))
        assert loads >= want_loads and stores >= want_stores, (name, loads, stores, want_loads, want_stores)
    assert steps == 20, steps


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
        # Float32 / float64 values stored into 16-bit tensors: rounded to nearest even too.
        narrowing = NARROWING.findall(ptx)
        assert all(m.startswith(".rn") for m in narrowing), f"{Path(cmd[-3]).name}: cvt{sorted(set(narrowing))}"
        counts["narrowing"] = counts.get("narrowing", 0) + len(narrowing)
    # The optimizer's explicit fmas (optim_math.h) and the sums' divisions and roots are there.
    assert counts.get("fma", 0) > 0 and counts.get("div", 0) > 0 and counts.get("sqrt", 0) > 0, counts
    assert counts["narrowing"] > 0, counts


def _innermost_loop_calls(body: str) -> tuple[int, list[str]]:
    """The innermost loops of a kernel's SASS (spans from a backward branch's target to the branch that contain
    no other such span) and the calls (CALL: the 64-bit division and remainder routines, among others) inside
    them."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    spans = []
    for addr, text in ins:
        m = re.search(r"\bBRA(?:\.\w+)*\s+(?:\w+,\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    calls = [f"{addr:#x}: {text}" for addr, text in ins
             if re.match(r"(@!?U?P\w+\s+)?CALL\.", text) and any(a <= addr <= b for a, b in inner)]
    return len(inner), calls


def test_group_indices_take_no_division_per_element(sass):
    """The kernels that walk groups (the gradient and prox kernels with group lasso, the group norms' pieces) find
    each element's group with a cursor set up once per loop and thread (GroupCursor): no call, so no
    64-bit division or remainder, inside any of their innermost loops (the per-element and per-vector loops)."""
    grouped = {}
    for name, body in sass.items():
        m = re.search(r"(ProxFunctor|GradFunctor)<(\w+), (\w+), (\w+), (\w+)>", name)
        if m and (m.group(5) == "true" if m.group(1) == "ProxFunctor" else m.group(4) == "true"):
            grouped[name] = body  # ProxFunctor<T, l1, l2, group>; GradFunctor<T, l1, linear term, accumulate>
        elif "group_piece_kernel<" in name:
            grouped[name] = body
    assert len(grouped) >= 4 * 4 + 4 * 4 + 4, sorted(grouped)
    for name, body in grouped.items():
        loops, calls = _innermost_loop_calls(body)
        assert loops >= 2, (name, loops)  # the vector loop and the scalar one, at least
        assert not calls, (name, calls)


def test_group_norm_pieces_read_16_bytes_at_a_time(sass):
    """A group that is one run of memory (rows, whole tensors) is summed through 16-byte loads, in every dtype."""
    pieces = {name: body for name, body in sass.items() if "group_piece_kernel<" in name}
    assert len(pieces) == 4, sorted(pieces)
    assert all(_VEC_LOAD.search(body) for body in pieces.values()), sorted(pieces)

