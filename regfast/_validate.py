"""The checks every public entry point shares: regularization hyperparameters (the functions, the optimizers,
their param groups and loaded state dicts) and tensor lists (params, grads), with the same values accepted
and the same error types and messages everywhere. Each check runs before anything is written."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from ._common import GROUPINGS, fast_grouping

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = set(FLOAT_DTYPES)
_LAYOUT, _DTYPE = attrgetter("layout"), attrgetter("dtype")


def _eager() -> bool:
    """True outside tracing: the checks may then take the vectorized route (same results, fewer Python steps)."""
    return not torch.compiler.is_compiling()


def strided(tensors: list[Tensor]) -> bool:
    """Whether every tensor of ``tensors`` is dense (strided): the fast route of the checks below."""
    return set(map(_LAYOUT, tensors)) <= {torch.strided}


def coefficient(name: str, value: Any) -> float:
    """``value`` as a float: a real number of any numeric type (NumPy scalars included), finite and >= 0.

    TypeError for anything that is not a real number (a bool, a tensor: pass ``float(t)``), ValueError
    for a negative, NaN, infinite or too large one.
    """
    if type(value) is float and 0.0 <= value < math.inf:  # the common case, without the numbers.Real check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a tensor (pass a float)" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a number, not {kind}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not 0.0 <= number < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return number


def grouping(value: Any) -> str:
    """``value`` if it names a grouping (``"row"``, ``"col"``, ``"tensor"``), else ValueError."""
    if not isinstance(value, str) or value not in GROUPINGS:
        raise ValueError(f"groups must be one of {', '.join(map(repr, GROUPINGS))}, got {value!r}")
    return value


def regularization(l1: Any, l2: Any, group_lasso: Any, groups: Any) -> tuple[float, float, float, str]:
    """The four regularization hyperparameters, checked: (l1, l2, group_lasso, groups)."""
    return (coefficient("l1", l1), coefficient("l2", l2), coefficient("group_lasso", group_lasso),
            grouping(groups))


def tensors(tensors: list[Tensor], names: Sequence[str], suffix: str = "") -> None:
    """Each tensor is dense (strided) and of a floating dtype regfast takes; TypeError naming the first that is not."""
    if _eager() and set(map(_LAYOUT, tensors)) <= {torch.strided} and set(map(_DTYPE, tensors)) <= _FLOAT_SET:
        return
    for i, t in enumerate(tensors):
        tensor(names[i] + suffix, t)


def tensor(name: str, t: Tensor) -> None:
    """``t`` (called ``name`` in messages) is dense (strided) and of a floating dtype regfast takes."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; regfast needs dense (strided) tensors")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; regfast needs float16, bfloat16, float32 or float64")


def writable(tensors: list[Tensor], names: Sequence[str], suffix: str = "") -> None:
    """In-place updates need every element stored once (refuse views such as ``expand()``), and an inference
    tensor only inside inference mode (as torch's own in-place ops)."""
    if _eager() and not torch.is_inference_mode_enabled() and any(map(Tensor.is_inference, tensors)):
        i = next(i for i, t in enumerate(tensors) if t.is_inference())
        raise RuntimeError(f"{names[i]}{suffix} is an inference tensor: it can be updated in place only inside "
                           "torch.inference_mode()")
    if _eager() and all(map(Tensor.is_contiguous, tensors)):
        return
    for i, t in enumerate(tensors):
        if not t.is_contiguous() and not _stored_once(t):
            raise ValueError(f"{names[i]}{suffix} (shape {tuple(t.shape)}, stride {t.stride()}) overlaps itself in "
                             f"memory (made by expand() or as_strided()?); it cannot be updated in place")


def _stored_once(t: Tensor) -> bool:
    """Whether no two elements of ``t`` share memory: with its dims sorted by stride, each stride must step
    past everything the smaller ones reach (as every view made by slicing, permuting or narrowing does)."""
    reach = 0  # the largest offset the dims of smaller stride reach
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def matching(params: list[Tensor], others: list[Tensor], grouping: list[list[int]]) -> bool:
    """True if each ``others[i]`` has ``params[i]``'s shape, dtype and device (``grouping``: ``params``' fast grouping).

    Vectorized: element counts, dims and (device, dtype) groups of all, shapes only where dims ≥ 2
    (equal counts and dims < 2 mean equal shapes).
    """
    if list(map(Tensor.numel, others)) != list(map(Tensor.numel, params)):
        return False
    dims = list(map(Tensor.dim, params))
    return (list(map(Tensor.dim, others)) == dims and fast_grouping(others) == grouping
            and all(others[i].shape == params[i].shape for i, d in enumerate(dims) if d > 1))


def grads(params: list[Tensor], grads: list[Tensor], names: Sequence[str],
                 grouping: list[list[int]] | None) -> None:
    """Each ``grads[i]`` is a dense tensor of ``params[i]``'s shape, (float) dtype and device, stored once.

    ``grouping`` is ``fast_grouping(params)``, or None to compare tensor by tensor.
    """
    if not strided(grads):
        tensors(grads, names, ".grad")
    writable(grads, names, ".grad")
    if grouping is not None and matching(params, grads, grouping):
        return
    tensors(grads, names, ".grad")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"{names[i]}.grad ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match "
                             f"{names[i]} ({tuple(p.shape)}, {p.dtype}, {p.device})")
