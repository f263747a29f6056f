"""The compiled extension (``cpp`` on CPU, ``cuda`` on CUDA) against the float64 oracle.

Every op through the public API and through the backend functions, on fresh random inputs:
all dtypes, the edge shapes, non-contiguous layouts, hundreds of tensors, NaN propagation,
bitwise determinism across thread counts, a tensor step and every grouping.
"""

import math

import oracle
import pytest
import torch
from helpers import DTYPES, EDGE_SHAPES, RTOL, assert_close, make_params, noncontiguous, to64, use_backend

import regfast
from regfast import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"regfast._C is not built: {_ext.unavailable_reason('cpu')}")

BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or _ext._C is None or not _ext._C.WITH_CUDA,
        reason="needs a CUDA device and regfast._C built with CUDA kernels")),
]
HYPERS = [
    dict(l1=0.3),
    dict(l2=0.7),
    dict(group_lasso=0.4),
    dict(l1=0.05, l2=0.2, group_lasso=0.3),
]
GROUPINGS = ["row", "col", "tensor"]
# Launcher edges: chunk-size neighbours (the CPU chunk is 2**15 elements), empty and 1-element
# tensors between others.
CHUNK_SHAPES = [(2**15 - 1,), (1,), (0,), (2**15,), (2**15 + 1,), (3, 2**14 + 1), (2**16 + 3, 2)]


def _kw(h):
    return dict(l1=h.get("l1", 0.0), l2=h.get("l2", 0.0), gl=h.get("group_lasso", 0.0))


def _grad_rtol(dtype):
    return RTOL[dtype]


def _value_dtype(dtype):
    """The tolerance class of a reduction: fp16/bf16 accumulate in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_all(ts, dtype, device, h, groups, lr=0.1):
    """penalty, its backward, add_penalty_grad_ and prox_ of ``ts`` against the oracle."""
    ref = to64(ts)
    kw = _kw(h)
    expected = oracle.penalty(ref, groups=groups, **kw)
    value = regfast.penalty(ts, groups=groups, **h)
    assert value.device.type == device and value.dtype == _value_dtype(dtype)
    assert_close(value, expected, _value_dtype(dtype), scale=1.0)

    leaves = [t.detach().clone().requires_grad_() for t in ts]
    regfast.penalty(leaves, groups=groups, **h).mul(1.5).backward()
    base = [torch.randn(t.shape, dtype=dtype, device=device) for t in ts]
    owners = [t.detach().clone() for t in ts]
    for o, b in zip(owners, base):
        o.grad = b.clone()
    value2 = regfast.add_penalty_grad_(owners, groups=groups, **h)
    assert_close(value2, expected, _value_dtype(dtype), scale=1.0)
    for leaf, o, b, r in zip(leaves, owners, base, ref):
        g = oracle.grad(r, groups=groups, **kw)
        assert leaf.grad.dtype == dtype and o.grad.dtype == dtype
        assert_close(leaf.grad, 1.5 * g, dtype, scale=2.0)
        assert_close(o.grad, b.double() + g, dtype, scale=2.0)

    stepped = [t.detach().clone() for t in ts]
    regfast.prox_(stepped, lr, groups=groups, **h)
    for s, r in zip(stepped, ref):
        assert s.dtype == dtype
        assert_close(s, oracle.prox(r, lr, groups=groups, **kw), dtype, scale=1.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_edge_shapes(backend, device, dtype):
    ts = make_params(EDGE_SHAPES, dtype, device)
    with use_backend(backend):
        for layout in (ts, [noncontiguous(t) for t in ts]):
            per_l1, per_l2sq = _ext.OPS.norms(layout)
            n = regfast.norms(layout)
            ref = to64(ts)
            acc = _value_dtype(dtype)
            assert per_l1.dtype == acc and per_l1.shape == (len(ts),) and per_l1.device.type == device
            exp_l1 = torch.stack([t.abs().sum() for t in ref])
            exp_l2sq = torch.stack([(t * t).sum() for t in ref])
            for got_l1, got_l2sq in ((per_l1, per_l2sq), (n.per_tensor_l1, n.per_tensor_l2sq)):
                assert_close(got_l1, exp_l1, acc)
                assert_close(got_l2sq, exp_l2sq, acc)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_ops_edge_shapes(backend, device, dtype, groups):
    ts = make_params(EDGE_SHAPES, dtype, device)
    with use_backend(backend):
        for h in HYPERS:
            _check_all(ts, dtype, device, h, groups)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_noncontiguous(backend, device, groups):
    dtype = torch.float32
    ts = [noncontiguous(t) for t in make_params([(17, 33), (4, 3, 5, 2), (1031,), (6, 5)], dtype, device)]
    assert not any(t.is_contiguous() for t in ts)
    with use_backend(backend):
        _check_all(ts, dtype, device, HYPERS[-1], groups)
        grads = [noncontiguous(torch.randn(t.shape, dtype=dtype, device=device)) for t in ts]
        before = [g.clone() for g in grads]
        params = [t.clone() for t in ts]
        _ext.OPS.add_penalty_grad_(params, grads, 0.1, 0.2, 0.3, groups)
        for p, g, b in zip(params, grads, before):
            assert_close(g, b.double() + oracle.grad(p.double(), 0.1, 0.2, 0.3, groups), dtype, scale=2.0)
        stepped = [noncontiguous(t.contiguous()) for t in ts]
        _ext.OPS.prox_(stepped, None, 0.1, 0.1, 0.2, 0.3, groups)
        for s, t in zip(stepped, ts):
            assert not s.is_contiguous()
            assert_close(s, oracle.prox(t.double(), 0.1, 0.1, 0.2, 0.3, groups), dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_edges_and_many_tensors(backend, device, dtype):
    shapes = CHUNK_SHAPES + [(int(s),) for s in torch.randint(0, 40, (300,))] + [(3, 4), (5, 1, 2)] * 10
    ts = make_params(shapes, dtype, device)
    with use_backend(backend):
        per_l1, per_l2sq = _ext.OPS.norms(ts)
        ref = to64(ts)
        assert_close(per_l1, torch.stack([t.abs().sum() for t in ref]), _value_dtype(dtype))
        assert_close(per_l2sq, torch.stack([(t * t).sum() for t in ref]), _value_dtype(dtype))
        for groups in GROUPINGS:
            _check_all(ts, dtype, device, HYPERS[-1], groups)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lr_tensor(backend, device, dtype):
    ts = make_params([(9, 7), (13,), (2, 3, 4)], dtype, device)
    lr = torch.tensor(0.05, dtype=dtype, device=device)
    with use_backend(backend):
        for groups in GROUPINGS:
            for h in HYPERS:
                stepped = [t.clone() for t in ts]
                regfast.prox_(stepped, lr, groups=groups, **h)
                for s, t in zip(stepped, ts):
                    assert_close(s, oracle.prox(t.double(), 0.05, groups=groups, **_kw(h)), dtype)
                direct = [t.clone() for t in ts]
                _ext.OPS.prox_(direct, lr.to(_value_dtype(dtype)), 0.0, groups=groups, **{k: h.get(k, 0.0)
                                                                                  for k in ("l1", "l2", "group_lasso")})
                for a, b in zip(direct, stepped):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_nan_and_inf_propagate(backend, device, groups):
    ts = make_params([(6, 5), (8,), (4, 3, 2)], torch.float32, device)
    ts[0][2, 3] = float("nan")
    ts[1][5] = float("inf")
    with use_backend(backend):
        per_l1, per_l2sq = _ext.OPS.norms(ts)
        assert per_l1[0].isnan() and per_l2sq[0].isnan() and per_l1[1].isinf() and per_l2sq[1].isinf()
        assert torch.isfinite(per_l1[2]) and torch.isfinite(per_l2sq[2])
        for h in HYPERS:
            assert regfast.penalty(ts, groups=groups, **h).isnan()
            grads = [torch.zeros_like(t) for t in ts]
            _ext.OPS.add_penalty_grad_(ts, grads, h.get("l1", 0.0), h.get("l2", 0.0), h.get("group_lasso", 0.0), groups)
            assert grads[0][2, 3].isnan()
            assert torch.isfinite(grads[2]).all()
            stepped = [t.clone() for t in ts]
            regfast.prox_(stepped, 0.1, groups=groups, **h)
            assert stepped[0][2, 3].isnan()
            assert not torch.isfinite(stepped[1][5])
            assert_close(stepped[2], oracle.prox(ts[2].double(), 0.1, groups=groups, **_kw(h)), torch.float32)
        # A zero coefficient is an absent term: 0·inf must not appear.
        assert regfast.penalty(ts[1:], l1=0.3, groups=groups).isinf()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_across_thread_counts(backend, device, dtype):
    ts = make_params([(300, 257), (2**16 + 5,), (65, 3, 17), (0,), ()], dtype, device)
    threads = torch.get_num_threads()

    def run():
        grads = [torch.ones_like(t) for t in ts]
        stepped = [t.clone() for t in ts]
        out = [*_ext.OPS.norms(ts)]
        for groups in GROUPINGS:
            out.append(_ext.OPS.penalty(ts, 0.1, 0.2, 0.3, groups))
            out.append(_ext.OPS.add_penalty_grad_(ts, grads, 0.1, 0.2, 0.3, groups))
            _ext.OPS.prox_(stepped, None, 0.01, 0.1, 0.2, 0.3, groups)
        return out + grads + stepped

    with use_backend(backend):
        try:
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            two = run()
            again = run()
        finally:
            torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_lasso_groupings_and_zero_groups(backend, device):
    w = torch.randn(7, 6, 3, dtype=torch.float64, device=device)
    w[2] = 0
    w[:, 4] = 0
    v = torch.randn(5, dtype=torch.float64, device=device)
    with use_backend(backend):
        for groups in GROUPINGS:
            expected = oracle.penalty([w.cpu(), v.cpu()], gl=0.7, groups=groups)
            assert_close(_ext.OPS.penalty([w, v], 0.0, 0.0, 0.7, groups), expected, torch.float64)
            out = _ext.OPS.penalty_backward(torch.tensor(2.0, dtype=torch.float64, device=device), [w, v],
                                        0.0, 0.0, 0.7, groups)
            assert_close(out[0], 2 * oracle.grad(w.cpu(), gl=0.7, groups=groups), torch.float64)
            assert_close(out[1], 2 * oracle.grad(v.cpu(), gl=0.7, groups=groups), torch.float64)
            for lr in (0.01, 10.0):
                stepped = [w.clone(), v.clone()]
                _ext.OPS.prox_(stepped, None, lr, 0.0, 0.0, 0.7, groups)
                assert_close(stepped[0], oracle.prox(w.cpu(), lr, gl=0.7, groups=groups), torch.float64)
                assert_close(stepped[1], oracle.prox(v.cpu(), lr, gl=0.7, groups=groups), torch.float64)
        # A large step zeroes every group exactly; the "tensor" group norm scales with √numel.
        big = [w.clone()]
        _ext.OPS.prox_(big, None, 100.0, 0.0, 0.0, 0.7, "tensor")
        assert (big[0] == 0).all()
        assert math.isclose(float(_ext.OPS.penalty([w], 0.0, 0.0, 1.0, "tensor")),
                            math.sqrt(w.numel()) * float(w.norm()), rel_tol=1e-12)


def test_unavailable_reason():
    assert _ext.unavailable_reason("cpu") is None
    assert "mps" in _ext.unavailable_reason("mps")
    if not _ext._C.WITH_CUDA:
        assert "without CUDA" in _ext.unavailable_reason("cuda")
    assert regfast.backend("cpu").selected == "cpp"
