"""A second, deliberately plain float64 statement of the math, independent of regfast.reference."""

from __future__ import annotations

import math

import torch


def groups_of(w: torch.Tensor, groups: str) -> torch.Tensor:
    """The groups of ``w`` as the rows of a 2-D tensor (one row per group)."""
    if groups == "tensor" or w.dim() < 2:
        return w.reshape(1, w.numel())
    if groups == "row":
        return w.reshape(w.shape[0], math.prod(w.shape[1:]))
    return w.transpose(0, 1).reshape(w.shape[1], w.shape[0] * math.prod(w.shape[2:]))


def from_groups(rows: torch.Tensor, w: torch.Tensor, groups: str) -> torch.Tensor:
    """Inverse of :func:`groups_of`."""
    if groups == "tensor" or w.dim() < 2 or groups == "row":
        return rows.reshape(w.shape)
    shape = (w.shape[1], w.shape[0], *w.shape[2:])
    return rows.reshape(shape).transpose(0, 1)


def penalty(ts, l1=0.0, l2=0.0, gl=0.0, groups="row") -> torch.Tensor:
    """l1·Σ|w| + l2·Σw² + gl·Σ_g √|g|·‖w_g‖, differentiable, in the dtype of the inputs."""
    total = torch.zeros((), dtype=torch.float64)
    for w in ts:
        w = w.to(torch.float64)
        total = total + l1 * w.abs().sum() + l2 * (w * w).sum()
        if gl:
            rows = groups_of(w, groups)
            if rows.numel():
                total = total + gl * math.sqrt(rows.shape[1]) * rows.norm(dim=1).sum()
    return total


def grad(w: torch.Tensor, l1=0.0, l2=0.0, gl=0.0, groups="row") -> torch.Tensor:
    """∇penalty at ``w`` (float64), with the group term 0 for a zero group."""
    w = w.detach().to(torch.float64)
    g = l1 * torch.where(w.isnan(), w, torch.sign(w)) + 2 * l2 * w  # a NaN weight: NaN gradient
    if gl:
        rows = groups_of(w, groups)
        if rows.numel():
            n = rows.norm(dim=1, keepdim=True)
            scaled = torch.where(n > 0, rows / n, torch.zeros_like(rows)) * gl * math.sqrt(rows.shape[1])
            g = g + from_groups(scaled, w, groups)
    return g


def prox(w: torch.Tensor, lr: float, l1=0.0, l2=0.0, gl=0.0, groups="row") -> torch.Tensor:
    """The proximal operator of lr·penalty at ``w`` (float64)."""
    w = w.detach().to(torch.float64)
    u = torch.sign(w) * torch.clamp(w.abs() - lr * l1, min=0) / (1 + 2 * lr * l2)
    if gl:
        rows = groups_of(u, groups)
        if rows.numel():
            n = rows.norm(dim=1, keepdim=True)
            t = lr * gl * math.sqrt(rows.shape[1]) / (1 + 2 * lr * l2)
            factor = torch.where(n > t, 1 - t / n, torch.zeros_like(n))
            factor = torch.where(n.isnan(), n, factor)  # a NaN's group stays NaN, never zeros
            u = from_groups(rows * factor, u, groups)
    return u
