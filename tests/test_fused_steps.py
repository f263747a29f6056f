"""The fused optimizer steps of every backend, step for step against the torch backend's.

ProxSGD and ProxAdamW step twin param sets on the same grads, one under the backend tested and one under
``REGFAST_BACKEND=torch`` (regfast.reference.optim, which mirrors torch's foreach optimizers; tests/test_optim.py
checks it against an independent oracle), and params, optimizer state and penalty are compared after every step
(:func:`lockstep`), as closely as each backend's arithmetic allows (:func:`agreement`):

- ``cpp`` / ``cuda``: SGD is the same arithmetic op for op, so on the CPU params and buffers agree bitwise. On
  CUDA the reference runs torch's CUDA foreach kernels, whose roundings the fused step reproduces
  (csrc/optim_math.h): SGD and AdamW without a penalty, with a float lr, agree bitwise in float32 and float64.
  AdamW's moments agree bitwise; its params agree to a few ulps because torch's CPU ``sqrt`` goes through MKL's
  vector math, which is not correctly rounded (about 0.7% of float32 and float64 results differ by one ulp from
  the correctly rounded square root the fused pass takes), so the denominator ``√v̂ + eps`` and with it the
  update can differ by an ulp. With group lasso, params get the fused pass's elementwise prox and the backend's
  group shrink, whose group norms are summed in another order than the reference's (a few ulps; 16-bit params
  are stepped in float32 and rounded once per step, as the reference's); Adam's metric (on the CPU the kernels'
  Newton steps in double, on CUDA the extension's ATen composition of the reference's ops) likewise: a few ulps.
- ``triton``: both backends do the same float32 (float64) arithmetic op for op, so float32 / float64 params
  differ by rounding order at most; float16 / bfloat16 params are that float32 math rounded once per step, so
  at most one unit in the last place; the moments to float32 (float64) rounding. Adam's metric with group lasso
  is the reference step itself: params bit for bit.

The penalty is reduced in another order than the reference's float64 norms: a float32-rounding tolerance.

The compiled kernels step tensors around their chunk and block sizes for 5 steps; Triton steps small tensors
over chunks of 64 elements (non-contiguous ones among them) for 3 steps, so that they span many chunks. In
Triton's CPU interpreter, which is slow, the cases are fewer (:func:`helpers.skip_in_interpreter`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    KERNEL_CHUNK,
    interpreted,
    launching,
    make_params,
    noncontiguous,
    same_layout_copy,
    select,
    skip_in_interpreter,
    use_backend,
)
from torch import nn

from regfast.optim import ProxAdamW, ProxSGD


@pytest.fixture(autouse=True)
def _not_the_reference(backend):
    if backend == "torch":
        pytest.skip("the torch backend is the reference side of the lockstep (tests/test_optim.py checks it "
                    "against an independent oracle)")


# ---------------------------------------------------------------------------------------------------------------
# How closely a backend's steps follow the reference's.

Compare = Callable[[torch.Tensor, torch.Tensor], None]


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit."""
    assert torch.equal(actual, expected), f"max diff {(actual.double() - expected.double()).abs().max().item():.3g}"


def ulps(n: int) -> Compare:
    """|a − e| ≤ n·eps(dtype)·max(|e|, 1): a few units in the last place of values of order 1."""
    def compare(actual, expected):
        eps = torch.finfo(expected.dtype).eps
        diff = (actual.double() - expected.double()).abs()
        bound = n * eps * expected.double().abs().clamp_min(1.0)
        assert bool((diff <= bound).all()), f"max diff {diff.max().item():.3g} > {n} ulps"
    return compare


def within(tol: float, atol: float | None = None) -> Compare:
    """|a − e| ≤ ``atol`` + ``tol``·|e| (``atol`` = ``tol`` unless given)."""
    def compare(actual, expected):
        torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol,
                                   atol=tol if atol is None else atol, equal_nan=True)
    return compare


@dataclass(frozen=True)
class Agreement:
    """How params, optimizer state (step counts aside: those always agree exactly) and the penalty agree."""

    params: Compare
    state: Compare
    penalty: Compare


# Triton's params against the reference's: float32 / float64 to rounding order, fp16 / bf16 to one ulp.
TRITON_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# Triton's penalty: per-chunk float32 partials against the reference's float64 sums.
TRITON_PENALTY_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def agreement(backend: str, device: str, kind: str, dtype: torch.dtype, config: dict) -> Agreement:
    """What the module docstring claims for ``backend`` stepping ``kind`` ("sgd" or "adamw") with ``config``."""
    group_lasso = bool(config.get("group_lasso"))
    metric = kind == "adamw" and group_lasso and config.get("prox", "preconditioned") == "preconditioned"
    double = dtype == torch.float64
    if backend == "triton":
        tol = TRITON_TOL[dtype]
        if double and device == "cuda" and kind == "adamw" and (isinstance(config.get("lr"), torch.Tensor | DeviceLr)
                                                                or config.get("capturable")):
            # With a tensor lr or capturable, both backends compute AdamW's bias corrections in float32; torch's
            # CUDA pow may round them one float32 ulp apart from the kernel: a relative 6e-8 of each update
            # (about lr) instead of float64 rounding. On CPU both round alike.
            tol = 1e-8
        return Agreement(exact if metric else within(tol), within(1e-12 if double else 1e-6),
                         within(TRITON_PENALTY_RTOL[dtype]))
    plain = not (config.get("l1") or config.get("l2") or group_lasso)
    if group_lasso and dtype == torch.bfloat16 and not metric:
        params = exact
    elif kind == "sgd" and device == "cpu" and not group_lasso:
        params = exact
    elif (device == "cuda" and backend == "cuda" and plain and dtype in (torch.float32, torch.float64)
          and not isinstance(config.get("lr"), torch.Tensor | DeviceLr) and not config.get("capturable")):
        # The reference is torch's foreach ops, here its CUDA kernels: the fused step rounds as they do
        # (csrc/optim_math.h, checked on the host by tests/test_cuda_math.py).
        params = exact
    else:
        params = ulps(4)
    # float32 sums of ~10⁵ terms in another order than the reference's: √n·eps ≈ 2e-5.
    return Agreement(params, exact, within(1e-12 if double else 2e-5, atol=1e-30))


# ---------------------------------------------------------------------------------------------------------------
# Twin optimizers in lockstep.


class DeviceLr(float):
    """A step given as a 0-dim tensor on the params' device (a ``torch.tensor`` lr in a config stays on the CPU)."""

    def __repr__(self) -> str:
        return f"device_tensor({float(self)})"


def optimizer(kind: str, config: dict, compute_penalty: bool = True) -> Callable[[list], torch.optim.Optimizer]:
    """A maker of ProxSGD (``kind="sgd"``, lr 0.05 unless given) or ProxAdamW (lr 0.01 unless given) with
    ``config``; without ``compute_penalty`` the optimizer keeps its default (off)."""
    def make(params):
        kw = dict(config)
        lr = kw.pop("lr", 0.05 if kind == "sgd" else 0.01)
        if isinstance(lr, DeviceLr):
            lr = torch.tensor(float(lr), device=params[0].device)
        elif isinstance(lr, torch.Tensor):
            lr = lr.clone()
        if compute_penalty:
            kw["compute_penalty"] = True
        return (ProxSGD if kind == "sgd" else ProxAdamW)(params, lr=lr, **kw)
    return make


@dataclass
class Twins:
    """The optimizer and params stepped under the backend tested, and their twins stepped under ``torch``."""

    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    ref_opt: torch.optim.Optimizer | None
    ref_params: list[nn.Parameter] | None


def lockstep(backend: str, make_opt, shapes, dtype: torch.dtype, device: str, agree: Agreement | None, steps: int,
             noncontig=(), chunk: int | None = None, seed: int = 0) -> Twins:
    """Step ``make_opt(params)`` on twin param sets, one under ``backend`` and one under the ``torch`` backend, on
    the same random grads for ``steps`` steps, and after every step compare: params (dtype, shape, strides, values
    by ``agree.params``), optimizer state (the same keys, dtypes and devices; step counts exactly, the rest by
    ``agree.state``) and the penalty (dtype, device, value by ``agree.penalty``; or None on both sides).

    The params at the indices ``noncontig`` are non-contiguous (transposed, or strided 1-D), and so are their
    grads (and their state, where the layout can be kept); Triton launches with ``chunk`` elements per work item.
    With ``agree`` None only the backend's side is stepped (to compare its runs with each other).
    """
    names = (backend, "torch") if agree is not None else (backend,)
    tensors = [noncontiguous(t) if i in noncontig else t for i, t in enumerate(make_params(shapes, dtype, device,
                                                                                           seed=seed))]
    params = {name: [nn.Parameter(same_layout_copy(t)) for t in tensors] for name in names}
    opts = {name: make_opt(params[name]) for name in names}
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) for s in shapes]
        for name in names:
            for p, g in zip(params[name], grads):
                p.grad = g.clone() if p.is_contiguous() else noncontiguous(g)
            with use_backend(name), launching(name, chunk):
                opts[name].step()
        if agree is None:
            continue
        ours, theirs = opts[backend], opts["torch"]
        for p, q in zip(params[backend], params["torch"], strict=True):
            assert p.dtype == q.dtype == dtype and p.shape == q.shape and p.stride() == q.stride()
            agree.params(p.detach(), q.detach())
            assert ours.state[p].keys() == theirs.state[q].keys()
            for key, value in theirs.state[q].items():
                mine = ours.state[p][key]
                assert mine.dtype == value.dtype and mine.device == value.device, key
                (exact if key == "step" else agree.state)(mine, value)
        a, b = ours.last_penalty, theirs.last_penalty
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and a.device == b.device
            agree.penalty(a, b)
    return Twins(opts[backend], params[backend], opts.get("torch"), params.get("torch"))


@dataclass(frozen=True)
class Setting:
    """The params a backend's lockstep runs step by default: their shapes, which are non-contiguous, how many
    steps, and Triton's chunk."""

    shapes: list[tuple[int, ...]]
    noncontig: tuple[int, ...]
    steps: int
    chunk: int | None


# Around the CPU chunk (2**15) and block (1024) sizes, empty and 0-dim tensors between others.
KERNEL_SETTING = Setting([(37, 53), (0,), (), (1031,), (5, 7, 3), (2**15 + 3,), (1,), (0, 4), (17, 1024)], (), 5,
                         None)
# Empty, 0-dim and 1-element tensors between others; (33, 17) spans 9 chunks of 64; (6, 5) and (33, 17) are
# transposed and (7,) strided.
TRITON_SETTING = Setting([(6, 5), (0, 3), (7,), (), (1,), (33, 17), (130,), (2, 0), (4, 3, 2)], (0, 2, 5), 3, 64)


def setting(backend: str) -> Setting:
    return TRITON_SETTING if backend == "triton" else KERNEL_SETTING


def run(backend, device, kind, config, dtype=torch.float32, shapes=None, noncontig=None, steps=None, chunk=None,
        compute_penalty=True, reference=True) -> Twins:
    """:func:`lockstep` of ``kind`` with ``config`` in ``backend``'s :class:`Setting` (or what is given instead),
    held to its :func:`agreement` (without ``reference``: the backend's side only)."""
    s = setting(backend)
    agree = agreement(backend, device, kind, dtype, config) if reference else None
    return lockstep(backend, optimizer(kind, config, compute_penalty), s.shapes if shapes is None else shapes, dtype,
                    device, agree, s.steps if steps is None else steps, s.noncontig if noncontig is None else noncontig,
                    s.chunk if chunk is None else chunk)


# ---------------------------------------------------------------------------------------------------------------
# The cases: (config, dtypes, dtypes in Triton's interpreter). The interpreter is slow: it runs fewer configs, most
# in float32 only (on the CPU a tensor lr is on the params' device either way).

NONE = ()
F32 = (torch.float32,)
ALL = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

SGD_CASES = [
    (dict(), ALL, F32),
    (dict(l1=0.02), F32, F32),
    (dict(momentum=0.9, l1=0.01, l2=0.1), ALL, NONE),
    (dict(momentum=0.9, l1=0.02, l2=0.1), F32, F32),
    (dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, maximize=True, l1=0.02), ALL, NONE),
    (dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, l2=0.1), F32, F32),
    (dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l2=0.3), ALL, NONE),
    (dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l1=0.02, l2=0.05), ALL, ALL),
    (dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True, l1=0.02, l2=0.05), F32, F32),
    (dict(weight_decay=1e-2, l1=0.05), ALL, NONE),
    (dict(lr=torch.tensor(0.05), momentum=0.9, l1=0.01, l2=0.1), ALL, NONE),
    (dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True, l2=0.2, maximize=True), ALL, NONE),
    (dict(lr=DeviceLr(0.05)), F32, F32),
    (dict(lr=DeviceLr(0.05), l1=0.02), F32, F32),
    (dict(lr=DeviceLr(0.05), momentum=0.9, l1=0.02, l2=0.1), F32, F32),
    (dict(lr=DeviceLr(0.05), momentum=0.8, dampening=0.3, weight_decay=1e-2, l2=0.1), F32, F32),
    (dict(lr=DeviceLr(0.05), momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True, l1=0.02, l2=0.05), F32,
     F32),
]
ADAMW_CASES = [
    (dict(), ALL, F32),
    (dict(l1=0.02), F32, F32),
    (dict(l1=0.01, l2=0.1), ALL, NONE),
    (dict(l1=0.02, l2=0.1), ALL, ALL),
    (dict(l1=0.02, l2=0.1, prox="lr"), F32, F32),
    (dict(l1=0.02, prox="lr", amsgrad=True, maximize=True), ALL, NONE),
    (dict(amsgrad=True, eps=1e-6, l1=0.02, l2=0.1, maximize=True), F32, F32),
    (dict(weight_decay=0.0, betas=(0.8, 0.99), l2=0.2, prox="lr", amsgrad=True), F32, F32),
    (dict(l2=0.3, betas=(0.3, 0.9), weight_decay=0.0, eps=1e-6), ALL, NONE),
    # β1 < 0.5: torch.lerp's second formula.
    (dict(betas=(0.3, 0.9), l1=0.01), F32, F32),
    (dict(capturable=True, l1=0.02, l2=0.1), F32, F32),
    (dict(capturable=True, amsgrad=True, prox="lr", l1=0.02), F32, F32),
    (dict(lr=torch.tensor(0.01), l1=0.01, l2=0.1), ALL, NONE),
    (dict(lr=torch.tensor(0.01), l1=0.01, l2=0.1, prox="lr", amsgrad=True, betas=(0.6, 0.99)), ALL, NONE),
    (dict(lr=torch.tensor(0.01), capturable=True, l1=0.01), ALL, NONE),
    (dict(lr=DeviceLr(0.01)), F32, F32),
    (dict(lr=DeviceLr(0.01), l1=0.02), F32, F32),
    (dict(lr=DeviceLr(0.01), l1=0.02, l2=0.1, prox="lr"), F32, F32),
    (dict(lr=DeviceLr(0.01), amsgrad=True, eps=1e-6, l1=0.02, l2=0.1, maximize=True), F32, F32),
    (dict(lr=DeviceLr(0.01), weight_decay=0.0, betas=(0.8, 0.99), l2=0.2, prox="lr", amsgrad=True), F32, F32),
    (dict(lr=DeviceLr(0.01), betas=(0.3, 0.9), l1=0.01), F32, F32),
    (dict(lr=DeviceLr(0.01), capturable=True, l1=0.02, l2=0.1), F32, F32),
    (dict(lr=DeviceLr(0.01), capturable=True, amsgrad=True, prox="lr", l1=0.02), F32, F32),
    (dict(lr=DeviceLr(0.01), amsgrad=True, l1=0.02, prox="lr"), ALL, ALL),
    (dict(lr=DeviceLr(0.01), capturable=True, l1=0.02, l2=0.1, maximize=True), ALL, ALL),
]
GROUP_CASES = [
    ("sgd", dict(momentum=0.9, l1=0.01, group_lasso=0.05)),
    ("sgd", dict(lr=torch.tensor(0.05), momentum=0.9, l2=0.1, group_lasso=0.05, groups="col")),
    ("sgd", dict(weight_decay=1e-2, l1=0.02, l2=0.3, group_lasso=0.2, groups="tensor")),
    ("adamw", dict(prox="lr", l2=0.1, group_lasso=0.05, groups="col")),
    ("adamw", dict(prox="lr", lr=torch.tensor(0.01), amsgrad=True, l1=0.01, l2=0.2, group_lasso=0.3)),
]


def _name(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"cpu_tensor({value.item():g})"
    return repr(value) if isinstance(value, DeviceLr) else str(value)


def _id(config: dict) -> str:
    return ",".join(f"{k}={_name(v)}" for k, v in config.items()) or "defaults"


def _params(cases):
    """(config, dtype, whether Triton's interpreter runs it) for each dtype of each case."""
    return [pytest.param(config, dtype, dtype in interpreter, id=f"{_id(config)}-{str(dtype)[6:]}")
            for config, dtypes, interpreter in cases for dtype in dtypes]


def _skip_unless(in_interpreter, backend, device):
    if not in_interpreter:
        skip_in_interpreter(backend, device, "it runs fewer configs, most in float32 only")


def _assert_state_layout(twins: Twins, noncontig) -> None:
    """The state of a non-contiguous (matrix) param is non-contiguous too."""
    for i in noncontig:
        p = twins.params[i]
        if p.dim() >= 2:
            for key, value in twins.opt.state[p].items():
                if key != "step":
                    assert not value.is_contiguous(), key


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, dtype, in_interpreter", _params(SGD_CASES))
def test_prox_sgd(backend, device, config, dtype, in_interpreter):
    """ProxSGD: plain, momentum (dampening, Nesterov), weight decay, maximize, a float or tensor lr."""
    _skip_unless(in_interpreter, backend, device)
    twins = run(backend, device, "sgd", config, dtype)
    if config.get("momentum"):
        _assert_state_layout(twins, setting(backend).noncontig)


@pytest.mark.parametrize("config, dtype, in_interpreter", _params(ADAMW_CASES))
def test_prox_adamw(backend, device, config, dtype, in_interpreter):
    """ProxAdamW: both proxes, amsgrad, betas (β1 on both sides of 0.5), eps, weight decay, maximize, capturable
    step counts (on the params' device), a float or tensor lr."""
    _skip_unless(in_interpreter, backend, device)
    twins = run(backend, device, "adamw", config, dtype)
    _assert_state_layout(twins, setting(backend).noncontig)
    for p in twins.params:
        step = twins.opt.state[p]["step"]
        assert step.item() == setting(backend).steps
        assert step.device.type == (device if config.get("capturable") else "cpu")


NONCONTIGUOUS_CASES = [("sgd", SGD_CASES[4][0]), ("sgd", SGD_CASES[10][0]), ("adamw", ADAMW_CASES[5][0]),
                       ("adamw", ADAMW_CASES[12][0])]


@pytest.mark.parametrize("kind, config", NONCONTIGUOUS_CASES, ids=lambda v: v if isinstance(v, str) else _id(v))
def test_noncontiguous_params_grads_and_state(backend, device, kind, config):
    """Every param non-contiguous (transposed, or strided 1-D), and so its grad and state."""
    shapes = [(6, 5), (17,), (4, 3, 2), (9, 33)] if backend == "triton" else [(37, 53), (1031,), (5, 7, 3), (64, 600)]
    twins = run(backend, device, kind, config, shapes=shapes, noncontig=range(len(shapes)))
    assert not any(p.is_contiguous() for p in twins.params)
    _assert_state_layout(twins, range(len(shapes)))


def many_shapes(c: int) -> list[tuple[int, ...]]:
    """300 tiny tensors (0 to 60 elements), with empty, 1-element and multi-chunk ones (for chunks of ``c``)
    among them."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(s,) if i % 3 else (2, s) for i, s in enumerate(torch.randint(0, 31, (300,), generator=gen).tolist())]
    big = [(0,), (1,), (4, c + 1), (0, 3), (3 * c + 7,), (c - 1,), (3, 4), (c + 1,), (5, 1, 2), (2 * c + 3, 2)]
    for i, s in enumerate(big):
        shapes.insert(10 + 29 * i, s)
    return shapes


@pytest.mark.parametrize("kind, config", [("sgd", dict(momentum=0.9, l1=0.02, l2=0.1)),
                                          ("adamw", dict(lr=DeviceLr(0.01), l1=0.02, l2=0.1))],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tiny_tensors(backend, device, kind, config, dtype):
    """Hundreds of tiny tensors in one step, big ones between them."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers many tensors there")
    s = setting(backend)
    c = s.chunk or KERNEL_CHUNK[backend]
    run(backend, device, kind, config, dtype, shapes=many_shapes(c), noncontig=(3, 12) if s.noncontig else (),
        steps=2 if backend == "triton" else s.steps)


def test_chunk_boundaries(backend, device):
    """Tensors ending just before, at and just after chunk boundaries, around each chunk the backend launches
    with (Triton: 16 and 32)."""
    for c in [16, 32] if backend == "triton" else [KERNEL_CHUNK[backend]]:
        shapes = [(s,) for s in [c - 1, c, c + 1, 1, 0, 2 * c - 1, 2 * c, 0, 2 * c + 1]] + [(3, c + 1)]
        for kind, config in (("adamw", dict(amsgrad=True, l1=0.02, l2=0.1)), ("sgd", dict(momentum=0.9, l1=0.02))):
            run(backend, device, kind, config, shapes=shapes, noncontig=(9,), steps=2, chunk=c)


@pytest.mark.parametrize("kind, config", [("sgd", dict(momentum=0.9, l1=0.01, l2=0.1)),
                                          ("adamw", dict(l1=0.01, l2=0.1)),
                                          ("adamw", dict(amsgrad=True, l1=0.02, l2=0.1))],
                         ids=["sgd", "adamw", "adamw_amsgrad"])
def test_without_compute_penalty(backend, device, kind, config):
    """compute_penalty off (the default): no penalty on either side, the same steps."""
    twins = run(backend, device, kind, config, compute_penalty=False)
    assert twins.opt.last_penalty is None and twins.ref_opt.last_penalty is None


def _group_cases():
    cases = [pytest.param(kind, config, dtype, False, id=f"{kind}-{_id(config)}-{str(dtype)[6:]}")
             for kind, config in GROUP_CASES for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    for groups in ("row", "col", "tensor"):
        for lr in (float, DeviceLr):
            for kind, config in (("sgd", dict(lr=lr(0.05), momentum=0.9, group_lasso=0.5, l1=0.01, l2=0.1,
                                              groups=groups)),
                                 ("adamw", dict(lr=lr(0.01), prox="lr", group_lasso=0.5, l2=0.1, groups=groups))):
                cases.append(pytest.param(kind, config, torch.float32, True, id=f"{kind}-{_id(config)}-float32"))
    # bfloat16 params stepped in float32 copies and rounded once per step, as the reference does.
    config = dict(momentum=0.9, group_lasso=0.1, l1=0.01)
    cases.append(pytest.param("sgd", config, torch.bfloat16, True, id=f"sgd-{_id(config)}-bfloat16"))
    return cases


@pytest.mark.parametrize("kind, config, dtype, in_interpreter", _group_cases())
def test_group_lasso_after_the_fused_step(backend, device, kind, config, dtype, in_interpreter):
    """The fused step with the elementwise prox, then the group shrink: in every grouping, with a float and a
    tensor lr."""
    _skip_unless(in_interpreter, backend, device)
    s = setting(backend)
    steps = 2 if backend == "triton" else s.steps
    twins = run(backend, device, kind, config, dtype, steps=steps)
    if not interpreted(backend, device):
        without = run(backend, device, kind, {**config, "group_lasso": 0.0}, dtype, steps=steps, reference=False)
        assert not all(torch.equal(p, q) for p, q in zip(twins.params, without.params))  # the group term did act


def assert_same_bits_on_1_and_2_threads(backend, device, kind, config, dtype, shapes):
    """Two steps on 1 and on 2 threads leave the same params and state, bit for bit."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            twins = run(backend, device, kind, config, dtype, shapes=shapes, noncontig=(), steps=2, reference=False)
            runs.append([*twins.params, *(t for p in twins.params for t in twins.opt.state[p].values())])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


LARGE_COLUMN_CASES = [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l1=0.01, l2=0.1, group_lasso=0.5, groups="col")),
    ("sgd", dict(lr=torch.tensor(0.05), momentum=0.8, dampening=0.3, maximize=True, group_lasso=0.5, groups="col")),
    ("sgd", dict(l1=0.01, group_lasso=0.5, groups="col")),
    ("adamw", dict(prox="lr", amsgrad=True, l1=0.01, l2=0.1, group_lasso=0.5, groups="col")),
    ("adamw", dict(prox="lr", lr=torch.tensor(0.01), weight_decay=0.1, group_lasso=0.5, groups="col")),
    ("sgd", dict(momentum=0.9, l1=0.01, l2=0.1, group_lasso=0.5, groups="tensor")),
    ("adamw", dict(prox="lr", l1=0.01, group_lasso=2.0, groups="tensor")),
    # Large steps, thresholds and a short second-moment memory: a replay that read the wrong moment, or skipped the
    # elementwise prox, moves the params by more than the tolerance.
    ("sgd", dict(lr=0.2, momentum=0.9, l1=0.5, group_lasso=0.5, groups="col")),
    ("adamw", dict(prox="lr", lr=0.1, betas=(0.9, 0.5), amsgrad=True, l1=2.0, group_lasso=0.5, groups="col"))]


@pytest.mark.parametrize("kind, config", LARGE_COLUMN_CASES, ids=lambda v: v if isinstance(v, str) else _id(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_16bit_params_by_columns_or_whole(backend, device, kind, config, dtype):
    """The column groups of 16-bit params of at least 2**22 elements, and their single groups (a whole tensor, a
    1-D one by columns), go in two passes over the elements in order on the CPU (the step, then the step again from
    the state it left), beside tensors that go by blocks (of every column: 64 × 600, 1500 × 700; of 256 columns:
    200 × 1300): with and without momentum, within two units in the last place of the reference (its group norms,
    sums of thousands of squares, are taken in another order: a factor one float32 ulp apart rounds a rare element
    the other way, by blocks as in two passes), and the same bits on 1 and 2 threads."""
    if backend != "cpp" or device != "cpu":
        pytest.skip("the CPU kernels' steps with group lasso on large tensors")
    shapes = [(1031, 4099), (64, 600), (1500, 700), (200, 1300), (2**22 + 37,)]
    lockstep(backend, optimizer(kind, config, True), shapes, dtype, device,
             Agreement(ulps(2), within(1e-4), within(2e-5, atol=1e-30)), 3)
    assert_same_bits_on_1_and_2_threads(backend, device, kind, config, dtype, shapes)


LARGE_BLOCK_CASES = [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l1=0.01, l2=0.1, group_lasso=0.5, groups="row")),
    ("sgd", dict(lr=torch.tensor(0.05), l1=0.01, group_lasso=0.5, groups="row")),
    ("sgd", dict(momentum=0.9, l1=0.01, group_lasso=0.5, groups="tensor"))]


@pytest.mark.parametrize("kind, config", LARGE_BLOCK_CASES, ids=lambda v: v if isinstance(v, str) else _id(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_16bit_blocks_ask_for_the_next_block(backend, device, kind, config, dtype):
    """16-bit SGD steps by rows and whole tensors with more than 2**22 elements in blocks: each block's shrink asks
    for the next block's memory on the CPU (the next block of the same tensor, of the next one, past tensors that go
    in two passes; with and without momentum): within two units in the last place of the reference, and the same
    bits on 1 and 2 threads."""
    if backend != "cpp" or device != "cpu":
        pytest.skip("the CPU kernels' steps with group lasso on large tensors")
    shapes = [(2100, 1030), (3, 5), (4099, 257), (700, 1500), (33,), (2**22 + 37,)]
    lockstep(backend, optimizer(kind, config, True), shapes, dtype, device,
             Agreement(ulps(2), within(1e-4), within(2e-5, atol=1e-30)), 2)
    assert_same_bits_on_1_and_2_threads(backend, device, kind, config, dtype, shapes)


@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_group_lasso_steps_propagate_nan_and_inf(backend, device, kind, groups, dtype):
    """The steps with group lasso and the scalar prox step (SGD, AdamW ``prox="lr"``) on params holding a NaN and an
    inf, in different groups (one tensor each, taken whole with ``groups="tensor"``), beside small groups that
    vanish and a larger tensor: the NaN's group becomes NaN, the inf's group keeps the inf and its other elements
    finite (its norm is inf, its factor 1; float64 norms are scaled by the group's largest magnitude, but for a group
    holding an inf), as the reference's step does; the rest agrees to a few ulps."""
    skip_in_interpreter(backend, device, "test_prox_sgd and test_prox_adamw check the group steps there")
    gen = torch.Generator().manual_seed(5)
    # The last: rows of 257 in two blocks on the CPU (the second's first group past 0), its pieces of 4096 elements
    # ending inside a group.
    shapes = [(40, 24), (24, 40), (40, 24), (150, 257)]
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    values[0][3, 5] = float("nan")
    values[1][10, 7] = float("inf")
    values[2] *= 0.1  # groups that vanish
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    config = dict(lr=0.05, momentum=0.9, l1=0.01, group_lasso=3.0, groups=groups) if kind == "sgd" else \
        dict(lr=0.01, prox="lr", l1=0.01, group_lasso=30.0, groups=groups)
    results = {}
    for name in (backend, "torch"):
        params = [nn.Parameter(v.to(device, dtype, copy=True)) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.to(device, dtype)
        opt = optimizer(kind, config, compute_penalty=False)(params)
        with use_backend(name):
            opt.step()
        results[name] = [p.detach().double().cpu() for p in params]
    ours, theirs = results[backend], results["torch"]
    nan = {"row": (0, 3), "col": (0, (slice(None), 5)), "tensor": (0, ...)}[groups]
    assert ours[nan[0]][nan[1]].isnan().all() and theirs[nan[0]][nan[1]].isnan().all()
    assert ours[1][10, 7] == theirs[1][10, 7] == float("inf")
    inf = {"row": (1, 10), "col": (1, (slice(None), 7)), "tensor": (1, ...)}[groups]
    assert torch.isfinite(ours[inf[0]][inf[1]]).sum() == torch.isfinite(theirs[inf[0]][inf[1]]).sum() == \
        ours[inf[0]][inf[1]].numel() - 1  # the rest of the inf's group stays finite
    vanished = {"row": lambda t: (t == 0).all(dim=1), "col": lambda t: (t == 0).all(dim=0),
                "tensor": lambda t: (t == 0).all()}[groups]
    assert vanished(theirs[2]).any()  # the group term did act, whole groups
    eps = torch.finfo(dtype).eps
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps * b.abs().nan_to_num(posinf=0).max().item(),
                                   equal_nan=True)


PACK_CASES = [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l1=0.01, l2=0.1, group_lasso=0.5)),
    ("sgd", dict(lr=0.2, l1=0.01, group_lasso=2.0, groups="tensor")),
    ("adamw", dict(prox="lr", amsgrad=True, l1=0.01, l2=0.1, group_lasso=2.0, groups="col")),
    ("adamw", dict(amsgrad=True, l1=0.01, l2=0.1, group_lasso=2.0)),
    ("adamw", dict(lr=0.1, betas=(0.9, 0.5), weight_decay=0.1, maximize=True, group_lasso=3.0, groups="tensor"))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("kind, config", PACK_CASES, ids=lambda v: v if isinstance(v, str) else _id(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_small_single_group_tensors_step_together_as_each_alone(backend, device, kind, config, dtype):
    """Tensors of one group (1-D ones in every grouping, any with ``groups="tensor"``) of up to 4096 elements go
    together on the CPU, several in one call of each group pass: stepped together (over 300 of them, more than one
    pack; a NaN, an inf, groups that vanish, groups that stay, beside a 4097-element one and a 2-D one) on two
    threads, params and state have the same bits as each tensor stepped alone on one, and agree with the reference."""
    if backend != "cpp" or device != "cpu":
        pytest.skip("the CPU kernels' group passes over several tensors at once")
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 2, 7, 8, 9, 16, 17, 100, 767, 4096, 4097, 0, 3000, 3000] + [1 + (37 * i) % 50 for i in range(300)]
    # (By columns, a float32 / float64 list with a tensor of more than one row takes the step in place, then
    # prox_'s group shrink, whose norms are summed in another order than the blocks': one row there.)
    shapes = [(n,) for n in sizes] + [(1, 5) if config.get("groups") == "col" else (3, 5), (1,)]
    values = [torch.randn(s, generator=gen, dtype=torch.float64) * (1e-3 if i % 3 == 0 else 1.0)
              for i, s in enumerate(shapes)]
    values[3][5] = float("nan")
    values[7][40] = float("inf")
    values[20].zero_()
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(3)]
    together = [nn.Parameter(v.to(dtype, copy=True)) for v in values]
    alone = [nn.Parameter(v.to(dtype, copy=True)) for v in values]
    make = optimizer(kind, config)
    opt, opts = make(together), [make([p]) for p in alone]
    threads = torch.get_num_threads()
    try:
        for step_grads in grads:
            for p, q, g in zip(together, alone, step_grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            torch.set_num_threads(2)  # the packs on two threads, each tensor alone on one
            opt.step()
            torch.set_num_threads(1)
            for o in opts:
                o.step()
    finally:
        torch.set_num_threads(threads)
    for p, q, o in zip(together, alone, opts, strict=True):
        assert torch.equal(_bits(p), _bits(q))
        for key, value in opt.state[p].items():
            assert torch.equal(_bits(value), _bits(o.state[q][key])), key
    assert together[3].isnan().all() and not together[7][40].isfinite()  # (an inf less an inf step is NaN)
    vanished = sum(bool((p == 0).all()) for p in together[21:314] if p.numel() > 1)
    assert 0 < vanished < 250, vanished  # the group term acted, on some groups
    agree = agreement(backend, device, kind, dtype, config)
    if dtype == torch.float64:
        # A factor 1 − c/‖w_g‖ near 0 (a group near vanishing) multiplies the ulp or two by which the norms' orders
        # of summation differ.
        agree = Agreement(within(1e-13), agree.state, agree.penalty)
    lockstep(backend, optimizer(kind, config), shapes[:40] + shapes[-2:], dtype, device, agree, 2)


LARGE_METRIC_CASES = [
    dict(amsgrad=True, l1=0.01, l2=0.1, group_lasso=0.5, groups="col"),
    dict(lr=torch.tensor(0.01), weight_decay=0.1, group_lasso=0.5, groups="col"),
    dict(l1=0.01, l2=0.1, group_lasso=2.0, groups="tensor"),
    # Large steps and thresholds, a short second-moment memory: some columns vanish, the rest take several Newton
    # steps; a replay that read the wrong moment or floors moves the params by more than the tolerance.
    dict(lr=0.1, betas=(0.9, 0.5), amsgrad=True, l1=0.5, l2=0.1, group_lasso=3.0, groups="col")]


@pytest.mark.parametrize("config", LARGE_METRIC_CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_large_params_in_adams_metric_by_columns_or_whole(backend, device, config, dtype):
    """Adam's metric with group lasso for params of at least 2**22 elements by columns of more than 16384 rows, or
    (but float64) as a single group (a whole tensor, a 1-D one by columns), goes in passes over the elements in order
    on the CPU (the group norms, the step, then the step replayed from the state it left for the vanishing test and
    each Newton step, and once more to round into the params), beside a small tensor that goes by blocks (and a
    float64 single group, in one block): as close to the reference as the blocks, and the same bits on 1 and 2
    threads."""
    if backend != "cpp" or device != "cpu":
        pytest.skip("the CPU kernels' steps with group lasso on large tensors")
    config = dict(config, prox="preconditioned")
    shapes = [(16400, 260), (64, 600), (2**22 + 37,)]
    agree = agreement(backend, device, "adamw", dtype, config)
    if dtype == torch.float64:
        # Sums of 16,400 squares per column in another order than the reference's, in blocks (measured: 6 units of
        # values of order 1) as in passes (8): the roots, and the factors from them, a few ulps further.
        agree = Agreement(ulps(16), agree.state, agree.penalty)
    lockstep(backend, optimizer("adamw", config, True), shapes, dtype, device, agree, 3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            twins = run(backend, device, "adamw", config, dtype, shapes=shapes, noncontig=(), steps=2,
                        reference=False)
            runs.append([*twins.params, *(t for p in twins.params for t in twins.opt.state[p].values())])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_large_float64_params_in_adams_metric_by_columns_scale_their_norms(backend, device):
    """The column passes of Adam's metric take float64 group norms as the blocks and the reference do, scaled by the
    column's largest magnitude: params of 1e-170, whose squares underflow to zero (unscaled, each norm would be
    taken as 1 and each floor would be of the params' size, not of group_lasso's), with gradients that the floors
    exceed for about one element in ten: those elements' steps follow the floors, and the params agree with the
    reference's to a few ulps only with the norms right."""
    if backend != "cpp" or device != "cpu":
        pytest.skip("the CPU kernels' steps with group lasso on large tensors")
    gen = torch.Generator().manual_seed(11)
    shape = (16400, 260)
    value = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-170
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-4 for _ in range(2)]
    config = dict(lr=0.01, group_lasso=1e-5, groups="col", prox="preconditioned")
    results = {}
    for name in (backend, "torch"):
        param = nn.Parameter(value.clone())
        opt = optimizer("adamw", config, compute_penalty=False)([param])
        for g in grads:
            param.grad = g.clone()
            with use_backend(name):
                opt.step()
        results[name] = param.detach()
    ours, theirs = results[backend], results["torch"]
    assert torch.isfinite(theirs).all() and (theirs != 0).float().mean() > 0.9
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(ours, theirs, rtol=16 * eps, atol=16 * eps * theirs.abs().max().item())


METRIC_CASES = [pytest.param(dict(l1=0.01, l2=0.1, group_lasso=0.05, groups=groups, prox="preconditioned",
                                  amsgrad=True), dtype, id=f"amsgrad-{groups}-{str(dtype)[6:]}")
                for groups in ("row", "col", "tensor") for dtype in (torch.float32, torch.float64, torch.bfloat16)]
METRIC_CASES.append(pytest.param(dict(group_lasso=0.1, l2=0.1), torch.float32, id="defaults-row-float32"))


@pytest.mark.parametrize("config, dtype", METRIC_CASES)
def test_group_lasso_in_adams_metric(backend, device, config, dtype):
    """Group lasso in Adam's metric (``prox="preconditioned"``), in every grouping."""
    run(backend, device, "adamw", config, dtype, steps=2 if backend == "triton" else None)


@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
def test_group_lasso_in_adams_metric_is_as_close_to_the_float64_steps_as_the_reference(backend, device, groups):
    """Float32 params stepped by the backend in Adam's metric with group lasso lie as close to the float64
    reference's steps (from the same values) as the float32 reference's do: whatever order or precision the
    backend's group sums and Newton steps take, they lose no accuracy. Groups of thousands of elements, wide
    columns, one whole tensor; three steps, with l1, l2 and weight decay."""
    if backend == "torch":
        pytest.skip("the torch backend is the reference")
    skip_in_interpreter(backend, device, "the lockstep tests check the interpreter's metric steps")
    from regfast.reference import optim as reference

    shapes = [(40, 3000), (3000, 40), (5, 7, 300), (20_000,)]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3)]

    def steps(fn, dtype):
        ps = [p.to(device, dtype, copy=True) for p in params]
        state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
        counts = [torch.zeros(()) for _ in ps]
        for gs in grads:
            fn(ps, [g.to(device, dtype) for g in gs], *state, counts, None, 0.05, 0.9, 0.999, 1e-8, 0.01, True, False,
               0.01, 0.1, 0.5, groups, "preconditioned", False)
        return ps

    exact = steps(reference.adamw_step_, torch.float64)
    ref = steps(reference.adamw_step_, torch.float32)
    ours = steps(select(device).adamw_step_, torch.float32)
    for e, r, o in zip(exact, ref, ours):
        ref_error = (r.double().cpu() - e.cpu()).abs()
        our_error = (o.double().cpu() - e.cpu()).abs()
        for measure in (torch.max, torch.mean):
            ours_, refs = measure(our_error).item(), measure(ref_error).item()
            assert ours_ <= 1.5 * refs + 1e-9, (tuple(e.shape), measure.__name__, ours_, refs)


def test_group_lasso_in_adams_metric_with_float64_groups_of_subnormal_norm(backend, device):
    """A float64 group whose norm is subnormal gets the reference's floors (|w|/‖w_g‖ first: ‖w_g‖'s reciprocal
    overflows), so the group vanishes as in the reference, instead of an infinite floor that leaves it unshrunk."""
    from regfast.reference import optim as reference

    def step(fn):
        ps = [torch.tensor([[1e-310, -1e-310], [0.5, 1e-310]], dtype=torch.float64, device=device)]
        state = [[torch.zeros_like(ps[0])] for _ in range(3)]
        fn(ps, [torch.zeros_like(ps[0])], *state, [torch.zeros(())], None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False,
           0.0, 0.0, 1.0, "row", "preconditioned", False)
        return ps[0]

    expected = step(reference.adamw_step_)
    assert torch.equal(expected[0], torch.zeros(2, dtype=torch.float64, device=device))
    torch.testing.assert_close(step(select(device).adamw_step_), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("spread", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("groups, count, size", [("row", 400, 16), ("col", 260, 16400)], ids=["rows", "long-columns"])
def test_group_lasso_in_adams_metric_vanishes_the_references_groups_at_the_boundary(backend, device, dtype, spread,
                                                                                    groups, count, size):
    """Groups whose ‖u_g/a_g‖ runs from 0.5 to 1.5 (the vanishing test at 1): a first AdamW step with grads of
    magnitudes e^(±spread) leaves u_i = w_i − lr·sign(g_i) and a_i = lr·gl·√|g|/d_i (d_i Adam's floored denominator),
    the params chosen so that ‖u_g/a_g‖ = c. The groups vanish or stay as the reference's test decides, one by one
    (equal a: ‖u_g‖ against a itself; spread a: the test's sum, and Newton's steps from further below the root). The
    groups left agree to a few ulps of u; a NaN group stays NaN. Rows of 16 (the CPU's blocks), and columns of 16400
    rows (a tensor of 2**22 elements or more, whose columns the CPU steps in passes over the whole tensor)."""
    skip_in_interpreter(backend, device, "the lockstep tests check the interpreter's metric steps")
    from regfast.reference import optim as reference

    lr, gl = 0.01, 0.5
    gen = torch.Generator().manual_seed(11)
    # One group per row of these [count, size] matrices; by columns the tensors stepped are their transposes.
    grads = torch.sign(torch.randn(count, size, generator=gen, dtype=torch.float64))
    grads = grads * torch.exp(spread * (2 * torch.rand(count, size, generator=gen, dtype=torch.float64) - 1))
    # Adam's denominators d_i = max(|g_i|, gl): the floors (gl·|w_i|/‖w_g‖·√|g|) are gl, the elements of a group
    # being of one magnitude; ‖u_g/a_g‖² = c²·mean(d²)/rms² with u_i = sign(g_i)·lr·gl·c/rms, a_i = lr·gl·√|g|/d_i.
    rms = grads.abs().clamp_min(gl).square().mean(dim=1, keepdim=True).sqrt()
    c = torch.linspace(0.5, 1.5, count, dtype=torch.float64)[:, None] / rms
    params = torch.sign(grads) * lr * (1 + c * gl)
    params[7, 3] = float("nan")
    state_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

    def laid_out(t):
        return t if groups == "row" else t.T.contiguous()

    def step(fn):
        ps = [laid_out(params).to(device, dtype, copy=True)]
        state = [[torch.zeros_like(ps[0], dtype=state_dtype)] for _ in range(3)]
        fn(ps, [laid_out(grads).to(device, dtype)], *state, [torch.zeros(())], None, lr, 0.9, 0.999, 1e-8, 0.0,
           False, False, 0.0, 0.0, gl, groups, "preconditioned", False)
        return laid_out(ps[0].double().cpu())

    expected, actual = step(reference.adamw_step_), step(select(device).adamw_step_)
    gone = (expected == 0).all(dim=1)
    assert 0.2 * count < int(gone.sum()) < 0.8 * count
    assert torch.equal((actual == 0).all(dim=1), gone)
    assert actual[7].isnan().all() and expected[7].isnan().all()
    keep = ~gone
    keep[7] = False
    # Float64 groups of 16400: the sums, in another order than the reference's (about √|g| ulps apart), set t for
    # the groups that barely stay (t ≪ a), whose factor t/(t + a) moves with t's relative error.
    tol = 1e-11 if dtype == torch.float64 and size > 16 else 4 * torch.finfo(dtype).eps
    diff = (actual[keep] - expected[keep]).abs() / (params[keep].abs() - lr)
    assert bool((diff <= tol).all()), diff.max().item()


def test_direct_calls_mutate_and_return_the_penalty(backend, device):
    """The backend functions themselves: state written in place, the penalty of the new params returned."""
    ops = select(device)
    params = make_params([(9, 7), (13,)], torch.float32, device)
    grads = make_params([(9, 7), (13,)], torch.float32, device)
    bufs = [torch.full_like(p, 7.0) for p in params]
    value = ops.sgd_step_(params, grads, bufs, None, 0.1, 0.9, 0.0, False, 0.0, False, True, 0.01, 0.1, 0.0, "row",
                          True)
    for b, g in zip(bufs, grads):
        assert torch.equal(b, g)  # init_buffers: the buffer is the gradient, whatever it held
    expected = sum(0.01 * p.abs().sum().double() + 0.1 * p.double().square().sum() for p in params)
    torch.testing.assert_close(value.double().cpu(), expected.cpu(), rtol=1e-6, atol=0)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    ops.adamw_step_(params, grads, *state, [], steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0.1, 0.0, 0.0,
                    "row", "lr", False)
    assert all(s.item() == 1 for s in steps)
    assert not any(torch.equal(s, torch.zeros_like(s)) for s in state[0])


DETERMINISM_CASES = [("sgd", SGD_CASES[4][0]), ("adamw", dict(lr=DeviceLr(0.01), amsgrad=True, l1=0.02, l2=0.1)),
                     ("adamw", dict(l1=0.01, l2=0.1, group_lasso=0.05, groups="col"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_deterministic_across_thread_counts(backend, device, dtype):
    """The same params, state and penalties on every run; with 1 and 2 CPU threads for the CPU kernels (Adam's
    metric by columns takes 100 × 2000 in one block on one thread, and on two, where it is more than its share of the
    call's elements, in blocks of 327 columns and one of 38: a column in a vector in one layout and in the scalar tail
    in the other; 300 × 257 and 100 × 337 in one block on both)."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers determinism there")
    s = setting(backend)
    shapes = s.shapes if backend == "triton" else [(300, 257), (100, 337), (100, 2000), (2**16 + 5,), (65, 3, 17), (0,),
                                                   ()]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2) if backend == "cpp" else (threads, threads):
            torch.set_num_threads(n)
            results = []
            for kind, config in DETERMINISM_CASES:
                twins = run(backend, device, kind, config, dtype, shapes=shapes,
                            steps=2 if backend == "triton" else None, reference=False)
                states = [t for p in twins.params for t in twins.opt.state[p].values()]
                results += [*twins.params, *states, twins.opt.last_penalty]
            runs.append(results)
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_cuda_graph_capture_and_replay(backend, device, kind):
    """A captured step replayed with new grads and a new lr matches the reference's steps."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if backend == "torch":
        pytest.skip("the reference's steps are the expectation here")
    lr = torch.tensor(0.05, device="cuda")
    cls, config = (ProxSGD, dict(momentum=0.9)) if kind == "sgd" else (ProxAdamW, dict(capturable=True, amsgrad=True))

    def make(ps):
        return cls(ps, lr=lr, l1=0.02, l2=0.1, compute_penalty=True, **config)

    shapes = [(64, 33), (1000,), (5,), (0,)]
    params = [nn.Parameter(t) for t in make_params(shapes, torch.float32, "cuda", seed=0)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt, expected = make(params), make(twins)
    for p in params:
        p.grad = torch.zeros_like(p)

    def new_grads():
        with torch.no_grad():
            for p, t in zip(params, twins):
                p.grad.copy_(torch.randn_like(p))
                t.grad = p.grad.clone()
        with use_backend("torch"):
            expected.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Warm-up: creates the state, caches the tables and compiles the kernels (the first step and
        # the later ones are different specializations) outside the capture.
        for _ in range(2):
            new_grads()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    agree = agreement(backend, device, kind, torch.float32, config)
    for step in (0.02, 0.01):
        lr.fill_(step)
        new_grads()
        graph.replay()
        for p, e in zip(params, twins):
            agree.params(p.detach(), e.detach())
        agree.penalty(opt.last_penalty, expected.last_penalty)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, config", [
    ("sgd", dict(momentum=0.9, weight_decay=1e-2, l1=0.01, l2=0.1)),
    ("sgd", dict(nesterov=True, momentum=0.5, maximize=True)),
    ("adamw", dict(l1=0.01, l2=0.1)),
    ("adamw", dict(amsgrad=True, prox="lr", l1=0.02, weight_decay=0.1)),
    ("adamw", dict()),
], ids=lambda v: v if isinstance(v, str) else _id(v))
def test_a_16_bit_step_is_the_float32_step_rounded_once(backend, device, kind, config, dtype):
    """A float16 / bfloat16 param is stepped in float32 and rounded once: its first step equals the same step of a
    float32 copy (same grads, same float32 state) rounded to its dtype, bit for bit, state included. On the CPU the
    16-bit params are stepped in blocks of float copies; the sizes straddle the blocks and the lanes."""
    if backend == "triton":
        pytest.skip("Triton's 16-bit steps are checked against the reference (test_prox_sgd, test_prox_adamw)")
    shapes = [(1025,), (3, 1000), (7,), (4096 + 3,), ()]
    narrow = [nn.Parameter(t) for t in make_params(shapes, dtype, device, seed=3)]
    wide = [nn.Parameter(p.detach().float()) for p in narrow]
    for p, q in zip(narrow, wide):
        p.grad = torch.randn(p.shape, device=device).to(dtype) * 0.1
        q.grad = p.grad.float()
    a, b = optimizer(kind, config, compute_penalty=False)(narrow), optimizer(kind, config, compute_penalty=False)(wide)
    a.step()
    b.step()
    for p, q in zip(narrow, wide):
        assert torch.equal(p.detach(), q.detach().to(dtype))
        for key, value in a.state[p].items():
            assert torch.equal(value, b.state[q][key]), key
