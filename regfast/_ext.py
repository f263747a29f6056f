"""The compiled extension ``regfast._C`` as a backend: ``cpp`` on CPU tensors, ``cuda`` on CUDA tensors.

Importing this module never fails: when ``regfast._C`` is missing (a pure-Python install,
``REGFAST_NO_EXT=1``, a failed build) or was built for another torch (it is then not loaded: its
symbols would not resolve), :func:`unavailable_reason` says why, from what the build recorded in
``regfast._build_info``.

Each function serves one (device, dtype) group, with the signature of the same function in
:mod:`regfast.reference`, and is one call of a ``torch.ops.regfast_C`` op; the dispatcher picks
the CPU or CUDA kernel from the tensors' device. The kernels take tensors of any layout
(non-contiguous ones are processed through contiguous copies, written back when mutated).

:func:`sgd_step_` and :func:`adamw_step_` are the fused optimizer steps of
:mod:`regfast.optim._ops`, with the signatures and semantics of :mod:`regfast.optim._reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Lr

REBUILD = "pip install --no-build-isolation -e . (or pip install --no-build-isolation regfast)"


def _load_extension():
    """``(regfast._C or None, why it is not loaded)``."""
    try:
        from . import _build_info
    except ImportError:  # no build step ran (a source tree on sys.path)
        _build_info = None
    if _build_info is not None:
        if _build_info.NOT_BUILT:
            return None, _build_info.NOT_BUILT
        built = _build_info.TORCH_VERSION
        if built != torch.__version__:
            return None, (f"regfast._C was built for torch {built}, running torch {torch.__version__}: "
                          f"rebuild with {REBUILD}")
    try:
        from . import _C
    except ImportError as exc:  # the extension is optional
        return None, f"regfast._C is not importable ({exc}): rebuild with {REBUILD}"
    return _C, ""


_C, _IMPORT_ERROR = _load_extension()

__all__ = ["add_penalty_grad_", "adamw_step_", "norms", "penalty", "penalty_backward", "prox_", "sgd_step_",
           "unavailable_reason"]


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


def _split_lr(lr: Lr) -> tuple[Tensor | None, float]:
    return (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))


def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: Lr,
              momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
              compute_penalty: bool) -> Tensor:
    """One SGD step and the proximal step in one pass over params, grads and buffers; returns the penalty.

    Mutates ``params`` and ``momentum_buffers``. ``group_lasso`` must be 0 (the op layer of
    :mod:`regfast.optim` runs the group passes).
    """
    if group_lasso:
        raise ValueError("the fused step takes no group lasso: regfast.optim's op layer runs the group passes")
    lr_tensor, lr_value = _split_lr(lr)
    return torch.ops.regfast_C.sgd_step_(params, grads, momentum_buffers, lr_tensor, lr_value, momentum, dampening,
                                         nesterov, weight_decay, maximize, init_buffers, l1, l2, compute_penalty)


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Lr, beta1: float, beta2: float,
                eps: float, weight_decay: float, amsgrad: bool, maximize: bool, l1: float, l2: float,
                group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    """One AdamW step and the proximal step in one pass over params, grads and moments; returns the penalty.

    Increments ``steps`` first. Mutates ``params``, ``exp_avgs``, ``exp_avg_sqs``,
    ``max_exp_avg_sqs`` and ``steps``. ``group_lasso`` must be 0 (see :func:`sgd_step_`).
    """
    if group_lasso:
        raise ValueError("the fused step takes no group lasso: regfast.optim's op layer runs the group passes")
    lr_tensor, lr_value = _split_lr(lr)
    return torch.ops.regfast_C.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor,
                                           lr_value, beta1, beta2, eps, weight_decay, amsgrad, maximize, l1, l2,
                                           prox, compute_penalty)
