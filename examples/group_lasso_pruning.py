"""Pruning whole neurons with row group lasso, then removing them from the network.

An MLP (64 → 128 → 128 → 10) learns scikit-learn's bundled 8x8 digits (no download) with
``regfast.optim.ProxSGD`` and a group-lasso penalty on the rows of its two hidden layers
(``groups="row"``: a row of a Linear weight is one neuron's incoming weights). The proximal step
sets whole rows to exactly 0. A neuron with a zero row computes ``relu(0·x + b) = relu(b)`` for
every input: a constant, so it can go. The pruned network is a smaller ``nn.Sequential``
without those rows (and their bias entries), without the matching input columns of the next
layer, and with the constant's contribution ``W_next[:, j]·relu(b_j)`` moved into the next
layer's bias. It computes the same function, so its test accuracy is the same.

Run it (about 10 s on a 2-core CPU; a GPU is used when present)::

    python examples/group_lasso_pruning.py           # writes examples/out/group_lasso_pruning.png
    python examples/group_lasso_pruning.py --quick   # fewer epochs, for a smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from regfast.optim import ProxSGD

GROUP_LASSO = 3e-3
SGD = {"lr": 0.05, "momentum": 0.9}


def load_digits(device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Train and test images flattened to (N, 64) in [0, 1] and labels (N,), a stratified 75 / 25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    split = train_test_split(images / 16.0, labels, test_size=0.25, stratify=labels, random_state=seed)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in split)
    return (x_train.float().to(device), y_train.long().to(device),
            x_test.float().to(device), y_test.long().to(device))


def make_mlp(hidden: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def param_groups(model: nn.Sequential, group_lasso: float) -> list[dict]:
    """Group lasso on the hidden layers' weights only: pruning rows of the output layer would drop classes."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    hidden = [m.weight for m in linears[:-1]]
    rest = [p for p in model.parameters() if all(p is not w for w in hidden)]
    return [{"params": hidden, "group_lasso": group_lasso, "groups": "row"}, {"params": rest}]


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, batch: int, group_lasso: float,
          seed: int) -> None:
    x, y = data[0], data[1]
    optimizer = ProxSGD(param_groups(model, group_lasso), **SGD)
    cross_entropy = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(batch):
            loss = cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def prune(model: nn.Sequential) -> nn.Sequential:
    """A smaller copy of a Linear / ReLU stack without the hidden neurons whose weight row is all 0.

    Such a neuron outputs the constant ``relu(b_j)``; its contribution ``W_next[:, j]·relu(b_j)``
    moves into the next layer's bias, and column ``j`` of the next layer goes with it.
    """
    linears = [m for m in model if isinstance(m, nn.Linear)]
    layers: list[nn.Module] = []
    first = linears[0].weight
    alive_in = torch.arange(linears[0].in_features, device=first.device)
    carried = torch.zeros(linears[0].in_features, device=first.device, dtype=first.dtype)  # removed inputs' outputs
    for i, layer in enumerate(linears):
        last = i == len(linears) - 1
        alive = torch.arange(layer.out_features, device=alive_in.device) if last else \
            layer.weight.ne(0).any(dim=1).nonzero().squeeze(1)
        bias = layer.bias + layer.weight @ carried
        smaller = nn.Linear(len(alive_in), len(alive), device=layer.weight.device, dtype=layer.weight.dtype)
        smaller.weight.copy_(layer.weight[alive][:, alive_in])
        smaller.bias.copy_(bias[alive])
        layers.append(smaller)
        if not last:
            layers.append(nn.ReLU())
            # Removed neurons have a zero row, so their pre-activation is their bias for every input.
            carried = torch.relu(bias)
            carried[alive] = 0
            alive_in = alive
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), logits


def hidden_sizes(model: nn.Sequential) -> list[int]:
    return [m.out_features for m in model if isinstance(m, nn.Linear)][:-1]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plot(path: Path, model: nn.Sequential) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linears = [m for m in model if isinstance(m, nn.Linear)][:-1]
    fig, axes = plt.subplots(1, len(linears), figsize=(6 * len(linears), 3.6))
    for k, (ax, layer) in enumerate(zip(axes, linears)):
        row_norms = layer.weight.detach().norm(dim=1).cpu()
        dead = row_norms == 0
        ax.bar(torch.arange(len(row_norms)).tolist(), row_norms.tolist(), width=1.0, color="C0")
        ax.bar(torch.nonzero(dead).squeeze(1).tolist(), [row_norms.max().item()] * int(dead.sum()), width=1.0,
               color="C3", alpha=0.15, label=f"{int(dead.sum())} rows exactly 0")
        ax.set(title=f"hidden layer {k + 1}: ‖row‖₂ per neuron", xlabel="neuron")
        ax.legend(fontsize=8)
    fig.suptitle(f"row group lasso {GROUP_LASSO:g} with ProxSGD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Train, prune, compare, write the PNG; return the numbers printed.

    Returns ``{"zero_rows": [per hidden layer], "hidden_before": [...], "hidden_after": [...],
    "params_before", "params_after", "accuracy_before", "accuracy_after", "max_logit_diff",
    "accuracy_no_penalty", "accuracy_finetuned", "png"}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 40, 15 with --quick)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (15 if args.quick else 40)
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
    x_test, y_test = data[2], data[3]
    print(f"{len(data[0])} train / {len(x_test)} test digits, {epochs} epochs of ProxSGD, device {device}")

    torch.manual_seed(args.seed)
    baseline = make_mlp().to(device)
    sparse = make_mlp().to(device)
    sparse.load_state_dict(baseline.state_dict())
    train(baseline, data, epochs, args.batch, 0.0, args.seed)
    train(sparse, data, epochs, args.batch, GROUP_LASSO, args.seed)
    pruned = prune(sparse)

    acc_baseline, _ = evaluate(baseline, x_test, y_test)
    acc_before, logits_before = evaluate(sparse, x_test, y_test)
    acc_after, logits_after = evaluate(pruned, x_test, y_test)
    # The penalty also shrank the surviving rows; a few epochs without it let them grow back.
    finetune_epochs = max(1, epochs // 4)
    train(pruned, data, finetune_epochs, args.batch, 0.0, args.seed + 1)
    acc_finetuned, _ = evaluate(pruned, x_test, y_test)
    result = {
        "zero_rows": [int(m.weight.ne(0).any(dim=1).logical_not().sum()) for m in sparse
                      if isinstance(m, nn.Linear)][:-1],
        "hidden_before": hidden_sizes(sparse),
        "hidden_after": hidden_sizes(pruned),
        "params_before": n_params(sparse),
        "params_after": n_params(pruned),
        "accuracy_no_penalty": acc_baseline,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "max_logit_diff": (logits_before - logits_after).abs().max().item(),
        "accuracy_finetuned": acc_finetuned,
    }
    print(f"no penalty:                 test accuracy {acc_baseline:.2%}, hidden sizes {hidden_sizes(baseline)}")
    print(f"group lasso {GROUP_LASSO:g} (rows):   rows exactly 0 per hidden layer {result['zero_rows']}")
    print(f"  before removal: {result['params_before']:>6,} params, hidden sizes {result['hidden_before']}, "
          f"test accuracy {acc_before:.2%}")
    print(f"  after removal:  {result['params_after']:>6,} params, hidden sizes {result['hidden_after']}, "
          f"test accuracy {acc_after:.2%}")
    print(f"  max |logits before - logits after| on the test set: {result['max_logit_diff']:.1e}")
    print(f"  after {finetune_epochs} epochs of fine-tuning without the penalty: test accuracy {acc_finetuned:.2%}")

    args.out.mkdir(parents=True, exist_ok=True)
    result["png"] = args.out / "group_lasso_pruning.png"
    plot(result["png"], sparse)
    print(f"wrote {result['png']}")
    return result


if __name__ == "__main__":
    main()
