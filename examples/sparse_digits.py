"""Exact zeros from L1: the naive loop in the loss versus regfast's proximal optimizers.

A small CNN learns scikit-learn's bundled 8x8 digits (no download) four times, from the same
initial weights, with the same L1 coefficient on the layer weights (biases are not penalized):

1. ``naive loop``: ``lam * sum(p.abs().sum() for p in weights)`` added to the loss, SGD;
2. ``regfast.penalty``: ``regfast.penalty(weights, l1=lam)`` in the loss, SGD: the same value
   and gradient as the loop, so the same training up to float rounding;
3. ``Proximal(SGD)``: ``regfast.optim.Proximal(torch.optim.SGD(regfast.param_groups(...)))``,
   the L1 term handled by its proximal step (soft-thresholding) after each SGD step;
4. ``ProxAdamW``: ``regfast.optim.ProxAdamW(regfast.param_groups(...))``, the proximal step in
   Adam's own metric, fused into the update.

A subgradient step on ``|w|`` makes a weight jump across 0, never land on it, so the runs with
the penalty in the loss end with almost no exact zeros; the proximal runs set most weights to
exactly 0 at about the same test accuracy. Printed per run: test accuracy, the fraction of exact
zeros per layer (``regfast.sparsity``) and the time per training step; the PNG shows the
weight magnitudes per layer.

Run it (about 20 s on a 2-core CPU; a GPU is used when present)::

    python examples/sparse_digits.py           # writes examples/out/sparse_digits.png
    python examples/sparse_digits.py --quick   # fewer epochs, for a smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import regfast
from regfast.optim import ProxAdamW, Proximal

# The L1 coefficient of every run, with the mean cross-entropy over a batch as the loss.
L1 = 1e-3
SGD = {"lr": 0.05, "momentum": 0.9}
# No decoupled weight decay: as in the other runs, the L1 term is the only regularizer.
ADAMW = {"lr": 2e-3, "weight_decay": 0.0}
RUNS = ("naive loop", "regfast.penalty", "Proximal(SGD)", "ProxAdamW")


def load_digits(device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Train and test images (N, 1, 8, 8) in [0, 1] and labels (N,), a stratified 75 / 25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    split = train_test_split(images / 16.0, labels, test_size=0.25, stratify=labels, random_state=seed)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in split)
    return (x_train.float().view(-1, 1, 8, 8).to(device), y_train.long().to(device),
            x_test.float().view(-1, 1, 8, 8).to(device), y_test.long().to(device))


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def naive_l1(weights: list[torch.Tensor]) -> torch.Tensor:
    """The loop people write: one abs and one sum per tensor, a graph as big as the model."""
    return sum(p.abs().sum() for p in weights)


def make_run(name: str, model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], torch.Tensor] | None]:
    """The optimizer of a run and the penalty it adds to the loss (None: the optimizer handles it)."""
    weights = regfast.weights(model)
    if name == "naive loop":
        return torch.optim.SGD(model.parameters(), **SGD), lambda: L1 * naive_l1(weights)
    if name == "regfast.penalty":
        return torch.optim.SGD(model.parameters(), **SGD), lambda: regfast.penalty(weights, l1=L1)
    if name == "Proximal(SGD)":
        return Proximal(torch.optim.SGD(regfast.param_groups(model, l1=L1, **SGD))), None
    if name == "ProxAdamW":
        return ProxAdamW(regfast.param_groups(model, l1=L1, **ADAMW)), None
    raise ValueError(f"unknown run {name!r}")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(name: str, model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, batch: int,
          seed: int) -> dict:
    """Train one run; its losses per step, test accuracy, exact zeros per layer and time per step."""
    x, y, x_test, y_test = data
    optimizer, penalty = make_run(name, model)
    cross_entropy = nn.CrossEntropyLoss()
    # The same batches in the same order for every run.
    gen = torch.Generator().manual_seed(seed)
    losses, steps = [], 0
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch):
            loss = cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            steps += 1
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sparsity = regfast.sparsity(regfast.weights(model))
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    return {
        "accuracy": accuracy(model, x_test, y_test),
        "zeros": {n: row.fraction for n, row in zip(names, sparsity.rows)},
        "zeros_total": sparsity.fraction,
        "ms_per_step": 1e3 * seconds / steps,
        "losses": torch.stack(losses).tolist(),
    }


def plot(path: Path, models: dict[str, nn.Module], results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(results[RUNS[0]]["zeros"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8))
    # Nonzero magnitudes below 10**floor are drawn at floor, exact zeros apart at floor - 1.
    floor = -7
    bins = torch.linspace(floor - 1.25, 0.5, 44).tolist()
    for ax, layer in zip(axes, layers):
        for name, model in models.items():
            w = dict(model.named_parameters())[layer].detach().abs().flatten().cpu()
            logw = torch.where(w > 0, w.clamp_min(10.0**floor).log10(), torch.tensor(float(floor - 1)))
            # The naive loop and regfast.penalty give the same weights: a wide line keeps both visible.
            ax.hist(logw.tolist(), bins=bins, histtype="step", lw=4 if name == "naive loop" else 1.5,
                    label=f"{name}: {results[name]['zeros'][layer]:.0%} zeros")
        ax.set(title=layer, xlabel="log10 |w|", yscale="log")
        ax.set_xticks([floor - 1, *range(floor + 1, 1, 2)], ["w = 0", *map(str, range(floor + 1, 1, 2))])
        ax.legend(fontsize=7)
    axes[0].set_ylabel("weights")
    fig.suptitle(f"weight magnitudes per layer, L1 = {L1:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Train the four runs, print the comparison, write the PNG; return the numbers printed.

    Returns ``{"runs": {run: {"accuracy", "zeros" (per layer), "zeros_total", "ms_per_step",
    "losses"}}, "penalty_at_init": {"naive loop": float, "regfast.penalty": float},
    "max_weight_diff": max |w_naive − w_penalty| after training, "png": path}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30, 12 with --quick)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (12 if args.quick else 30)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The tensors are small: on the CPU one thread beats several, which mostly wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args, epochs, device)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, epochs: int, device: str) -> dict:
    data = load_digits(device, args.seed)
    torch.manual_seed(args.seed)
    initial = make_cnn().state_dict()
    probe = make_cnn().to(device)
    probe.load_state_dict(initial)
    weights = regfast.weights(probe)
    result = {"runs": {}, "penalty_at_init": {"naive loop": naive_l1(weights).item(),
                                              "regfast.penalty": regfast.penalty(weights, l1=1.0).item()}}
    print(f"{len(data[0])} train / {len(data[2])} test digits, {epochs} epochs of batch {args.batch}, "
          f"L1 = {L1:g} on the weights, device {device}")
    print(f"Σ|w| at init: naive loop {result['penalty_at_init']['naive loop']:.6f}, "
          f"regfast.penalty {result['penalty_at_init']['regfast.penalty']:.6f}")

    models = {}
    for name in RUNS:
        model = make_cnn().to(device)
        model.load_state_dict(initial)
        result["runs"][name] = train(name, model, data, epochs, args.batch, args.seed)
        models[name] = model
    result["max_weight_diff"] = max((a - b).abs().max().item() for a, b in
                                    zip(models["naive loop"].parameters(), models["regfast.penalty"].parameters()))

    layers = list(result["runs"][RUNS[0]]["zeros"])
    head = f"{'run':<16} {'test acc':>8} " + " ".join(f"{n:>12}" for n in layers) + f" {'total':>7} {'ms/step':>8}"
    print("exact zeros per layer:")
    print(head)
    print("-" * len(head))
    for name, r in result["runs"].items():
        cells = " ".join(f"{r['zeros'][n]:>12.1%}" for n in layers)
        print(f"{name:<16} {r['accuracy']:>8.2%} {cells} {r['zeros_total']:>7.1%} {r['ms_per_step']:>8.2f}")
    print(f"max |w_naive - w_regfast.penalty| after training: {result['max_weight_diff']:.2e}")

    args.out.mkdir(parents=True, exist_ok=True)
    result["png"] = args.out / "sparse_digits.png"
    plot(result["png"], models, result["runs"])
    print(f"wrote {result['png']}")
    return result


if __name__ == "__main__":
    main()
