"""ProxAdamW: torch.optim.AdamW with the proximal step of the penalty fused into the update."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _ops
from .._common import acc_dtype
from ._base import FusedProximalOptimizer, check_nonnegative, split_lr, views_of_one_buffer, with_grads

__all__ = ["ProxAdamW"]

PROX_MODES = ("preconditioned", "lr")


class ProxAdamW(FusedProximalOptimizer):
    """AdamW followed, in the same pass, by the proximal step of the penalty.

    Each step is the update of :class:`torch.optim.AdamW` (``foreach`` flavour: decoupled weight
    decay ``w ← w·(1 − lr·weight_decay)``, then ``w ← w − lr·m̂/d`` with ``d = √v̂ + eps``, floored
    as below with ``prox="preconditioned"``) and then the proximal step of
    ``R = l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂``:

    - ``prox="preconditioned"`` (default): the exact proximal operator of ``R`` in Adam's own
      metric, i.e. with the per-element step ``s = lr/d``, where Adam's denominator is taken no
      smaller than the size of the penalty's gradient at the weights before the step,
      ``d = max(√v̂ + eps, l1 + 2·l2·|w| + group_lasso·√|g|·|w|/‖w_g‖)``, in the update and the
      prox alike. An element with no gradient history (``v̂ = 0``: an embedding row not in the
      batch, a dead unit) or gradients smaller than the penalty's then gets the step Adam would
      give it if the penalty's gradient were its gradient, so the penalty moves it by at most
      about ``lr`` per step, instead of the step ``lr/eps`` that would wipe it. The prox is then:
      ``u = sign(w)·max(|w| − s·l1, 0)/(1 + 2·s·l2)`` per element, and per group the
      minimizer of ``Σ_i (x_i − u_i)²·(1 + 2·s_i·l2)/(2·s_i) + group_lasso·√|g|·‖x_g‖₂``: the
      group is 0 when ``‖u_g/a_g‖₂ ≤ 1`` (``a_i = group_lasso·√|g|·s_i/(1 + 2·s_i·l2)``), else
      ``x_i = u_i·t/(t + a_i)`` with ``t = ‖x_g‖₂`` the root of ``Σ_i u_i²/(t + a_i)² = 1``
      (8 monotone Newton steps; a few more passes over the group's elements). Since the prox
      and the gradient step share one metric, the fixed points are exactly the minimizers of
      loss + ``R`` (the KKT points): the penalty is part of the objective Adam optimizes.
    - ``prox="lr"``: the prox with the scalar step ``lr``, i.e. :func:`regfast.prox_`. Like
      AdamW's decoupled weight decay it shrinks every weight at the same rate whatever its
      gradient history; its fixed points are not the minimizers of loss + ``R``.

    With ``l1 = l2 = group_lasso = 0`` it is ``torch.optim.AdamW``.

    Args:
        params: iterable of tensors or of dicts defining param groups; any hyperparameter
            below may be overridden per group (e.g. :func:`regfast.param_groups`).
        lr: learning rate, a float or a one-element tensor (default: 1e-3).
        betas: coefficients of the running averages of the gradient and its square (default: (0.9, 0.999)).
        eps: added to the denominator ``√v̂`` (default: 1e-8).
        weight_decay: decoupled weight decay (default: 1e-2).
        l1, l2, group_lasso: penalty coefficients, >= 0 (default: 0).
        groups: ``"row"`` (slices along dim 0), ``"col"`` (along dim 1) or ``"tensor"``; tensors
            with fewer than 2 dims are one group (default: ``"row"``).
        prox: ``"preconditioned"`` or ``"lr"``, see above (default: ``"preconditioned"``).
        amsgrad: use the running maximum of ``v`` (AMSGrad) (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        capturable: keep the step counts on the params' device and compute the bias
            corrections there, with no host sync (for CUDA graphs) (default: False).
        compute_penalty: after each step set :attr:`last_penalty` to the penalty of the new
            values of the params that were updated, computed by the same op (default: False).

    Params may mix devices and dtypes (float16, bfloat16, float32, float64); each (device,
    dtype) set of a param group is one ``regfast::adamw_step_`` call. ``state[p]`` holds
    ``step`` (float32 0-dim, on the CPU unless ``capturable``), ``exp_avg``, ``exp_avg_sq``
    and with amsgrad ``max_exp_avg_sq``, all float32 (float64 for float64 params) whatever
    the param dtype; a float16 / bfloat16 param is updated in float32 and rounded once per
    step. Params whose ``grad`` is None are skipped and get no state. ``step`` mutates the
    params and their state; grads are left unchanged. On the CPU, once a step has updated
    every param of a group, the group's states of each dtype are views of one flat buffer per
    state (same values; see the README's "Backends").

    Attributes:
        last_penalty: 0-dim float32 (float64 if any param is) tensor, or None without ``compute_penalty``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0, groups: str = "row",
                 prox: str = "preconditioned", amsgrad: bool = False, maximize: bool = False, *,
                 capturable: bool = False, compute_penalty: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1, l2=l2,
                        group_lasso=group_lasso, groups=groups, prox=prox, amsgrad=amsgrad, maximize=maximize,
                        capturable=capturable)
        super().__init__(params, defaults, compute_penalty)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("learning rate", group["lr"])
        check_nonnegative("epsilon value", group["eps"])
        check_nonnegative("weight_decay value", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected two numbers)")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be a float in [0, 1))")
        if group["prox"] not in PROX_MODES:
            raise ValueError(f"Invalid prox: {group['prox']!r} (expected one of {', '.join(map(repr, PROX_MODES))})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("prox", "preconditioned"), ("amsgrad", False), ("maximize", False),
                               ("capturable", False)):
                group.setdefault(key, value)

    def _check_capture(self, group: dict[str, Any]) -> None:
        super()._check_capture(group)
        if not group["capturable"]:
            raise RuntimeError("ProxAdamW: a CUDA graph capture of step() with capturable=False, whose step counts "
                               "live on the CPU: every replay would reuse the bias corrections of the captured "
                               "step; construct ProxAdamW with capturable=True to step inside a CUDA graph")

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        acc = acc_dtype(p.dtype)
        step_device = p.device if group["capturable"] else torch.device("cpu")
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        state["exp_avg"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
        return state

    def _init_flat_states(self, bucket: list[Tensor], group: dict[str, Any]) -> None:
        """The states of a (device, dtype) bucket of params, as :meth:`_init_state` makes them, each kind the
        consecutive views of one buffer."""
        p = bucket[0]
        acc = acc_dtype(p.dtype)
        shapes = [q.shape for q in bucket]
        step_device = p.device if group["capturable"] else torch.device("cpu")
        kinds = {"step": views_of_one_buffer([torch.Size()] * len(bucket), torch.float32, step_device),
                 "exp_avg": views_of_one_buffer(shapes, acc, p.device),
                 "exp_avg_sq": views_of_one_buffer(shapes, acc, p.device)}
        if group["amsgrad"]:
            kinds["max_exp_avg_sq"] = views_of_one_buffer(shapes, acc, p.device)
        for i, q in enumerate(bucket):
            self.state[q].update((key, views[i]) for key, views in kinds.items())

    def _step_group(self, group: dict[str, Any]) -> list[Tensor]:
        lr_tensor, lr = split_lr(group["lr"])
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        hyper = (lr_tensor, lr, beta1, beta2, group["eps"], group["weight_decay"], amsgrad, group["maximize"],
                 group["l1"], group["l2"], group["group_lasso"], group["groups"], group["prox"], self.compute_penalty)
        walked = self._walk(group, *hyper)
        if walked is not None:
            return walked
        params, buckets = with_grads(group)
        # Flat states for the extension's walk (which steps group lasso too) and, without group lasso, for a backend
        # that launches from Python.
        flat = lr_tensor is None
        launched = flat and group["group_lasso"] == 0
        if self._fresh_states_flat(group, params, flat, launched):
            for idx in buckets:
                self._init_flat_states([params[i] for i in idx], group)
        values = []
        for idx in buckets:
            bucket = [params[i] for i in idx]
            states = [self.state[p] if self.state.get(p) else self._init_state(p, group) for p in bucket]
            values.append(_ops.call(
                "adamw_step_", bucket, [p.grad for p in bucket], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                [s["step"] for s in states], *hyper))
        self._keep_plan(group, params, "adamw_step", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None,
                                                     "step"), flat, launched)
        return values
