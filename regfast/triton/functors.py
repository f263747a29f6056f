"""Elementwise math shared by the kernels; each gives NaN and inf where :mod:`regfast.reference` does."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A float64 scalar argument as an ``ACC`` value (without a detour through float32)."""
    return tl.full((), value, ACC)


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
    shrink = 1.0 / (1.0 + 2.0 * step * scalar(l2, ACC))
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
def group_index(offs, inner, ngroups, first_group):
    """Group-table index of flat element ``offs`` of a ``[outer, ngroups, inner]`` tensor."""
    return first_group + (offs // inner) % ngroups


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
