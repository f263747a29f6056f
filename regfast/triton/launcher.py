"""The multi-tensor launcher: device-side tables that let one kernel launch cover a whole tensor list.

A kernel over a list of ``n`` tensors reads three int64 tables on the device:

- the pointer table (``n``): each tensor's data pointer, cast to a typed pointer in the kernel;
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
and :func:`group_layout` on (device, chunk size, shapes), :func:`pointer_table` on the data
pointers (numels and pointers keyed as native int64 bytes, hashed by the extension's digest of them
where it is loaded). A list that regfast's C++ walk checked (:class:`~regfast._common.Walked`, or
:class:`~regfast._common.ByAddress` for tensors the launch reads only through their addresses)
brings those bytes, and whether it is contiguous, read in C++: the launch then makes no Python call
per tensor. A call whose tensors kept their storage and shapes therefore makes no host-to-device
copy and no host sync, which is what lets the kernels be captured in a CUDA graph: a table used
while a graph is being captured is pinned (never evicted, as the graph reads it on every replay;
:func:`unpin_tables` releases them once those graphs are gone), and a table missing during a
capture is an error that says to run the call once before capturing.

Every part of a table starts 16-byte aligned, and :func:`pointer_table` says whether every data
pointer is: the kernels then tell the compiler so (``ALIGNED``) and load 128 bits at a time. They
work on contiguous tensors: :func:`contiguous` gives a contiguous copy of any other tensor, and
:func:`write_back` copies an in-place result back into it. :func:`on_device` makes the tensors'
device current, so that each launch runs on it and on its current stream.
"""

from __future__ import annotations

import contextlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import HOST, READ_LISTS, Walked

DEFAULT_CHUNK = 65536
"""Elements per work item (a power of two)."""

BLOCK = 1024
"""Elements a program handles per loop iteration (lanes past its chunk's end are masked), float64 aside."""

GROUP_BLOCK = 16
"""Groups one program of the group-norm pass handles together (row and col groupings)."""

CACHE_ENTRIES = 64
"""Tables kept per cache, pinned ones (used by a captured CUDA graph) not counted."""

VECTOR_BYTES = 16
"""Width of the kernels' vector loads and stores: data pointers aligned to it take the vector path."""

LAUNCH_OPTIONS = {"enable_fp_fusion": False, "maxnreg": 128}
"""Compile options of every launch: each multiply and add rounds on its own, as in the reference; up to
128 registers per thread (left to itself, ptxas keeps some kernels at 64 and spills in the hot loop)."""

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}

_chunk = DEFAULT_CHUNK
_layouts: OrderedDict[tuple, tuple[bytes, Layout]] = OrderedDict()
_group_layouts: OrderedDict[tuple, tuple[bytes, GroupLayout]] = OrderedDict()
_addresses: OrderedDict[tuple, tuple[bytes, tuple[Tensor, bool]]] = OrderedDict()
_pinned: dict[int, set] = {}


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


def block_size(dtype: torch.dtype) -> int:
    """Elements a program of 4 warps handles per loop iteration: 8 per thread for 16- and 32-bit dtypes (one
    or two 128-bit accesses per tensor), 4 for float64 (two), which keeps every kernel within 128 registers."""
    return BLOCK // 2 if dtype.itemsize == 8 else BLOCK


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return TL_DTYPES[dtype]


def acc_tl_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype of ``dtype``: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def tensor_pointer(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """The typed pointer to the data of tensor ``t`` of a :func:`pointer_table`, 16-byte aligned if ``ALIGNED``."""
    pointer = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def work_item(work, sizes, n_work, CHUNK: tl.constexpr):
    """This program's work item: (program id, tensor index, first element, elements in the chunk as int32)."""
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid) * CHUNK
    count = tl.minimum(tl.load(sizes + t) - start, CHUNK).to(tl.int32)
    return pid, t, start, count


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` (a CUDA device) is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which launches run on ``device`` and its current stream (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def unpin_tables() -> None:
    """Let the tables used by captured CUDA graphs be evicted again: call it once those graphs are deleted."""
    _pinned.clear()


def _digest(data: bytes) -> int | bytes:
    """What the table caches key the int64 bytes ``data`` (a list's data pointers, numels or dims) by: the
    extension's 64-bit digest of them where it is loaded (several times faster than Python's hash of the bytes,
    which every table of every call would pay; a hit still compares the bytes), else the bytes."""
    return data if HOST.digest is None else HOST.digest(data)


def _cached(cache: OrderedDict, key: tuple, data: bytes, device: torch.device, build: Callable):
    """The tables that ``build`` makes from ``data`` (the int64 bytes they depend on), kept in ``cache`` under
    ``key`` and the :func:`_digest` of ``data`` (an entry is taken only when its bytes equal ``data``): built on a
    miss, pinned when a graph is being captured, evicted least recently used."""
    graph = capturing(device)
    key = (*key, _digest(data))
    entry = cache.get(key)
    if entry is None or entry[0] != data:
        if graph:
            raise RuntimeError("regfast: the device tables of this call are not cached, and building them copies from "
                               "the host, which a CUDA graph cannot capture: run the same call once before capturing")
        fresh = (data, build())
        if entry is not None and key in _pinned.get(id(cache), ()):
            return fresh[1]  # another list's tables with the same digest, read by a captured graph: kept
        entry = fresh
        cache[key] = entry
    cache.move_to_end(key)
    pinned = _pinned.setdefault(id(cache), set())
    if graph:
        pinned.add(key)
    if len(cache) - len(pinned) > CACHE_ENTRIES:
        for old in cache:
            if old not in pinned:
                del cache[old]
                break
    return entry[1]


def _pack(parts: list[list[int]], device: torch.device) -> list[Tensor]:
    """The int64 lists ``parts`` as views of one device tensor (one copy), each starting 16-byte aligned."""
    values, bounds = [], []
    for part in parts:
        values += [0] * (len(values) % 2)
        bounds.append((len(values), len(part)))
        values += part
    packed = torch.tensor(values, dtype=torch.int64).to(device)
    return [packed[start:start + size] for start, size in bounds]


@dataclass(frozen=True)
class Layout:
    """The shape-derived tables of one tensor list (all int64 on the list's device).

    ``sizes``: ``n``; ``work``: ``2 × n_work`` (tensor index, chunk index); ``segments``:
    ``n + 1``, the first work item of each tensor.
    """

    n: int
    n_work: int
    chunk: int
    sizes: Tensor
    work: Tensor
    segments: Tensor

    @staticmethod
    def build(numels: list[int], chunk: int, device: torch.device) -> Layout:
        """The tables of tensors with ``numels`` elements, split in chunks of ``chunk``."""
        counts = [-(-numel // chunk) for numel in numels]
        work_tensor = [t for t, count in enumerate(counts) for _ in range(count)]
        return Layout.from_work(list(numels), work_tensor, [c for count in counts for c in range(count)], chunk,
                                device)

    @staticmethod
    def from_work(sizes: list[int], work_tensor: list[int], work_chunk: list[int], chunk: int,
                  device: torch.device) -> Layout:
        """A layout with an explicit work list (``work_tensor`` non-decreasing); sizes as given."""
        segments = [0] * (len(sizes) + 1)
        for t in work_tensor:
            segments[t + 1] += 1
        for t in range(len(sizes)):
            segments[t + 1] += segments[t]
        n_work = len(work_tensor)
        sizes_t, work, segments_t = _pack([sizes, work_tensor + work_chunk, segments], device)
        return Layout(len(sizes), n_work, chunk, sizes_t, work.view(2, n_work), segments_t)


def _int64_bytes(values) -> bytes:
    return array("q", values).tobytes()


def layout(params: list[Tensor]) -> Layout:
    """The cached :class:`Layout` of ``params`` for the current chunk size."""
    sizes = params.sizes if type(params) is Walked and params.sizes is not None else \
        _int64_bytes(map(Tensor.numel, params))
    device = params[0].device
    return _cached(_layouts, (device, _chunk), sizes, device,
                   lambda: Layout.build(array("q", sizes).tolist(), _chunk, device))


@dataclass(frozen=True)
class GroupLayout:
    """The group tables of one tensor list (all int64 on the list's device).

    Per tensor (``n``): ``outer``, ``inner``, ``ngroups`` and ``offsets`` (index of its first group
    in the list's ``n_groups`` groups; tensors without elements have none). The group-norm work list
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
    outer: Tensor
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
        outer_sizes, inner, ngroups, offsets = [], [], [], []
        work_t, work_g, work_k, block_t, block_g, per_block = [], [], [], [], [], []
        n_groups = 0
        for t, (outer, groups, size) in enumerate(shapes):
            numel = outer * groups * size
            outer_sizes.append(max(outer, 1))
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
        n_work, n_blocks = len(work_t), len(block_t)
        parts = _pack([outer_sizes, inner, ngroups, offsets, work_t + work_g + work_k, block_t + block_g, segments],
                      device)
        return GroupLayout(n_groups, n_work, n_blocks, group_block, split, *parts[:4],
                           parts[4].view(3, n_work), parts[5].view(2, n_blocks), parts[6])


DIMS = 6
"""Per tensor, the int64 values of a list's ``dims`` key: dim, numel, shape[0], shape[1] (0 where absent),
prod(shape[1:]), prod(shape[2:])."""


def _dims_of(t: Tensor) -> tuple[int, ...]:
    shape = t.shape
    return (len(shape), t.numel(), shape[0] if shape else 0, shape[1] if len(shape) > 1 else 0,
            math.prod(shape[1:]), math.prod(shape[2:]))


def _group_shapes(dims: bytes, groups: str) -> list[tuple[int, int, int]]:
    """``(outer, ngroups, inner)`` of each tensor of a ``dims`` key: the tensor (contiguous) seen as ``[outer,
    ngroups, inner]``, group g = ``[:, g, :]``. ``"row"`` groups are slices along dim 0, ``"col"`` along dim 1,
    ``"tensor"`` (and any tensor with fewer than 2 dims) is one group."""
    values = array("q", dims)
    shapes = []
    for i in range(0, len(values), DIMS):
        dim, numel, first, second, rest, rest2 = values[i:i + DIMS]
        if groups == "tensor" or dim < 2:
            shapes.append((1, 1, numel))
        elif groups == "row":
            shapes.append((1, first, rest))
        else:
            shapes.append((first, second, rest2))
    return shapes


def group_layout(params: list[Tensor], groups: str) -> GroupLayout:
    """The cached :class:`GroupLayout` of contiguous ``params`` for ``groups`` and the current chunk size, keyed by
    the params' ``dims`` (read by the walk for a Walked list, else here)."""
    dims = params.dims if type(params) is Walked and params.dims is not None else \
        _int64_bytes(value for t in params for value in _dims_of(t))
    device = params[0].device

    def build() -> GroupLayout:
        shapes = _group_shapes(dims, groups)
        group_block = 1 if all(s[1] == 1 for s in shapes) else GROUP_BLOCK
        return GroupLayout.build(shapes, _chunk, group_block, device)

    return _cached(_group_layouts, (device, _chunk, groups), dims, device, build)


def pointer_table(tensors: list[Tensor]) -> tuple[Tensor, bool]:
    """The cached int64 device table of the data pointers of ``tensors`` (in order), and whether all are
    16-byte aligned. What the host walk made (:class:`~regfast._common.Walked`, :class:`~regfast._common.ByAddress`)
    brings its pointers read."""
    addresses = tensors.addresses if type(tensors) in READ_LISTS else _int64_bytes(map(Tensor.data_ptr, tensors))
    device = tensors[0].device

    def build() -> tuple[Tensor, bool]:
        pointers = array("q", addresses).tolist()
        return _pack([pointers], device)[0], all(p % VECTOR_BYTES == 0 for p in pointers)

    return _cached(_addresses, (device,), addresses, device, build)


def pointer_tables(*tensor_lists: list[Tensor]) -> tuple[list[Tensor | None], bool]:
    """:func:`pointer_table` of each list (None for an empty one), and whether every pointer of all is aligned."""
    found = [pointer_table(ts) if ts else (None, True) for ts in tensor_lists]
    return [table for table, _ in found], all(aligned for _, aligned in found)


def contiguous(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with each non-contiguous one replaced by a contiguous copy (the kernels index flat memory)."""
    if tensors.dense if type(tensors) in READ_LISTS else all(map(Tensor.is_contiguous, tensors)):
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def write_back(originals: list[Tensor], used: list[Tensor]) -> None:
    """Copy the results of an in-place kernel from the contiguous copies in ``used`` back into ``originals``."""
    if used is originals:
        return
    for original, copy in zip(originals, used):
        if copy is not original:
            original.copy_(copy)
