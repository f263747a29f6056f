"""Group lasso, first pass: the norm of every group, turned into a per-group coefficient.

:func:`group_coefficients` runs two kernels over a :class:`~.launcher.GroupLayout`: the first
writes, for each work item, the partial Σw² of each of its ``group_block`` groups (for the prox,
Σu² of the elastic-net output ``u``); the second sums each block's partials in a fixed order and
writes one coefficient per group, which the second pass (:mod:`.penalty`, :mod:`.prox`)
multiplies into each element of the group:

- gradient: ``scale·group_lasso·√|g| / ‖w_g‖`` (0 for a zero group), ``scale`` being 1 or the
  upstream gradient of ``penalty_backward``;
- prox: ``max(0, 1 − s·group_lasso·√|g| / ((1 + 2·s·l2)·‖u_g‖))`` (0 for a zero group).

It can also write each block's share of the penalty, ``group_lasso·Σ_g √|g|·‖w_g‖``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import acc_dtype
from .functors import clamp_min_zero, elastic_net, prox_step, scalar
from .launcher import GroupLayout, Layout, acc_tl_dtype, tensor_pointer, tl_dtype

GRADIENT = tl.constexpr(0)
PROX = tl.constexpr(1)


@triton.jit
def _group_partials_kernel(params, sizes, inner_table, ngroups_table, work, partials, n_work,
                           lr_ptr, lr_value: tl.float64, l1: tl.float64, l2: tl.float64,
                           DTYPE: tl.constexpr, ACC: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                           K_BLOCK: tl.constexpr, SPLIT: tl.constexpr, ELASTIC_NET: tl.constexpr,
                           LR_TENSOR: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    first_group = tl.load(work + n_work + pid)
    first_k = tl.load(work + 2 * n_work + pid)
    inner = tl.load(inner_table + t)
    ngroups = tl.load(ngroups_table + t)
    group_numel = tl.load(sizes + t) // ngroups
    w_ptr = tensor_pointer(params, t, DTYPE)
    if ELASTIC_NET:
        _, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    g = first_group + tl.arange(0, GROUP_BLOCK)
    acc = tl.zeros([GROUP_BLOCK, K_BLOCK], dtype=ACC)
    last_k = tl.minimum(first_k + SPLIT, group_numel)
    for k0 in range(first_k, last_k, K_BLOCK):
        # Element k of group g of a [outer, ngroups, inner] tensor is at (k // inner, g, k % inner).
        k = k0 + tl.arange(0, K_BLOCK).to(tl.int64)
        outer_index = k // inner
        offs = (outer_index * ngroups * inner)[None, :] + (g * inner)[:, None] + (k - outer_index * inner)[None, :]
        mask = (g < ngroups)[:, None] & (k < last_k)[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0).to(ACC)
        if ELASTIC_NET:
            w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
        acc += w * w
    tl.store(partials + pid * GROUP_BLOCK + tl.arange(0, GROUP_BLOCK), tl.sum(acc, axis=1))


@triton.jit
def _group_coefficients_kernel(partials, blocks, segments, sizes, ngroups_table, offsets, coefficients, values,
                               n_blocks, group_lasso: tl.float64, scale_ptr, lr_ptr, lr_value: tl.float64,
                               l1: tl.float64, l2: tl.float64, ACC: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                               MODE: tl.constexpr, SCALED: tl.constexpr, VALUE: tl.constexpr,
                               LR_TENSOR: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blocks + b)
    first_group = tl.load(blocks + n_blocks + b)
    first = tl.load(segments + b)
    last = tl.load(segments + b + 1)
    ngroups = tl.load(ngroups_table + t)
    root_size = tl.sqrt((tl.load(sizes + t) // ngroups).to(ACC))
    lane = tl.arange(0, GROUP_BLOCK)
    sq_sum = tl.zeros([GROUP_BLOCK], dtype=ACC)
    for j in range(first, last):
        sq_sum += tl.load(partials + j * GROUP_BLOCK + lane)
    norm = tl.sqrt(sq_sum)
    g = first_group + lane
    in_tensor = g < ngroups
    weight = scalar(group_lasso, ACC) * root_size
    # A zero group gets coefficient 0; dividing by 1 instead of 0 there keeps inf out of the unused branch.
    divisor = tl.where(norm == 0, 1.0, norm)
    if MODE == GRADIENT:
        if SCALED:
            weight = weight * tl.load(scale_ptr).to(ACC)
        coef = tl.where(norm == 0, 0.0, weight / divisor)
    else:
        step, _, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
        coef = tl.where(norm == 0, 0.0, clamp_min_zero(1.0 - step * weight * shrink / divisor))
    tl.store(coefficients + tl.load(offsets + t) + g, coef, mask=in_tensor)
    if VALUE:
        tl.store(values + b, tl.sum(tl.where(in_tensor, weight * norm, 0.0), axis=0))


def group_coefficients(table: Tensor, lay: Layout, glay: GroupLayout, dtype: torch.dtype, group_lasso: float,
                       values: Tensor | None = None, scale: Tensor | None = None, lr: float | Tensor | None = None,
                       l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """One coefficient per group (1-D, ``glay.n_groups``, accumulation dtype) for the second pass.

    Without ``lr``: the gradient coefficient, times ``scale`` (a 0-dim device tensor) when given.
    With ``lr`` (a float, or a 0-dim tensor in the accumulation dtype on the device): the prox
    factor of the elastic-net output with ``l1``, ``l2``. When ``values`` (1-D, ``glay.n_blocks``)
    is given, each block's ``group_lasso·Σ_g √|g|·‖w_g‖`` is written into it.
    """
    acc = acc_dtype(dtype)
    device = table.device
    coefficients = torch.empty(glay.n_groups, dtype=acc, device=device)
    if not glay.n_blocks:
        return coefficients
    prox = lr is not None
    lr_tensor = isinstance(lr, Tensor)
    lr_ptr = lr if lr_tensor else coefficients
    lr_value = 0.0 if lr_tensor or lr is None else float(lr)
    k_block = lay.block // glay.group_block
    partials = torch.empty(glay.n_work, glay.group_block, dtype=acc, device=device)
    _group_partials_kernel[(glay.n_work,)](
        table, lay.sizes, glay.inner, glay.ngroups, glay.work, partials, glay.n_work, lr_ptr, lr_value, l1, l2,
        DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), GROUP_BLOCK=glay.group_block, K_BLOCK=k_block,
        SPLIT=glay.split, ELASTIC_NET=prox and bool(l1 or l2), LR_TENSOR=lr_tensor, HAS_L1=bool(l1), HAS_L2=bool(l2))
    _group_coefficients_kernel[(glay.n_blocks,)](
        partials, glay.blocks, glay.segments, lay.sizes, glay.ngroups, glay.offsets, coefficients,
        coefficients if values is None else values, glay.n_blocks, group_lasso,
        coefficients if scale is None else scale, lr_ptr, lr_value, l1, l2, ACC=acc_tl_dtype(dtype),
        GROUP_BLOCK=glay.group_block, MODE=PROX if prox else GRADIENT, SCALED=scale is not None,
        VALUE=values is not None, LR_TENSOR=lr_tensor)
    return coefficients
