"""What the proximal optimizers share: hyperparameter checks, per-group regularization, the fused base class."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from itertools import chain, repeat
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import _dispatch, _ext, _ops
from .._common import acc_dtype, by_device_dtype, capturing, fast_grouping, refuse_host_lr
from .._validate import matching, regularization, strided

_GRAD = attrgetter("grad")

REGULARIZATION_KEYS = ("l1", "l2", "group_lasso", "groups")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0 (a tensor counts by its value)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} is not a number")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"Invalid {name}: {value} (must be finite and >= 0)")


def check_regularization(group: dict[str, Any]) -> None:
    """The regularization keys of a param group, checked as the functions check them (TypeError, ValueError)
    and stored back as floats (a NumPy scalar becomes a float)."""
    group.update(zip(REGULARIZATION_KEYS, regularization(group["l1"], group["l2"], group["group_lasso"],
                                                         group["groups"])))


def split_lr(lr: float | Tensor) -> tuple[Tensor | None, float]:
    """``(tensor, 0.0)`` for a tensor lr, ``(None, lr)`` for a number: the two lr arguments of the ops."""
    if isinstance(lr, Tensor):
        return lr.detach().reshape(()), 0.0
    return None, float(lr)


def total(values: list[Tensor]) -> Tensor:
    """The sum of 0-dim tensors on the first one's device, float64 if any is float64."""
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    out = values[0].to(dtype)
    for v in values[1:]:
        out = out + v.to(out.device, dtype)
    return out


def with_grads(group: dict[str, Any]) -> tuple[list[Tensor], list[list[int]]]:
    """The params of ``group`` that have a gradient, checked to be dense and to match their param,
    and their indices grouped by (device, dtype) as :func:`by_device_dtype` groups them."""
    params = group["params"]
    if torch.compiler.is_compiling():
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
    else:
        grads = list(map(_GRAD, params))
        if any(map(is_, grads, repeat(None))):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            return [], []
        if strided(grads) and (grouping := fast_grouping(params)) is not None and matching(params, grads, grouping):
            return params, grouping
    for p, g in zip(params, grads):
        if g.layout != torch.strided:
            raise RuntimeError("sparse gradients are not supported by the proximal step")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"a gradient ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match "
                             f"its param ({tuple(p.shape)}, {p.dtype}, {p.device})")
    return params, by_device_dtype(params)


def _flat_of(tensors: list[Tensor], dtype: torch.dtype) -> Tensor | None:
    """The flat buffer whose consecutive views ``tensors`` are, or None."""
    base = tensors[0]._base
    if base is None or base.dtype != dtype or base.dim() != 1 or base.storage_offset() != 0:
        return None
    offset = 0
    for t in tensors:
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return base if offset == base.numel() else None


def _flat_states(params: list[Tensor], states: list[dict[str, Any]], keys: tuple[str | None, ...],
                 devices: set[str]) -> list[tuple[Tensor, ...]] | None:
    """Per state key (``()`` for None), the flat buffers of the params' states, one per (device, dtype) group in
    order of first appearance; each state becomes a view of its buffer (``"step"``: one float32 count per param).
    None, with nothing changed, unless every param is a plain contiguous tensor on a device of type in ``devices``
    (no repeats) and every state a tensor of the accumulation dtype on its param's device (float32 counts, all of a
    group on its device or all on the CPU), and no CUDA graph is being captured (the step before the flattening
    would have captured the states' old memory)."""
    if not _flat_params(params, devices):
        return None
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for key in filter(None, keys):
        for p, state in zip(params, states):
            t = state.get(key)
            want = torch.float32 if key == "step" else acc_dtype(p.dtype)
            if not isinstance(t, Tensor) or t.dtype != want or \
                    not (t.device == p.device or (key == "step" and t.device.type == "cpu")) or \
                    (t.numel() != 1 if key == "step" else t.shape != p.shape):
                return None
        if key == "step" and any(len({states[i][key].device for i in idx}) != 1 for idx in buckets.values()):
            return None
    out = []
    for key in keys:
        if key is None:
            out.append(())
            continue
        out.append(tuple(_flatten(states, idx, key, torch.float32 if key == "step" else acc_dtype(dtype))
                         for (_, dtype), idx in buckets.items()))
    return out


def _flat_params(params: list[Tensor], devices: set[str]) -> bool:
    """Whether a plan may keep the states of ``params`` flat: the extension is loaded, nothing is traced or captured
    into a CUDA graph, and the params are distinct plain contiguous tensors on devices of type in ``devices``."""
    return not (torch.compiler.is_compiling() or _ext._C is None or capturing() or
                len({id(p) for p in params}) != len(params)) and \
        all(type(p) in _ops.PLAIN_TYPES and p.device.type in devices and p.is_contiguous() for p in params)


def _flat_devices() -> tuple[set[str], set[str]]:
    """The device types whose plans keep flat states: those the extension steps from a flat plan (the CPU, under
    ``cpp``), and those a backend that launches from Python (Triton) serves."""
    on_cpu, on_cuda = _dispatch.cpu_cuda_names()
    launched = {kind for kind, backend in (("cpu", on_cpu), ("cuda", on_cuda)) if backend == "triton"}
    return ({"cpu"} if on_cpu == "cpp" else set()), launched


def _flatten(states: list[dict[str, Any]], idx: list[int], key: str, dtype: torch.dtype) -> Tensor:
    """The flat buffer (of ``dtype``) whose consecutive views ``states[i][key]`` for i in ``idx`` are, made (the
    states becoming views of it, with the same values) unless they already are."""
    tensors = [states[i][key] for i in idx]
    flat = _flat_of(tensors, dtype)
    if flat is None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        offset = 0
        for i, t in zip(idx, tensors):
            states[i][key] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
    return flat


def views_of_one_buffer(shapes: list[torch.Size], dtype: torch.dtype, device: torch.device,
                        zero: bool = True) -> list[Tensor]:
    """New tensors of ``shapes``, consecutive views of one new buffer (zeros, or uninitialized), laid out as
    :func:`_flatten` lays out a group's states: a plan then finds them flat and moves nothing."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = (torch.zeros if zero else torch.empty)(sum(sizes), dtype=dtype, device=device)
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[offset:offset + size].view(shape))
        offset += size
    return out


def _flat_counts(params: list[Tensor], states: list[dict[str, Any]]) -> None:
    """Where every step count is a one-element float32 CPU tensor (AdamW's counts, kept on the host for params on
    any device), make the counts of each (device, dtype) group of params views of one buffer, in order: a backend
    that launches from Python then counts a group's steps with one add (see regfast.triton.optim)."""
    if torch.compiler.is_compiling() or len({id(p) for p in params}) != len(params):
        return
    steps = [state.get("step") for state in states]
    if not all(isinstance(t, Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() == 1
               for t in steps):
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for idx in buckets.values():
        _flatten(states, idx, "step", torch.float32)


def profile_hook_step(func):
    """The wrapper torch puts around each optimizer class's ``step`` (``Optimizer.profile_hook_step``, which the
    optimizers of regfast take from here): the global and the optimizer's step pre hooks, the step, the profiler's
    entry point, the post hooks. The step's profiler label (a ``record_function``) is entered only while a profiler
    records (and under ``torch.compile``, which traces torch's own form): elsewhere it records nothing, and it costs
    about as much as the whole host path of a small model's step."""

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _hooked_step(func, self, args, kwargs)
        return _hooked_step(func, self, args, kwargs)

    return wrapper


def _hooked_step(func, self, args, kwargs):
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    out = func(self, *args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class FusedProximalOptimizer(Optimizer):
    """Base of the optimizers whose step ends with the proximal step in the same pass.

    Subclasses define ``_check_group`` (their own hyperparameters) and ``_step_group`` (one
    param group; returns the per-(device, dtype) penalty values). State tensors are kept in
    the accumulation dtype (float32, float64 for float64 params) also across
    ``load_state_dict``, which would otherwise cast them to the param dtype.
    """

    profile_hook_step = staticmethod(profile_hook_step)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 compute_penalty: bool) -> None:
        self.compute_penalty = bool(compute_penalty)
        self.last_penalty: Tensor | None = None
        self._plans: dict[int, tuple] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (a dict with ``params`` and any hyperparameter to override); it is validated first."""
        super().add_param_group(param_group)
        self.__dict__.setdefault("_plans", {}).clear()
        self.__dict__.setdefault("_checked", {}).clear()
        try:
            check_regularization(self.param_groups[-1])
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_groups(self) -> None:
        """Every param group's hyperparameters checked as the constructor checks them (TypeError, ValueError)
        before any group steps, so that a value put into a group since (a schedule of ``l1``, a typo in
        ``groups``) is refused with nothing written. A group whose values are the very objects checked at its
        last step is not checked again. Not while a graph is traced (the values are then symbols, whose checks
        would be data-dependent guards)."""
        if torch.compiler.is_compiling():
            return
        checked = self.__dict__.setdefault("_checked", {})
        for group in self.param_groups:
            last = checked.get(id(group))
            if last is not None and last[0] is group and len(last[1]) == len(group) and \
                    all(map(is_, last[1], group.values())):
                continue
            check_regularization(group)
            self._check_group(group)
            checked[id(group)] = (group, tuple(group.values()))

    def _step_group(self, group: dict[str, Any]) -> list[Tensor]:
        raise NotImplementedError

    def _check_capture(self, group: dict[str, Any]) -> None:
        """Inside a CUDA graph capture: raise RuntimeError where ``group`` would freeze a host value of this
        step into the graph, which every replay would then reuse. An lr held by a CPU tensor is read on the
        host at capture; subclasses add their own host state."""
        refuse_host_lr(group["lr"], f"{type(self).__name__}: ")

    def _walk(self, group: dict[str, Any], *hyper) -> list[Tensor] | None:
        """The step of ``group`` in one C++ walk (:func:`regfast._ops.walk`) from its plan, or None (no plan,
        or the walk declines: a param without a grad, a param or state that no longer fits the plan…); None while
        a graph is traced, which steps through the ops (torch before 2.13 cannot trace the plans' ``id`` keys)."""
        if torch.compiler.is_compiling():
            return None
        plan = self._plans.get(id(group))
        if plan is None or plan[0] is not self.state or plan[1] != len(self.state):
            return None
        return _ops.walk(plan[2], group["params"], *plan[3], *hyper)

    def _keep_plan(self, group: dict[str, Any], updated: list[Tensor], name: str, keys: tuple[str | None, ...],
                   flat: bool, launched: bool) -> None:
        """After a step that updated every param of ``group`` (``updated``), remember the group's params and state
        tensors (``keys``: the state keys in the order of the walk ``name``; None for an unused state) for the
        next steps' walks. A plan lives until :meth:`add_param_group` or :meth:`load_state_dict`, or until
        ``state`` changes size; state tensors assigned by hand into ``state`` need :meth:`load_state_dict`.

        When every param is a plain contiguous tensor on the CPU served by the extension and ``flat``, or on devices
        served by a backend that launches from Python (Triton) and ``launched`` (the group's hyperparameters allow
        it), the states of each (device, dtype) are moved into one flat buffer per state, ``state[p][key]`` becoming
        views of it with the same values: the walk then reads the buffers, not each state tensor (the Triton backend
        gets the views' addresses from the walk). Nothing while a graph is traced (its steps take no walk)."""
        if torch.compiler.is_compiling():
            return
        if len(updated) != len(group["params"]):
            self._plans.pop(id(group), None)
            return
        states = [self.state[p] for p in updated]
        for devices, suffix, allowed in zip(_flat_devices(), ("_flat", "_launch"), (flat, launched)):
            buffers = _flat_states(updated, states, keys, devices) if allowed and devices else None
            if buffers is not None:
                numels = torch.tensor([p.numel() for p in updated], dtype=torch.int64)
                if suffix == "_flat":
                    args = (tuple(updated), numels, *buffers)
                else:  # the walk hands the backend each state's views, from the plan
                    args = (tuple(updated), numels, tuple(buffers),
                            tuple(tuple(s[key] for s in states) if key else () for key in keys))
                self._plans[id(group)] = (self.state, len(self.state), name.replace("_step", suffix), args)
                return
        if "step" in keys:
            _flat_counts(updated, states)
        args = (tuple(updated), *(tuple(s[key] for s in states) if key else () for key in keys))
        self._plans[id(group)] = (self.state, len(self.state), name, args)

    def _fresh_states_flat(self, group: dict[str, Any], params: list[Tensor], flat: bool, launched: bool) -> bool:
        """Whether this step makes the states of every param of ``group`` (each with a grad, none with a state yet)
        and its plan will keep them in flat buffers: they are then made as views of them (views_of_one_buffer), so
        that the first step already runs on the memory every later step runs on (which a CUDA graph captured after
        it replays)."""
        if not (flat or launched) or len(params) != len(group["params"]) or any(map(self.state.get, params)):
            return False
        return any(allowed and devices and _flat_params(params, devices)
                   for devices, allowed in zip(_flat_devices(), (flat, launched)))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "compute_penalty": self.compute_penalty, "last_penalty": self.last_penalty}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compute_penalty", False)
        self.__dict__.setdefault("last_penalty", None)
        self._plans = {}
        self._checked = {}
        for group in self.param_groups:
            for key in REGULARIZATION_KEYS:
                group.setdefault(key, self.defaults[key])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one saved without the regularization keys, which get the defaults).

        Floating state tensors are restored in the accumulation dtype from the saved values, so a
        bfloat16 / float16 model resumes bitwise.
        """
        for group in state_dict["param_groups"]:  # checked before anything is loaded
            merged = {**self.defaults, **group}
            check_regularization(merged)
            self._check_group(merged)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        self._plans.clear()
        self.__dict__.setdefault("_checked", {}).clear()
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            state = self.state[p]
            for key, value in saved_state[saved_id].items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    state[key] = value.to(p.device, acc_dtype(p.dtype), copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every param with a gradient; params whose ``grad`` is None are skipped and get no state.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with grad
        enabled before the update. Returns its loss (or None). Sets :attr:`last_penalty`.
        """
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if capturing():
            for group in self.param_groups:  # all before any step
                self._check_capture(group)
        values: list[Tensor] = []
        for group in self.param_groups:
            values.extend(self._step_group(group))
        if self.compute_penalty:
            self.last_penalty = total(values) if values else torch.zeros(())
        return loss
