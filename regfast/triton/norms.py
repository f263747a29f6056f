"""Per-tensor Σ|w| and Σw² in one read: per-chunk partials, then a fixed-order reduction per tensor.

No float atomics: the first kernel writes one pair of partials per work item, the second sums
each tensor's run of partials in order, so results are identical bit for bit from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import acc_dtype
from .launcher import Layout, acc_tl_dtype, addresses, contiguous, layout, tensor_pointer, tl_dtype


@triton.jit
def _chunk_norms_kernel(params, sizes, work, partials, n_work,
                        DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid) * CHUNK
    w_ptr = tensor_pointer(params, t, DTYPE)
    end = tl.minimum(tl.load(sizes + t) - start, CHUNK)
    abs_sum = tl.zeros([BLOCK], dtype=ACC)
    sq_sum = tl.zeros([BLOCK], dtype=ACC)
    for j in range(0, end, BLOCK):
        local = j + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + start + local, mask=local < end, other=0).to(ACC)
        abs_sum += tl.abs(w)
        sq_sum += w * w
    tl.store(partials + pid, tl.sum(abs_sum, axis=0))
    tl.store(partials + n_work + pid, tl.sum(sq_sum, axis=0))


@triton.jit
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


def chunk_norms(table: Tensor, lay: Layout, dtype: torch.dtype) -> Tensor:
    """Σ|w| (row 0) and Σw² (row 1) of each work item of ``lay``: ``2 × n_work`` in the accumulation dtype."""
    partials = torch.empty(2, lay.n_work, dtype=acc_dtype(dtype), device=table.device)
    if lay.n_work:
        _chunk_norms_kernel[(lay.n_work,)](table, lay.sizes, lay.work, partials, lay.n_work, DTYPE=tl_dtype(dtype),
                                           ACC=acc_tl_dtype(dtype), CHUNK=lay.chunk, BLOCK=lay.block)
    return partials


def norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor Σ|w| and Σw² of one (device, dtype) group: two 1-D tensors of ``len(params)``.

    Accumulates in float32 (float64 for float64); non-contiguous tensors are read through a
    contiguous copy. Nothing is mutated.
    """
    params = contiguous(params)
    lay = layout(params)
    dtype = params[0].dtype
    partials = chunk_norms(addresses(params), lay, dtype)
    abs_sums = torch.empty(lay.n, dtype=acc_dtype(dtype), device=partials.device)
    sq_sums = torch.empty_like(abs_sums)
    _tensor_sums_kernel[(lay.n,)](partials, lay.segments, abs_sums, sq_sums, lay.n_work, ACC=acc_tl_dtype(dtype),
                                  BLOCK=128)
    return abs_sums, sq_sums
