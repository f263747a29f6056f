"""The penalty value, its gradient added into ``grads`` in place, and ``penalty_backward``.

One elementwise kernel serves all three: it reads ``w`` once, optionally writes the gradient
(``g += ∇`` or ``out = scale·∇``) and optionally writes each work item's partial
``l1·Σ|w| + l2·Σw²``. With group lasso, :func:`.group.group_coefficients` first turns the group
norms into one coefficient per group (and the group term of the value), which the elementwise
kernel multiplies into ``w``. The value is the sum of all partials in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import acc_dtype
from .functors import group_advance, group_cursor, group_ids, load, round_to, scalar, sign, store
from .group import group_coefficients
from .launcher import (
    LAUNCH_OPTIONS,
    acc_tl_dtype,
    block_size,
    contiguous,
    group_layout,
    layout,
    on_device,
    pointer_tables,
    tensor_pointer,
    tl_dtype,
    work_item,
    write_back,
)

NO_WRITE = tl.constexpr(0)
ACCUMULATE = tl.constexpr(1)
ASSIGN = tl.constexpr(2)


@triton.jit
def _penalty_block(w_ptr, g_ptr, coef_ptr, pre_ptr, offs, count, r, g, inner, ngroups, abs_sum, sq_sum, l1_grad,
                   l2_grad,
                   DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, HAS_L1: tl.constexpr,
                   HAS_L2: tl.constexpr, HAS_GROUPS: tl.constexpr, WRITE: tl.constexpr, VALUE: tl.constexpr,
                   MASKED: tl.constexpr):
    mask = offs < count
    w = load(w_ptr + offs, mask, MASKED).to(ACC)
    if VALUE:
        if HAS_L1:
            abs_sum += tl.abs(w)
        if HAS_L2:
            sq_sum += w * w
    if WRITE != NO_WRITE:
        grad = tl.zeros([BLOCK], dtype=ACC)
        if HAS_L1:
            grad += l1_grad * sign(w)
        if HAS_L2:
            grad += l2_grad * w
        if HAS_GROUPS:
            ids = group_ids(r, g, inner, ngroups, BLOCK)
            grad += load(coef_ptr + ids, mask, MASKED) * (w * load(pre_ptr + ids, mask, MASKED))
        if WRITE == ACCUMULATE:
            grad += load(g_ptr + offs, mask, MASKED).to(ACC)
        store(g_ptr + offs, round_to(grad, DTYPE), mask, MASKED)
    return abs_sum, sq_sum


@triton.jit(do_not_specialize=["n_work"])
def _penalty_kernel(param_ptrs, grads, sizes, work, partials, n_work, l1: tl.float64, l2: tl.float64, scale_ptr,
                    group_coefs, group_pres, inner_table, ngroups_table, offsets,
                    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GROUPS: tl.constexpr, WRITE: tl.constexpr,
                    SCALED: tl.constexpr, VALUE: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, start, count = work_item(work, sizes, n_work, CHUNK)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, ALIGNED) + start
    l1_value = scalar(l1, ACC)
    l2_value = scalar(l2, ACC)
    l1_grad = l1_value
    l2_grad = 2.0 * l2_value
    if SCALED:
        scale = tl.load(scale_ptr).to(ACC)
        l1_grad = l1_grad * scale
        l2_grad = l2_grad * scale
    g_ptr = w_ptr
    if WRITE != NO_WRITE:
        g_ptr = tensor_pointer(grads, t, DTYPE, ALIGNED) + start
    # The group position of the first element of each block (without groups: unused zeros).
    inner, ngroups, r, g, step_r, step_g, coef_ptr = group_cursor(t, start, inner_table, ngroups_table, offsets,
                                                                group_coefs, BLOCK, HAS_GROUPS)
    pre_ptr = group_pres
    if HAS_GROUPS:
        pre_ptr = group_pres + tl.load(offsets + t)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    full = count - count % BLOCK
    for j in range(0, full, BLOCK):
        offs = tl.multiple_of(j, BLOCK) + tl.arange(0, BLOCK)
        abs_sum, sq_sum = _penalty_block(w_ptr, g_ptr, coef_ptr, pre_ptr, offs, count, r, g, inner, ngroups,
                                         abs_sum, sq_sum, l1_grad, l2_grad, DTYPE, ACC, BLOCK, HAS_L1, HAS_L2,
                                         HAS_GROUPS, WRITE, VALUE, False)
        if HAS_GROUPS:
            r, g = group_advance(r, g, step_r, step_g, inner, ngroups)
    if full < count:
        abs_sum, sq_sum = _penalty_block(w_ptr, g_ptr, coef_ptr, pre_ptr, full + tl.arange(0, BLOCK), count, r, g,
                                         inner, ngroups, abs_sum, sq_sum, l1_grad, l2_grad, DTYPE, ACC, BLOCK,
                                         HAS_L1, HAS_L2, HAS_GROUPS, WRITE, VALUE, True)
    if VALUE:
        tl.store(partials + pid, l1_value * tl.sum(abs_sum, axis=0) + l2_value * tl.sum(sq_sum, axis=0))


def _run(params: list[Tensor], grads: list[Tensor] | None, l1: float, l2: float, group_lasso: float, groups: str,
         write, value: bool, scale: Tensor | None = None) -> Tensor | None:
    """One (device, dtype) group through the group pass (if any) and the elementwise kernel.

    ``params`` and ``grads`` are contiguous. Returns the penalty value (0-dim, accumulation
    dtype) when ``value``, else None.
    """
    dtype = params[0].dtype
    acc = acc_dtype(dtype)
    device = params[0].device
    lay = layout(params)
    (table, grad_table), aligned = pointer_tables(params, grads or [])
    grad_table = table if grad_table is None else grad_table
    elementwise = write != NO_WRITE or bool(l1 or l2)
    # The group values start at a multiple of 4 elements: their alignment does not depend on the model.
    n_partials = -(-lay.n_work // 4) * 4 if elementwise and value else 0
    glay = group_layout(params, groups) if group_lasso else None
    n_values = n_partials + (glay.n_blocks if glay is not None and value else 0)
    partials = torch.zeros(n_values, dtype=acc, device=device) if value else None
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    group_coefs = group_pres = unused
    if glay is not None:
        group_values = partials[n_partials:] if value else None
        group_coefs, group_pres = group_coefficients(table, aligned, lay, glay, dtype, group_lasso,
                                                     values=group_values, scale=scale)
    if elementwise and lay.n_work:
        with on_device(device):
            _penalty_kernel[(lay.n_work,)](
                table, grad_table, lay.sizes, lay.work, partials if value else unused, lay.n_work, l1, l2,
                scale if scale is not None else unused, group_coefs, group_pres,
                glay.inner if glay is not None else unused, glay.ngroups if glay is not None else unused,
                glay.offsets if glay is not None else unused,
                DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=block_size(dtype),
                HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GROUPS=glay is not None, WRITE=write, SCALED=scale is not None,
                VALUE=value, ALIGNED=aligned, **LAUNCH_OPTIONS)
    return partials.sum() if value else None


def penalty(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    """``l1·Σ|w| + l2·Σw² + group_lasso·Σ_g √|g|·‖w_g‖₂`` of one group: 0-dim, accumulation dtype.

    Nothing is mutated; non-contiguous tensors are read through a contiguous copy.
    """
    value = _run(contiguous(params), None, l1, l2, group_lasso, groups, NO_WRITE, True)
    assert value is not None
    return value


def add_penalty_grad_(params: list[Tensor], grads: list[Tensor], l1: float, l2: float, group_lasso: float,
                      groups: str) -> Tensor:
    """``grads[i] += ∇penalty(params[i])`` in place (same shapes and dtype); returns the value (0-dim, acc dtype).

    ``params`` are only read. A non-contiguous param is read through a contiguous copy; a
    non-contiguous grad is updated in a contiguous copy that is then copied back.
    """
    if not (l1 or l2 or group_lasso):
        return torch.zeros((), dtype=acc_dtype(params[0].dtype), device=params[0].device)
    params = contiguous(params)
    work_grads = contiguous(grads)
    value = _run(params, work_grads, l1, l2, group_lasso, groups, ACCUMULATE, True)
    write_back(grads, work_grads)
    assert value is not None
    return value


def penalty_backward(grad: Tensor, params: list[Tensor], l1: float, l2: float, group_lasso: float,
                     groups: str) -> list[Tensor]:
    """``grad`` (0-dim) times the penalty's gradient: one new contiguous tensor per param (param dtype).

    ``grad`` is read on the device (no host sync). Nothing is mutated.
    """
    params = contiguous(params)
    outs = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    if not (l1 or l2 or group_lasso):
        return [out.zero_() for out in outs]
    scale = grad.detach().to(device=params[0].device, dtype=acc_dtype(params[0].dtype)).reshape(())
    _run(params, outs, l1, l2, group_lasso, groups, ASSIGN, False, scale=scale)
    return outs
