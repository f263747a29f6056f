"""What every layer shares: the accumulation dtype, the lr kinds, the groupings and group shapes, and
the grouping of tensor lists by (device, dtype).

Imported by the public API, the op layer and every backend alike (it imports none of them), so that
:mod:`regfast.reference` is only the spec.
"""

from __future__ import annotations

import math
from operator import itemgetter

import torch
from torch import Tensor, nn

Lr = float | Tensor

# Tensor types the direct calls and the vectorized checks take (subclasses go the general way).
PLAIN_TYPES = {Tensor, nn.Parameter, *((nn.Buffer,) if hasattr(nn, "Buffer") else ())}

GROUPINGS = ("row", "col", "tensor")


class Walked(list):
    """A list of tensors that the host walk (:mod:`regfast._C`) checked and grouped, with what it read of them for a
    backend that builds its device tables in Python (Triton), instead of a Python call per tensor.

    ``addresses``: each tensor's data pointer, as native int64 bytes (for a list the call writes, the writable
    pointer); ``sizes``: each numel likewise, for a group's params (else None); ``dense``: whether every tensor is
    contiguous; ``flat``: for step counts that are consecutive elements of one float32 CPU tensor, a view over them
    (else None); ``shared``: whether the tensors are views of one buffer (a flat plan's states), whose one version
    counter a single bump marks; ``dims``: for a group's params of a call with group lasso, per tensor its dim, numel,
    first two sizes (0 where absent) and the products of its sizes from the second and from the third on, as native
    int64 bytes (the key of the group tables of regfast.triton.launcher), else None. Only the walk makes these, and
    only for the call at hand: the tensors are not to change between.
    """

    __slots__ = ("addresses", "sizes", "dense", "flat", "shared", "dims")


class ByAddress:
    """Tensors that the host walk hands to a backend that launches from Python (Triton) where the launch reads them
    only through their data pointers (a flat plan's states, views of one buffer, or its grads): ``addresses``
    (native int64 bytes, each tensor's data pointer), ``dense``, ``shared`` (views of one buffer: one bump of the first
    one's version counter marks them all), ``flat`` (step counts on the host that are the whole buffer: the buffer,
    which one add counts; else None), ``len()`` the number of tensors, ``[0]`` and ``[:1]`` the first one. It holds no
    list of the tensors, which would touch every tensor's object twice per step; a path that reads them one by one is
    given a :class:`Walked` list instead, and a ByAddress refuses to be read any other way. The walk that hands them
    bumps the version counters of what the call writes itself (there is no list to bump them through)."""

    __slots__ = ("first", "count", "addresses", "flat", "shared")
    dense = True

    def __init__(self, first: Tensor, count: int, addresses: bytes, flat: Tensor | None, shared: bool) -> None:
        self.first, self.count, self.addresses, self.flat, self.shared = first, count, addresses, flat, shared

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if type(index) is int and index == 0:
            return self.first
        if index == slice(None, 1):
            return [self.first]
        raise TypeError("regfast: these tensors are read through their addresses, not one by one")

    def __iter__(self):
        raise TypeError("regfast: these tensors are read through their addresses, not one by one")

    def __repr__(self) -> str:
        return f"ByAddress({self.count} tensors)"


READ_LISTS = (Walked, ByAddress)
"""The types of what the host walk hands a launcher in Python, with the data pointers it read (``addresses``)."""


class _Host:
    """The compiled extension's host helpers for a backend that launches from Python (Triton), which imports no other
    backend: the op layer (:mod:`regfast._ops`) sets them when the extension is loaded; None otherwise.

    ``digest(data: bytes) -> int``: a 64-bit digest of int64 bytes, the hash of the launcher's table keys.
    ``bias_table(counts, lr, beta1, beta2, wide) -> Tensor | None``: AdamW's host step counts (one contiguous float32
    CPU tensor) incremented, and their bias corrections (regfast._C.host_bias_table)."""

    __slots__ = ("digest", "bias_table")

    def __init__(self) -> None:
        self.digest = self.bias_table = None


HOST = _Host()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lr_step(params: list[Tensor], lr_tensor: Tensor | None, lr: float) -> Lr:
    """The step of an op's ``(lr_tensor, lr)`` pair: ``lr``, or ``lr_tensor`` on the params' device in their
    accumulation dtype. A CPU ``lr_tensor`` for CUDA params is refused inside a CUDA graph capture (the graph
    would replay its value at capture forever), as the extension's ops refuse it."""
    if lr_tensor is None:
        return lr
    device = params[0].device
    if device.type == "cuda" and capturing():
        refuse_host_lr(lr_tensor, "")
    return lr_tensor.to(device, acc_dtype(params[0].dtype))


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (cheap when CUDA was never initialized)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def refuse_host_lr(lr, who: str) -> None:
    """Inside a CUDA graph capture: raise RuntimeError for an lr held by a CPU tensor, which the graph would
    replay at its value at capture forever (``who``: a prefix naming the caller)."""
    if isinstance(lr, Tensor) and lr.is_cpu:
        raise RuntimeError(f"{who}lr is a CPU tensor, whose value at capture a CUDA graph would replay forever: put "
                           "lr on the params' device to change it between replays")


def group_dims(t: Tensor, groups: str) -> tuple[int, ...] | None:
    """Dims reduced to form the groups of ``t``; ``None`` means the whole tensor is one group.

    ``"row"`` groups are slices along dim 0 (reduce over dims 1..), ``"col"`` slices along
    dim 1 (reduce over dim 0 and dims 2..). Tensors with fewer than 2 dims are one group.
    """
    if groups == "tensor" or t.dim() < 2:
        return None
    if groups == "row":
        return tuple(range(1, t.dim()))
    return (0, *range(2, t.dim()))


def group_size(t: Tensor, groups: str) -> int:
    """Number of elements in each group of ``t`` (0 for a tensor with no elements)."""
    dims = group_dims(t, groups)
    if dims is None:
        return t.numel()
    return math.prod(t.shape[d] for d in dims)


# torch's C++ grouping of tensor lists by (device, dtype), as its foreach optimizers use; None where absent.
_GROUP_BY_DEVICE_DTYPE = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)


def fast_grouping(tensors: list[Tensor]) -> list[list[int]] | None:
    """:func:`by_device_dtype` by torch's C++ grouping, or None while tracing or for tensor subclasses (DTensor…)."""
    if torch.compiler.is_compiling() or _GROUP_BY_DEVICE_DTYPE is None or not set(map(type, tensors)) <= PLAIN_TYPES:
        return None
    return sorted((idx for _, idx in _GROUP_BY_DEVICE_DTYPE([tensors], True).values()), key=itemgetter(0))


def by_device_dtype(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), groups in order of first appearance: one op call each."""
    fast = fast_grouping(tensors) if tensors else None
    if fast is not None:
        return fast
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())
