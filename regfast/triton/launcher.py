"""The multi-tensor launcher: device-side tables that let one kernel launch cover a whole tensor list.

A kernel over a list of ``n`` tensors reads three int64 tables on the device:

- ``addresses`` (``n``): each tensor's data pointer, cast to a typed pointer in the kernel;
- ``sizes`` (``n``): each tensor's number of elements;
- ``work`` (``2 × W``): the work list. Row 0 holds a tensor index, row 1 a chunk index; program
  ``p`` of the launch handles elements ``[work[1, p]·chunk, (work[1, p] + 1)·chunk)`` of tensor
  ``work[0, p]``. Items are ordered tensor by tensor, chunk by chunk, so that each tensor's
  items form one contiguous run (``segments[t] : segments[t + 1]``): per-chunk partial sums are
  then reduced per tensor in a fixed order, without atomics. Empty tensors own no item. A chunk
  index times the chunk size is computed in int64, so a tensor may exceed 2^31 elements.

Group lasso adds a :class:`GroupLayout`: every tensor is viewed as ``[outer, ngroups, inner]``
(group ``g`` is ``[:, g, :]``), and a second work list splits each block of ``group_block``
consecutive groups into pieces of at most ``max(chunk, BLOCK) // group_block`` elements per group.

Tables depend only on shapes and addresses, so they are built once and cached: :func:`layout`
and :func:`group_layout` on (device, chunk size, shapes), :func:`addresses` on the data pointers.
A call whose tensors kept their storage and shapes therefore makes no host-to-device copy, which
is also what lets the kernels be captured in a CUDA graph. Kernels work on contiguous tensors:
:func:`contiguous` gives a contiguous copy of any other tensor, and :func:`write_back` copies an
in-place result back into it.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_CHUNK = 65536
"""Elements per work item (a power of two)."""

BLOCK = 1024
"""Elements a program handles per loop iteration (lanes past its chunk's end are masked)."""

GROUP_BLOCK = 16
"""Groups one program of the group-norm pass handles together (row and col groupings)."""

CACHE_ENTRIES = 64

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}

_chunk = DEFAULT_CHUNK
_layouts: OrderedDict[tuple, Layout] = OrderedDict()
_group_layouts: OrderedDict[tuple, GroupLayout] = OrderedDict()
_addresses: OrderedDict[tuple, Tensor] = OrderedDict()


def chunk_size() -> int:
    """Elements per work item of the launches made now."""
    return _chunk


@contextlib.contextmanager
def chunked(chunk: int) -> Iterator[None]:
    """Launch with ``chunk`` elements per work item (a power of two ≥ 16) inside the block."""
    global _chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk size must be a power of two >= 16, got {chunk}")
    old, _chunk = _chunk, chunk
    try:
        yield
    finally:
        _chunk = old


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return TL_DTYPES[dtype]


def acc_tl_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype of ``dtype``: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def tensor_pointer(table, t, DTYPE: tl.constexpr):
    """The typed pointer to the data of tensor ``t`` of an :func:`addresses` table."""
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _upload(values: Tensor, device: torch.device) -> Tensor:
    return values.to(device=device, dtype=torch.int64)


@dataclass(frozen=True)
class Layout:
    """The shape-derived tables of one tensor list (all int64 on the list's device).

    ``sizes``: ``n``; ``work``: ``2 × n_work`` (tensor index, chunk index); ``segments``:
    ``n + 1``, the first work item of each tensor. ``block`` is the kernels' loop step.
    """

    n: int
    n_work: int
    chunk: int
    block: int
    sizes: Tensor
    work: Tensor
    segments: Tensor

    @staticmethod
    def build(numels: list[int], chunk: int, device: torch.device) -> Layout:
        """The tables of tensors with ``numels`` elements, split in chunks of ``chunk``."""
        sizes = torch.tensor(numels, dtype=torch.int64)
        counts = (sizes + chunk - 1) // chunk
        return Layout.from_work(sizes, torch.repeat_interleave(torch.arange(len(numels)), counts),
                                torch.cat([torch.arange(int(c)) for c in counts]), chunk, device)

    @staticmethod
    def from_work(sizes: Tensor, work_tensor: Tensor, work_chunk: Tensor, chunk: int,
                  device: torch.device) -> Layout:
        """A layout with an explicit work list (``work_tensor`` non-decreasing); sizes as given."""
        n = sizes.numel()
        counts = torch.bincount(work_tensor, minlength=n) if work_tensor.numel() else torch.zeros(n, dtype=torch.int64)
        segments = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        packed = _upload(torch.cat([sizes, work_tensor, work_chunk, segments]), device)
        n_work = work_tensor.numel()
        return Layout(n, n_work, chunk, BLOCK, packed[:n], packed[n:n + 2 * n_work].view(2, n_work),
                      packed[n + 2 * n_work:])


def layout(params: list[Tensor]) -> Layout:
    """The cached :class:`Layout` of ``params`` for the current chunk size."""
    numels = tuple(map(Tensor.numel, params))
    device = params[0].device
    return _cached(_layouts, (device, _chunk, numels), lambda: Layout.build(list(numels), _chunk, device))


def group_shape(t: Tensor, groups: str) -> tuple[int, int, int]:
    """``(outer, ngroups, inner)``: ``t`` (contiguous) seen as ``[outer, ngroups, inner]``, group g = ``[:, g, :]``.

    ``"row"`` groups are slices along dim 0, ``"col"`` along dim 1, ``"tensor"`` (and any tensor
    with fewer than 2 dims) is one group.
    """
    if groups == "tensor" or t.dim() < 2:
        return 1, 1, t.numel()
    if groups == "row":
        return 1, t.shape[0], math.prod(t.shape[1:])
    return t.shape[0], t.shape[1], math.prod(t.shape[2:])


@dataclass(frozen=True)
class GroupLayout:
    """The group tables of one tensor list (all int64 on the list's device).

    Per tensor (``n``): ``inner``, ``ngroups`` and ``offsets`` (index of its first group in the
    list's ``n_groups`` groups; tensors without elements have none). The group-norm work list
    ``work`` (``3 × n_work``) holds (tensor index, first group, first element within the groups);
    ``blocks`` (``2 × n_blocks``) holds (tensor index, first group) of each block of
    ``group_block`` groups, and ``segments`` (``n_blocks + 1``) the first work item of each block.
    A work item covers at most ``split`` elements of each of its groups.
    """

    n_groups: int
    n_work: int
    n_blocks: int
    group_block: int
    split: int
    inner: Tensor
    ngroups: Tensor
    offsets: Tensor
    work: Tensor
    blocks: Tensor
    segments: Tensor

    @staticmethod
    def build(shapes: list[tuple[int, int, int]], chunk: int, group_block: int,
              device: torch.device) -> GroupLayout:
        split = max(chunk, BLOCK) // group_block
        inner, ngroups, offsets = [], [], []
        work_t, work_g, work_k, block_t, block_g, per_block = [], [], [], [], [], []
        n_groups = 0
        for t, (outer, groups, size) in enumerate(shapes):
            numel = outer * groups * size
            inner.append(max(size, 1))
            ngroups.append(max(groups, 1))
            offsets.append(n_groups)
            if numel == 0:
                continue
            n_groups += groups
            group_numel = outer * size
            n_splits = -(-group_numel // split)
            for g0 in range(0, groups, group_block):
                block_t.append(t)
                block_g.append(g0)
                per_block.append(n_splits)
                work_t += [t] * n_splits
                work_g += [g0] * n_splits
                work_k += range(0, n_splits * split, split)
        segments = [0]
        for count in per_block:
            segments.append(segments[-1] + count)
        n = len(shapes)
        n_work, n_blocks = len(work_t), len(block_t)
        packed = _upload(torch.tensor(inner + ngroups + offsets + work_t + work_g + work_k + block_t + block_g
                                      + segments, dtype=torch.int64), device)
        parts = packed.split([n, n, n, 3 * n_work, 2 * n_blocks, n_blocks + 1])
        return GroupLayout(n_groups, n_work, n_blocks, group_block, split, parts[0], parts[1], parts[2],
                           parts[3].view(3, n_work), parts[4].view(2, n_blocks), parts[5])


def group_layout(params: list[Tensor], groups: str) -> GroupLayout:
    """The cached :class:`GroupLayout` of contiguous ``params`` for ``groups`` and the current chunk size."""
    shapes = tuple(group_shape(t, groups) for t in params)
    group_block = 1 if all(s[1] == 1 for s in shapes) else GROUP_BLOCK
    device = params[0].device
    return _cached(_group_layouts, (device, _chunk, group_block, shapes),
                   lambda: GroupLayout.build(list(shapes), _chunk, group_block, device))


def addresses(tensors: list[Tensor]) -> Tensor:
    """The cached int64 device table of the data pointers of ``tensors`` (in order)."""
    pointers = tuple(map(Tensor.data_ptr, tensors))
    device = tensors[0].device
    return _cached(_addresses, (device, pointers),
                   lambda: _upload(torch.tensor(pointers, dtype=torch.int64), device))


def contiguous(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with each non-contiguous one replaced by a contiguous copy (the kernels index flat memory)."""
    if all(map(Tensor.is_contiguous, tensors)):
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def write_back(originals: list[Tensor], used: list[Tensor]) -> None:
    """Copy the results of an in-place kernel from the contiguous copies in ``used`` back into ``originals``."""
    if used is originals:
        return
    for original, copy in zip(originals, used):
        if copy is not original:
            original.copy_(copy)
