"""What is timed: each operation, and every way of computing it side by side.

A :class:`Provider` builds, from a list of parameters (leaf tensors whose ``.grad`` is set), a
callable that does the operation once. The naive providers are the loops people write, used as
they are used (in the loss, then ``backward()``); the first provider of each operation is the
baseline that every other one is compared with. Every provider of an operation computes the
same thing, except those marked ``comparable=False`` (an optimizer step without the
regularization, an L2-only kernel), which are timed but not checked.

All operations use the elastic-net coefficients :data:`L1` and :data:`L2`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import regfast
from regfast import _dispatch

__all__ = ["ADAMW_LR", "L1", "L2", "OPS", "PROX_LR", "SGD_LR", "Op", "Provider", "providers"]

# Small enough that hundreds of timed calls of prox_ or a step leave the weights (std 0.02)
# far from all-zero, big enough that one call changes float32 values well above rounding.
L1 = 1e-4
L2 = 1e-3
PROX_LR = 1e-2
SGD_LR = 1e-2
MOMENTUM = 0.9
ADAMW_LR = 1e-3

Build = Callable[[list[Tensor], torch.device], Callable[[], object]]


@dataclass(frozen=True)
class Op:
    """One operation: ``passes`` is how many times its data must cross memory (per element), ``target``
    what a call changes besides its return value (``"grads"``, ``"params"`` or ``""``)."""

    name: str
    title: str
    passes: int
    target: str


OPS: dict[str, Op] = {op.name: op for op in (
    Op("norms", "Σ|w| and Σw² (no grad): reads w", 1, ""),
    Op("penalty", "penalty in the loss, forward + backward: reads w twice, writes the grad", 3, "grads"),
    Op("add_penalty_grad_", "penalty gradient into .grad: reads w, reads and writes g", 3, "grads"),
    Op("prox_", "proximal step: reads and writes w", 2, "params"),
    Op("sgd-step", "SGD step (momentum 0.9) with the prox: reads w, g, buf; writes w, buf", 5, "params"),
    Op("adamw-step", "AdamW step with the prox: reads w, g, m, v; writes w, m, v", 7, "params"),
)}


def _available(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    """One way of doing an operation.

    ``build(params, device)`` returns the callable that is timed; ``devices`` are the device
    types it is meant for (it is not listed on others); ``unavailable(device)`` says why it
    cannot run here, or None; ``backend`` is the regfast backend forced (``REGFAST_BACKEND``)
    while it runs.
    """

    name: str
    family: str
    build: Build
    devices: tuple[str, ...] = ("cpu", "cuda")
    backend: str | None = None
    comparable: bool = True
    note: str = ""
    unavailable: Callable[[torch.device], str | None] = _available


def _without_grad(fn: Callable[[list[Tensor]], object]) -> Callable[[list[Tensor]], object]:
    """``fn`` run under ``torch.no_grad()``: the params require grad, and these ops must not record a graph."""
    def run(ws: list[Tensor]) -> object:
        with torch.no_grad():
            return fn(ws)
    return run


def _no_grad(fn: Callable[[list[Tensor]], object]) -> Build:
    """The provider that calls ``fn(params)`` under ``torch.no_grad()``."""
    return lambda params, device: functools.partial(_without_grad(fn), params)


def _with_backward(loss_fn: Callable[[list[Tensor]], Tensor]) -> Build:
    """The provider that puts ``loss_fn(params)`` through ``backward()``, as a penalty in the loss is used."""
    def build(params: list[Tensor], device: torch.device) -> Callable[[], object]:
        def run() -> Tensor:
            loss = loss_fn(params)
            loss.backward()
            return loss.detach()
        return run
    return build


def _compiled(fn: Callable, wrap: Callable[[Callable], Build]) -> Build:
    """The provider ``wrap`` makes of ``torch.compile(fn)``, compiled when built."""
    def build(params: list[Tensor], device: torch.device) -> Callable[[], object]:
        # Every case compiles afresh: recompiles of one function count against dynamo's cache
        # limit, past which it silently runs the function eagerly.
        torch._dynamo.reset()
        return wrap(torch.compile(fn))(params, device)
    return build


# The naive loops, as written in training scripts.

def norms_abs_square(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Σ|w| and Σw² by a loop of ``w.abs().sum()`` and ``w.square().sum()``."""
    return sum(w.abs().sum() for w in ws), sum(w.square().sum() for w in ws)


def norms_torch_norm(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Σ|w| and Σw² by a loop of ``torch.norm(w, 1)`` and ``torch.norm(w) ** 2``."""
    return sum(torch.norm(w, 1) for w in ws), sum(torch.norm(w) ** 2 for w in ws)


def norms_foreach(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Σ|w| and Σw² by ``torch._foreach_norm``."""
    return torch.stack(torch._foreach_norm(ws, 1)).sum(), torch.stack(torch._foreach_norm(ws, 2)).square().sum()


def norms_total(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Σ|w| and Σw² by ``torch.nn.utils.get_total_norm``."""
    return torch.nn.utils.get_total_norm(ws, 1.0), torch.nn.utils.get_total_norm(ws, 2.0) ** 2


def _loss_of(norms_fn: Callable[[list[Tensor]], tuple[Tensor, Tensor]]) -> Callable[[list[Tensor]], Tensor]:
    def loss(ws: list[Tensor]) -> Tensor:
        l1, l2sq = norms_fn(ws)
        return L1 * l1 + L2 * l2sq
    loss.__name__ = norms_fn.__name__.replace("norms", "penalty")
    return loss


penalty_abs_square = _loss_of(norms_abs_square)
penalty_torch_norm = _loss_of(norms_torch_norm)
penalty_foreach = _loss_of(norms_foreach)


def grad_loop(ws: list[Tensor]) -> None:
    """``g += l1·sign(w) + 2·l2·w`` tensor by tensor."""
    for w in ws:
        w.grad.add_(torch.sign(w), alpha=L1).add_(w, alpha=2 * L2)


def grad_foreach(ws: list[Tensor]) -> None:
    """``g += l1·sign(w) + 2·l2·w`` with ``torch._foreach_*``."""
    grads = [w.grad for w in ws]
    torch._foreach_add_(grads, torch._foreach_sign(ws), alpha=L1)
    torch._foreach_add_(grads, ws, alpha=2 * L2)


def prox_loop(ws: list[Tensor], lr: float = PROX_LR) -> None:
    """``w ← sign(w)·max(|w| − lr·l1, 0) / (1 + 2·lr·l2)`` tensor by tensor."""
    for w in ws:
        w.copy_(torch.sign(w) * torch.clamp(w.abs() - lr * L1, min=0) / (1 + 2 * lr * L2))


def prox_foreach(ws: list[Tensor], lr: float = PROX_LR) -> None:
    """The same proximal step with ``torch._foreach_*``: w − clamp(w, −t, t) is the soft threshold."""
    t = lr * L1
    clipped = torch._foreach_clamp_max(torch._foreach_clamp_min(ws, -t), t)
    torch._foreach_sub_(ws, clipped)
    torch._foreach_div_(ws, 1 + 2 * lr * L2)


# regfast.

def _backend_unavailable(backend: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on CPU tensors only in its interpreter, far too slow to time"
        return _dispatch.unavailable_reason(backend, device.type)
    return reason


_BACKEND_DEVICES = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cpu", "cuda")}


def _first_reason(*checks: Callable[[torch.device], str | None]) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        for check in checks:
            found = check(device)
            if found:
                return found
        return None
    return reason


def _per_backend(name: str, build: Build, *checks: Callable[[torch.device], str | None],
                 comparable: bool = True, note: str = "") -> list[Provider]:
    """One provider per regfast backend; ``checks`` add reasons not to run beyond the backend's own."""
    return [Provider(f"{name}[{backend}]", "regfast", build, _BACKEND_DEVICES[backend], backend, comparable, note,
                     unavailable=_first_reason(*checks, _backend_unavailable(backend)))
            for backend in _dispatch.BACKENDS]


def _regfast_norms(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    n = regfast.norms(ws)
    return n.l1, n.l2sq


def _regfast_penalty(ws: list[Tensor]) -> Tensor:
    return regfast.penalty(ws, l1=L1, l2=L2)


def _regfast_add_grad(params: list[Tensor], device: torch.device) -> Callable[[], object]:
    return lambda: regfast.add_penalty_grad_(params, l1=L1, l2=L2)


def _regfast_prox(params: list[Tensor], device: torch.device) -> Callable[[], object]:
    return lambda: regfast.prox_(params, PROX_LR, l1=L1, l2=L2)


# Optimizer steps.

def _sgd(params: list[Tensor], device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=SGD_LR, momentum=MOMENTUM, foreach=True)


def _adamw(params: list[Tensor], device: torch.device) -> torch.optim.Optimizer:
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=0.0, **impl)


def _step_then(make_opt: Callable, prox: Callable[[list[Tensor]], None] | None) -> Build:
    def build(params: list[Tensor], device: torch.device) -> Callable[[], object]:
        opt = make_opt(params, device)

        def run() -> None:
            opt.step()
            if prox is not None:
                prox(params)
        return run
    return build


def _optim_unavailable(name: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        try:
            module = importlib.import_module("regfast.optim")
        except Exception as exc:  # any import failure means there is nothing to time
            return f"regfast.optim is not importable ({type(exc).__name__}: {exc})"
        return None if hasattr(module, name) else f"regfast.optim has no {name}"
    return reason


def _prox_optimizer(name: str, **kwargs: object) -> Build:
    def build(params: list[Tensor], device: torch.device) -> Callable[[], object]:
        opt = getattr(importlib.import_module("regfast.optim"), name)(params, l1=L1, l2=L2, **kwargs)
        return opt.step
    return build


def _apex_unavailable(device: torch.device) -> str | None:
    try:
        importlib.import_module("amp_C")
        importlib.import_module("apex.optimizers")
    except Exception as exc:  # apex is optional; any import failure skips it
        return f"NVIDIA Apex is not importable ({type(exc).__name__}: {exc})"
    return None


def _apex_l2norm(params: list[Tensor], device: torch.device) -> Callable[[], object]:
    amp_c = importlib.import_module("amp_C")
    applier = importlib.import_module("apex.multi_tensor_apply").multi_tensor_applier
    overflow = torch.zeros(1, dtype=torch.int, device=device)

    def run() -> tuple[Tensor]:
        with torch.no_grad():
            total, _ = applier(amp_c.multi_tensor_l2norm, overflow, [params], False)
        return (total.square(),)
    return run


def _apex_optimizer(name: str, **kwargs: float) -> Callable:
    def make(params: list[Tensor], device: torch.device) -> torch.optim.Optimizer:
        return getattr(importlib.import_module("apex.optimizers"), name)(params, **kwargs)
    return make


def _has_total_norm(device: torch.device) -> str | None:
    return None if hasattr(torch.nn.utils, "get_total_norm") else "torch.nn.utils.get_total_norm needs torch >= 2.6"


def _step_providers(sgd: bool) -> list[Provider]:
    """A torch optimizer's step with the naive prox loop (the baseline), alone, and with ``regfast.prox_``;
    Apex's fused step alone; regfast's fused step-and-prox optimizers."""
    if sgd:
        label, make_opt, lr, note = "SGD", _sgd, SGD_LR, "torch SGD(foreach=True)"
        apex = _step_then(_apex_optimizer("FusedSGD", lr=SGD_LR, momentum=MOMENTUM), None)
        fused = _per_backend("ProxSGD", _prox_optimizer("ProxSGD", lr=SGD_LR, momentum=MOMENTUM),
                             _optim_unavailable("ProxSGD"))
    else:
        label, make_opt, lr, note = "AdamW", _adamw, ADAMW_LR, "torch AdamW: fused=True on CUDA, foreach=True on CPU"
        apex = _step_then(_apex_optimizer("FusedAdam", lr=ADAMW_LR, adam_w_mode=True, weight_decay=0.0), None)
        fused = [
            *_per_backend("ProxAdamW(prox=lr)", _prox_optimizer("ProxAdamW", lr=ADAMW_LR, weight_decay=0.0, prox="lr"),
                          _optim_unavailable("ProxAdamW")),
            *_per_backend("ProxAdamW(preconditioned)", _prox_optimizer("ProxAdamW", lr=ADAMW_LR, weight_decay=0.0),
                          _optim_unavailable("ProxAdamW"), comparable=False,
                          note="the default prox: another update than AdamW + prox_, not compared"),
        ]
    return [
        Provider(f"{label} + loop prox", "naive", _step_then(make_opt, _without_grad(lambda ws: prox_loop(ws, lr))),
                 note=note),
        Provider(f"{label} alone", "torch", _step_then(make_opt, None), comparable=False,
                 note=f"{note}; no regularization: the floor"),
        Provider(f"apex Fused{'SGD' if sgd else 'Adam'} alone", "apex", apex, ("cuda",), comparable=False,
                 note="no regularization", unavailable=_apex_unavailable),
        *_per_backend(f"{label} + regfast.prox_", _step_then(make_opt, lambda ws: regfast.prox_(ws, lr, l1=L1, l2=L2)),
                      note=note),
        *fused,
    ]


_COMPILE = "torch.compile(loop)"


def providers(op: str) -> list[Provider]:
    """Every provider of ``op`` (a key of :data:`OPS`), the baseline first; none is built or checked here."""
    if op == "norms":
        return [
            Provider("loop abs().sum, square().sum", "naive", _no_grad(norms_abs_square)),
            Provider("loop torch.norm(w, 1), ** 2", "naive", _no_grad(norms_torch_norm)),
            Provider("torch._foreach_norm", "torch", _no_grad(norms_foreach)),
            Provider("get_total_norm", "torch", _no_grad(norms_total), unavailable=_has_total_norm),
            Provider(_COMPILE, "compile", _compiled(norms_abs_square, _no_grad)),
            Provider("apex multi_tensor_l2norm", "apex", _apex_l2norm, ("cuda",), comparable=False,
                     note="L2 only: apex has no L1 kernel", unavailable=_apex_unavailable),
            *_per_backend("regfast.norms", _no_grad(_regfast_norms)),
        ]
    if op in ("penalty", "add_penalty_grad_"):
        loops = [
            Provider("loop abs().sum + square().sum", "naive", _with_backward(penalty_abs_square),
                     note="in the loss, then backward()"),
            Provider("loop torch.norm(w, 1) + ** 2", "naive", _with_backward(penalty_torch_norm),
                     note="in the loss, then backward()"),
        ]
        if op == "penalty":
            return [
                *loops,
                Provider("torch._foreach_norm", "torch", _with_backward(penalty_foreach)),
                Provider("get_total_norm", "torch", _with_backward(penalty_foreach),
                         unavailable=lambda device: "get_total_norm runs under no_grad: it has no gradient"),
                Provider(_COMPILE, "compile", _compiled(penalty_abs_square, _with_backward)),
                *_per_backend("regfast.penalty", _with_backward(_regfast_penalty)),
            ]
        return [
            *loops,
            Provider("loop grad.add_(sign(w)).add_(w)", "naive", _no_grad(grad_loop)),
            Provider("torch._foreach_add_", "torch", _no_grad(grad_foreach)),
            Provider("torch.compile(grad loop)", "compile", _compiled(grad_loop, _no_grad)),
            *_per_backend("regfast.add_penalty_grad_", _regfast_add_grad),
        ]
    if op == "prox_":
        return [
            Provider("loop sign*relu(|w|-t)/(1+s)", "naive", _no_grad(prox_loop)),
            Provider("torch._foreach_ clamp/sub/div", "torch", _no_grad(prox_foreach)),
            Provider(_COMPILE, "compile", _compiled(prox_loop, _no_grad)),
            *_per_backend("regfast.prox_", _regfast_prox),
        ]
    if op in ("sgd-step", "adamw-step"):
        return _step_providers(sgd=op == "sgd-step")
    raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
