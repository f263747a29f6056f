"""The Triton fused optimizer steps against the torch backend: ProxSGD / ProxAdamW, step for step.

Runs on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` there). Each case builds two identical param sets, steps one under
``REGFAST_BACKEND=triton`` and the other under ``REGFAST_BACKEND=torch`` on the same grads, and
compares params, optimizer state and penalty after every step. Small chunk sizes keep the
interpreter fast and still make tensors span many chunks.
"""

import pytest
import torch
from helpers import make_params, noncontiguous, use_backend
from torch import nn

from regfast import _dispatch
from regfast.optim import ProxAdamW, ProxSGD

rt = pytest.importorskip("regfast.triton")
if rt.unavailable_reason() is None:
    from regfast.triton import launcher

pytestmark = pytest.mark.skipif(rt.unavailable_reason() is not None, reason=f"{rt.unavailable_reason()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = ("triton", "torch")
CHUNK = 64
# Empty, 0-dim and 1-element tensors between others; (33, 17) spans 9 chunks of 64.
SHAPES = [(6, 5), (0, 3), (7,), (), (1,), (33, 17), (130,), (2, 0), (4, 3, 2)]
# Params given a non-contiguous layout: transposed (their state is too) and strided 1-D.
NONCONTIGUOUS = (0, 2, 5)
STEPS = 3

# |triton − torch| allowed, relative to the value and to a unit scale. Both backends do the same
# float32 (float64) arithmetic op for op, so fp32/fp64 differ by rounding order at most; fp16/bf16
# params are that float32 math rounded once per step, so at most one unit in the last place.
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# The penalty: per-chunk float32 partials against the reference's float64 sums.
PENALTY_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}

SGD_CONFIGS = [
    dict(),
    dict(l1=0.02),
    dict(momentum=0.9, l1=0.02, l2=0.1),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, l2=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True, l1=0.02, l2=0.05),
]
ADAMW_CONFIGS = [
    dict(),
    dict(l1=0.02),
    dict(l1=0.02, l2=0.1, prox="lr"),
    dict(amsgrad=True, eps=1e-6, l1=0.02, l2=0.1, maximize=True),
    dict(weight_decay=0.0, betas=(0.8, 0.99), l2=0.2, prox="lr", amsgrad=True),
    # β1 < 0.5: torch.lerp's second formula.
    dict(betas=(0.3, 0.9), l1=0.01),
    dict(capturable=True, l1=0.02, l2=0.1),
    dict(capturable=True, amsgrad=True, prox="lr", l1=0.02),
]


def _lr(value: float, kind: str):
    return torch.tensor(value, device=DEVICE) if kind == "tensor" else value


def _sgd(lr: float, lr_kind: str = "float", **config):
    return lambda ps: ProxSGD(ps, lr=_lr(lr, lr_kind), **config, compute_penalty=True)


def _adamw(lr: float, lr_kind: str = "float", **config):
    return lambda ps: ProxAdamW(ps, lr=_lr(lr, lr_kind), **config, compute_penalty=True)


def _tensors(dtype, shapes, noncontig, seed=0):
    ts = make_params(shapes, dtype, DEVICE, seed=seed)
    return [noncontiguous(t) if i in noncontig else t for i, t in enumerate(ts)]


def _close(actual, expected, dtype, rtol=None):
    tol = TOL[dtype] if rtol is None else rtol
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol, atol=tol,
                               equal_nan=True)


def _step(opt, backend: str, chunk: int = CHUNK) -> None:
    with use_backend(backend), launcher.chunked(chunk):
        opt.step()


def lockstep(make_opt, dtype=torch.float32, shapes=SHAPES, noncontig=NONCONTIGUOUS, steps=STEPS, chunk=CHUNK,
             tol=None):
    """Step the optimizer under both backends on the same grads; compare everything after each step.

    ``tol`` replaces the params' tolerance of ``TOL``.
    """
    twins = {b: [nn.Parameter(t) for t in _tensors(dtype, shapes, noncontig)] for b in BACKENDS}
    opts = {b: make_opt(ps) for b, ps in twins.items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE) for s in shapes]
        for backend in BACKENDS:
            for p, g in zip(twins[backend], grads):
                # A non-contiguous param gets a non-contiguous grad.
                p.grad = g.clone() if p.is_contiguous() else noncontiguous(g)
            _step(opts[backend], backend, chunk)
        ours, theirs = opts["triton"], opts["torch"]
        for p, e in zip(twins["triton"], twins["torch"]):
            assert p.dtype == dtype and p.stride() == e.stride()
            _close(p, e, dtype, rtol=tol)
            for key, value in theirs.state[e].items():
                mine = ours.state[p][key]
                assert mine.dtype == value.dtype and mine.device == value.device
                if key == "step":
                    assert torch.equal(mine, value)
                else:
                    _close(mine, value, dtype if dtype == torch.float64 else torch.float32)
        _close(ours.last_penalty, theirs.last_penalty, dtype, rtol=PENALTY_RTOL[dtype])
    return opts, twins


def test_triton_serves_the_optimizer_ops():
    with use_backend("triton"):
        backend = _dispatch.select(torch.device(DEVICE))
        assert backend.sgd_step_ is rt.sgd_step_ and backend.adamw_step_ is rt.adamw_step_


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=range(len(SGD_CONFIGS)))
def test_prox_sgd_matches_torch_backend(config, lr_kind):
    opts, twins = lockstep(_sgd(0.05, lr_kind, **config))
    if config.get("momentum"):
        buffers = [opts["triton"].state[twins["triton"][i]]["momentum_buffer"] for i in NONCONTIGUOUS]
        assert not buffers[0].is_contiguous() and not buffers[2].is_contiguous()


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=range(len(ADAMW_CONFIGS)))
def test_prox_adamw_matches_torch_backend(config, lr_kind):
    opts, twins = lockstep(_adamw(0.01, lr_kind, **config))
    state = opts["triton"].state[twins["triton"][0]]
    assert not state["exp_avg"].is_contiguous() and state["step"].item() == STEPS
    assert state["step"].device.type == (DEVICE if config.get("capturable") else "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("make_opt, float32_bias", [
    (_sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, l1=0.02, l2=0.05), False),
    (_adamw(0.01, l1=0.02, l2=0.1), False),
    (_adamw(0.01, "tensor", amsgrad=True, l1=0.02, prox="lr"), True),
    (_adamw(0.01, capturable=True, l1=0.02, l2=0.1, maximize=True), True),
], ids=["sgd", "adamw", "adamw_tensor_lr", "adamw_capturable"])
def test_low_and_double_precision(make_opt, float32_bias, dtype):
    tol = None
    if float32_bias and dtype == torch.float64 and DEVICE == "cuda":
        # With a tensor lr or capturable, both backends compute AdamW's bias corrections in float32;
        # torch's CUDA pow may round them one float32 ulp apart from the kernel: a relative 6e-8 of
        # each update (about lr) instead of float64 rounding. On CPU both round alike.
        tol = 1e-8
    lockstep(make_opt, dtype, tol=tol)


@pytest.mark.parametrize("make_opt", [_sgd(0.05, momentum=0.9, l1=0.02, l2=0.1),
                                      _adamw(0.01, "tensor", l1=0.02, l2=0.1)],
                         ids=["sgd", "adamw"])
def test_many_tiny_tensors(make_opt):
    gen = torch.Generator().manual_seed(0)
    shapes = [(s,) if i % 3 else (2, s) for i, s in enumerate(torch.randint(1, 12, (320,), generator=gen).tolist())]
    # Empty, 1-element and multi-chunk tensors among the small ones.
    shapes[10:10] = [(0,), (1,), (4, CHUNK + 1), (0, 3), (3 * CHUNK + 7,)]
    lockstep(make_opt, shapes=shapes, noncontig=(3, 12), steps=2)


@pytest.mark.parametrize("chunk", [16, 32])
def test_chunk_boundaries(chunk):
    sizes = [chunk - 1, chunk, chunk + 1, 1, 0, 2 * chunk - 1, 2 * chunk, 0, 2 * chunk + 1]
    shapes = [(s,) for s in sizes] + [(3, chunk + 1)]
    lockstep(_adamw(0.01, amsgrad=True, l1=0.02, l2=0.1), shapes=shapes, noncontig=(9,), steps=2, chunk=chunk)
    lockstep(_sgd(0.05, momentum=0.9, l1=0.02), shapes=shapes, noncontig=(9,), steps=2, chunk=chunk)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
def test_group_lasso_after_the_fused_step(groups, lr_kind):
    # float32: the fused launch applies the elementwise prox, the group launches the group shrink.
    lockstep(_sgd(0.05, lr_kind, momentum=0.9, group_lasso=0.5, l1=0.01, l2=0.1, groups=groups), steps=2)
    lockstep(_adamw(0.01, lr_kind, prox="lr", group_lasso=0.5, l2=0.1, groups=groups), steps=2)


def test_group_lasso_in_adams_metric_and_in_low_precision():
    # Adam's metric: the reference step's torch ops, bit for bit. bfloat16: stepped in float32 copies and rounded
    # once per step, as the reference does.
    opts, twins = lockstep(_adamw(0.01, group_lasso=0.1, l2=0.1), steps=2)
    for p, e in zip(twins["triton"], twins["torch"]):
        assert torch.equal(p, e)
    lockstep(_sgd(0.05, momentum=0.9, group_lasso=0.1, l1=0.01), dtype=torch.bfloat16, steps=2)


def test_without_penalty_value():
    twins = {b: [nn.Parameter(t) for t in _tensors(torch.float32, SHAPES, NONCONTIGUOUS)] for b in BACKENDS}
    for backend, params in twins.items():
        opt = ProxAdamW(params, lr=0.01, amsgrad=True, l1=0.02, l2=0.1)
        for p in params:
            p.grad = torch.ones_like(p)
        _step(opt, backend)
        assert opt.last_penalty is None
    for p, e in zip(*twins.values()):
        _close(p, e, torch.float32)


@pytest.mark.parametrize("make_opt", [_sgd(0.05, momentum=0.9, l1=0.02, l2=0.1),
                                      _adamw(0.01, "tensor", amsgrad=True, l1=0.02, l2=0.1)],
                         ids=["sgd", "adamw"])
def test_bitwise_deterministic(make_opt):
    runs = []
    for _ in range(2):
        params = [nn.Parameter(t) for t in _tensors(torch.float32, SHAPES, NONCONTIGUOUS)]
        opt = make_opt(params)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            _step(opt, "triton")
        states = [t for p in params for t in opt.state[p].values()]
        runs.append([*params, *states, opt.last_penalty])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@CUDA_ONLY
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_cuda_graph_capture_and_replay(kind):
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
    with torch.cuda.stream(stream), use_backend("triton"):
        # Warm-up: creates the state, caches the tables and compiles the kernels (the first step and
        # the later ones are different specializations) outside the capture.
        for _ in range(2):
            new_grads()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with use_backend("triton"), torch.cuda.graph(graph):
        opt.step()
    for step in (0.02, 0.01):
        lr.fill_(step)
        new_grads()
        graph.replay()
        for p, e in zip(params, twins):
            _close(p, e, torch.float32)
        _close(opt.last_penalty, expected.last_penalty, torch.float32, rtol=PENALTY_RTOL[torch.float32])
