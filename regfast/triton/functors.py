"""Elementwise math shared by the kernels; each gives NaN and inf where :mod:`regfast.reference` does.

Division and square root are correctly rounded (:func:`div_rn`, :func:`sqrt_rn`), as the reference
computes them: Triton's plain float32 ``/`` and ``tl.sqrt`` are approximate (``div.full.f32``,
``sqrt.approx.ftz.f32``, which flushes a subnormal norm to zero). Group indices are formed without
a 64-bit division per element (:func:`group_position`, :func:`group_advance`, :func:`group_ids`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A float64 scalar argument as an ``ACC`` value (without a detour through float32)."""
    return tl.full((), value, ACC)


@triton.jit
def div_rn(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest even (float64 division is IEEE already)."""
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sqrt_rn(x, ACC: tl.constexpr):
    """√x rounded to nearest even (float64 square root is IEEE already)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def load(pointer, mask, MASKED: tl.constexpr):
    """``tl.load``, masked (0 where off) only when ``MASKED``: full blocks load without a mask, as vectors."""
    if MASKED:
        return tl.load(pointer, mask=mask, other=0)
    else:
        return tl.load(pointer)


@triton.jit
def store(pointer, value, mask, MASKED: tl.constexpr):
    """``tl.store``, masked only when ``MASKED``."""
    if MASKED:
        tl.store(pointer, value, mask=mask)
    else:
        tl.store(pointer, value)


@triton.jit
def sign(w):
    """sign(w): 0 for ±0, NaN for NaN (so that a NaN weight gets a NaN gradient, as in every backend)."""
    return tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, tl.where(w == w, 0.0, w)))


@triton.jit
def clamp_min_zero(x):
    """max(x, 0), NaN for NaN."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def prox_step(lr_ptr, lr_value, l1, l2, ACC: tl.constexpr, LR_TENSOR: tl.constexpr):
    """The step ``s``, the soft threshold ``s·l1`` and the shrink ``1 / (1 + 2·s·l2)`` in ``ACC``.

    The step is loaded from ``lr_ptr`` (a 0-dim tensor, so no host sync) when ``LR_TENSOR``,
    else it is the float64 scalar ``lr_value``.
    """
    if LR_TENSOR:
        step = tl.load(lr_ptr).to(ACC)
    else:
        step = scalar(lr_value, ACC)
    threshold = step * scalar(l1, ACC)
    shrink = div_rn(scalar(1.0, ACC), 1.0 + 2.0 * step * scalar(l2, ACC), ACC)
    return step, threshold, shrink


@triton.jit
def elastic_net(w, threshold, shrink, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr):
    """u = sign(w)·max(|w| − threshold, 0)·shrink: exactly 0 where |w| ≤ threshold."""
    u = w
    if HAS_L1:
        magnitude = clamp_min_zero(tl.abs(w) - threshold)
        u = tl.where(w < 0, -magnitude, magnitude)
    if HAS_L2:
        u = u * shrink
    return u


@triton.jit
def group_position(first, inner, ngroups):
    """Where flat element ``first`` of a ``[outer, ngroups, inner]`` tensor lies: (``first % inner``, its group).

    Two scalar divisions, once per program; :func:`group_advance` then moves block by block.
    """
    quotient = first // inner
    return first - quotient * inner, quotient % ngroups


@triton.jit
def group_cursor(t, start, inner_table, ngroups_table, offsets, values, BLOCK: tl.constexpr,
                 HAS_GROUPS: tl.constexpr):
    """Tensor ``t``'s group shape and where its element ``start`` lies, for the element loop:
    ``(inner, ngroups, r, g, step_r, step_g, first)`` with (``r``, ``g``) the position of ``start``
    (:func:`group_position`), (``step_r``, ``step_g``) that of ``BLOCK`` (the move per block) and
    ``first`` the pointer to the tensor's first entry of the per-group table ``values``. All zeros (and
    ``values``) without ``HAS_GROUPS``."""
    inner = start
    ngroups = start
    r = start * 0
    g = r
    step_r = r
    step_g = r
    first = values
    if HAS_GROUPS:
        inner = tl.load(inner_table + t)
        ngroups = tl.load(ngroups_table + t)
        first = values + tl.load(offsets + t)
        r, g = group_position(start, inner, ngroups)
        step_r, step_g = group_position(BLOCK, inner, ngroups)
    return inner, ngroups, r, g, step_r, step_g, first


@triton.jit
def group_advance(r, g, step_r, step_g, inner, ngroups):
    """The position (``r``, ``g``) moved on by ``step_r + inner·step_g`` elements (``step_r < inner``,
    ``step_g < ngroups``): comparisons and subtractions, no division."""
    r = r + step_r
    carry = r >= inner
    r = tl.where(carry, r - inner, r)
    g = g + step_g + carry.to(g.dtype)
    return r, tl.where(g >= ngroups, g - ngroups, g)


@triton.jit
def group_ids(r, g, inner, ngroups, BLOCK: tl.constexpr):
    """The groups (int32, within the tensor) of the ``BLOCK`` elements from one at position (``r``, ``g``).

    Element ``i`` is ``(r + i) // inner`` groups on: 0 or 1 when ``inner ≥ BLOCK`` (a comparison),
    else a 32-bit division of numbers below ``2·BLOCK``; the group wraps at ``ngroups`` with one
    subtraction when ``ngroups ≥ BLOCK``, else a 32-bit remainder.
    """
    i = tl.arange(0, BLOCK)
    n = ngroups.to(tl.int32)
    if inner >= BLOCK:
        boundary = tl.minimum(inner - r, BLOCK).to(tl.int32)
        ids = g.to(tl.int32) + (i >= boundary).to(tl.int32)
        ids = tl.where(ids >= n, ids - n, ids)
    else:
        ids = g.to(tl.int32) + (r.to(tl.int32) + i) // inner.to(tl.int32)
        if n >= BLOCK:
            ids = tl.where(ids >= n, ids - n, ids)
        else:
            ids = ids % n
    return ids


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """``x`` (float32 or float64) rounded to nearest-even into ``DTYPE``.

    For bfloat16 the rounding is done on the float32 bits first, so that the final conversion is
    exact: Triton's interpreter truncates float32 to bfloat16 instead of rounding.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # NaN stays NaN (the carry could turn a NaN with a small payload into inf).
        x = tl.where(x != x, x.to(tl.float32), bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)
