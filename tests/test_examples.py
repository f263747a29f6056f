"""Smoke tests of examples/: each runs at its ``--quick`` size and its claims are checked on the numbers it returns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"regfast_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIP_NAMES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def needs(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"this example needs {module} (pip install {PIP_NAMES[module]})")


def test_overfit_sine_penalties_lower_validation_loss(tmp_path):
    needs("matplotlib")
    result = load("overfit_sine").main(["--quick", "--out", str(tmp_path)])
    val, train = result["val"], result["train"]
    for name in ("L2", "L1", "L1 + L2"):
        assert val[name] < val["no penalty"], (name, val)
        # The unpenalized net fits the training noise better: that is the overfitting the penalties prevent.
        assert train[name] > train["no penalty"], (name, train)
        assert result["penalty"][name] > 0
    assert result["png"] == tmp_path / "overfit_sine.png"
    assert result["png"].stat().st_size > 0


@pytest.fixture(scope="module")
def sparse_digits(tmp_path_factory):
    needs("sklearn", "matplotlib")
    out = tmp_path_factory.mktemp("sparse_digits")
    return load("sparse_digits").main(["--quick", "--out", str(out)]), out


def test_sparse_digits_naive_loop_and_penalty_agree(sparse_digits):
    result, _ = sparse_digits
    init = result["penalty_at_init"]
    assert init["naive loop"] > 0
    assert init["regfast.penalty"] == pytest.approx(init["naive loop"], rel=1e-5)
    naive, fused = result["runs"]["naive loop"], result["runs"]["regfast.penalty"]
    # Same seed, batches and gradient: the same training up to float rounding.
    assert len(naive["losses"]) == len(fused["losses"])
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(naive["losses"]), rtol=1e-4, atol=1e-5)
    assert result["max_weight_diff"] < 1e-4
    assert fused["accuracy"] == pytest.approx(naive["accuracy"], abs=0.01)


def test_sparse_digits_only_proximal_runs_are_sparse(sparse_digits):
    result, _ = sparse_digits
    runs = result["runs"]
    for name in ("naive loop", "regfast.penalty"):
        assert runs[name]["zeros_total"] < 0.01, (name, runs[name]["zeros"])
    for name in ("Proximal(SGD)", "ProxAdamW"):
        assert runs[name]["zeros_total"] > 0.3, (name, runs[name]["zeros"])
        assert runs[name]["accuracy"] > 0.9, (name, runs[name]["accuracy"])
        assert runs[name]["accuracy"] >= runs["naive loop"]["accuracy"] - 0.05, name
    for name, run in runs.items():
        assert set(run["zeros"]) == {"0.weight", "2.weight", "6.weight", "8.weight"}, name
        assert run["ms_per_step"] > 0


def test_sparse_digits_writes_png(sparse_digits):
    result, out = sparse_digits
    assert result["png"] == out / "sparse_digits.png"
    assert result["png"].stat().st_size > 0


def test_group_lasso_pruning_keeps_accuracy(tmp_path):
    needs("sklearn", "matplotlib")
    result = load("group_lasso_pruning").main(["--quick", "--out", str(tmp_path)])
    hidden = sum(result["hidden_before"])
    assert sum(result["zero_rows"]) > 0.2 * hidden, result["zero_rows"]
    assert result["hidden_after"] == [h - z for h, z in zip(result["hidden_before"], result["zero_rows"])]
    assert result["params_after"] < result["params_before"]
    assert result["accuracy_after"] == result["accuracy_before"]
    assert result["max_logit_diff"] < 1e-4
    assert result["accuracy_before"] > 0.9
    assert result["png"] == tmp_path / "group_lasso_pruning.png"
    assert result["png"].stat().st_size > 0


def test_prune_computes_the_same_function():
    # Zero rows with positive and negative biases: the pruned net must fold relu(b) into the next bias.
    example = load("group_lasso_pruning")
    torch.manual_seed(0)
    model = example.make_mlp(hidden=16).double()
    with torch.no_grad():
        for layer, dead in ((model[0], [0, 3, 4, 15]), (model[2], [1, 2, 9])):
            layer.weight[dead] = 0
            layer.bias[dead[0]] = 0.7
            layer.bias[dead[1]] = -0.4
    pruned = example.prune(model)
    linears = [m for m in pruned if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 12), (12, 13), (13, 10)]
    x = torch.randn(50, 64, dtype=torch.float64)
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-12, atol=1e-12)
