"""The compiled extension ``regfast._C``: the ``cpp`` backend on CPU tensors, ``cuda`` on CUDA tensors.

Importing this module never fails: when ``regfast._C`` is missing (a pure-Python install,
``REGFAST_NO_EXT=1``, a failed build) or was built for another torch (it is then not loaded: its
symbols would not resolve), :func:`unavailable_reason` says why, from what the build recorded in
``regfast._build_info``.

The extension's kernels implement the ``regfast_C`` ops, which :func:`define_ops` defines with the
schemas of the ``regfast`` ops (:mod:`regfast._schema`); the backend is ``torch.ops.regfast_C``
itself (:data:`OPS`), whose dispatcher picks the CPU or CUDA kernel from the tensors' device. The
kernels take tensors of any layout (non-contiguous ones are processed through contiguous copies,
written back when mutated).
"""

from __future__ import annotations

import torch

REBUILD = "pip install --no-build-isolation -e . (or pip install --no-build-isolation regfast)"


def _load_extension():
    """``(regfast._C or None, why it is not loaded)``."""
    try:
        from . import _build_info
    except ImportError:  # no build step ran (a source tree on sys.path)
        _build_info = None
    if _build_info is not None:
        if _build_info.NOT_BUILT:
            return None, _build_info.NOT_BUILT
        built = _build_info.TORCH_VERSION
        if built != torch.__version__:
            return None, (f"regfast._C was built for torch {built}, running torch {torch.__version__}: "
                          f"rebuild with {REBUILD}")
    try:
        from . import _C
    except ImportError as exc:  # the extension is optional
        return None, f"regfast._C is not importable ({exc}): rebuild with {REBUILD}"
    return _C, ""


_C, _IMPORT_ERROR = _load_extension()

# The backend: the regfast_C ops, one per regfast op (defined by define_ops).
OPS = torch.ops.regfast_C
_LIBRARY: list[torch.library.Library] = []


def define_ops(schemas: dict[str, str]) -> None:
    """Define ``regfast_C::<name>`` with each schema of ``schemas``, once, when the extension is loaded.

    The kernels registered themselves (``TORCH_LIBRARY_IMPL``) when ``regfast._C`` was imported;
    the dispatcher checks here that each kernel's C++ signature matches its schema."""
    if _C is None or _LIBRARY:
        return
    library = torch.library.Library("regfast_C", "DEF")
    for name, schema in schemas.items():
        library.define(name + schema)
    _LIBRARY.append(library)


def unavailable_reason(device_type: str) -> str | None:
    """``None`` if the extension has kernels for ``device_type`` tensors, else why not."""
    if _C is None:
        return _IMPORT_ERROR
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _C.WITH_CUDA:
            return None
        return ("regfast._C was built without CUDA kernels (torch without CUDA or no CUDA toolkit at build "
                "time; REGFAST_BUILD_CUDA=1 forces them)")
    return f"regfast._C has no {device_type} kernels"
