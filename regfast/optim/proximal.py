"""Proximal: any torch.optim optimizer followed by the proximal step of the penalty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _ops
from ..api import penalty, prox_
from ._base import REGULARIZATION_KEYS, check_regularization, profile_hook_step, total, with_grads

__all__ = ["Proximal"]


class Proximal(Optimizer):
    """Wrap ``optimizer`` so that each step ends with :func:`regfast.prox_` on the params it updated.

    After ``optimizer.step()``, every param group's params that have a gradient get
    ``w ← prox_{lr·R}(w)`` with the group's current ``lr`` and
    ``R = l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂``, using the group's own ``l1``,
    ``l2``, ``group_lasso`` and ``groups`` (the constructor's values are the defaults, written
    into each group that lacks them). Params whose ``grad`` is None (frozen) are left alone.
    This is one extra pass over the params; :class:`ProxSGD` and :class:`ProxAdamW` fuse it.

    The wrapper is a full :class:`torch.optim.Optimizer`: ``param_groups`` and ``state`` are the
    inner optimizer's own objects (also after ``load_state_dict`` and ``add_param_group``), so
    LR schedulers, ``torch.amp.GradScaler`` (a step skipped for inf/NaN grads skips the prox
    too), ``zero_grad``, step hooks, ``state_dict`` / ``load_state_dict``, ``deepcopy`` and
    pickle work as with the inner optimizer.

    Args:
        optimizer: the optimizer to wrap; it keeps doing the update.
        l1, l2, group_lasso: default penalty coefficients, >= 0 (default: 0).
        groups: default grouping, ``"row"``, ``"col"`` or ``"tensor"`` (default: ``"row"``).
        compute_penalty: after each step set :attr:`last_penalty` to the penalty of the updated
            params' new values (one more pass) (default: False).

    Attributes:
        optimizer: the wrapped optimizer.
        last_penalty: 0-dim float32 (float64 if any param is) tensor, or None without ``compute_penalty``.
    """

    profile_hook_step = staticmethod(profile_hook_step)

    def __init__(self, optimizer: Optimizer, l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0,
                 groups: str = "row", *, compute_penalty: bool = False) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        regularization = dict(l1=l1, l2=l2, group_lasso=group_lasso, groups=groups)
        check_regularization(regularization)
        checked = []
        for group in optimizer.param_groups:
            coefs = {**regularization, **{k: group[k] for k in REGULARIZATION_KEYS if k in group}}
            check_regularization(coefs)
            checked.append(coefs)
        for group, coefs in zip(optimizer.param_groups, checked):
            group.update({k: coefs[k] for k in REGULARIZATION_KEYS if k in group})
        # Optimizer.__setstate__ creates the hook registries and wraps step for the hooks without
        # creating param_groups and state of its own, which live in the inner optimizer.
        self.__setstate__({"optimizer": optimizer, "defaults": {**optimizer.defaults, **regularization},
                           "compute_penalty": bool(compute_penalty), "last_penalty": None})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fill_regularization()

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "defaults": self.defaults, "compute_penalty": self.compute_penalty,
                "last_penalty": self.last_penalty}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's param groups (the same list)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict[Tensor, Any]:
        """The inner optimizer's state (the same dict)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: dict[Tensor, Any]) -> None:
        self.optimizer.state = value

    def _fill_regularization(self) -> None:
        for group in self.optimizer.param_groups:
            for key in REGULARIZATION_KEYS:
                group.setdefault(key, self.defaults[key])

    def __repr__(self) -> str:
        reg = ", ".join(f"{k}={self.defaults[k]!r}" for k in REGULARIZATION_KEYS)
        return f"Proximal({reg},\n{self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer, with the regularization defaults where it has none."""
        group = {k: self.defaults[k] for k in REGULARIZATION_KEYS} | dict(param_group)
        check_regularization(group)
        self.optimizer.add_param_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (its groups hold the regularization keys), through this one's hooks."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.optimizer.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer; groups saved without the regularization keys get the defaults."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        for group in state_dict["param_groups"]:  # checked before anything is loaded
            check_regularization({**{k: self.defaults[k] for k in REGULARIZATION_KEYS}, **group})
        self.optimizer.load_state_dict(state_dict)
        self._fill_regularization()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _inner_step(self, closure):
        """The inner optimizer's step with its own step hooks, without the global ones: those fire once, around
        this optimizer's step (torch wraps each optimizer class's ``step`` with both kinds)."""
        inner = self.optimizer
        wrapped = type(inner).step
        raw = getattr(wrapped, "__wrapped__", None) if getattr(wrapped, "hooked", False) else None
        if raw is None or "step" in vars(inner) or not hasattr(inner, "_optimizer_step_pre_hooks"):
            # Not wrapped by torch, or patched on the instance (a scheduler's step counter): the plain call.
            return inner.step() if closure is None else inner.step(closure)
        args, kwargs = ((), {}) if closure is None else ((closure,), {})
        for hook in inner._optimizer_step_pre_hooks.values():
            result = hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        loss = raw(inner, *args, **kwargs)
        inner._optimizer_step_code()
        for hook in inner._optimizer_step_post_hooks.values():
            hook(inner, args, kwargs)
        return loss

    def step(self, closure=None):
        """The inner optimizer's step (with ``closure`` if given), then the proximal step; returns its loss.

        The regularization of every group is checked first, and without ``closure`` the gradients too
        (dense, matching their params): when the proximal step would refuse, the inner step does not run.
        """
        checked = []  # (coefficients, params with a grad: known before the step unless a closure makes grads)
        for group in self.optimizer.param_groups:
            coefs = {k: group.get(k, self.defaults[k]) for k in REGULARIZATION_KEYS}
            check_regularization(coefs)
            group.update(coefs)
            if closure is not None:
                checked.append((coefs, None))
            elif _ops.grads_ready(group["params"]):
                checked.append((coefs, group["params"]))
            else:
                checked.append((coefs, with_grads(group)[0]))
        loss = self._inner_step(closure)
        values = []
        with torch.no_grad():
            for group, (coefs, params) in zip(self.optimizer.param_groups, checked):
                if params is None:
                    params, _ = with_grads(group)
                if not params:
                    continue
                prox_(params, group["lr"], **coefs)
                if self.compute_penalty:
                    values.append(penalty(params, **coefs))
        if self.compute_penalty:
            self.last_penalty = total(values) if values else torch.zeros(())
        return loss
