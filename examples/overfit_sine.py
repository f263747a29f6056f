"""Regularization against overfitting: an MLP fitted to 30 noisy points of sin(x).

A 4-hidden-layer MLP (128 units each) has far more parameters than the 30 training points, so
without a penalty it chases the noise. The same network, from the same initial weights, is
trained four times: with no penalty, with L2, with L1 and with L1 + L2 (elastic net), the
penalty added to the loss by ``regfast.penalty``. Validation loss is measured on fresh noisy
points from the same curve; every penalty ends below the unpenalized run.

Run it (about 30 s on a 2-core CPU; a GPU is used when present)::

    python examples/overfit_sine.py            # writes examples/out/overfit_sine.png
    python examples/overfit_sine.py --quick    # fewer steps, for a smoke test
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import regfast

# Coefficients of l1·Σ|w| + l2·Σw² over the layer weights (biases are left alone).
PENALTIES = {
    "no penalty": {},
    "L2": {"l2": 1e-3},
    "L1": {"l1": 3e-4},
    "L1 + L2": {"l1": 1e-4, "l2": 5e-4},
}
NOISE = 0.3


def make_data(n_train: int, n_val: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n_train`` and ``n_val`` points (x, sin x + noise), x uniform in [-π, π], shapes (n, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n_train + n_val, 1, generator=gen) * 2 - 1) * math.pi
    y = torch.sin(x) + NOISE * torch.randn(x.shape, generator=gen)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_mlp(hidden: int = 128, layers: int = 4) -> nn.Sequential:
    dims = [1] + [hidden] * layers
    blocks: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        blocks += [nn.Linear(d_in, d_out), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(hidden, 1))


def train(model: nn.Module, data: tuple[torch.Tensor, ...], steps: int, lr: float,
          hyper: dict) -> tuple[list[float], list[float]]:
    """Full-batch Adam on MSE + penalty; the (unpenalized) train and validation MSE after each step."""
    x, y, x_val, y_val = data
    weights = regfast.weights(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mse = nn.MSELoss()
    train_curve, val_curve = [], []
    for _ in range(steps):
        fit = mse(model(x), y)
        loss = fit + regfast.penalty(weights, **hyper) if hyper else fit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val = mse(model(x_val), y_val)
        train_curve.append(fit.detach())
        val_curve.append(val)
    # One host sync for the whole run instead of one per step.
    return torch.stack(train_curve).tolist(), torch.stack(val_curve).tolist()


def plot(path: Path, data: tuple[torch.Tensor, ...], models: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, _, _ = (t.cpu() for t in data)
    device = next(iter(models.values()))[0].weight.device
    grid = torch.linspace(-math.pi, math.pi, 400).unsqueeze(1)
    fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_fit.plot(grid, torch.sin(grid), "k--", lw=1, label="sin(x)")
    ax_fit.scatter(x, y, c="k", s=14, zorder=3, label="30 training points")
    for (name, model), color in zip(models.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        with torch.no_grad():
            ax_fit.plot(grid, model(grid.to(device)).cpu(), color=color, label=name)
        train_curve, val_curve = curves[name]
        ax_loss.plot(train_curve, color=color, lw=1, alpha=0.6)
        ax_loss.plot(val_curve, color=color, lw=1.5, label=f"{name}: validation {val_curve[-1]:.3f}")
    ax_fit.set(title="fits", xlabel="x", ylim=(-2, 2))
    ax_fit.legend(fontsize=8)
    ax_loss.axhline(NOISE**2, color="k", ls=":", lw=1, label=f"noise variance {NOISE**2:.2f}")
    ax_loss.set(title="MSE: train (thin) and validation (thick)", xlabel="step", yscale="log")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Train the four runs, print their losses, write the PNG; return the numbers printed.

    Returns ``{"train": {run: final train MSE}, "val": {run: final validation MSE},
    "penalty": {run: final penalty value}, "png": path}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per run (default 3000, 1000 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (1000 if args.quick else 3000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The tensors are tiny: on the CPU one thread beats several, which mostly wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args, steps, device)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, steps: int, device: str) -> dict:
    data = tuple(t.to(device) for t in make_data(30, 500, args.seed))
    torch.manual_seed(args.seed)
    initial = make_mlp().state_dict()
    models, curves, result = {}, {}, {"train": {}, "val": {}, "penalty": {}}
    print(f"{steps} full-batch Adam steps on 30 points, validation on 500 (noise variance {NOISE**2:.2f}), "
          f"device {device}")
    print(f"{'run':<11} {'train MSE':>10} {'val MSE':>10} {'penalty':>10}")
    for name, hyper in PENALTIES.items():
        model = make_mlp().to(device)
        model.load_state_dict(initial)
        curves[name] = train(model, data, steps, lr=1e-3, hyper=hyper)
        models[name] = model
        pen = regfast.penalty(regfast.weights(model), **hyper).item()
        result["train"][name], result["val"][name] = curves[name][0][-1], curves[name][1][-1]
        result["penalty"][name] = pen
        print(f"{name:<11} {curves[name][0][-1]:>10.4f} {curves[name][1][-1]:>10.4f} {pen:>10.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    result["png"] = args.out / "overfit_sine.png"
    plot(result["png"], data, models, curves)
    print(f"wrote {result['png']}")
    return result


if __name__ == "__main__":
    main()
