"""Building from source as a user does: the sdist, a failed build, an extension built for another torch.

The sdist is built from this checkout and installed (not editable) with ``--no-build-isolation`` into
a fresh virtual environment that sees this machine's torch; its ``regfast._C`` must load with its CPU
kernels. A source tree with a deliberately broken file must fail loudly when the extension is
required, and otherwise install without it, with ``regfast.backend()`` quoting the compiler's error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKEN = "#error regfast test: deliberately broken source"

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                                reason="no C++ compiler")


def _run(cmd, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)), **(env or {})}
    for name in ("REGFAST_NO_EXT", "REGFAST_BUILD_CUDA", "REGFAST_REQUIRE_EXT", "PYTHONPATH"):
        if name not in (env or {}):
            full_env.pop(name, None)
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=1800)
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _tracked(root: Path) -> list[str]:
    return _run(["git", "ls-files"], cwd=root).stdout.split()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    # Built from a copy of the tracked files, so that the checkout gets no build outputs.
    src = tmp_path_factory.mktemp("src")
    for name in _tracked(ROOT):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", out], cwd=src)
    (archive,) = out.glob("regfast-*.tar.gz")
    return archive


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh environment that sees this machine's packages (torch, pip, setuptools) but not this checkout."""
    path = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path])
    return path / "bin" / "python"


def _backend_report(python: Path, cwd: Path) -> str:
    code = "import regfast, regfast._ext as e; print(regfast.__file__); print(regfast.backend('cpu'))"
    return _run([python, "-c", code], cwd=cwd).stdout


def test_sdist_carries_every_source(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {n for n in _tracked(ROOT) if n.startswith("csrc/")} | {"LICENSE", "README.md", "setup.py",
                                                                      "pyproject.toml"}
    assert needed - names == set()
    assert {n for n in needed if n.endswith((".cu", ".cuh", ".h"))}, "csrc has headers and CUDA sources"
    assert "regfast/_build_info.py" not in names


@pytest.fixture(scope="module")
def installed(sdist, venv, tmp_path_factory) -> Path:
    """The sdist installed (not editable) into ``venv``: the installed package's folder."""
    _run([venv, "-m", "pip", "install", "--no-build-isolation", "--no-deps", sdist])
    code = "import regfast, os; print(os.path.dirname(regfast.__file__))"
    return Path(_run([venv, "-c", code], cwd=tmp_path_factory.mktemp("cwd")).stdout.strip())


def test_sdist_installs_with_its_cpu_kernels(installed, venv, tmp_path):
    assert not installed.is_relative_to(ROOT)
    assert "TORCH_VERSION = " in (installed / "_build_info.py").read_text()
    report = _backend_report(venv, tmp_path)
    assert str(installed) in report.splitlines()[0]
    assert "cpu: cpp" in report, report


def test_extension_built_for_another_torch_is_not_loaded(installed, venv, tmp_path):
    info = installed / "_build_info.py"
    text = info.read_text()
    try:
        info.write_text("\n".join("TORCH_VERSION = '0.0.1'" if line.startswith("TORCH_VERSION") else line
                                  for line in text.splitlines()) + "\n")
        report = _backend_report(venv, tmp_path)
    finally:
        info.write_text(text)
    assert "cpu: torch" in report, report
    assert "regfast._C was built for torch 0.0.1, running torch" in report, report
    assert "rebuild with pip install --no-build-isolation" in report, report


@pytest.fixture
def broken_tree(tmp_path) -> Path:
    src = tmp_path / "src"
    for name in _tracked(ROOT):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for source in src.glob("csrc/*.cpp"):
        source.write_text(BROKEN + "\n" + source.read_text())
    return src


def test_broken_source_fails_loudly_when_the_extension_is_required(broken_tree, tmp_path):
    result = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w",
                   tmp_path / "wheels", broken_tree], env={"REGFAST_REQUIRE_EXT": "1"}, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "regfast: regfast._C failed to build:" in output and "deliberately broken source" in output


def test_broken_source_installs_without_the_extension_and_says_why(broken_tree, tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp_path / "venv"])
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", broken_tree])
    report = _backend_report(python, tmp_path)
    assert "cpu: torch" in report, report
    assert "regfast._C failed to build:" in report and "deliberately broken source" in report, report
