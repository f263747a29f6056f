"""regfast on DTensor parameters (FSDP2's ``fully_shard``, tensor parallel, HSDP meshes).

Each op computes on the local shards and all-reduces only what must be: sums over elements across
the mesh dims a tensor is sharded on (never across replicated dims, which would count the same
values twice), and group sums of squares across the mesh dims that split a group. Requests that
share a (mesh, mesh dims) pair travel in one collective, so the usual FSDP2 case (every weight
``Shard(0)`` on one mesh) costs one all-reduce per call.

The all-reduces used for values that enter autograd pass the gradient through unchanged: every
rank computes the same global penalty, and ∂penalty/∂(local shard) is the local formula evaluated
with the global group norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops
from ._common import by_device_dtype, group_dims, group_size

try:
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass(frozen=True)
class _Plan:
    """Which mesh dims each kind of sum of one DTensor must be all-reduced over."""

    mesh: object
    elements: tuple[int, ...]  # every mesh dim the tensor is sharded on: sums over its elements
    split: tuple[int, ...]     # mesh dims whose shards cut through its groups: group sums of squares
    index: tuple[int, ...]     # mesh dims whose shards hold whole groups: sums over groups


def _plan(name: str, t: Tensor, groups: str) -> _Plan:
    reduced = group_dims(t, groups)
    elements, split, index = [], [], []
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"{name} is a DTensor with a Partial placement; regfast needs sharded or "
                             f"replicated params")
        if isinstance(placement, Shard):
            elements.append(mesh_dim)
            dim = placement.dim % max(t.dim(), 1)
            (split if reduced is None or dim in reduced else index).append(mesh_dim)
    return _Plan(t.device_mesh, tuple(elements), tuple(split), tuple(index))


def _all_reduce(items: list[tuple[Tensor, object, tuple[int, ...]]]) -> list[Tensor]:
    """Sum each tensor over its (mesh, mesh dims); one collective per distinct pair.

    The result carries the input's gradient unchanged (identity backward).
    """
    out: list[Tensor | None] = [None] * len(items)
    by_key: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, (x, mesh, dims) in enumerate(items):
        if dims:
            by_key.setdefault((id(mesh), dims), []).append(i)
        else:
            out[i] = x
    for idx in by_key.values():
        mesh, dims = items[idx[0]][1], items[idx[0]][2]
        flat = torch.cat([items[i][0].detach().reshape(-1).to(torch.float64) for i in idx])
        for d in dims:
            dist.all_reduce(flat, group=mesh.get_group(d))
        offset = 0
        for i in idx:
            x = items[i][0]
            total = flat[offset:offset + x.numel()].reshape(x.shape).to(x.dtype)
            offset += x.numel()
            out[i] = x + (total - x.detach()) if x.requires_grad else total
    return out


def _local_group_sumsq(local: Tensor, global_t: Tensor, groups: str) -> Tensor:
    """Σ w² over each group's local part in float64, shaped to broadcast against ``local`` (differentiable).

    float64 holds the squares of every float32 / float16 / bfloat16 value and their sums in range (float64
    params: see the README's limits)."""
    dims = group_dims(global_t, groups)
    sq = local.to(torch.float64).square()
    return sq.sum() if dims is None else sq.sum(dim=dims, keepdim=True)


def _safe_sqrt(s: Tensor) -> Tensor:
    """√s with a zero (not infinite) gradient at s = 0; NaN stays NaN."""
    zero = s == 0
    return torch.where(zero, torch.zeros_like(s), torch.where(zero, torch.ones_like(s), s).sqrt())


def norms(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw² of DTensors (global values), in input order, float64."""
    locals_ = [t.to_local() for t in tensors]
    per_l1: list[Tensor | None] = [None] * len(tensors)
    per_l2sq: list[Tensor | None] = [None] * len(tensors)
    for idx in by_device_dtype(locals_):
        l1, l2sq = _ops.norms([locals_[i] for i in idx])
        for k, i in enumerate(idx):
            per_l1[i], per_l2sq[i] = l1[k], l2sq[k]
    plans = [_plan(f"params[{i}]", t, "tensor") for i, t in enumerate(tensors)]
    items = [(torch.stack([a, b]), p.mesh, p.elements) for a, b, p in zip(per_l1, per_l2sq, plans)]
    reduced = _all_reduce(items)
    device = locals_[0].device
    l1 = torch.stack([r[0].to(device, torch.float64) for r in reduced])
    l2sq = torch.stack([r[1].to(device, torch.float64) for r in reduced])
    return l1, l2sq


def _elementwise_penalty(locals_: list[Tensor], plans: list[_Plan], l1: float, l2: float,
                         grads: list[Tensor] | None = None) -> list[tuple[Tensor, object, tuple[int, ...]]]:
    """Local l1/l2 values per (device, dtype, mesh, sharded dims) group, as all-reduce requests.

    With ``grads`` (local gradient shards) the gradient is added into them in the same pass.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, (loc, p) in enumerate(zip(locals_, plans)):
        buckets.setdefault((loc.device, loc.dtype, id(p.mesh), p.elements), []).append(i)
    items = []
    for idx in buckets.values():
        group = [locals_[i] for i in idx]
        if grads is None:
            value = _ops.penalty(group, l1, l2, 0.0, "row")
        else:
            value = _ops.add_penalty_grad_(group, [grads[i] for i in idx], l1, l2, 0.0, "row")
        items.append((value, plans[idx[0]].mesh, plans[idx[0]].elements))
    return items


def _reduce(tensors: list[Tensor], locals_: list[Tensor], plans: list[_Plan], groups: str,
            values: list, with_groups: bool, with_terms: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """All-reduce ``values`` requests together with what the group term needs, in as few collectives as possible.

    Returns the reduced values, each tensor's global group norms (shaped like its local groups) and each
    tensor's global Σ_g √|g|·‖w_g‖. Groups held whole by every shard need no group collective: their
    norms are local and their sums travel with ``values``; groups cut by shards first reduce their
    sums of squares (with ``values``), then their sums.
    """
    if not with_groups:
        return _all_reduce(values), [], []
    sumsq = [_local_group_sumsq(loc, t, groups) for loc, t in zip(locals_, tensors)]
    roots = [math.sqrt(group_size(t, groups)) for t in tensors]
    whole = [i for i, p in enumerate(plans) if not p.split]
    cut = [i for i, p in enumerate(plans) if p.split]
    norms_: list[Tensor | None] = [None] * len(tensors)
    for i in whole:
        norms_[i] = _safe_sqrt(sumsq[i])
    whole_terms = [(norms_[i].sum() * roots[i], plans[i].mesh, plans[i].index) for i in whole] if with_terms else []
    reduced = _all_reduce(values + [(sumsq[i], plans[i].mesh, plans[i].split) for i in cut] + whole_terms)
    for k, i in enumerate(cut):
        norms_[i] = _safe_sqrt(reduced[len(values) + k])
    terms: list[Tensor | None] = [None] * len(tensors)
    if with_terms:
        for k, i in enumerate(whole):
            terms[i] = reduced[len(values) + len(cut) + k]
        cut_terms = _all_reduce([(norms_[i].sum() * roots[i], plans[i].mesh, plans[i].index) for i in cut])
        for k, i in enumerate(cut):
            terms[i] = cut_terms[k]
    return reduced[:len(values)], norms_, terms


def _prepare(tensors: list[Tensor], names: list[str], groups: str) -> tuple[list[_Plan], list[Tensor]]:
    return [_plan(n, t, groups) for n, t in zip(names, tensors)], [t.to_local() for t in tensors]


def _sum(values: list[Tensor], device: torch.device, scale: float = 1.0) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for v in values:
        total = total + scale * v.to(torch.float64)
    return total


def penalty(tensors: list[Tensor], names: list[str], l1: float, l2: float, group_lasso: float,
            groups: str) -> Tensor:
    """The global penalty of DTensor params (float64), differentiable with respect to their local shards."""
    plans, locals_ = _prepare(tensors, names, groups)
    items = _elementwise_penalty(locals_, plans, l1, l2) if (l1 or l2) else []
    values, _, terms = _reduce(tensors, locals_, plans, groups, items, bool(group_lasso), True)
    device = locals_[0].device
    return _sum(values, device) + _sum(terms, device, group_lasso)


def add_penalty_grad_(tensors: list[Tensor], names: list[str], l1: float, l2: float, group_lasso: float,
                      groups: str) -> Tensor:
    """Add the penalty's gradient into each DTensor's local grad shard; return the global value (float64)."""
    plans, locals_ = _prepare(tensors, names, groups)
    grads = [t.grad.to_local() for t in tensors]
    items = _elementwise_penalty(locals_, plans, l1, l2, grads) if (l1 or l2) else []
    values, norms_, terms = _reduce(tensors, locals_, plans, groups, items, bool(group_lasso), True)
    for loc, g, n, t in zip(locals_, grads, norms_, tensors):
        coef = group_lasso * math.sqrt(group_size(t, groups))
        # Each element divided by its group's norm (float64): no factor overflows for tiny groups.
        g.add_(loc.to(torch.float64) / torch.where(n == 0, 1, n) * coef)
    device = locals_[0].device
    return _sum(values, device) + _sum(terms, device, group_lasso)


def prox_(tensors: list[Tensor], names: list[str], lr: float | Tensor, l1: float, l2: float, group_lasso: float,
          groups: str) -> None:
    """The proximal step on DTensor params' local shards, with group norms taken across shards."""
    plans, locals_ = _prepare(tensors, names, groups)
    lr_tensor, lr_float = (lr, 0.0) if isinstance(lr, Tensor) else (None, lr)
    if l1 or l2:
        for idx in by_device_dtype(locals_):
            _ops.prox_([locals_[i] for i in idx], lr_tensor, lr_float, l1, l2, 0.0, groups)
    if not group_lasso:
        return
    _, norms_, _ = _reduce(tensors, locals_, plans, groups, [], True, False)
    shrink = 1 + 2 * lr * l2
    for loc, n, t in zip(locals_, norms_, tensors):
        coef = torch.as_tensor(lr * group_lasso * math.sqrt(group_size(t, groups)) / shrink, dtype=torch.float64,
                               device=n.device)
        # A true division (number / tensor multiplies by the reciprocal, which overflows for a tiny norm).
        factor = torch.clamp_min(1 - coef / torch.where(n == 0, 1, n), 0)
        loc.mul_(torch.where(n == 0, torch.zeros_like(n), factor).to(loc.dtype))
