"""Per-tensor Σ|w| and Σw² in one read: per-chunk partials, then a fixed-order reduction per tensor.

No float atomics: the first kernel writes one pair of partials per work item, the second sums
each tensor's run of partials in order, so results are identical bit for bit from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import acc_dtype
from .functors import load
from .launcher import (
    LAUNCH_OPTIONS,
    Layout,
    acc_tl_dtype,
    block_size,
    contiguous,
    layout,
    on_device,
    pointer_table,
    tensor_pointer,
    tl_dtype,
    work_item,
)


@triton.jit
def _norms_block(w_ptr, offs, count, abs_sum, sq_sum, ACC: tl.constexpr, MASKED: tl.constexpr):
    w = load(w_ptr + offs, offs < count, MASKED).to(ACC)
    return abs_sum + tl.abs(w), sq_sum + w * w


@triton.jit(do_not_specialize=["n_work"])
def _chunk_norms_kernel(param_ptrs, sizes, work, partials, n_work, DTYPE: tl.constexpr, ACC: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, start, count = work_item(work, sizes, n_work, CHUNK)
    w_ptr = tensor_pointer(param_ptrs, t, DTYPE, ALIGNED) + start
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    full = count - count % BLOCK
    for j in range(0, full, BLOCK):
        offs = tl.multiple_of(j, BLOCK) + tl.arange(0, BLOCK)
        abs_sum, sq_sum = _norms_block(w_ptr, offs, count, abs_sum, sq_sum, ACC, False)
    if full < count:
        abs_sum, sq_sum = _norms_block(w_ptr, full + tl.arange(0, BLOCK), count, abs_sum, sq_sum, ACC, True)
    tl.store(partials + pid, tl.sum(abs_sum, axis=0))
    tl.store(partials + n_work + pid, tl.sum(sq_sum, axis=0))


@triton.jit(do_not_specialize=["n_work"])
def _tensor_sums_kernel(partials, segments, abs_out, sq_out, n_work, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Each tensor's Σ|w| and Σw²: its run ``segments[t]:segments[t + 1]`` of partials, summed in a fixed order."""
    t = tl.program_id(0)
    first = tl.load(segments + t)
    last = tl.load(segments + t + 1)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    for j in range(first, last, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        abs_sum += tl.load(partials + offs, mask=offs < last, other=0)
        sq_sum += tl.load(partials + n_work + offs, mask=offs < last, other=0)
    tl.store(abs_out + t, tl.sum(abs_sum, axis=0))
    tl.store(sq_out + t, tl.sum(sq_sum, axis=0))


def chunk_norms(table: Tensor, lay: Layout, dtype: torch.dtype, aligned: bool = False) -> Tensor:
    """Σ|w| (row 0) and Σw² (row 1) of each work item of ``lay``: ``2 × n_work`` in the accumulation dtype.

    ``aligned``: every pointer of ``table`` is 16-byte aligned (vector loads).
    """
    partials = torch.empty(2, lay.n_work, dtype=acc_dtype(dtype), device=table.device)
    if lay.n_work:
        with on_device(table.device):
            _chunk_norms_kernel[(lay.n_work,)](table, lay.sizes, lay.work, partials, lay.n_work,
                                               DTYPE=tl_dtype(dtype), ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk,
                                               BLOCK=block_size(dtype), ALIGNED=aligned, **LAUNCH_OPTIONS)
    return partials


def norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw² of one (device, dtype) group: two 1-D tensors of ``len(params)``.

    Accumulates in float32 (float64 for float64); non-contiguous tensors are read through a
    contiguous copy. Nothing is mutated.
    """
    params = contiguous(params)
    lay = layout(params)
    dtype = params[0].dtype
    table, aligned = pointer_table(params)
    partials = chunk_norms(table, lay, dtype, aligned)
    abs_sums = torch.empty(lay.n, dtype=acc_dtype(dtype), device=partials.device)
    sq_sums = torch.empty_like(abs_sums)
    with on_device(partials.device):
        _tensor_sums_kernel[(lay.n,)](partials, lay.segments, abs_sums, sq_sums, lay.n_work, ACC=acc_tl_dtype(dtype),
                                      BLOCK=128, **LAUNCH_OPTIONS)
    return abs_sums, sq_sums
