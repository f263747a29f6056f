"""The ``triton`` backend: every regfast op as one multi-tensor Triton launch per (device, dtype) group.

Serves CUDA tensors, and CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1``
set before this package is imported: Triton decides at kernel definition whether a kernel is
compiled or interpreted). Importing this package never fails; :func:`unavailable_reason` says
why the backend cannot serve when Triton is missing or was set up for the other mode.

Functions (the contract of :mod:`regfast._schema`, as in :mod:`regfast.reference`): :func:`norms`,
:func:`penalty`, :func:`penalty_backward`, :func:`add_penalty_grad_`, :func:`prox_`, and the fused
optimizer steps :func:`sgd_step_`, :func:`adamw_step_`.
"""

from __future__ import annotations

import os

import torch

__all__ = ["add_penalty_grad_", "adamw_step_", "norms", "penalty", "penalty_backward", "prox_", "prox_step_",
           "sgd_step_", "unavailable_reason"]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETED = _interpret_requested()

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # any import failure (missing package, broken install) disables the backend
    _IMPORT_ERROR: str | None = f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None
    from .norms import norms
    from .optim import adamw_step_, sgd_step_
    from .penalty import add_penalty_grad_, penalty, penalty_backward
    from .prox import prox_, prox_step_


def unavailable_reason() -> str | None:
    """``None`` if this backend can run its kernels now, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if _interpret_requested() != _INTERPRETED:
        state = "interpreted" if _INTERPRETED else "compiled"
        return (f"regfast.triton was imported with its kernels {state}, but TRITON_INTERPRET has changed since; "
                "set it before the first regfast call")
    if not _INTERPRETED and not torch.cuda.is_available():
        return "no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1 before import runs it on CPU)"
    return None
