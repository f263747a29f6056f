"""Every regfast operation as a ``torch.library`` custom op in the ``regfast`` namespace: the op layer.

Each op serves one (device, dtype) group: a non-empty list of tensors sharing a device and a
floating dtype (:mod:`regfast.api` and :mod:`regfast.optim` group, validate and sum). Its schema is
the one of :mod:`regfast._schema`; it has a fake implementation for tracing, and ``penalty`` /
``penalty_backward`` register their autograd formulas. The real implementation asks
:mod:`regfast._dispatch` which backend serves the group's device and calls that backend's function
of the same name with the same arguments: every backend implements the whole contract.

:func:`call` is how the layers above call an op: straight to the backend in eager mode when
nothing could observe the difference (:func:`direct_backend`), through the custom op otherwise.
"""

from __future__ import annotations

from operator import attrgetter
from types import ModuleType

import torch
from torch import Tensor

from . import _dispatch, _ext
from ._common import HOST, PLAIN_TYPES, READ_LISTS, ByAddress, Walked, acc_dtype
from ._schema import SCHEMAS, mutated
from .reference import penalty_differentiable, penalty_hvp

_REQUIRES_GRAD = attrgetter("requires_grad")


def _missing() -> bool:
    return True  # a torch without one of the checks below: take the custom op every time


# Each is true while something could observe a direct call: a torch dispatch mode, a torch function
# mode, a functorch transform.
_ACTIVE_MODE_CHECKS = tuple(getattr(torch._C, name, _missing) for name in (
    "_len_torch_dispatch_stack", "_is_torch_function_mode_enabled", "_are_functorch_transforms_active"))


def walk(name: str, params, *args):
    """Public call ``name`` (``"norms"``, ``"penalty"``, ``"add_penalty_grad"``, ``"prox"``; ``"sgd_step"``,
    ``"adamw_step"`` from an optimizer's plan) on the list ``params`` in one C++ walk (:mod:`regfast._C`'s host
    path: checks, repeats, grouping, kernels, version counters; ``penalty``'s autograd node), or None when the walk
    does not take it: no extension, tracing, a mode or transform active, a device the ``torch`` backend serves, or
    any tensor it cannot prove valid. On None nothing was written; the caller's Python path runs. Where a device's
    backend launches from Python (Triton), the walk checks and groups the list (and an optimizer step's states), and
    each group's kernels are launched here (:func:`_run_groups`, :func:`_run_steps`) on
    :class:`~regfast._common.Walked` lists (a flat plan's states and grads as :class:`~regfast._common.ByAddress`
    where the launch reads only their addresses): the data pointers, numels and contiguity the walk read, so that
    the launcher makes no Python call per tensor."""
    if _ext._C is None or torch.compiler.is_compiling() or any(check() for check in _ACTIVE_MODE_CHECKS):
        return None
    on_cpu, on_cuda = _dispatch.cpu_cuda_names()
    if name in _FLAT_LAUNCHES:
        step, counts = _FLAT_LAUNCHES[name]
        planned, numels, flats, tuples, *hyper = args
        states, grads = _by_address(step, hyper)
        groups = _ext._C.plan_groups_flat_walk(params, _PLAIN_TUPLE, on_cpu == "triton", on_cuda == "triton", planned,
                                               numels, flats, tuples, counts, Walked, ByAddress if states else None,
                                               grads, _group_lasso(step, hyper))
        # With the states by their addresses the walk bumped the params and the states' buffers itself.
        return None if groups is None else _run_steps(step, groups, *hyper, bumped=states)
    cpu, cuda = on_cpu == "cpp", on_cuda == "cuda"
    launched = "triton" in (on_cpu, on_cuda) and (name in _WALK_NEEDS or name in _STEP_STATES)
    if cpu or cuda:
        walked = getattr(_ext._C, f"{name}_walk")(params, _PLAIN_TUPLE, cpu, cuda, *args)
        if walked is not None or not launched:
            return walked
    elif not launched:
        return None
    if name in _STEP_STATES:
        planned, *rest = args
        count, counts = _STEP_STATES[name]
        groups = _ext._C.plan_groups_walk(params, _PLAIN_TUPLE, on_cpu != "torch", on_cuda != "torch", planned,
                                          tuple(rest[:count]), counts, Walked, _group_lasso(name, rest[count:]))
        return None if groups is None else _run_steps(name, groups, *rest[count:])
    grads, write = _WALK_NEEDS[name]
    # Every group the walk may take launches from Python (no group goes to the extension, which takes tensor lists):
    # the walk bumps what the call writes itself, and hands add_penalty_grad_'s grads by their addresses alone.
    bumped = (grads or write) and {on_cpu, on_cuda} <= {"triton", "torch"}
    groups = _ext._C.groups_walk(params, _PLAIN_TUPLE, on_cpu != "torch", on_cuda != "torch", grads, write, Walked,
                                 _group_lasso(name, args), ByAddress if bumped else None)
    return None if groups is None else _run_groups(name, groups, *args, bumped=bumped)


def _group_lasso(name: str, args) -> bool:
    """Whether public call or optimizer step ``name`` with ``args`` (an optimizer step's hyperparameters after its
    states) has group lasso: only then does a launcher read the params' dims (``Walked.dims``), which the walk then
    lists."""
    index = _GROUP_LASSO_ARG.get(name)
    return index is not None and bool(args[index])


# Where each call's and step's group-lasso coefficient lies among its arguments (norms has none).
_GROUP_LASSO_ARG = {"add_penalty_grad": 2, "prox": 4, "sgd_step": 9, "adamw_step": 10}


# Per optimizer step walked from a plan: (how many state tuples follow the planned params, the index of the step
# counts among them or -1).
_STEP_STATES = {"sgd_step": (1, -1), "adamw_step": (4, 3)}


def _by_address(step: str, hyper: list) -> tuple[bool, bool]:
    """Whether the Triton step ``step`` with ``hyper`` reads a flat plan's states, and its grads, only through their
    addresses (and the counts' buffer), so that the walk may hand them as :class:`~regfast._common.ByAddress`. The
    states: always for SGD; for AdamW unless an lr tensor or group lasso in Adam's metric makes it read them one by
    one. The grads: where the states are, without group lasso (whose step reads 16-bit grads one by one into copies)."""
    group_lasso = _group_lasso(step, hyper)
    if step == "sgd_step":
        return True, not group_lasso
    lr_tensor, prox = hyper[0], hyper[12]
    states = lr_tensor is None and not (group_lasso and prox == "preconditioned")
    return states, states and not group_lasso


# Per optimizer step walked from a flat plan for a backend that launches from Python: (the step, the index of the
# step counts among its states or -1). The plan holds the params, their numels, per state its flat buffers and the
# state tensors (views of them); params without a grad are skipped, as the Python path skips them.
_FLAT_LAUNCHES = {"sgd_launch": ("sgd_step", -1), "adamw_launch": ("adamw_step", 3)}


def _run_steps(name: str, groups: list[tuple], *hyper, bumped: bool = False) -> list[Tensor]:
    """Optimizer step ``name`` on the (params, grads, state lists) groups of :func:`walk`, each group on its backend
    as the Python path calls it (a plan's momentum buffers all exist), with the same version-counter bumps (made by
    the walk already where ``bumped``)."""
    values = []
    with torch.no_grad():
        for params, grads, states in groups:
            backend = _backend(params)
            if name == "sgd_step":
                lr_tensor, lr, momentum, dampening, weight_decay, nesterov, maximize, *rest = hyper
                values.append(backend.sgd_step_(params, grads, states[0], lr_tensor, lr, momentum, dampening, nesterov,
                                                weight_decay, maximize, False, *rest))
            else:
                values.append(backend.adamw_step_(params, grads, *states, *hyper))
            # A flat plan's states share their buffer's version counter: one bump marks them all.
            if not bumped:
                bump_versions(params, *(s[:1] if type(s) in READ_LISTS and s.shared else s for s in states if s))
    return values


# Per public call: (reads and writes the grads, writes the params).
_WALK_NEEDS = {"norms": (False, False), "add_penalty_grad": (True, False), "prox": (False, True)}


def _run_groups(name: str, groups: list[tuple], *args, bumped: bool = False):
    """Public call ``name`` on the (params, grads, index) groups of :func:`walk`, each group on its backend, with
    the results combined as the C++ walk combines them, and the version counters of what it wrote bumped (by the
    walk already where ``bumped``)."""
    first = groups[0][0][0]
    wide = any(group[0][0].dtype == torch.float64 for group in groups)
    dtype = torch.float64 if wide else torch.float32
    with torch.no_grad():
        if name == "norms":
            if len(groups) == 1:
                return _backend(groups[0][0]).norms(groups[0][0])
            count = sum(len(params) for params, _, _ in groups)
            per_l1 = torch.empty(count, device=first.device, dtype=dtype)
            per_l2sq = torch.empty_like(per_l1)
            for params, _, index in groups:
                a, b = _backend(params).norms(params)
                order = torch.tensor(index, device=first.device)
                per_l1.index_copy_(0, order, a.to(first.device, dtype))
                per_l2sq.index_copy_(0, order, b.to(first.device, dtype))
            return per_l1, per_l2sq
        if name == "add_penalty_grad":
            total = None
            for params, grads, _ in groups:
                value = _backend(params).add_penalty_grad_(params, grads, *args).to(first.device, dtype)
                total = value if total is None else total + value
            if not bumped:
                bump_versions(*(grads for _, grads, _ in groups))
            return total
        lr_tensor, *rest = args
        for params, _, _ in groups:
            _backend(params).prox_(params, lr_tensor, *rest)
        if not bumped:
            bump_versions(*(params for params, _, _ in groups))
        return True


def grads_ready(params) -> bool:
    """Whether every tensor of the list ``params`` is a plain dense floating tensor with a ``grad`` of its shape,
    dtype and device, in one C++ walk; False also when that walk is not available or a graph is being traced,
    which the walk would break (then check in Python)."""
    return _ext._C is not None and not torch.compiler.is_compiling() and \
        _ext._C.grads_ready(params, _PLAIN_TUPLE) is True


_PLAIN_TUPLE = tuple(PLAIN_TYPES)

if _ext._C is not None:  # for the backends that launch from Python, which import no other backend
    HOST.digest, HOST.bias_table = _ext._C.digest, _ext._C.host_bias_table


def _backend(params: list[Tensor]):
    return _dispatch.select(params[0].device)


def _version_bump_takes_lists() -> bool:
    try:
        torch._C._increment_version([torch.empty(0)])
    except TypeError:
        return False
    return True


_BUMP_LISTS = _version_bump_takes_lists()


def bump_versions(*tensor_lists: list[Tensor]) -> None:
    """Mark the tensors of ``tensor_lists`` as modified in place (autograd's version counters), as the op would:
    in one C++ call where the extension is loaded (it loads later tensors ahead), else torch's per list."""
    if _ext._C is not None:
        _ext._C.bump_versions(*tensor_lists)
        return
    for tensors in tensor_lists:
        if _BUMP_LISTS:
            torch._C._increment_version(tensors)
        else:
            for t in tensors:
                torch._C._increment_version(t)


def direct_backend(params: list[Tensor], *others: list[Tensor]) -> ModuleType | None:
    """The backend to call straight for one group in eager mode, or None to go through the custom op.

    For hundreds of small tensors the dispatcher's own Python steps (a version-counter bump per
    tensor among them) cost more than the kernels. A direct call gives the same result and is
    taken only where no one could see the difference: no tracing, no torch dispatch or function
    mode, no functorch transform, and plain tensors only; callers then :func:`bump_versions`.
    """
    if torch.compiler.is_compiling() or any(check() for check in _ACTIVE_MODE_CHECKS):
        return None
    for tensors in (params, *others):
        if not set(map(type, tensors)) <= PLAIN_TYPES:
            return None
    return _backend(params)


def _params_of(name: str, args: tuple):
    """The params of a call of op ``name`` (its first tensor list)."""
    return args[1] if name == "penalty_backward" else args[0]


def _new_scalar(params: list[Tensor], *_) -> Tensor:
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


def _fake_norms(params: list[Tensor]) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(params[0].dtype)
    return params[0].new_empty(len(params), dtype=acc), params[0].new_empty(len(params), dtype=acc)


def _fake_penalty_backward(grad: Tensor, params: list[Tensor], *_) -> list[Tensor]:
    return [torch.empty_like(p) for p in params]


def _fake_none(*_) -> None:
    return None


# What each op returns, for tracing: shapes and dtypes only.
_FAKES = {"norms": _fake_norms, "penalty": _new_scalar, "penalty_backward": _fake_penalty_backward,
          "add_penalty_grad_": _new_scalar, "prox_": _fake_none, "sgd_step_": _new_scalar,
          "adamw_step_": _new_scalar}


def _define(name: str):
    def implementation(*args):
        return getattr(_backend(_params_of(name, args)), name)(*args)

    implementation.__name__ = name
    op = torch.library.custom_op(f"regfast::{name}", implementation, mutates_args=mutated(name),
                                 schema=SCHEMAS[name])
    op.register_fake(_FAKES[name])
    return op


norms, penalty, penalty_backward, add_penalty_grad_, prox_, sgd_step_, adamw_step_ = map(_define, SCHEMAS)
_ext.define_ops(SCHEMAS)

# Per op, the positions of the tensor lists it writes (bumped after a direct call).
_WRITTEN = {name: tuple(i for i, arg in enumerate(getattr(torch.ops.regfast, name).default._schema.arguments)
                        if arg.name in mutated(name)) for name in SCHEMAS}
_OPS = {name: getattr(torch.ops.regfast, name) for name in SCHEMAS}


def call(name: str, *args):
    """Op ``name`` on one group, with its schema's arguments: straight to the backend when
    :func:`direct_backend` allows (then the written tensors' version counters are bumped), else the op."""
    backend = direct_backend(*(arg for arg in args if isinstance(arg, list)))
    if backend is None:
        return _OPS[name](*args)
    value = getattr(backend, name)(*args)
    bump_versions(*(args[i] for i in _WRITTEN[name]))
    return value


def _penalty_setup_context(ctx, inputs, output) -> None:
    params, l1, l2, group_lasso, groups = inputs
    ctx.hyper = (l1, l2, group_lasso, groups)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(*params)


def _penalty_backward(ctx, grad: Tensor):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    return list(penalty_backward(grad, list(ctx.saved_tensors), *ctx.hyper)), None, None, None, None


penalty.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


def _penalty_backward_setup_context(ctx, inputs, output) -> None:
    grad, params, l1, l2, group_lasso, groups = inputs
    ctx.hyper = (l1, l2, group_lasso, groups)
    ctx.save_for_backward(grad, *params)


def _penalty_backward_backward(ctx, grad_outputs: list[Tensor]):
    """Second derivatives: d/d(grad) is ⟨∇P(w), v⟩, d/dw is grad·H(w)·v (:func:`penalty_hvp`); both
    differentiable again (the first through this op, the second in plain torch ops)."""
    grad, *params = ctx.saved_tensors
    vectors = [torch.zeros_like(p) if v is None else v for v, p in zip(grad_outputs, params)]
    grad_grad = params_grad = None
    if ctx.needs_input_grad[0]:
        unit = penalty_backward(torch.ones_like(grad), params, *ctx.hyper)
        grad_grad = torch.stack([(u.to(grad.dtype) * v.to(grad.dtype)).sum() for u, v in zip(unit, vectors)]).sum()
    if ctx.needs_input_grad[1]:
        params_grad = [(grad * hv).to(p.dtype) for hv, p in zip(penalty_hvp(params, vectors, *ctx.hyper), params)]
    return grad_grad, params_grad, None, None, None, None


penalty_backward.register_autograd(_penalty_backward_backward, setup_context=_penalty_backward_setup_context)


class _DirectPenalty(torch.autograd.Function):
    """:func:`penalty` with its gradient, calling one backend straight (see :func:`direct_backend`)."""

    @staticmethod
    def forward(ctx, backend: ModuleType, hyper: tuple, *params: Tensor) -> Tensor:
        ctx.backend, ctx.hyper = backend, hyper
        ctx.save_for_backward(*params)
        return backend.penalty(list(params), *hyper)

    @staticmethod
    def backward(ctx, grad: Tensor):
        params = list(ctx.saved_tensors)
        if torch.is_grad_enabled():  # create_graph: the op, which refuses to be differentiated again
            grads = penalty_backward(grad, params, *ctx.hyper)
        else:
            grads = ctx.backend.penalty_backward(grad, params, *ctx.hyper)
        return (None, None, *grads)


def transform_active() -> bool:
    """A functorch transform or forward-mode AD is running: what a custom op cannot follow."""
    functorch = torch._C._are_functorch_transforms_active() if hasattr(torch._C, "_are_functorch_transforms_active") \
        else False
    return functorch or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def run_penalty(params: list[Tensor], l1: float, l2: float, group_lasso: float, groups: str) -> Tensor:
    """:func:`penalty` of one group (differentiable), straight to the backend when :func:`direct_backend` allows.

    Under a functorch transform (``torch.func.grad``, ``jvp``, ``vmap``, ``hessian``…) or forward-mode
    AD, which a custom op cannot follow, it is :func:`~regfast.reference.penalty_differentiable`:
    plain torch ops that every transform knows.
    """
    if not torch.compiler.is_compiling() and transform_active():
        return penalty_differentiable(params, l1, l2, group_lasso, groups)
    backend = direct_backend(params)
    if backend is None:
        return penalty(params, l1, l2, group_lasso, groups)
    hyper = (l1, l2, group_lasso, groups)
    if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, params)):
        return _DirectPenalty.apply(backend, hyper, *params)
    return backend.penalty(params, *hyper)
