"""The proximal step in place: elastic-net soft threshold and shrink, then the group shrink.

Without group lasso one kernel reads and writes each element once. With it,
:func:`.group.group_coefficients` first computes each group's factor from the norm of the
elastic-net output ``u``, and the same kernel then writes ``factor_g·u``. The step is a float
or a 0-dim device tensor that the kernels load themselves: no host sync, so the step can be
captured in a CUDA graph and replayed with a new value written into that tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._common import lr_step
from .functors import elastic_net, group_advance, group_cursor, group_ids, load, prox_step, round_to, store
from .group import group_coefficients
from .launcher import (
    LAUNCH_OPTIONS,
    acc_tl_dtype,
    block_size,
    contiguous,
    group_layout,
    layout,
    on_device,
    pointer_table,
    tensor_pointer,
    tl_dtype,
    work_item,
    write_back,
)


@triton.jit
def _prox_block(w_ptr, factor_ptr, offs, count, r, g, inner, ngroups, threshold, shrink, DTYPE: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr,
                HAS_GROUPS: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < count
    u = elastic_net(load(w_ptr + offs, mask, MASKED).to(ACC), threshold, shrink, HAS_L1, HAS_L2)
    if HAS_GROUPS:
        u = u * load(factor_ptr + group_ids(r, g, inner, ngroups, BLOCK), mask, MASKED)
    store(w_ptr + offs, round_to(u, DTYPE), mask, MASKED)


@triton.jit(do_not_specialize=["n_work"])
def _prox_kernel(param_ptrs, sizes, work, n_work, lr_ptr, lr_value: tl.float64, l1: tl.float64, l2: tl.float64,
                 group_factors, inner_table, ngroups_table, offsets,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 LR_TENSOR: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GROUPS: tl.constexpr,
                 ALIGNED: tl.constexpr):
    _, t, start, count = work_item(work, sizes, n_work, CHUNK)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, ALIGNED) + start
    _, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    # The group position of the first element of each block (without groups: unused zeros).
    inner, ngroups, r, g, step_r, step_g, factor_ptr = group_cursor(t, start, inner_table, ngroups_table, offsets,
                                                                group_factors, BLOCK, HAS_GROUPS)
    full = count - count % BLOCK
    for j in range(0, full, BLOCK):
        offs = tl.multiple_of(j, BLOCK) + tl.arange(0, BLOCK)
        _prox_block(w_ptr, factor_ptr, offs, count, r, g, inner, ngroups, threshold, shrink, DTYPE, ACC, BLOCK,
                    HAS_L1, HAS_L2, HAS_GROUPS, False)
        if HAS_GROUPS:
            r, g = group_advance(r, g, step_r, step_g, inner, ngroups)
    if full < count:
        _prox_block(w_ptr, factor_ptr, full + tl.arange(0, BLOCK), count, r, g, inner, ngroups, threshold, shrink,
                    DTYPE, ACC, BLOCK, HAS_L1, HAS_L2, HAS_GROUPS, True)


def prox_(params: list[Tensor], lr_tensor: Tensor | None, lr: float, l1: float, l2: float, group_lasso: float,
          groups: str) -> None:
    """The proximal step of one (device, dtype) group, in place; the step is ``lr_tensor`` when given, else ``lr``."""
    prox_step_(params, lr_step(params, lr_tensor, lr), l1, l2, group_lasso, groups)


def prox_step_(params: list[Tensor], lr: float | Tensor, l1: float, l2: float, group_lasso: float,
               groups: str) -> None:
    """The proximal step of one (device, dtype) group with step ``lr``, in place on ``params``.

    ``lr`` is a float or a 0-dim tensor in the accumulation dtype on the params' device. A
    non-contiguous param is updated in a contiguous copy that is then copied back.
    """
    if not (l1 or l2 or group_lasso):
        return
    work_params = contiguous(params)
    dtype = work_params[0].dtype
    lay = layout(work_params)
    table, aligned = pointer_table(work_params)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    glay = group_layout(work_params, groups) if group_lasso else None
    factors = unused
    if glay is not None:
        factors = group_coefficients(table, aligned, lay, glay, dtype, group_lasso, lr=lr, l1=l1, l2=l2)[0]
    if lay.n_work:
        with on_device(table.device):
            _prox_kernel[(lay.n_work,)](
                table, lay.sizes, lay.work, lay.n_work, lr if lr_tensor else unused,
                0.0 if lr_tensor else float(lr), l1, l2, factors, glay.inner if glay is not None else unused,
                glay.ngroups if glay is not None else unused, glay.offsets if glay is not None else unused,
                DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=block_size(dtype),
                LR_TENSOR=lr_tensor, HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GROUPS=glay is not None, ALIGNED=aligned,
                **LAUNCH_OPTIONS)
    write_back(params, work_params)
