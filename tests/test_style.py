import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean():
    paths = [p for p in ("regfast", "tests", "benchmarks", "examples", "scripts", "setup.py") if (ROOT / p).exists()]
    result = subprocess.run(["ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The layers of the package (README, "Architecture"), top to bottom: each module imports only from its own
# layer and the ones below it; the backends import only the shared helpers and the spec (regfast.reference).
LAYERS = {
    "api": ("regfast", "regfast.api", "regfast.optim", "regfast._distributed", "regfast._cli", "regfast.__main__",
            "regfast.bench"),
    "ops": ("regfast._ops", "regfast._dispatch"),
    "backends": ("regfast.reference", "regfast.triton", "regfast._ext", "regfast._C"),
    "helpers": ("regfast._common", "regfast._validate", "regfast._schema", "regfast._build_info"),
}
ORDER = list(LAYERS)


def _layer(module: str) -> str:
    for name, prefixes in sorted(LAYERS.items(), key=lambda kv: -max(map(len, kv[1]))):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "regfast") or module == "regfast":
            return name
    raise AssertionError(f"{module} is in no layer")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for every regfast import in ``path``."""
    import ast

    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] == "regfast":
                out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "regfast")
    return out


def _backend(module: str) -> str:
    """The backend a module belongs to (the extension's loader and the extension are one)."""
    return "regfast._ext" if module == "regfast._C" else ".".join(module.split(".")[:2])


def _is_module(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    generated = ("regfast._C", "regfast._build_info")  # built by setup.py
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or module in generated


def test_layers_import_only_downwards_and_no_private_names():
    problems = []
    for path in sorted((ROOT / "regfast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mine = _layer(me)
        for module, names in _imports(path):
            targets = [f"{module}.{n}" if _is_module(f"{module}.{n}") else module for n in names] or [module]
            for target, name in zip(targets, names or [None]):
                theirs = _layer(target)
                if ORDER.index(theirs) < ORDER.index(mine):
                    problems.append(f"{me} ({mine}) imports {target} ({theirs}): an import back up")
                if mine == theirs == "backends" and _backend(target) not in (_backend(me), "regfast.reference"):
                    problems.append(f"{me} imports another backend, {target}")
                if name and name.startswith("_") and target == module and not module.startswith(me):
                    problems.append(f"{me} imports {module}'s private name {name}")
    assert not problems, "\n".join(problems)
