"""Every regfast operation as a ``torch.library`` custom op in the ``regfast`` namespace.

Each op serves one (device, dtype) group: a non-empty list of tensors sharing a device and a
floating dtype (:mod:`regfast.api` groups, validates and sums). The schemas say what each op
mutates; each op has a fake implementation for tracing and the differentiable one registers
its autograd formula. The real implementation asks :mod:`regfast._dispatch` which backend
serves the group's device and calls that backend's function of the same name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from .reference import acc_dtype


def _backend(params: list[Tensor]):
    return _dispatch.select(params[0].device)


@torch.library.custom_op("regfast::norms", mutates_args=())
def norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw², each 1-D of ``len(params)`` in the accumulation dtype."""
    return _backend(params).norms(params)


@norms.register_fake
def _(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(params[0].dtype)
    return params[0].new_empty(len(params), dtype=acc), params[0].new_empty(len(params), dtype=acc)


@torch.library.custom_op("regfast::penalty", mutates_args=())
def penalty(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    """The penalty value, a 0-dim tensor in the accumulation dtype."""
    return _backend(params).penalty(params, l1, l2, group_lasso, groups)


@penalty.register_fake
def _(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


@torch.library.custom_op("regfast::penalty_backward", mutates_args=())
def penalty_backward(grad: Tensor, params: list[Tensor], l1: float, l2: float,
                     group_lasso: float, groups: str) -> list[Tensor]:
    """``grad`` (0-dim) times the penalty's gradient: one new tensor per param."""
    return _backend(params).penalty_backward(grad, params, l1, l2, group_lasso, groups)


@penalty_backward.register_fake
def _(grad: Tensor, params: list[Tensor], l1: float, l2: float, group_lasso: float,
      groups: str) -> list[Tensor]:
    return [torch.empty_like(p) for p in params]


def _penalty_setup_context(ctx, inputs, output) -> None:
    params, l1, l2, group_lasso, groups = inputs
    ctx.hyper = (l1, l2, group_lasso, groups)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*params)


def _penalty_backward(ctx, grad: Tensor):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    return list(penalty_backward(grad, list(ctx.saved_tensors), *ctx.hyper)), None, None, None, None


penalty.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


@torch.library.custom_op("regfast::add_penalty_grad_", mutates_args=("grads",))
def add_penalty_grad_(params: list[Tensor], grads: list[Tensor], l1: float, l2: float,
                      group_lasso: float, groups: str) -> Tensor:
    """``grads[i] += ∇penalty(params[i])`` in place; returns the penalty value (accumulation dtype)."""
    return _backend(params).add_penalty_grad_(params, grads, l1, l2, group_lasso, groups)


@add_penalty_grad_.register_fake
def _(params: list[Tensor], grads: list[Tensor], l1: float, l2: float, group_lasso: float,
      groups: str) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


@torch.library.custom_op("regfast::prox_", mutates_args=("params",))
def prox_(params: list[Tensor], lr_tensor: Tensor | None, lr: float, l1: float, l2: float,
          group_lasso: float, groups: str) -> None:
    """The proximal step in place; the step is ``lr_tensor`` (0-dim) when given, else ``lr``."""
    step = lr if lr_tensor is None else lr_tensor.to(params[0].device, acc_dtype(params[0].dtype))
    _backend(params).prox_(params, step, l1, l2, group_lasso, groups)


@prox_.register_fake
def _(params: list[Tensor], lr_tensor: Tensor | None, lr: float, l1: float, l2: float,
      group_lasso: float, groups: str) -> None:
    return None
