"""regfast: fused multi-tensor L1 / L2 / elastic-net / group-lasso regularization for PyTorch.

Public API: :func:`penalty` (differentiable, in the loss), :func:`add_penalty_grad_` (into
``.grad`` after backward), :func:`norms`, :func:`prox_` (the proximal step, exact zeros),
:func:`weights`, :func:`param_groups`, :func:`sparsity` and :func:`backend`.
"""

from . import optim
from ._dispatch import BackendInfo, backend
from .api import (
    Norms,
    Sparsity,
    add_penalty_grad_,
    norms,
    param_groups,
    penalty,
    prox_,
    sparsity,
    weights,
)

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "Norms",
    "Sparsity",
    "add_penalty_grad_",
    "backend",
    "norms",
    "optim",
    "param_groups",
    "penalty",
    "prox_",
    "sparsity",
    "weights",
]
