"""Which backend serves a call, and why the others do not.

Every backend implements each op of :mod:`regfast._schema` under its name, with its schema's
arguments, for one (device, dtype) group of tensors:

- ``torch``: :mod:`regfast.reference`, pure PyTorch, any device;
- ``cpp``: the compiled extension's CPU kernels (``torch.ops.regfast_C``), CPU tensors;
- ``cuda``: the compiled extension's CUDA kernels (``torch.ops.regfast_C``), CUDA tensors;
- ``triton``: :mod:`regfast.triton`, CUDA tensors, or CPU tensors when Triton runs in its
  interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).

``REGFAST_BACKEND`` (``auto`` by default) forces a backend on the devices it runs on; it is an
error if that backend is unavailable there. On other devices, and under ``auto``, the first
available backend of :data:`AUTO_ORDER` serves.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
ENV = "REGFAST_BACKEND"

_modules: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}
_MODULE_NAMES = {"torch": "regfast.reference", "cpp": "regfast._ext", "cuda": "regfast._ext",
                 "triton": "regfast.triton"}


def _load(name: str) -> ModuleType | None:
    """Import a backend's module once; remember why it failed."""
    module_name = _MODULE_NAMES[name]
    if module_name in _modules:
        return _modules[module_name]
    if module_name in _load_errors:
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure to import makes the backend unavailable, with its reason
        _load_errors[module_name] = f"{type(exc).__name__}: {exc}"
        return None
    _modules[module_name] = module
    return module


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _serves(name: str, device_type: str) -> bool:
    """Whether backend ``name`` is meant to run on ``device_type`` at all."""
    if name == "torch":
        return True
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    return device_type == {"cpp": "cpu", "cuda": "cuda"}[name]


def unavailable_reason(name: str, device_type: str) -> str | None:
    """``None`` if backend ``name`` can serve ``device_type`` tensors, else why not."""
    if not _serves(name, device_type):
        if name == "triton" and device_type == "cpu":
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1 set before import)"
        return f"does not run on {device_type} tensors"
    module = _load(name)
    if module is None:
        return _load_errors[_MODULE_NAMES[name]]
    if name in ("cpp", "cuda"):
        return module.unavailable_reason(device_type)
    if name == "triton":
        return module.unavailable_reason()
    return None


def requested() -> str:
    """The backend named by ``REGFAST_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{ENV}={name!r} is not a backend; expected one of auto, {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Set ``REGFAST_BACKEND=name`` inside the block (None: leave it as it is); restored on exit."""
    old = os.environ.get(ENV)
    if name is not None:
        os.environ[ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


# The backends serving each device type, by (REGFAST_BACKEND, TRITON_INTERPRET): a backend's availability is
# fixed once its module is imported, and only these variables change which one serves. Every regfast call asks.
_selected: dict[tuple[str | None, str | None], dict[str, str]] = {}


def _serving() -> dict[str, str]:
    key = (os.environ.get(ENV), os.environ.get("TRITON_INTERPRET"))
    serving = _selected.get(key)
    if serving is None:
        serving = _selected[key] = {}
    return serving


def _served(serving: dict[str, str], device_type: str) -> str:
    name = serving.get(device_type)
    if name is None:
        name = serving[device_type] = _select_name(device_type)
    return name


def select_name(device: torch.device) -> str:
    """The name of the backend that serves tensors on ``device``."""
    return _served(_serving(), device.type)


def cpu_cuda_names() -> tuple[str, str]:
    """``select_name`` of the CPU and of CUDA devices (the environment read once)."""
    serving = _serving()
    return _served(serving, "cpu"), _served(serving, "cuda")


def _select_name(device_type: str) -> str:
    forced = requested()
    if forced != "auto" and _serves(forced, device_type):
        reason = unavailable_reason(forced, device_type)
        if reason is not None:
            raise RuntimeError(f"{ENV}={forced} but the {forced} backend cannot serve {device_type} tensors: {reason}")
        return forced
    for name in AUTO_ORDER.get(device_type, ("torch",)):
        if unavailable_reason(name, device_type) is None:
            return name
    return "torch"


def select(device: torch.device):
    """The backend that serves tensors on ``device``: an object with one function per op."""
    name = select_name(device)
    module = _load(name)
    assert module is not None
    return module.OPS if name in ("cpp", "cuda") else module


@dataclass
class BackendInfo:
    """Which backend serves ``device`` (``selected``) and, for each other backend, why not."""

    device: str
    selected: str
    requested: str
    reasons: dict[str, str] = field(default_factory=dict)
    kernels: str = ""  # the selected backend's variant, e.g. the CPU kernels' instruction set

    def __str__(self) -> str:
        lines = [f"{self.device}: {self.selected}" + (f" ({self.kernels})" if self.kernels else "")
                 + (f" (REGFAST_BACKEND={self.requested})" if self.requested != "auto" else "")]
        for name, reason in self.reasons.items():
            lines.append(f"  {name}: {reason}")
        return "\n".join(lines)


def backend(device: torch.device | str | None = None) -> BackendInfo:
    """Which backend serves ``device`` (default: CUDA when available, else CPU), and why the others do not.

    Raises like any regfast call would when ``REGFAST_BACKEND`` names a backend that is unavailable.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    selected = select_name(device)
    reasons: dict[str, str] = {}
    for name in BACKENDS:
        if name == selected:
            continue
        reason = unavailable_reason(name, device.type)
        if reason is None:
            order = AUTO_ORDER.get(device.type, ("torch",))
            reason = ("available; not chosen" if requested() != "auto" or name not in order
                      else f"available; {selected} comes first")
        reasons[name] = reason
    kernels = ""
    if selected == "cpp" and device.type == "cpu":
        from regfast import _ext

        try:
            kernels = f"{_ext._C.cpu_isa()} kernels"
        except ValueError as exc:  # REGFAST_CPU_ISA names no instruction set this CPU runs
            kernels = str(exc)
    return BackendInfo(str(device), selected, requested(), reasons, kernels)
