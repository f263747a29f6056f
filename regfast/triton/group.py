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
from .functors import clamp_min_zero, div_rn, elastic_net, load, prox_step, scalar, sqrt_rn
from .launcher import (
    LAUNCH_OPTIONS,
    VECTOR_BYTES,
    GroupLayout,
    Layout,
    acc_tl_dtype,
    block_size,
    on_device,
    tensor_pointer,
    tl_dtype,
)

GRADIENT = tl.constexpr(0)
PROX = tl.constexpr(1)


@triton.jit
def _square_tile(w_ptr, offs, mask, acc, threshold, shrink, ACC: tl.constexpr, ELASTIC_NET: tl.constexpr,
                 HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, MASKED: tl.constexpr):
    """``acc + w²`` (or ``u²`` of the elastic-net output) over one tile."""
    w = load(w_ptr + offs, mask, MASKED).to(ACC)
    if ELASTIC_NET:
        w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
    return acc + w * w


@triton.jit
def _rows(w_ptr, g, stride, ngroups, first_k, count, acc, threshold, shrink, ACC: tl.constexpr,
          GROUP_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, ELASTIC_NET: tl.constexpr, HAS_L1: tl.constexpr,
          HAS_L2: tl.constexpr):
    """Tiles of rows ``g`` (``stride`` elements apart), loaded along the row."""
    lane = tl.arange(0, K_BLOCK)
    rows = w_ptr + (g * stride)[:, None] + first_k
    in_tensor = tl.broadcast_to((g < ngroups)[:, None], (GROUP_BLOCK, K_BLOCK))
    full = count - count % K_BLOCK
    for j in range(0, full, K_BLOCK):
        offs = tl.broadcast_to((tl.multiple_of(j, K_BLOCK) + lane)[None, :], (GROUP_BLOCK, K_BLOCK))
        acc = _square_tile(rows, offs, in_tensor, acc, threshold, shrink, ACC, ELASTIC_NET, HAS_L1, HAS_L2, True)
    if full < count:
        k = full + lane
        acc = _square_tile(rows, tl.broadcast_to(k[None, :], (GROUP_BLOCK, K_BLOCK)), in_tensor & (k < count)[None, :],
                           acc, threshold, shrink, ACC, ELASTIC_NET, HAS_L1, HAS_L2, True)
    return acc


@triton.jit
def _columns(w_ptr, g, ngroups, first_group, first_k, count, acc, threshold, shrink, ACC: tl.constexpr,
             GROUP_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, ELASTIC_NET: tl.constexpr, HAS_L1: tl.constexpr,
             HAS_L2: tl.constexpr):
    """Tiles of a matrix's columns ``g`` (rows ``ngroups`` elements long), loaded along the row: a full block
    of groups without a mask."""
    lane = tl.arange(0, K_BLOCK)
    columns = w_ptr + first_k * ngroups + g[:, None]
    full = count - count % K_BLOCK
    if first_group + GROUP_BLOCK <= ngroups:
        for j in range(0, full, K_BLOCK):
            offs = (tl.multiple_of(j, K_BLOCK) + lane)[None, :] * ngroups
            acc = _square_tile(columns, offs, None, acc, threshold, shrink, ACC, ELASTIC_NET, HAS_L1, HAS_L2, False)
        if full < count:
            k = full + lane
            mask = tl.broadcast_to((k < count)[None, :], (GROUP_BLOCK, K_BLOCK))
            acc = _square_tile(columns, k[None, :] * ngroups, mask, acc, threshold, shrink, ACC, ELASTIC_NET, HAS_L1,
                               HAS_L2, True)
    else:
        for j in range(0, count, K_BLOCK):
            k = j + lane
            mask = (g < ngroups)[:, None] & (k < count)[None, :]
            acc = _square_tile(columns, k[None, :] * ngroups, mask, acc, threshold, shrink, ACC, ELASTIC_NET, HAS_L1,
                               HAS_L2, True)
    return acc


@triton.jit(do_not_specialize=["n_work"])
def _group_partials_kernel(param_ptrs, outer_table, inner_table, ngroups_table, work, partials, n_work,
                           lr_ptr, lr_value: tl.float64, l1: tl.float64, l2: tl.float64,
                           DTYPE: tl.constexpr, ACC: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                           K_BLOCK: tl.constexpr, SPLIT: tl.constexpr, VECTOR: tl.constexpr,
                           ELASTIC_NET: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_L1: tl.constexpr,
                           HAS_L2: tl.constexpr):
    """Σw² of elements ``[first_k, first_k + SPLIT)`` of each of ``GROUP_BLOCK`` groups from ``first_group``.

    A ``[outer, ngroups, inner]`` tensor is read in one of three tilings, chosen per tensor:
    ``outer == 1`` (rows, whole tensors): group ``g`` is ``inner`` contiguous elements, loaded as
    vectors along ``k``; ``inner == 1`` (columns of a matrix): element ``k`` of groups ``g..`` are
    contiguous, loaded as vectors along the groups; otherwise element ``k`` is at
    ``(k // inner, g, k % inner)``, found without a division per element. ``VECTOR`` (elements per
    16 bytes, or 1) says that the tensors are 16-byte aligned; the vector loads are taken for the
    tensors whose rows are too.
    """
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    first_group = tl.multiple_of(tl.load(work + n_work + pid), GROUP_BLOCK)
    first_k = tl.multiple_of(tl.load(work + 2 * n_work + pid), K_BLOCK)
    outer = tl.load(outer_table + t)
    inner = tl.load(inner_table + t)
    ngroups = tl.load(ngroups_table + t)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, VECTOR > 1)
    threshold = scalar(0.0, ACC)
    shrink = threshold
    if ELASTIC_NET:
        _, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    g = first_group + tl.arange(0, GROUP_BLOCK)
    lane = tl.arange(0, K_BLOCK)
    count = (tl.minimum(first_k + SPLIT, outer * inner) - first_k).to(tl.int32)
    acc = tl.zeros([GROUP_BLOCK, K_BLOCK], dtype=ACC)
    # A row length known to be a multiple of VECTOR is passed as (n // VECTOR)·VECTOR: the compiler then
    # knows that each row starts 16-byte aligned (a hint on the value itself would hold outside the branch too).
    if outer == 1:
        # Row g starts g·inner elements in (a tensor of one group has one row: stride 0).
        stride = tl.where(ngroups == 1, 0, inner)
        if stride % VECTOR == 0:
            acc = _rows(w_ptr, g, (stride // VECTOR) * VECTOR, ngroups, first_k, count, acc, threshold, shrink, ACC,
                        GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2)
        else:
            acc = _rows(w_ptr, g, stride, ngroups, first_k, count, acc, threshold, shrink, ACC, GROUP_BLOCK, K_BLOCK,
                        ELASTIC_NET, HAS_L1, HAS_L2)
    elif inner == 1:
        if ngroups % VECTOR == 0:
            acc = _columns(w_ptr, g, (ngroups // VECTOR) * VECTOR, first_group, first_k, count, acc, threshold,
                           shrink, ACC, GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2)
        else:
            acc = _columns(w_ptr, g, ngroups, first_group, first_k, count, acc, threshold, shrink, ACC, GROUP_BLOCK,
                           K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2)
    else:
        o = first_k // inner
        i = first_k - o * inner
        step_i = K_BLOCK % inner
        step_o = K_BLOCK // inner
        slab = ngroups * inner
        for j in range(0, count, K_BLOCK):
            # Element j + lane of the groups is at (o + carry, g, i + lane − carry·inner).
            if inner >= K_BLOCK:
                carry = (lane >= tl.minimum(inner - i, K_BLOCK).to(tl.int32)).to(tl.int32)
            else:
                carry = (i.to(tl.int32) + lane) // inner.to(tl.int32)
            position = (o + carry) * slab + (i + lane - carry * inner)
            mask = (g < ngroups)[:, None] & (j + lane < count)[None, :]
            acc = _square_tile(w_ptr, (g * inner)[:, None] + position[None, :], mask, acc, threshold, shrink, ACC,
                               ELASTIC_NET, HAS_L1, HAS_L2, True)
            i = i + step_i
            o = o + step_o + (i >= inner).to(tl.int64)
            i = tl.where(i >= inner, i - inner, i)
    tl.store(partials + pid * GROUP_BLOCK + tl.arange(0, GROUP_BLOCK), tl.sum(acc, axis=1))


@triton.jit(do_not_specialize=["n_blocks"])
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
    root_size = sqrt_rn((tl.load(sizes + t) // ngroups).to(ACC), ACC)
    lane = tl.arange(0, GROUP_BLOCK)
    sq_sum = tl.zeros([GROUP_BLOCK], dtype=ACC)
    for j in range(first, last):
        sq_sum += tl.load(partials + j * GROUP_BLOCK + lane)
    norm = sqrt_rn(sq_sum, ACC)
    g = first_group + lane
    in_tensor = g < ngroups
    weight = scalar(group_lasso, ACC) * root_size
    # A zero group gets coefficient 0; dividing by 1 instead of 0 there keeps inf out of the unused branch.
    divisor = tl.where(norm == 0, 1.0, norm)
    if MODE == GRADIENT:
        if SCALED:
            weight = weight * tl.load(scale_ptr).to(ACC)
        coef = tl.where(norm == 0, 0.0, div_rn(weight, divisor, ACC))
    else:
        step, _, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
        coef = tl.where(norm == 0, 0.0, clamp_min_zero(1.0 - div_rn(step * weight * shrink, divisor, ACC)))
    tl.store(coefficients + tl.load(offsets + t) + g, coef, mask=in_tensor)
    if VALUE:
        tl.store(values + b, tl.sum(tl.where(in_tensor, weight * norm, 0.0), axis=0))


def group_coefficients(table: Tensor, aligned: bool, lay: Layout, glay: GroupLayout, dtype: torch.dtype,
                       group_lasso: float, values: Tensor | None = None, scale: Tensor | None = None,
                       lr: float | Tensor | None = None, l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """One coefficient per group (1-D, ``glay.n_groups``, accumulation dtype) for the second pass.

    ``aligned``: every pointer of ``table`` is 16-byte aligned. Without ``lr``: the gradient
    coefficient, times ``scale`` (a 0-dim device tensor) when given. With ``lr`` (a float, or a
    0-dim tensor in the accumulation dtype on the device): the prox factor of the elastic-net
    output with ``l1``, ``l2``. When ``values`` (1-D, ``glay.n_blocks``) is given, each block's
    ``group_lasso·Σ_g √|g|·‖w_g‖`` is written into it.
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
    k_block = block_size(dtype) // glay.group_block
    partials = torch.empty(glay.n_work, glay.group_block, dtype=acc, device=device)
    vector = VECTOR_BYTES // dtype.itemsize if aligned else 1
    with on_device(device):
        _group_partials_kernel[(glay.n_work,)](
            table, glay.outer, glay.inner, glay.ngroups, glay.work, partials, glay.n_work, lr_ptr, lr_value, l1, l2,
            DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), GROUP_BLOCK=glay.group_block, K_BLOCK=k_block,
            SPLIT=glay.split, VECTOR=vector, ELASTIC_NET=prox and bool(l1 or l2), LR_TENSOR=lr_tensor,
            HAS_L1=bool(l1), HAS_L2=bool(l2), **LAUNCH_OPTIONS)
        _group_coefficients_kernel[(glay.n_blocks,)](
            partials, glay.blocks, glay.segments, lay.sizes, glay.ngroups, glay.offsets, coefficients,
            coefficients if values is None else values, glay.n_blocks, group_lasso,
            coefficients if scale is None else scale, lr_ptr, lr_value, l1, l2, ACC=acc_tl_dtype(dtype),
            GROUP_BLOCK=glay.group_block, MODE=PROX if prox else GRADIENT, SCALED=scale is not None,
            VALUE=values is not None, LR_TENSOR=lr_tensor, **LAUNCH_OPTIONS)
    return coefficients
