"""The compiled extension ``regfast._C`` as a backend: ``cpp`` on CPU tensors, ``cuda`` on CUDA tensors.

Importing this module never fails: when ``regfast._C`` is missing (a pure-Python install,
``REGFAST_NO_EXT=1``, no compiler at install time) :func:`unavailable_reason` says why.
"""

from __future__ import annotations

try:
    from . import _C
except ImportError as exc:  # the extension is optional
    _C = None
    _IMPORT_ERROR = (f"regfast._C is not built ({exc}); reinstall with a C++ compiler present: "
                     "pip install --no-build-isolation -e .")
else:
    _IMPORT_ERROR = ""


def unavailable_reason(device_type: str) -> str | None:
    """``None`` if the extension has kernels for ``device_type`` tensors, else why not."""
    if _C is None:
        return _IMPORT_ERROR
    return f"regfast._C has no {device_type} kernels (built without them)"
