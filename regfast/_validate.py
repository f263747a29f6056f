"""The checks of regularization hyperparameters, shared by the functions, the optimizers, their param groups
and loaded state dicts: the same values accepted, the same error types and messages everywhere."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._common import GROUPINGS


def coefficient(name: str, value: Any) -> float:
    """``value`` as a float: a real number of any numeric type (NumPy scalars included), finite and >= 0.

    TypeError for anything that is not a real number (a bool, a tensor: pass ``float(t)``), ValueError
    for a negative, NaN, infinite or too large one.
    """
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
