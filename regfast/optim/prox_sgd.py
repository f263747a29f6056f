"""ProxSGD: torch.optim.SGD with the proximal step of the penalty fused into the update."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from operator import is_
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._common import acc_dtype
from ._base import FusedProximalOptimizer, check_nonnegative, split_lr, views_of_one_buffer, with_grads

__all__ = ["ProxSGD"]


class ProxSGD(FusedProximalOptimizer):
    """Stochastic gradient descent followed, in the same pass, by the proximal step of the penalty.

    Each step is exactly the update of :class:`torch.optim.SGD` (``foreach`` flavour) and then
    ``w ← prox_{lr·R}(w)`` with ``R = l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂`` (see
    :func:`regfast.prox_`): proximal gradient descent, which gives exact zeros. With
    ``l1 = l2 = group_lasso = 0`` it is ``torch.optim.SGD``.

    Args:
        params: iterable of tensors or of dicts defining param groups; any hyperparameter
            below may be overridden per group (e.g. :func:`regfast.param_groups`).
        lr: learning rate and prox step, a float or a one-element tensor (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening for momentum (default: 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default: False).
        weight_decay: coupled L2 weight decay added to the gradient, as in SGD (default: 0).
        l1, l2, group_lasso: penalty coefficients, >= 0 (default: 0).
        groups: ``"row"`` (slices along dim 0), ``"col"`` (along dim 1) or ``"tensor"``; tensors
            with fewer than 2 dims are one group (default: ``"row"``).
        maximize: maximize the objective instead of minimizing (default: False).
        compute_penalty: after each step set :attr:`last_penalty` to the penalty of the new
            values of the params that were updated, computed by the same op (default: False).

    Params may mix devices and dtypes (float16, bfloat16, float32, float64); each (device,
    dtype) set of a param group is one ``regfast::sgd_step_`` call. Momentum buffers are
    float32 (float64 for float64 params); a float16 / bfloat16 param is updated in float32 and
    rounded once per step. Params whose ``grad`` is None are skipped and get no state.
    ``step`` mutates the params and ``state[p]["momentum_buffer"]``; grads are left unchanged.
    On the CPU, once a step has updated every param of a group, the group's buffers of each
    dtype are views of one flat buffer (same values; see the README's "Backends").

    Attributes:
        last_penalty: 0-dim float32 (float64 if any param is) tensor, or None without ``compute_penalty``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0, groups: str = "row",
                 maximize: bool = False, *, compute_penalty: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        l1=l1, l2=l2, group_lasso=group_lasso, groups=groups, maximize=maximize)
        super().__init__(params, defaults, compute_penalty)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("learning rate", group["lr"])
        check_nonnegative("momentum value", group["momentum"])
        check_nonnegative("dampening value", group["dampening"])
        check_nonnegative("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _step_group(self, group: dict[str, Any]) -> list[Tensor]:
        lr_tensor, lr = split_lr(group["lr"])
        momentum = group["momentum"]
        hyper = (momentum, group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"],
                 group["l1"], group["l2"], group["group_lasso"], group["groups"], self.compute_penalty)
        walked = self._walk(group, lr_tensor, lr, *hyper)
        if walked is not None:
            return walked
        params, buckets = with_grads(group)
        # Flat states for the extension's walk (which steps group lasso too) and, without group lasso, for a backend
        # that launches from Python.
        flat = lr_tensor is None
        launched = flat and group["group_lasso"] == 0
        fresh_flat = momentum != 0 and self._fresh_states_flat(group, params, flat, launched)
        values = []
        for idx in buckets:
            bucket = [params[i] for i in idx]
            if fresh_flat:  # the first step of every param: the buffers as views of one, set by the step
                views = views_of_one_buffer([p.shape for p in bucket], acc_dtype(bucket[0].dtype), bucket[0].device,
                                            zero=False)
                for p, view in zip(bucket, views):
                    self.state[p]["momentum_buffer"] = view
                splits = [(True, bucket, views)]
            # A param's first step sets its buffer to the gradient; the others decay theirs.
            elif momentum == 0:
                splits = [(False, bucket, [])]
            else:
                found = [s.get("momentum_buffer") if s else None for s in map(self.state.get, bucket)]
                if not any(map(is_, found, repeat(None))):
                    splits = [(False, bucket, found)]
                else:
                    fresh = [p for p, b in zip(bucket, found) if b is None]
                    for p in fresh:
                        self.state[p]["momentum_buffer"] = torch.empty_like(p, dtype=acc_dtype(p.dtype))
                    splits = [(True, fresh, [self.state[p]["momentum_buffer"] for p in fresh]),
                              (False, [p for p, b in zip(bucket, found) if b is not None],
                               [b for b in found if b is not None])]
            for init, ps, buffers in splits:
                if not ps:
                    continue
                values.append(_ops.call(
                    "sgd_step_", ps, [p.grad for p in ps], buffers, lr_tensor, lr, momentum, group["dampening"],
                    group["nesterov"], group["weight_decay"], group["maximize"], init,
                    group["l1"], group["l2"], group["group_lasso"], group["groups"], self.compute_penalty))
        self._keep_plan(group, params, "sgd_step", ("momentum_buffer" if momentum != 0 else None,), flat, launched)
        return values
