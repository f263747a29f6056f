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

from .functors import elastic_net, group_index, prox_step
from .group import group_coefficients
from .launcher import acc_tl_dtype, addresses, contiguous, group_layout, layout, tensor_pointer, tl_dtype, write_back


@triton.jit
def _prox_kernel(params, sizes, work, n_work, lr_ptr, lr_value: tl.float64, l1: tl.float64, l2: tl.float64,
                 group_factors, inner_table, ngroups_table, offsets,
                 DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 LR_TENSOR: tl.constexpr, HAS_L1: tl.constexpr, HAS_L2: tl.constexpr, HAS_GROUPS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid) * CHUNK
    w_ptr = tensor_pointer(params, t, DTYPE)
    _, threshold, shrink = prox_step(lr_ptr, lr_value, l1, l2, ACC, LR_TENSOR)
    if HAS_GROUPS:
        inner = tl.load(inner_table + t)
        ngroups = tl.load(ngroups_table + t)
        first_group = tl.load(offsets + t)
    end = tl.minimum(tl.load(sizes + t) - start, CHUNK)
    for j in range(0, end, BLOCK):
        local = j + tl.arange(0, BLOCK)
        offs = start + local
        mask = local < end
        u = elastic_net(tl.load(w_ptr + offs, mask=mask, other=0).to(ACC), threshold, shrink, HAS_L1, HAS_L2)
        if HAS_GROUPS:
            u = u * tl.load(group_factors + group_index(offs, inner, ngroups, first_group), mask=mask, other=0)
        tl.store(w_ptr + offs, u.to(DTYPE), mask=mask)


def prox_(params: list[Tensor], lr: float | Tensor, l1: float, l2: float, group_lasso: float, groups: str) -> None:
    """The proximal step of one (device, dtype) group with step ``lr``, in place on ``params``.

    ``lr`` is a float or a 0-dim tensor in the accumulation dtype on the params' device. A
    non-contiguous param is updated in a contiguous copy that is then copied back.
    """
    if not (l1 or l2 or group_lasso):
        return
    work_params = contiguous(params)
    dtype = work_params[0].dtype
    lay = layout(work_params)
    table = addresses(work_params)
    lr_tensor = isinstance(lr, Tensor)
    # Pointer arguments a launch does not read (their constexpr flag is off) get any tensor.
    unused = table
    glay = group_layout(work_params, groups) if group_lasso else None
    factors = unused
    if glay is not None:
        factors = group_coefficients(table, lay, glay, dtype, group_lasso, lr=lr, l1=l1, l2=l2)
    if lay.n_work:
        _prox_kernel[(lay.n_work,)](
            table, lay.sizes, lay.work, lay.n_work, lr if lr_tensor else unused, 0.0 if lr_tensor else float(lr),
            l1, l2, factors, glay.inner if glay is not None else unused,
            glay.ngroups if glay is not None else unused, glay.offsets if glay is not None else unused,
            DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=lay.block, LR_TENSOR=lr_tensor,
            HAS_L1=bool(l1), HAS_L2=bool(l2), HAS_GROUPS=glay is not None)
    write_back(params, work_params)
