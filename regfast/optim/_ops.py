"""The fused optimizer steps as ``torch.library`` custom ops: ``regfast::sgd_step_`` and ``regfast::adamw_step_``.

Each op serves one (device, dtype) group of params, as the ops of :mod:`regfast._ops` do; the
optimizers in :mod:`regfast.optim` group, validate and keep the state. The real implementation
asks :func:`regfast._dispatch.select` for the backend of the params' device and calls its
function of the same name when it has one, else the pure-PyTorch one of
:mod:`regfast.optim._reference`. A backend adds a fused step by defining, with the semantics
documented there (``lr`` arrives as a float or a 0-dim tensor on the params' device in the
accumulation dtype, every state tensor is in the accumulation dtype)::

    sgd_step_(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
              maximize, init_buffers, l1, l2, group_lasso, groups, compute_penalty) -> Tensor
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, prox,
                compute_penalty) -> Tensor

Both return the penalty of the new params (a 0-dim accumulation-dtype tensor; 0 unless
``compute_penalty``), ideally reduced in the same pass that writes them. A fused step needs no
group lasso of its own: the group shrink needs every group's norm after the update, so this
layer calls it with ``group_lasso=0`` and then runs the backend's own ``prox_`` group passes
(:func:`regfast.optim._reference.group_prox_after_step_`), for float32 / float64 params and a
scalar step (SGD, AdamW with ``prox="lr"``); in Adam's metric, and on float16 / bfloat16 params
(which the reference rounds once per step), the reference step serves group lasso.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._common import Lr, acc_dtype
from .._ops import bump_versions, direct_backend, lr_step
from . import _reference


def _implementation(params: list[Tensor], name: str):
    """The selected backend's ``name`` for the params' device, or the reference one when it has none."""
    return getattr(_dispatch.select(params[0].device), name, None) or getattr(_reference, name)


def _splits_group_lasso(params: list[Tensor]) -> bool:
    """Whether a fused step may leave group lasso to the group passes after it (float32 / float64 params)."""
    return params[0].dtype in (torch.float32, torch.float64)


def _sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr: Lr, momentum: float,
         dampening: float, nesterov: bool, weight_decay: float, maximize: bool, init_buffers: bool, l1: float,
         l2: float, group_lasso: float, groups: str, compute_penalty: bool) -> Tensor:
    step = _implementation(params, "sgd_step_")
    args = (params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay, maximize, init_buffers,
            l1, l2)
    if group_lasso and step is not _reference.sgd_step_:
        if not _splits_group_lasso(params):
            step = _reference.sgd_step_
        else:
            step(*args, 0.0, groups, False)
            return _reference.group_prox_after_step_(_dispatch.select(params[0].device), params, lr, l1, l2,
                                                     group_lasso, groups, compute_penalty)
    return step(*args, group_lasso, groups, compute_penalty)


def _adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
           max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Lr, beta1: float, beta2: float, eps: float,
           weight_decay: float, amsgrad: bool, maximize: bool, l1: float, l2: float, group_lasso: float, groups: str,
           prox: str, compute_penalty: bool) -> Tensor:
    step = _implementation(params, "adamw_step_")
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
            amsgrad, maximize, l1, l2)
    if group_lasso and step is not _reference.adamw_step_:
        if prox != "lr" or not _splits_group_lasso(params):
            step = _reference.adamw_step_
        else:
            step(*args, 0.0, groups, prox, False)
            return _reference.group_prox_after_step_(_dispatch.select(params[0].device), params, lr, l1, l2,
                                                     group_lasso, groups, compute_penalty)
    return step(*args, group_lasso, groups, prox, compute_penalty)


@torch.library.custom_op("regfast::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr_tensor: Tensor | None,
              lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
              init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
              compute_penalty: bool) -> Tensor:
    """An SGD step then the proximal step with step lr; the step is ``lr_tensor`` (0-dim) when given, else ``lr``."""
    return _sgd(params, grads, momentum_buffers, lr_step(params, lr_tensor, lr), momentum, dampening, nesterov,
                weight_decay, maximize, init_buffers, l1, l2, group_lasso, groups, compute_penalty)


@sgd_step_.register_fake
def _(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr_tensor: Tensor | None,
      lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
      init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str, compute_penalty: bool) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


@torch.library.custom_op("regfast::adamw_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr_tensor: Tensor | None, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                l1: float, l2: float, group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    """An AdamW step then the proximal step; the step is ``lr_tensor`` (0-dim) when given, else ``lr``."""
    return _adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_step(params, lr_tensor, lr), beta1,
                  beta2, eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, prox, compute_penalty)


@adamw_step_.register_fake
def _(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
      max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr_tensor: Tensor | None, lr: float, beta1: float,
      beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool, l1: float, l2: float,
      group_lasso: float, groups: str, prox: str, compute_penalty: bool) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


def run_sgd_step_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], lr_tensor: Tensor | None,
                  lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
                  init_buffers: bool, l1: float, l2: float, group_lasso: float, groups: str,
                  compute_penalty: bool) -> Tensor:
    """:func:`sgd_step_`, straight to the backend when :func:`regfast._ops.direct_backend` allows."""
    args = (momentum, dampening, nesterov, weight_decay, maximize, init_buffers, l1, l2, group_lasso, groups,
            compute_penalty)
    if direct_backend(params, grads, momentum_buffers) is None:
        return sgd_step_(params, grads, momentum_buffers, lr_tensor, lr, *args)
    value = _sgd(params, grads, momentum_buffers, lr_step(params, lr_tensor, lr), *args)
    bump_versions(params, momentum_buffers)
    return value


def run_adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr_tensor: Tensor | None, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                    l1: float, l2: float, group_lasso: float, groups: str, prox: str,
                    compute_penalty: bool) -> Tensor:
    """:func:`adamw_step_`, straight to the backend when :func:`regfast._ops.direct_backend` allows."""
    state = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    args = (beta1, beta2, eps, weight_decay, amsgrad, maximize, l1, l2, group_lasso, groups, prox, compute_penalty)
    if direct_backend(params, grads, *state) is None:
        return adamw_step_(params, grads, *state, lr_tensor, lr, *args)
    value = _adamw(params, grads, *state, lr_step(params, lr_tensor, lr), *args)
    bump_versions(params, *state)
    return value
