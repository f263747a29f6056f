"""The compiled extension ``regfast._C`` as a backend: ``cpp`` on CPU tensors, ``cuda`` on CUDA tensors.

Importing this module never fails: when ``regfast._C`` is missing (a pure-Python install,
``REGFAST_NO_EXT=1``, no compiler at install time) :func:`unavailable_reason` says why.

Each function serves one (device, dtype) group, with the signature of the same function in
:mod:`regfast.reference`, and is one call of a ``torch.ops.regfast_C`` op; the dispatcher picks
the CPU or CUDA kernel from the tensors' device. The kernels take tensors of any layout
(non-contiguous ones are processed through contiguous copies, written back when mutated).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C
except ImportError as exc:  # the extension is optional
    _C = None
    _IMPORT_ERROR = (f"regfast._C is not built ({exc}); reinstall with a C++ compiler present: "
                     "pip install --no-build-isolation -e .")
else:
    _IMPORT_ERROR = ""

__all__ = ["add_penalty_grad_", "norms", "penalty", "penalty_backward", "prox_", "unavailable_reason"]


def unavailable_reason(device_type: str) -> str | None:
    """``None`` if the extension has kernels for ``device_type`` tensors, else why not."""
    if _C is None:
        return _IMPORT_ERROR
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _C.WITH_CUDA:
            return None
        return ("regfast._C was built without CUDA kernels (torch without CUDA or no CUDA toolkit at build "
                "time; REGFAST_BUILD_CUDA=1 forces them)")
    return f"regfast._C has no {device_type} kernels"


def norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw², each 1-D of ``len(params)`` in the accumulation dtype."""
    return torch.ops.regfast_C.norms(params)


def penalty(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    """The penalty value, a 0-dim tensor in the accumulation dtype."""
    return torch.ops.regfast_C.penalty(params, l1, l2, group_lasso, groups)


def penalty_backward(grad: Tensor, params: list[Tensor], l1: float, l2: float, group_lasso: float,
                     groups: str) -> list[Tensor]:
    """``grad`` (0-dim) times the penalty's gradient: one new tensor per param, in the param's dtype."""
    return torch.ops.regfast_C.penalty_backward(grad, params, l1, l2, group_lasso, groups)


def add_penalty_grad_(params: list[Tensor], grads: list[Tensor], l1: float, l2: float, group_lasso: float,
                      groups: str) -> Tensor:
    """``grads[i] += ∇penalty(params[i])`` in place; returns the penalty value (accumulation dtype)."""
    return torch.ops.regfast_C.add_penalty_grad_(params, grads, l1, l2, group_lasso, groups)


def prox_(params: list[Tensor], lr: float | Tensor, l1: float, l2: float, group_lasso: float, groups: str) -> None:
    """The proximal step in place; ``lr`` is a float or a 0-dim tensor on the params' device (read there)."""
    if isinstance(lr, Tensor):
        torch.ops.regfast_C.prox_(params, lr, 0.0, l1, l2, group_lasso, groups)
    else:
        torch.ops.regfast_C.prox_(params, None, float(lr), l1, l2, group_lasso, groups)
