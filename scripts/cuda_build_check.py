"""Build regfast._C with its CUDA kernels on a machine without a GPU, link it, import it, and report.

    python scripts/cuda_build_check.py [--cache DIR] [--prepare]

1. An environment with torch's CUDA wheel (``torch==2.11.0`` from PyPI, built for CUDA 13.0, with its
   CUDA runtime wheels; ``REGFAST_CUDA_TORCH=torch==X`` picks another) in ``DIR/venv``; kept between runs
   while it holds that release, so only the first one downloads (~4 GB). Torch before 2.13 compiles
   extensions as C++17, 2.13 as C++20: the default checks the older standard, and an install against
   this machine's torch 2.13 (the tests' build) the newer one.
2. The tracked files of this checkout copied to ``DIR/src`` (only those whose content changed, so
   that the CPU objects of the last build are reused), then ``setup.py build_ext --inplace`` there
   with ``REGFAST_BUILD_CUDA=1 REGFAST_REQUIRE_EXT=1`` for sm_80 and sm_90. The CUDA kernels are
   recompiled on every run, so that the log holds ptxas's report of each.
3. ``regfast._C`` imported in that environment: ``WITH_CUDA`` must be 1, every ``regfast_C`` op must
   have a kernel for the CUDA dispatch key, and regfast must report the CUDA backend as built.
4. ptxas's ``-v`` output turned into one table (kernel, architecture, registers, spills, stack,
   shared memory), written to ``DIR/out/ptxas-report.txt`` beside ``DIR/out/build.log`` and printed.

Needs nvcc (13.x for the CUDA 13 headers of those torch wheels; ``CUDA_HOME`` or on ``PATH``) and
network access to PyPI for the first run. Exits non-zero when any step fails.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = os.environ.get("REGFAST_CUDA_TORCH", "torch==2.11.0")
ARCHS = "8.0;9.0"

CHECK = r"""
import regfast, regfast._C as C, regfast._build_info as info, torch
from regfast import _ext
assert C.WITH_CUDA == 1, "regfast._C was built without its CUDA kernels"
assert info.CUDA_VERSION == torch.version.cuda, (info.CUDA_VERSION, torch.version.cuda)
ops = sorted({r.split("::")[1] for r in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
              if r.startswith("regfast_C::")})
assert ops, "no regfast_C op has a CPU kernel"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"regfast_C::{op}", "CUDA")]
assert not missing, f"regfast_C ops without a CUDA kernel: {missing}"
assert _ext.unavailable_reason("cuda") is None, _ext.unavailable_reason("cuda")
assert C.cuda_table_cache() == (0, 0, 0, 0), C.cuda_table_cache()
print(f"regfast._C: WITH_CUDA=1, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA kernels for {len(ops)} ops: {', '.join(ops)}")
"""


def _run(cmd, log=None, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) if "\n" not in str(c) else "<script>" for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if log is not None:
        with open(log, "a") as f:
            f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-6000:] + result.stderr[-6000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(map(str, cmd))}")
    return result


def environment(cache: Path) -> Path:
    """The cached environment's python, with torch's CUDA wheel."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    # A CUDA build of torch, of the release TORCH names (an environment of another release is made anew).
    release = TORCH.split("==")[1] if "==" in TORCH else None
    probe = ("import sys, torch; version = torch.__version__.split('+')[0]; "
             f"sys.exit(0 if torch.version.cuda and {release!r} in (None, version) else 1)")
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", venv])
    _run([python, "-m", "pip", "install", "--isolated", "-q", "--cache-dir", cache / "pip", "--upgrade", "pip"])
    # --isolated: ignore this machine's pip configuration, which prefers a local CPU build of torch.
    install = [python, "-m", "pip", "install", "--isolated", "-q", "--cache-dir", cache / "pip", TORCH, "numpy",
               "setuptools>=64", "wheel", "ninja"]
    for attempt in range(2):
        if subprocess.run([str(c) for c in install]).returncode == 0:
            break
        if attempt:
            raise SystemExit("failed to install torch's CUDA wheel")
        time.sleep(10)
    _run([python, "-c", probe])
    return python


def sync_sources(src: Path) -> None:
    """Copy the tracked files of the checkout into ``src``, leaving unchanged ones (and their times) alone."""
    tracked = _run(["git", "ls-files"], cwd=ROOT).stdout.split()
    for name in tracked:
        source, target = ROOT / name, src / name
        if not source.is_file():
            continue
        if target.exists() and filecmp.cmp(source, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for stale in (src / "csrc").glob("*"):
        if f"csrc/{stale.name}" not in tracked:
            stale.unlink()


def cuda_home() -> str:
    """The CUDA toolkit: ``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda``, or the one whose ``bin/nvcc`` is on PATH."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and (
                Path(candidate) / "include" / "cuda_runtime.h").exists():
            return candidate
    raise SystemExit("no CUDA toolkit found (set CUDA_HOME)")


def build(python: Path, src: Path, out: Path) -> Path:
    """``setup.py build_ext --inplace`` in ``src`` with the CUDA kernels required; returns the build log."""
    log = out / "build.log"
    log.write_text("")
    # Recompile every CUDA object, so that ptxas reports on every kernel.
    kernels = {cu.stem for cu in (src / "csrc").glob("*.cu")}
    for obj in (src / "build").rglob("*.o"):
        if obj.name.split(".")[0] in kernels:
            obj.unlink()
    env = {**os.environ, "CUDA_HOME": cuda_home(), "REGFAST_BUILD_CUDA": "1", "REGFAST_REQUIRE_EXT": "1",
           "TORCH_CUDA_ARCH_LIST": ARCHS,
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    env.pop("REGFAST_NO_EXT", None)
    start = time.time()
    _run([python, "setup.py", "build_ext", "--inplace"], log=log, cwd=src, env=env)
    print(f"built in {time.time() - start:.0f} s", flush=True)
    return log


def ptxas_table(log_text: str) -> list[dict]:
    """ptxas's ``-v`` lines of a build log, one row per (kernel, architecture)."""
    rows, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "spill_stores": 0,
                       "spill_loads": 0, "stack": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(name: str) -> str:
    """A demangled kernel name without its return type, namespaces and parameter list."""
    name = re.sub(r"^void\s+", "", name)
    name = name.replace("(anonymous namespace)::", "").replace("regfast::cuda::", "").replace("regfast::", "")
    depth = 0
    for i, ch in enumerate(name):  # cut at the parameter list: the first "(" outside template brackets
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    return re.sub(r"\s+", " ", name)[:110]


def format_table(rows: list[dict]) -> str:
    names = demangle(sorted({r["kernel"] for r in rows}))
    short = {k: short_name(v) for k, v in names.items()}
    width = max(len(v) for v in short.values())
    header = (f"{'kernel':<{width}}  {'arch':<5}  {'regs':>4}  {'spill st':>8}  {'spill ld':>8}  {'stack':>5}  "
              f"{'smem':>6}")
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (short[r["kernel"]], r["arch"])):
        lines.append(f"{short[r['kernel']]:<{width}}  {r['arch']:<5}  {r['registers']:>4}  {r['spill_stores']:>8}  "
                     f"{r['spill_loads']:>8}  {r['stack']:>5}  {r['smem']:>6}")
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    lines.append(f"{len(rows)} kernels compiled; {len(spills)} with spills; "
                 f"most registers: {max((r['registers'] for r in rows), default=0)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "REGFAST_CUDA_CACHE", Path.home() / ".cache" / "regfast-cuda-build")), help="environment and build cache")
    parser.add_argument("--prepare", action="store_true",
                        help="only make the environment (step 1: the download), e.g. in the background of other work")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    out = cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    python = environment(cache)
    if args.prepare:
        print(f"environment ready: {python}")
        return 0
    src = cache / "src"
    sync_sources(src)
    log = build(python, src, out)
    rows = ptxas_table(log.read_text())
    if not rows:
        raise SystemExit(f"no ptxas report in {log}: were the CUDA kernels compiled?")
    report = format_table(rows)
    (out / "ptxas-report.txt").write_text(report + "\n")
    print(report)
    result = _run([python, "-c", CHECK], cwd=out, env={**os.environ, "PYTHONPATH": str(src)})
    print(result.stdout, end="")
    print(f"build log: {log}\nptxas report: {out / 'ptxas-report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
