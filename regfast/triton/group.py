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

from .._common import acc_dtype
from .functors import clamp_min_zero, elastic_net, load, prox_step, scalar
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
def _power_of_two(e):
    """2^e as a float64 (int64 ``e`` within float64's normal exponents), exactly, from its bits."""
    bits = tl.zeros((), dtype=tl.int64) + ((e + 1023) << 52)  # a tensor for a constant e too
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _square_tile(w_ptr, offs, mask, small, mid, big, threshold, shrink, ACC: tl.constexpr, ELASTIC_NET: tl.constexpr,
                 HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, MASKED: tl.constexpr, PARTS: tl.constexpr):
    """The parts of Σw² (or Σu² of the elastic-net output) plus one tile, in float64.

    One part (``mid``) for float32 / float16 / bfloat16 values, whose squares and sums float64
    holds exactly in range; three for float64 (``PARTS == 3``), by magnitude and scaled so that no
    square or sum leaves float64's range (Blue's algorithm, as in LAPACK's dnrm2): |u| < 2^-511
    into ``small`` scaled by 2^537, |u| > 2^486 into ``big`` scaled by 2^-538, the rest (NaN
    included) into ``mid``.
    """
    w = load(w_ptr + offs, mask, MASKED).to(ACC)
    if ELASTIC_NET:
        w = elastic_net(w, threshold, shrink, HAS_L1, HAS_L2)
    u = w.to(tl.float64)
    if PARTS == 3:
        magnitude = tl.abs(u)
        is_small = magnitude < _power_of_two(-511)
        is_big = magnitude > _power_of_two(486)
        low = u * _power_of_two(537)
        high = u * _power_of_two(-538)
        small += tl.where(is_small, low * low, 0.0)
        big += tl.where(is_big, high * high, 0.0)
        mid += tl.where(is_small | is_big, 0.0, u * u)
    else:
        mid += u * u
    return small, mid, big


@triton.jit
def _rows(w_ptr, g, stride, ngroups, first_k, count, small, mid, big, threshold, shrink, ACC: tl.constexpr,
          GROUP_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, ELASTIC_NET: tl.constexpr, HAS_L1: tl.constexpr,
          HAS_L2: tl.constexpr, PARTS: tl.constexpr):
    """Tiles of rows ``g`` (``stride`` elements apart), loaded along the row."""
    lane = tl.arange(0, K_BLOCK)
    rows = w_ptr + (g * stride)[:, None] + first_k
    in_tensor = tl.broadcast_to((g < ngroups)[:, None], (GROUP_BLOCK, K_BLOCK))
    full = count - count % K_BLOCK
    for j in range(0, full, K_BLOCK):
        offs = tl.broadcast_to((tl.multiple_of(j, K_BLOCK) + lane)[None, :], (GROUP_BLOCK, K_BLOCK))
        small, mid, big = _square_tile(rows, offs, in_tensor, small, mid, big, threshold, shrink, ACC, ELASTIC_NET,
                                       HAS_L1, HAS_L2, True, PARTS)
    if full < count:
        k = full + lane
        small, mid, big = _square_tile(rows, tl.broadcast_to(k[None, :], (GROUP_BLOCK, K_BLOCK)),
                                       in_tensor & (k < count)[None, :], small, mid, big, threshold, shrink, ACC,
                                       ELASTIC_NET, HAS_L1, HAS_L2, True, PARTS)
    return small, mid, big


@triton.jit
def _columns(w_ptr, g, ngroups, first_group, first_k, count, small, mid, big, threshold, shrink, ACC: tl.constexpr,
             GROUP_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, ELASTIC_NET: tl.constexpr, HAS_L1: tl.constexpr,
             HAS_L2: tl.constexpr, PARTS: tl.constexpr):
    """Tiles of a matrix's columns ``g`` (rows ``ngroups`` elements long), loaded along the row: a full block
    of groups without a mask."""
    lane = tl.arange(0, K_BLOCK)
    columns = w_ptr + first_k * ngroups + g[:, None]
    full = count - count % K_BLOCK
    if first_group + GROUP_BLOCK <= ngroups:
        for j in range(0, full, K_BLOCK):
            offs = (tl.multiple_of(j, K_BLOCK) + lane)[None, :] * ngroups
            small, mid, big = _square_tile(columns, offs, None, small, mid, big, threshold, shrink, ACC, ELASTIC_NET,
                                           HAS_L1, HAS_L2, False, PARTS)
        if full < count:
            k = full + lane
            mask = tl.broadcast_to((k < count)[None, :], (GROUP_BLOCK, K_BLOCK))
            small, mid, big = _square_tile(columns, k[None, :] * ngroups, mask, small, mid, big, threshold, shrink,
                                           ACC, ELASTIC_NET, HAS_L1, HAS_L2, True, PARTS)
    else:
        for j in range(0, count, K_BLOCK):
            k = j + lane
            mask = (g < ngroups)[:, None] & (k < count)[None, :]
            small, mid, big = _square_tile(columns, k[None, :] * ngroups, mask, small, mid, big, threshold, shrink,
                                           ACC, ELASTIC_NET, HAS_L1, HAS_L2, True, PARTS)
    return small, mid, big


@triton.jit(do_not_specialize=["n_work"])
def _group_partials_kernel(param_ptrs, outer_table, inner_table, ngroups_table, work, partials, n_work,
                           lr_ptr, lr_value: tl.float64, l1: tl.float64, l2: tl.float64,
                           DTYPE: tl.constexpr, ACC: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                           K_BLOCK: tl.constexpr, SPLIT: tl.constexpr, VECTOR: tl.constexpr,
                           ELASTIC_NET: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_L1: tl.constexpr,
                           HAS_L2: tl.constexpr, PARTS: tl.constexpr):
    """Σw² (in ``PARTS`` float64 parts, see :func:`_square_tile`) of elements ``[first_k, first_k + SPLIT)`` of
    each of ``GROUP_BLOCK`` groups from ``first_group``.

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
    mid = tl.zeros([GROUP_BLOCK, K_BLOCK], dtype=tl.float64)
    small = mid
    big = mid
    # A row length known to be a multiple of VECTOR is passed as (n // VECTOR)·VECTOR: the compiler then
    # knows that each row starts 16-byte aligned (a hint on the value itself would hold outside the branch too).
    if outer == 1:
        # Row g starts g·inner elements in (a tensor of one group has one row: stride 0).
        stride = tl.where(ngroups == 1, 0, inner)
        if stride % VECTOR == 0:
            small, mid, big = _rows(w_ptr, g, (stride // VECTOR) * VECTOR, ngroups, first_k, count, small, mid, big,
                                    threshold, shrink, ACC, GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2, PARTS)
        else:
            small, mid, big = _rows(w_ptr, g, stride, ngroups, first_k, count, small, mid, big, threshold, shrink, ACC,
                                    GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2, PARTS)
    elif inner == 1:
        if ngroups % VECTOR == 0:
            small, mid, big = _columns(w_ptr, g, (ngroups // VECTOR) * VECTOR, first_group, first_k, count, small,
                                       mid, big, threshold, shrink, ACC, GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1,
                                       HAS_L2, PARTS)
        else:
            small, mid, big = _columns(w_ptr, g, ngroups, first_group, first_k, count, small, mid, big, threshold,
                                       shrink, ACC, GROUP_BLOCK, K_BLOCK, ELASTIC_NET, HAS_L1, HAS_L2, PARTS)
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
            small, mid, big = _square_tile(w_ptr, (g * inner)[:, None] + position[None, :], mask, small, mid, big,
                                           threshold, shrink, ACC, ELASTIC_NET, HAS_L1, HAS_L2, True, PARTS)
            i = i + step_i
            o = o + step_o + (i >= inner).to(tl.int64)
            i = tl.where(i >= inner, i - inner, i)
    lanes = tl.arange(0, GROUP_BLOCK)
    tl.store(partials + pid * PARTS * GROUP_BLOCK + lanes, tl.sum(mid, axis=1))
    if PARTS == 3:
        tl.store(partials + (pid * PARTS + 1) * GROUP_BLOCK + lanes, tl.sum(small, axis=1))
        tl.store(partials + (pid * PARTS + 2) * GROUP_BLOCK + lanes, tl.sum(big, axis=1))


@triton.jit
def _exponent(x):
    """e with x = m·2^e, m in [0.5, 1), for a positive finite float64 ``x`` (subnormals included), from its bits."""
    tiny = x < _power_of_two(-1022)
    scaled = tl.where(tiny, x * _power_of_two(64), x)
    e = ((scaled.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
    return tl.where(tiny, e - 64, e)


@triton.jit
def _norm(small, mid, big, PARTS: tl.constexpr):
    """‖·‖₂ from the parts of a square sum (see :func:`_square_tile`), float64."""
    if PARTS == 3:
        up = _power_of_two(537)
        down = _power_of_two(-538)
        from_big = tl.sqrt(big + (mid * down) * down) / down
        low = tl.sqrt(small) / up
        m = tl.sqrt(mid)
        high = tl.maximum(m, low)
        lesser = tl.minimum(m, low)
        ratio = lesser / tl.where(high == 0, 1.0, high)
        both = high * tl.sqrt(1.0 + ratio * ratio)
        from_small = tl.where(mid == 0, low, both)
        norm = tl.where(big > 0, from_big, tl.where(small > 0, from_small, m))
        return tl.where((mid != mid) | (small != small) | (big != big), mid + small + big, norm)
    else:
        return tl.sqrt(mid)


@triton.jit(do_not_specialize=["n_blocks"])
def _group_coefficients_kernel(partials, blocks, segments, sizes, ngroups_table, offsets, coefficients, pres, values,
                               n_blocks, group_lasso: tl.float64, scale_ptr, lr_ptr, lr_value: tl.float64,
                               l1: tl.float64, l2: tl.float64, ACC: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                               MODE: tl.constexpr, SCALED: tl.constexpr, VALUE: tl.constexpr,
                               LR_TENSOR: tl.constexpr, PARTS: tl.constexpr):
    """Per group: the norm from the partials (summed in order, float64), then the gradient coefficient
    as a pair (``coefficients``, ``pres``) with ``coefficient·(w·pre)`` = ``weight·w/‖w_g‖``, or the
    prox factor (computed in float64: a tiny norm gives factor 0, never inf)."""
    b = tl.program_id(0)
    t = tl.load(blocks + b)
    first_group = tl.load(blocks + n_blocks + b)
    first = tl.load(segments + b)
    last = tl.load(segments + b + 1)
    ngroups = tl.load(ngroups_table + t)
    root_size = tl.sqrt((tl.load(sizes + t) // ngroups).to(tl.float64))
    lane = tl.arange(0, GROUP_BLOCK)
    mid = tl.zeros([GROUP_BLOCK], dtype=tl.float64)
    small = mid
    big = mid
    for j in range(first, last):
        mid += tl.load(partials + j * PARTS * GROUP_BLOCK + lane)
        if PARTS == 3:
            small += tl.load(partials + (j * PARTS + 1) * GROUP_BLOCK + lane)
            big += tl.load(partials + (j * PARTS + 2) * GROUP_BLOCK + lane)
    norm = _norm(small, mid, big, PARTS)
    g = first_group + lane
    in_tensor = g < ngroups
    weight = group_lasso * root_size
    # A zero group gets coefficient 0; dividing by 1 instead of 0 there keeps inf out of the unused branch.
    divisor = tl.where(norm == 0, 1.0, norm)
    where = coefficients + tl.load(offsets + t) + g
    if MODE == GRADIENT:
        if SCALED:
            weight = weight * tl.load(scale_ptr).to(tl.float64)
        # weight/norm as q·pre with pre a power of two: pre = 1 unless the exponent of weight/norm is
        # beyond ±60 (tiny or huge weights), where q and pre each carry about half of it, so that both stay
        # within ACC's range and w·pre within a few powers of two of weight.
        # The weight carries the upstream gradient's sign (negative under -penalty in the loss): its magnitude's
        # exponent decides.
        weights = tl.zeros([GROUP_BLOCK], dtype=tl.float64) + weight
        usable = (weights != 0) & (norm > 0) & (weights * 0.0 == 0.0) & (norm * 0.0 == 0.0)  # nonzero and finite
        e = _exponent(tl.where(usable, tl.abs(weights), 1.0)) - _exponent(tl.where(usable, divisor, 1.0))
        split = usable & ((e <= -60) | (e >= 60))
        half = tl.where(split, e // 2, 0)
        pre = _power_of_two(half)
        coef = tl.where(norm == 0, 0.0, weights / (divisor * pre))
        tl.store(pres + tl.load(offsets + t) + g, pre.to(ACC), mask=in_tensor)
    else:
        step, _, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
        reach = step.to(tl.float64) * weight * shrink.to(tl.float64)
        coef = tl.where(norm == 0, 0.0, clamp_min_zero(1.0 - reach / divisor))
    tl.store(where, coef.to(ACC), mask=in_tensor)
    if VALUE:
        tl.store(values + b, tl.sum(tl.where(in_tensor, weight * norm, 0.0), axis=0).to(ACC))


def group_coefficients(table: Tensor, aligned: bool, lay: Layout, glay: GroupLayout, dtype: torch.dtype,
                       group_lasso: float, values: Tensor | None = None, scale: Tensor | None = None,
                       lr: float | Tensor | None = None, l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """Per-group values (accumulation dtype) for the second pass, from group norms summed in float64.

    ``aligned``: every pointer of ``table`` is 16-byte aligned. Without ``lr``: the gradient
    coefficient, times ``scale`` (a 0-dim device tensor) when given, as two rows: row 0 the
    coefficient ``q`` and row 1 a power of two ``p`` with ``q·(w·p) = weight·w/‖w_g‖`` (``p = 1``
    unless the group's weights are tiny or huge); each row starts 16-byte aligned. With ``lr`` (a
    float, or a 0-dim tensor in the accumulation dtype on the device): the prox factor of the
    elastic-net output with ``l1``, ``l2`` (row 0 only). When ``values`` (1-D, ``glay.n_blocks``)
    is given, each block's ``group_lasso·Σ_g √|g|·‖w_g‖`` is written into it.
    """
    acc = acc_dtype(dtype)
    device = table.device
    row = -(-glay.n_groups // 4) * 4
    coefficients = torch.empty(2, row, dtype=acc, device=device)
    if not glay.n_blocks:
        return coefficients
    prox = lr is not None
    lr_tensor = isinstance(lr, Tensor)
    lr_ptr = lr if lr_tensor else coefficients
    lr_value = 0.0 if lr_tensor or lr is None else float(lr)
    k_block = block_size(dtype) // glay.group_block
    parts = 3 if dtype == torch.float64 else 1
    partials = torch.empty(glay.n_work, parts, glay.group_block, dtype=torch.float64, device=device)
    vector = VECTOR_BYTES // dtype.itemsize if aligned else 1
    with on_device(device):
        _group_partials_kernel[(glay.n_work,)](
            table, glay.outer, glay.inner, glay.ngroups, glay.work, partials, glay.n_work, lr_ptr, lr_value, l1, l2,
            DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), GROUP_BLOCK=glay.group_block, K_BLOCK=k_block,
            SPLIT=glay.split, VECTOR=vector, ELASTIC_NET=prox and bool(l1 or l2), LR_TENSOR=lr_tensor,
            HAS_L1=bool(l1), HAS_L2=bool(l2), PARTS=parts, **LAUNCH_OPTIONS)
        _group_coefficients_kernel[(glay.n_blocks,)](
            partials, glay.blocks, glay.segments, lay.sizes, glay.ngroups, glay.offsets, coefficients[0],
            coefficients[1], coefficients if values is None else values, glay.n_blocks, group_lasso,
            coefficients if scale is None else scale, lr_ptr, lr_value, l1, l2, ACC=acc_tl_dtype(dtype),
            GROUP_BLOCK=glay.group_block, MODE=PROX if prox else GRADIENT, SCALED=scale is not None,
            VALUE=values is not None, LR_TENSOR=lr_tensor, PARTS=parts, **LAUNCH_OPTIONS)
    return coefficients
