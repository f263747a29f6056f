"""The compiled fused optimizer steps (``cpp`` on CPU, ``cuda`` on CUDA) against the reference steps.

ProxSGD and ProxAdamW run the same steps on twin params under the compiled backend and under
``REGFAST_BACKEND=torch`` (regfast.reference.optim, which mirrors torch's foreach optimizers).

SGD is the same arithmetic op for op, so params and buffers agree bitwise.
AdamW's moments agree bitwise; its params agree to a few ulps because torch's CPU ``sqrt`` goes
through MKL's vector math, which is not correctly rounded (about 0.7% of float32 and float64
results differ by one ulp from the correctly rounded square root the fused pass takes), so the
denominator ``√v̂ + eps`` and with it the update can differ by an ulp. The penalty is reduced in
a different order than the reference's float64 norms: a float32-rounding tolerance.
"""

import pytest
import torch
from helpers import make_params, noncontiguous, use_backend
from torch import nn

from regfast import _ext
from regfast.optim import ProxAdamW, ProxSGD

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"regfast._C is not built: {_ext.unavailable_reason('cpu')}")

BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or _ext._C is None or not _ext._C.WITH_CUDA,
        reason="needs a CUDA device and regfast._C built with CUDA kernels")),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 5
# Shapes around the CPU chunk (2**15) and block (1024) sizes, empty and 0-dim tensors between others.
SHAPES = [(37, 53), (0,), (), (1031,), (5, 7, 3), (2**15 + 3,), (1,), (0, 4), (17, 1024)]

SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9, l1=0.01, l2=0.1),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, maximize=True, l1=0.02),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, l2=0.3),
    dict(weight_decay=1e-2, l1=0.05),
    dict(lr=torch.tensor(0.05), momentum=0.9, l1=0.01, l2=0.1),
    dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True, l2=0.2, maximize=True),
]
ADAMW_CONFIGS = [
    dict(),
    dict(l1=0.01, l2=0.1),
    dict(l1=0.02, prox="lr", amsgrad=True, maximize=True),
    dict(l2=0.3, betas=(0.3, 0.9), weight_decay=0.0, eps=1e-6),
    dict(lr=torch.tensor(0.01), l1=0.01, l2=0.1),
    dict(lr=torch.tensor(0.01), l1=0.01, l2=0.1, prox="lr", amsgrad=True, betas=(0.6, 0.99)),
    dict(lr=torch.tensor(0.01), capturable=True, l1=0.01),
]


def _make(kind, config, params, compute_penalty=True):
    kw = dict(config)
    if isinstance(kw.get("lr"), torch.Tensor):
        kw["lr"] = kw["lr"].clone()
    kw.setdefault("lr", 0.05 if kind == "sgd" else 0.01)
    return (ProxSGD if kind == "sgd" else ProxAdamW)(params, compute_penalty=compute_penalty, **kw)


def _run(kind, config, backend, tensors, grads, compute_penalty=True):
    """STEPS steps of the optimizer under ``backend`` on copies of ``tensors``; returns params, optimizer, penalties."""
    # noncontiguous() of a transposed tensor is a view of it; of a contiguous copy it is new storage.
    params = [nn.Parameter(t.clone() if t.is_contiguous() else noncontiguous(t.contiguous())) for t in tensors]
    opt = _make(kind, config, params, compute_penalty)
    penalties = []
    with use_backend(backend):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone() if g.is_contiguous() else noncontiguous(g.contiguous())
            opt.step()
            penalties.append(opt.last_penalty)
    return params, opt, penalties


def _problem(dtype, device, shapes=SHAPES, layout=None):
    tensors = make_params(shapes, dtype, device)
    grads = [make_params(shapes, dtype, device) for _ in range(STEPS)]
    if layout is not None:
        tensors = [layout(t) for t in tensors]
        grads = [[layout(g) for g in gs] for gs in grads]
    return tensors, grads


def _ulps_close(actual, expected, ulps):
    """|a − e| ≤ ulps·eps(dtype)·max(|e|, 1): a few units in the last place of params of order 1."""
    eps = torch.finfo(expected.dtype).eps
    diff = (actual.double() - expected.double()).abs()
    bound = ulps * eps * expected.double().abs().clamp_min(1.0)
    assert bool((diff <= bound).all()), f"max diff {diff.max().item():.3g} > {ulps} ulps"


def _check(kind, ours, theirs, exact_params, penalty=True):
    (ps, opt, pens), (ps_ref, opt_ref, pens_ref) = ours, theirs
    for p, q in zip(ps, ps_ref):
        assert p.dtype == q.dtype and p.shape == q.shape and p.stride() == q.stride()
        if exact_params:
            assert torch.equal(p, q)
        else:
            _ulps_close(p, q, 4)
        for key, value in opt_ref.state[q].items():
            # Moments, buffers and step counts do not depend on the params' rounding: bitwise.
            assert torch.equal(opt.state[p][key], value), key
    for a, b in zip(pens, pens_ref):
        if not penalty:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.device == b.device
        # float32 sums of ~10⁵ terms in another order than the reference's: √n·eps ≈ 2e-5.
        rtol = 1e-12 if a.dtype == torch.float64 else 2e-5
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_prox_sgd_matches_reference(backend, device, dtype, config):
    tensors, grads = _problem(dtype, device)
    ours = _run("sgd", config, backend, tensors, grads)
    theirs = _run("sgd", config, "torch", tensors, grads)
    _check("sgd", ours, theirs, exact_params=device == "cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=str)
def test_prox_adamw_matches_reference(backend, device, dtype, config):
    tensors, grads = _problem(dtype, device)
    ours = _run("adamw", config, backend, tensors, grads)
    theirs = _run("adamw", config, "torch", tensors, grads)
    _check("adamw", ours, theirs, exact_params=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind,config", [("sgd", SGD_CONFIGS[2]), ("sgd", SGD_CONFIGS[5]), ("adamw", ADAMW_CONFIGS[2]),
                                         ("adamw", ADAMW_CONFIGS[4])], ids=str)
def test_noncontiguous_params_grads_and_state(backend, device, kind, config):
    tensors, grads = _problem(torch.float32, device, shapes=[(37, 53), (1031,), (5, 7, 3), (64, 600)],
                              layout=noncontiguous)
    assert not any(t.is_contiguous() for t in tensors)
    ours = _run(kind, config, backend, tensors, grads)
    theirs = _run(kind, config, "torch", tensors, grads)
    assert not any(p.is_contiguous() for p in ours[0])
    _check(kind, ours, theirs, exact_params=kind == "sgd" and device == "cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors(backend, device, dtype):
    shapes = [(int(n),) for n in torch.randint(0, 60, (300,))] + [(3, 4), (0,), (2**15 - 1,)] * 5
    tensors, grads = _problem(dtype, device, shapes=shapes)
    for kind, config in (("sgd", SGD_CONFIGS[1]), ("adamw", ADAMW_CONFIGS[1])):
        ours = _run(kind, config, backend, tensors, grads)
        theirs = _run(kind, config, "torch", tensors, grads)
        _check(kind, ours, theirs, exact_params=kind == "sgd" and device == "cpu")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_without_compute_penalty(backend, device):
    tensors, grads = _problem(torch.float32, device)
    for kind, config in (("sgd", SGD_CONFIGS[1]), ("adamw", ADAMW_CONFIGS[1])):
        ours = _run(kind, config, backend, tensors, grads, compute_penalty=False)
        theirs = _run(kind, config, "torch", tensors, grads, compute_penalty=False)
        _check(kind, ours, theirs, exact_params=kind == "sgd" and device == "cpu", penalty=False)


GROUP_CONFIGS = [
    ("sgd", dict(momentum=0.9, l1=0.01, group_lasso=0.05)),
    ("sgd", dict(lr=torch.tensor(0.05), momentum=0.9, l2=0.1, group_lasso=0.05, groups="col")),
    ("sgd", dict(weight_decay=1e-2, l1=0.02, l2=0.3, group_lasso=0.2, groups="tensor")),
    ("adamw", dict(prox="lr", l2=0.1, group_lasso=0.05, groups="col")),
    ("adamw", dict(prox="lr", lr=torch.tensor(0.01), amsgrad=True, l1=0.01, l2=0.2, group_lasso=0.3)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind,config", GROUP_CONFIGS, ids=str)
def test_group_lasso_after_the_fused_step(backend, device, dtype, kind, config):
    # float32 / float64: the fused pass applies the elementwise prox, the backend's group passes the
    # group shrink; bfloat16 goes to the reference (rounded once per step), bit for bit.
    tensors, grads = _problem(dtype, device)
    ours = _run(kind, config, backend, tensors, grads)
    theirs = _run(kind, config, "torch", tensors, grads)
    _check(kind, ours, theirs, exact_params=dtype == torch.bfloat16)
    without = _run(kind, {**config, "group_lasso": 0.0}, backend, tensors, grads)
    assert not all(torch.equal(p, q) for p, q in zip(ours[0], without[0]))  # the group term did act


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
def test_group_lasso_in_adams_metric(backend, device, dtype, groups):
    """The extension's own ATen composition of the metric step: the reference's ops, but group norms summed in
    another order, so params agree to a few ulps."""
    tensors, grads = _problem(dtype, device)
    config = dict(l1=0.01, l2=0.1, group_lasso=0.05, groups=groups, prox="preconditioned", amsgrad=True)
    ours = _run("adamw", config, backend, tensors, grads)
    theirs = _run("adamw", config, "torch", tensors, grads)
    _check("adamw", ours, theirs, exact_params=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_direct_calls_mutate_and_return_the_penalty(backend, device):
    """The backend functions themselves: state written in place, penalty of the new params, bad prox rejected."""
    params = make_params([(9, 7), (13,)], torch.float32, device)
    grads = make_params([(9, 7), (13,)], torch.float32, device)
    bufs = [torch.full_like(p, 7.0) for p in params]
    value = _ext.OPS.sgd_step_(params, grads, bufs, None, 0.1, 0.9, 0.0, False, 0.0, False, True, 0.01, 0.1, 0.0,
                               "row", True)
    for b, g in zip(bufs, grads):
        assert torch.equal(b, g)  # init_buffers: the buffer is the gradient, whatever it held
    expected = sum(0.01 * p.abs().sum().double() + 0.1 * p.double().square().sum() for p in params)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    with pytest.raises(RuntimeError, match="prox"):
        _ext.OPS.adamw_step_(params, grads, *state, [], steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0.1,
                             0.0, 0.0, "row", "bogus", False)
    _ext.OPS.adamw_step_(params, grads, *state, [], steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0.1,
                         0.0, 0.0, "row", "lr", False)
    assert all(s.item() == 1 for s in steps)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_across_thread_counts(backend, device, dtype):
    tensors, grads = _problem(dtype, device, shapes=[(300, 257), (2**16 + 5,), (65, 3, 17), (0,), ()])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append([_run(kind, config, backend, tensors, grads)
                         for kind, config in (("sgd", SGD_CONFIGS[2]), ("adamw", ADAMW_CONFIGS[1]))])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for (ps, _, pens), (qs, _, qens) in zip(runs[0], other):
            assert all(torch.equal(p, q) for p, q in zip(ps, qs))
            assert all(torch.equal(a, b) for a, b in zip(pens, qens))
