"""regfast's public functions: norms, penalties, their gradients and the proximal step.

``params`` everywhere is an ``nn.Module`` (its parameters), a single tensor, or any iterable of
tensors (a generator is consumed once). A tensor listed twice (tied weights) counts once.
Tensors may mix devices and floating dtypes (float16, bfloat16, float32, float64); each
(device, dtype) group is one call of a :mod:`regfast._ops` op, served by the backend that
:func:`regfast.backend` names. Every check runs before anything is written: on an error no
parameter and no gradient has changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from typing import NamedTuple, overload

import torch
from torch import Tensor, nn

from . import _distributed, _ops, _validate
from ._common import by_device_dtype, fast_grouping

__all__ = [
    "Norms",
    "Sparsity",
    "add_penalty_grad_",
    "norms",
    "param_groups",
    "penalty",
    "prox_",
    "sparsity",
    "weights",
]

Params = nn.Module | Tensor | Mapping[str, Tensor] | Iterable[Tensor]


class _Names(Sequence[str]):
    """The names of a call's tensors (``named_parameters()`` names, else ``params[i]``), made when asked for."""

    def __init__(self, names: list[str] | None = None, index: list[int] | None = None, n: int = 0) -> None:
        self._names, self._index, self._n = names, index, n

    def __len__(self) -> int:
        return len(self._names) if self._names is not None else len(self._index) if self._index is not None else self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if self._names is not None:
            return self._names[i]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return f"params[{self._index[i] if self._index is not None else range(self._n)[i]}]"


def _listed(params: Params):
    """``params`` as a list or tuple of tensors for the C++ walk when it is one (a module's parameters), else
    ``params`` itself (the walk then declines)."""
    if isinstance(params, nn.Module):
        return list(params.parameters())
    return params


def _named(params: Params) -> tuple[list[Tensor], _Names]:
    """The distinct tensors of ``params`` in order, and a name for each (for messages and tables)."""
    if isinstance(params, nn.Module):
        pairs = list(params.named_parameters())  # distinct already
        tensors, names = [p for _, p in pairs], _Names([n for n, _ in pairs])
    elif isinstance(params, Tensor):
        tensors, names = [params], _Names(["params"])
    elif isinstance(params, Mapping):  # {name: tensor}, e.g. dict(model.named_parameters())
        pairs = list(params.items())
        bad = next((k for k, v in pairs if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise TypeError(f"params[{bad!r}] is a {type(params[bad]).__name__}, not a torch.Tensor")
        first = {id(v): i for i, (_, v) in reversed(list(enumerate(pairs)))}
        index = sorted(first.values())
        tensors, names = [pairs[i][1] for i in index], _Names([str(pairs[i][0]) for i in index])
    else:
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be an nn.Module, a tensor or an iterable of tensors, "
                            f"not {type(params).__name__}") from None
        if not all(map(isinstance, items, repeat(Tensor))):
            bad = next(i for i, p in enumerate(items) if not isinstance(p, Tensor))
            raise TypeError(f"params[{bad}] is a {type(items[bad]).__name__}, not a torch.Tensor")
        if len(set(map(id, items))) == len(items):
            tensors, names = items, _Names(n=len(items))
        else:
            first = {id(p): i for i, p in reversed(list(enumerate(items)))}
            index = sorted(first.values())
            tensors, names = [items[i] for i in index], _Names(index=index)
    _validate.tensors(tensors, names)
    return tensors, names


def _check_hyper(l1: float, l2: float, group_lasso: float, groups: str) -> tuple[float, float, float]:
    return _validate.regularization(l1, l2, group_lasso, groups)[:3]


def _partition(tensors: list[Tensor]) -> tuple[list[list[int]], list[int]]:
    """Indices of the plain tensors grouped by (device, dtype) in order of first appearance, and of the DTensors."""
    fast = fast_grouping(tensors) if tensors else None
    if fast is not None:
        return fast, []
    distributed = [i for i, t in enumerate(tensors) if _distributed.is_dtensor(t)]
    if not distributed:
        return by_device_dtype(tensors), []
    plain = [i for i, t in enumerate(tensors) if not _distributed.is_dtensor(t)]
    return [[plain[j] for j in idx] for idx in by_device_dtype([tensors[i] for i in plain])], distributed


def _pick(tensors: list[Tensor], idx: list[int]) -> list[Tensor]:
    return tensors if len(idx) == len(tensors) else [tensors[i] for i in idx]


def _result_dtype(tensors: list[Tensor], groups: list[list[int]], distributed: list[int]) -> torch.dtype:
    """float64 if any tensor is float64, else float32; a (device, dtype) group is judged by its first tensor."""
    firsts = [tensors[idx[0]] for idx in groups] + [tensors[i] for i in distributed]
    return torch.float64 if any(t.dtype == torch.float64 for t in firsts) else torch.float32


def _total(values: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sum of per-group values, in ``dtype`` on ``device``."""
    total = values[0].to(device, dtype)
    for v in values[1:]:
        total = total + v.to(device, dtype)
    return total


class Norms(NamedTuple):
    """Norms of a list of tensors, all on the first tensor's device (float64 if any input is).

    ``l1`` = Σ|w|, ``l2sq`` = Σw², ``l2`` = √Σw² (0-dim); ``per_tensor_l1`` and
    ``per_tensor_l2sq`` are 1-D, one entry per distinct tensor in input order.
    """

    l1: Tensor
    l2sq: Tensor
    l2: Tensor
    per_tensor_l1: Tensor
    per_tensor_l2sq: Tensor


def norms(params: Params) -> Norms:
    """Σ|w| and Σw² per tensor and in total, in one pass per (device, dtype) group, with no grad.

    Accumulates in float32 (float64 for float64 tensors); the values stay on the device (no
    host sync). An empty ``params`` gives zeros on the CPU.
    """
    walked = _ops.walk("norms", _listed(params))
    if walked is not None:
        per_l1, per_l2sq = walked
        l2sq = per_l2sq.sum()
        return Norms(per_l1.sum(), l2sq, l2sq.sqrt(), per_l1, per_l2sq)
    tensors, _ = _named(params)
    if not tensors:
        empty = torch.zeros(0)
        return Norms(empty.sum(), empty.sum(), empty.sum(), empty, empty.clone())
    with torch.no_grad():
        groups, distributed = _partition(tensors)
        dtype = _result_dtype(tensors, groups, distributed)
        results = [_ops.call("norms", _pick(tensors, idx)) for idx in groups]
        if distributed:
            groups.append(distributed)
            results.append(_distributed.norms([tensors[i] for i in distributed]))
        if len(groups) == 1 and not distributed:
            per_l1, per_l2sq = results[0]
        else:
            device = tensors[0].device
            order = torch.tensor([i for idx in groups for i in idx], device=device)
            per_l1 = torch.empty(len(tensors), device=device, dtype=dtype)
            per_l2sq = torch.empty_like(per_l1)
            per_l1[order] = torch.cat([r[0].to(device, dtype) for r in results])
            per_l2sq[order] = torch.cat([r[1].to(device, dtype) for r in results])
        l2sq = per_l2sq.sum()
        return Norms(per_l1.sum(), l2sq, l2sq.sqrt(), per_l1, per_l2sq)


def penalty(params: Params, l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0,
            groups: str = "row") -> Tensor:
    """``l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂`` as a differentiable 0-dim tensor.

    A drop-in for the regularization loop inside the loss: ``loss = loss + penalty(model, l1=1e-4)``.
    ``groups`` is ``"row"`` (slices along dim 0), ``"col"`` (along dim 1) or ``"tensor"``;
    tensors with fewer than 2 dims are one group. The value is float32 (float64 if any param
    is float64) on the first param's device; the gradient is ``l1·sign(w) + 2·l2·w +
    group_lasso·√|g|·w_g/‖w_g‖₂``, 0 at w = 0. Terms whose coefficient is 0 are not computed.
    """
    l1, l2, group_lasso = _check_hyper(l1, l2, group_lasso, groups)
    if not _ops.transform_active():  # forward-mode AD and functorch take plain torch ops (run_penalty)
        walked = _ops.walk("penalty", _listed(params), l1, l2, group_lasso, groups)
        if walked is not None:
            return walked
    tensors, names = _named(params)
    if not tensors:
        return torch.zeros(())
    plain, distributed = _partition(tensors)
    values = [_ops.run_penalty(_pick(tensors, idx), l1, l2, group_lasso, groups) for idx in plain]
    if distributed:
        values.append(_distributed.penalty([tensors[i] for i in distributed], [names[i] for i in distributed],
                                           l1, l2, group_lasso, groups))
    return _total(values, tensors[0].device, _result_dtype(tensors, plain, distributed))


def add_penalty_grad_(params: Params, l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0,
                      groups: str = "row") -> Tensor:
    """Add the penalty's gradient into each ``p.grad`` in place; return the penalty value.

    Call it after ``loss.backward()`` instead of putting the penalty in the loss: no autograd
    graph and no temporary the size of the params. A param whose ``grad`` is None gets one.
    The value is detached, 0-dim, float32 (float64 if any param is float64), on the first
    param's device. Arguments as in :func:`penalty`.
    """
    l1, l2, group_lasso = _check_hyper(l1, l2, group_lasso, groups)
    walked = _ops.walk("add_penalty_grad", _listed(params), l1, l2, group_lasso, groups)
    if walked is not None:
        return walked
    tensors, names = _named(params)
    if not tensors:
        return torch.zeros(())
    plain, distributed = _partition(tensors)
    grads = [p.grad for p in tensors]
    missing = [i for i, g in enumerate(grads) if g is None] if any(map(is_, grads, repeat(None))) else []
    if missing:
        present = sorted(set(range(len(tensors))) - set(missing))
        _validate.grads([tensors[i] for i in present], [grads[i] for i in present],
                     _Names([names[i] for i in present]), None)
    else:
        _validate.grads(tensors, grads, names, None if distributed else plain)
    with torch.no_grad():
        for i in missing:
            grads[i] = tensors[i].grad = torch.zeros_like(tensors[i])
        values = [_ops.call("add_penalty_grad_", _pick(tensors, idx), _pick(grads, idx), l1, l2, group_lasso, groups)
                  for idx in plain]
        if distributed:
            values.append(_distributed.add_penalty_grad_([tensors[i] for i in distributed],
                                                         [names[i] for i in distributed], l1, l2, group_lasso, groups))
        return _total(values, tensors[0].device, _result_dtype(tensors, plain, distributed))


def _check_lr(lr: float | Tensor) -> tuple[Tensor | None, float]:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got a tensor of shape {tuple(lr.shape)}")
        _validate.tensor("lr", lr)
        return lr.detach().reshape(()), 0.0
    lr = _validate.coefficient("lr", lr)
    if torch.compiler.is_compiling():
        # A float reaching a custom op would be specialized (one graph per lr value); a tensor is not.
        return torch.ones((), dtype=torch.float64) * lr, 0.0
    return None, lr


def prox_(params: Params, lr: float | Tensor, l1: float = 0.0, l2: float = 0.0, group_lasso: float = 0.0,
          groups: str = "row") -> None:
    """The proximal step of the penalty with step ``lr``, in place; it gives exact zeros.

    ``w ← sign(w)·max(|w| − lr·l1, 0) / (1 + 2·lr·l2)``, then each group
    ``w_g ← max(0, 1 − lr·group_lasso·√|g| / ((1 + 2·lr·l2)·‖w_g‖₂))·w_g`` (a zero group stays
    zero): the exact proximal operator of the whole penalty. ``lr`` is a number or a
    one-element tensor (on the params' device or the CPU; its value is not checked, so that
    no host sync happens). Arguments otherwise as in :func:`penalty`.
    """
    l1, l2, group_lasso = _check_hyper(l1, l2, group_lasso, groups)
    lr_tensor, lr_float = _check_lr(lr)
    if (l1 or l2 or group_lasso) and _ops.walk("prox", _listed(params), lr_tensor, lr_float, l1, l2, group_lasso,
                                               groups):
        return
    tensors, names = _named(params)
    _validate.writable(tensors, names)
    if not tensors or not (l1 or l2 or group_lasso):
        return
    with torch.no_grad():
        plain, distributed = _partition(tensors)
        for idx in plain:
            _ops.call("prox_", _pick(tensors, idx), lr_tensor, lr_float, l1, l2, group_lasso, groups)
        if distributed:
            _distributed.prox_([tensors[i] for i in distributed], [names[i] for i in distributed],
                               lr_float if lr_tensor is None else lr_tensor, l1, l2, group_lasso, groups)


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def weights(model: nn.Module) -> list[Tensor]:
    """The parameters a penalty normally covers: layer weights with dim ≥ 2.

    Biases (any parameter whose name contains ``bias``) and the parameters of normalization
    layers are left out, as is anything with fewer than 2 dims. Tied weights appear once.
    """
    out, seen = [], set()
    for module in model.modules():
        if isinstance(module, _NORM_LAYERS):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and "bias" not in name and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def param_groups(model: nn.Module, **hyper) -> list[dict]:
    """Two optimizer param groups: :func:`weights` with ``hyper``, and every other param unregularized.

    ``param_groups(model, lr=1e-3, l1=1e-5)`` →
    ``[{"params": weights, "lr": 1e-3, "l1": 1e-5}, {"params": rest, "lr": 1e-3, "l1": 0,
    "l2": 0, "group_lasso": 0, "weight_decay": 0}]``. ``hyper`` keys other than the four
    regularization ones (``lr``, ``betas``…) apply to both groups. A group with no params is
    left out.
    """
    chosen = weights(model)
    ids = {id(p) for p in chosen}
    rest = [p for p in dict.fromkeys(model.parameters()) if id(p) not in ids]
    shared = {k: v for k, v in hyper.items() if k not in ("l1", "l2", "group_lasso", "weight_decay")}
    unregularized = {**shared, "l1": 0.0, "l2": 0.0, "group_lasso": 0.0, "weight_decay": 0.0}
    groups = [{"params": chosen, **hyper}, {"params": rest, **unregularized}]
    return [g for g in groups if g["params"]]


@dataclass(frozen=True)
class SparsityRow:
    """One tensor's share of exact (or near, ``|w| ≤ atol``) zeros."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class Sparsity:
    """Zeros per tensor (``rows``) and in total; ``str()`` gives a table."""

    rows: list[SparsityRow]
    atol: float

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> SparsityRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __str__(self) -> str:
        width = max([len("total"), *(len(r.name) for r in self.rows)])
        head = f"{'tensor':<{width}}  {'shape':>18}  {'numel':>12}  {'zeros':>12}  {'sparsity':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{width}}  {shape:>18}  {r.numel:>12,}  {r.zeros:>12,}  {r.fraction:>8.2%}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<{width}}  {'':>18}  {self.numel:>12,}  {self.zeros:>12,}  {self.fraction:>8.2%}")
        return "\n".join(lines)


def sparsity(model_or_params: Params, atol: float = 0.0) -> Sparsity:
    """Count the zeros (``|w| ≤ atol``) of each tensor and in total; one host sync in all.

    Rows are named as in ``named_parameters()`` when a module is given, else ``params[i]``.
    """
    atol = _validate.coefficient("atol", atol)
    tensors, names = _named(model_or_params)
    zeros = [0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    with torch.no_grad():
        for idx in by_device.values():
            counts = torch.stack([(tensors[i].abs() <= atol).sum() for i in idx]).tolist()
            for i, c in zip(idx, counts):
                zeros[i] = c
    rows = [SparsityRow(n, tuple(t.shape), t.numel(), z) for n, t, z in zip(names, tensors, zeros)]
    return Sparsity(rows, atol)
