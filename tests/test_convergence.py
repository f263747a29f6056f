"""The proximal optimizers reach the minimizer of least squares + penalty, exact zeros included.

Problem: ``f(W) = ‖X·vec(W) − y‖² / (2n)`` with ``W`` of shape (groups, features per group), a
random design and a sparse ground truth, plus ``l1·Σ|w| + l2·Σw² + gl·Σ_rows √|g|·‖w_g‖₂``.
At the result the KKT conditions must hold and the zero pattern must be exactly the one of an
independent float64 FISTA solution.
"""

import math

import pytest
import torch
from torch import nn

from regfast.optim import ProxAdamW, Proximal, ProxSGD

N, GROUPS, WIDTH = 200, 6, 4
PENALTIES = {
    "lasso": dict(l1=0.05),
    "elastic_net": dict(l1=0.04, l2=0.05),
    "group_lasso": dict(group_lasso=0.08),
    "sparse_group_lasso": dict(l1=0.02, group_lasso=0.05),
}


def _problem(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, GROUPS * WIDTH, generator=gen, dtype=torch.float64)
    truth = torch.randn(GROUPS, WIDTH, generator=gen, dtype=torch.float64)
    truth[GROUPS // 2:] = 0  # whole groups absent
    truth[0, :2] = 0  # and single features
    y = x @ truth.reshape(-1) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    lipschitz = torch.linalg.eigvalsh(x.T @ x / N).max().item()
    return x, y, lipschitz


def _grad(x, y, w):
    return (x.T @ (x @ w.reshape(-1) - y) / N).reshape(w.shape)


def _prox(w, step, l1=0.0, l2=0.0, group_lasso=0.0):
    """The prox of the penalty with row groups, written out independently of regfast."""
    u = torch.sign(w) * torch.clamp(w.abs() - step * l1, min=0) / (1 + 2 * step * l2)
    if group_lasso:
        norms = u.norm(dim=1, keepdim=True)
        threshold = step * group_lasso * math.sqrt(WIDTH) / (1 + 2 * step * l2)
        u = u * torch.where(norms > threshold, 1 - threshold / norms, torch.zeros_like(norms))
    return u


def _fista(x, y, lipschitz, penalty, steps=3000):
    w = torch.zeros(GROUPS, WIDTH, dtype=torch.float64)
    z, t = w.clone(), 1.0
    for _ in range(steps):
        w_next = _prox(z - _grad(x, y, z) / lipschitz, 1 / lipschitz, **penalty)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = w_next + (t - 1) / t_next * (w_next - w)
        w, t = w_next, t_next
    return w


def _check_kkt(x, y, w, penalty, tol):
    """Stationarity where w ≠ 0 and the subgradient bound where w = 0, per feature and per group."""
    l1, l2, gl = penalty.get("l1", 0.0), penalty.get("l2", 0.0), penalty.get("group_lasso", 0.0)
    g = _grad(x, y, w) + 2 * l2 * w
    for row in range(GROUPS):
        w_g, g_g = w[row], g[row]
        if (w_g == 0).all():
            # 0 ∈ g + l1·[−1, 1] + gl·√|g|·(unit ball): the l1 part absorbs up to l1 per feature.
            residual = torch.sign(g_g) * torch.clamp(g_g.abs() - l1, min=0)
            assert residual.norm() <= gl * math.sqrt(WIDTH) + tol
            continue
        group_term = gl * math.sqrt(WIDTH) * w_g / w_g.norm() if gl else torch.zeros_like(w_g)
        nonzero = w_g != 0
        stationarity = g_g + l1 * torch.sign(w_g) + group_term
        assert stationarity[nonzero].abs().max() <= tol
        assert ((g_g + group_term)[~nonzero].abs() <= l1 + tol).all()


def _run(opt, w, x, y, steps, lr_at=None):
    for t in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        w.grad = _grad(x, y, w.detach())
        opt.step()
    return w.detach()


@pytest.mark.parametrize("name", list(PENALTIES))
def test_proximal_gradient_reaches_the_optimum(name):
    penalty = PENALTIES[name]
    x, y, lipschitz = _problem(int(torch.randint(0, 2**31, ())))
    optimum = _fista(x, y, lipschitz, penalty)
    _check_kkt(x, y, optimum, penalty, tol=1e-10)
    assert (optimum == 0).any() and (optimum != 0).any()
    for make in (lambda ps: ProxSGD(ps, lr=1 / lipschitz, **penalty),
                 lambda ps: Proximal(torch.optim.SGD(ps, lr=1 / lipschitz), **penalty)):
        w = nn.Parameter(torch.zeros(GROUPS, WIDTH, dtype=torch.float64))
        result = _run(make([w]), w, x, y, steps=1500)
        _check_kkt(x, y, result, penalty, tol=1e-9)
        assert torch.equal(result == 0, optimum == 0)
        torch.testing.assert_close(result, optimum, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_prox_adamw_with_decaying_lr_approaches_the_optimum(name):
    penalty = PENALTIES[name]
    x, y, lipschitz = _problem(int(torch.randint(0, 2**31, ())))
    optimum = _fista(x, y, lipschitz, penalty)
    w = nn.Parameter(torch.zeros(GROUPS, WIDTH, dtype=torch.float64))
    opt = ProxAdamW([w], weight_decay=0.0, **penalty)
    result = _run(opt, w, x, y, steps=3000, lr_at=lambda t: 0.05 / (1 + t / 100))
    assert (result - optimum).abs().max() <= 1e-3
    _check_kkt(x, y, result, penalty, tol=1e-2)
    assert torch.equal(result == 0, optimum == 0)
