"""The Triton kernels through Triton's real compiler, for sm_80 and sm_90, with no GPU; checks on the compiled code.

``tests/triton_offline.py`` (one process per architecture, with Triton's interpreter off) calls
every backend function over a matrix of dtypes, groupings, terms, step kinds and optimizer options
behind a stub driver, so that each launch goes through the argument binder, specialization and
the whole compile pipeline down to a cubin, and reads the PTX and SASS of every compiled variant.
These tests check its report:

- every call compiles and passes the launcher's argument checks;
- the hot loops of the bandwidth-bound kernels load and store 128 bits at a time for 16-bit and
  32-bit tensors that are 16-byte aligned, and unaligned ones take the scalar path;
- no spills (no local memory, no stack), no 64-bit division or remainder in a loop;
- division and square root correctly rounded, FP contraction off; 16-bit results rounded to nearest even;
- a second model with other sizes and tensor counts compiles nothing new.

Against another Triton version: ``pip install triton==X`` then ``python -m pytest tests/test_triton_compile.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

TESTS = Path(__file__).resolve().parent
ARCHS = (80, 90)
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
pytestmark = pytest.mark.skipif(not NVDISASM.exists(), reason="this Triton ships no nvdisasm (not a CUDA build)")

# Kernels that stream tensors from memory, and those of them that also write each element.
BANDWIDTH_BOUND = {"norms._chunk_norms_kernel", "penalty._penalty_kernel", "prox._prox_kernel",
                   "group._group_partials_kernel", "optim._sgd_kernel", "optim._adamw_kernel"}
WRITERS = {"prox._prox_kernel", "optim._sgd_kernel", "optim._adamw_kernel"}
VECTOR_DTYPES = {"fp32", "fp16", "bf16"}


class CompileRuns:
    """The two compile runs (one process per architecture, in parallel), started once per session: by
    ``conftest.py`` as soon as the tests are collected, so that they compile in the background while the
    rest of the suite runs, or else by the first test that needs their reports."""

    def __init__(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="regfast_triton_compile_"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
        self.procs = {}
        for arch in ARCHS:
            with open(self.out / f"sm_{arch}.log", "w") as log:  # a file, not a pipe nobody reads until the end
                self.procs[arch] = subprocess.Popen(
                    [sys.executable, str(TESTS / "triton_offline.py"), "--arch", str(arch), "--out",
                     str(self.out / f"sm_{arch}.json")], env=env, stdout=log, stderr=subprocess.STDOUT)

    def reports(self) -> dict[int, dict]:
        found = {}
        for arch, proc in self.procs.items():
            proc.wait(timeout=3600)
            log = (self.out / f"sm_{arch}.log").read_text()
            assert proc.returncode == 0, f"sm_{arch}: the compile run failed:\n{log[-5000:]}"
            found[arch] = json.loads((self.out / f"sm_{arch}.json").read_text())
        return found

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.out, ignore_errors=True)


_runs: CompileRuns | None = None


def start_compile_runs() -> None:
    """Starts the compile runs in the background if they can run here and have not started."""
    global _runs
    if _runs is None and NVDISASM.exists():
        _runs = CompileRuns()


def stop_compile_runs() -> None:
    global _runs
    if _runs is not None:
        _runs.stop()
        _runs = None


@pytest.fixture(scope="module")
def reports() -> dict[int, dict]:
    """The compile report of each architecture."""
    start_compile_runs()
    try:
        return _runs.reports()
    finally:
        stop_compile_runs()


def _variants(report: dict, kernels=None):
    return [v for v in report["variants"] if kernels is None or v["kernel"] in kernels]


def _describe(v: dict) -> str:
    return f"{v['kernel']} {v['constants']}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_call_compiles(reports, arch):
    report = reports[arch]
    failures = report["failures"]
    first = failures[0] if failures else {}
    assert not failures, f"{len(failures)} calls failed on sm_{arch}; first: {first.get('call')}\n{first.get('error')}"
    assert report["launches"] > report["calls"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiled_for_every_dtype(reports, arch):
    compiled = {}
    for v in _variants(reports[arch]):
        compiled.setdefault(v["kernel"], set()).add(v["constants"].get("DTYPE", v["constants"].get("ACC")))
    expected = BANDWIDTH_BOUND | {"norms._tensor_sums_kernel", "group._group_coefficients_kernel"}
    assert set(compiled) == expected
    for kernel in BANDWIDTH_BOUND:
        assert compiled[kernel] == {"fp32", "fp16", "bf16", "fp64"}, kernel


def _vectorized(v: dict) -> bool:
    c = v["constants"]
    if c.get("DTYPE") not in VECTOR_DTYPES:
        return False
    if v["kernel"] == "group._group_partials_kernel":
        return int(c["VECTOR"]) > 1
    return c.get("ALIGNED") == "True"


@pytest.mark.parametrize("arch", ARCHS)
def test_aligned_tensors_move_128_bits_per_access(reports, arch):
    checked = 0
    for v in _variants(reports[arch], BANDWIDTH_BOUND):
        if not _vectorized(v):
            continue
        checked += 1
        assert v["loop_ldg128"] > 0, f"no LDG.E.128 in a loop of {_describe(v)}"
        writes = v["kernel"] in WRITERS or (v["kernel"] == "penalty._penalty_kernel" and v["constants"]["WRITE"] != "0")
        if writes:
            assert v["loop_stg128"] > 0, f"no STG.E.128 in a loop of {_describe(v)}"
        if v["kernel"] != "group._group_partials_kernel" and v["constants"].get("HAS_GROUPS") != "True":
            # No narrow access is left in the elementwise loops (the masked tail is not a loop; with groups,
            # each element also gathers its group's coefficient).
            assert v["loop_ldg_narrow"] == 0 and v["loop_stg_narrow"] == 0, _describe(v)
    assert checked >= 100


@pytest.mark.parametrize("arch", ARCHS)
def test_unaligned_tensors_take_the_scalar_path(reports, arch):
    unaligned = [v for v in _variants(reports[arch], BANDWIDTH_BOUND - {"group._group_partials_kernel"})
                 if v["constants"].get("ALIGNED") == "False"]
    assert {v["kernel"] for v in unaligned} == BANDWIDTH_BOUND - {"group._group_partials_kernel"}
    for v in unaligned:
        assert v["ldg128"] == 0 and v["stg128"] == 0, _describe(v)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_no_64_bit_division_in_loops(reports, arch):
    for v in _variants(reports[arch]):
        assert v["local_memory"] == 0 and v["stack"] == 0, f"spills (local memory) in {_describe(v)}"
        assert 0 < v["registers"] <= 128, _describe(v)
        assert v["ptx_loop_div64"] == 0, f"64-bit division in a loop of {_describe(v)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_division_and_square_root_are_correctly_rounded(reports, arch):
    for v in _variants(reports[arch]):
        assert v["approx"] == [], f"{v['approx']} in {_describe(v)}"
        assert v["enable_fp_fusion"] is False, _describe(v)
        assert v["fma"] == 0, f"contracted a·b + c in {_describe(v)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_16_bit_results_are_rounded_to_nearest(reports, arch):
    """Every conversion of a float32 / float64 value into float16 / bfloat16 rounds to nearest even (cvt.rn), and the
    kernels writing 16-bit params or grads have such conversions."""
    narrowing = 0
    for v in _variants(reports[arch]):
        assert v["narrowing"] == [], f"cvt{v['narrowing']} into 16 bits in {_describe(v)}"
        narrowing += v["narrowing_rn"]
    assert narrowing > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_another_model_compiles_nothing_new(reports, arch):
    report = reports[arch]
    assert report["variants_after_b"] == report["variants_after_a"]
