"""Group norms at the edges of each dtype's range, and reductions whose bits do not depend on the thread count.

The expected values come from ``math.hypot`` (exact scaling, no overflow or underflow) on the float64
values of the inputs; every CPU backend is checked: ``torch``, ``cpp`` and ``triton`` (in its
interpreter), each forced for the call.
"""

import math

import pytest
import torch
from helpers import RTOL, use_backend

import regfast
from regfast import _dispatch

BACKENDS = [b for b in ("torch", "cpp", "triton") if _dispatch.unavailable_reason(b, "cpu") is None]

# (dtype, scale): weights of about `scale` whose squares leave the dtype's range (or its normal range) below
# or above, and ordinary ones. float32 5e-42 and float64 1e-318 are subnormal themselves.
EDGES = [(torch.float32, s) for s in (1e-25, 5e-42, 3e19, 2e36, 1.0)] + \
        [(torch.bfloat16, s) for s in (1e-25, 3e19)] + \
        [(torch.float16, s) for s in (1e-4, 300.0)] + \
        [(torch.float64, s) for s in (1e-170, 1e-318, 1e160, 1e300, 1.0)]


def _weights(dtype, scale, groups):
    """A (3, 4) tensor with entries of mixed signs and sizes around ``scale``, one group all zeros."""
    base = torch.tensor([[3.0, -4.0, 1.5, 0.25], [0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, -0.5, 7.0]], dtype=torch.float64)
    if groups == "col":
        base[:, 1] = 0
    return (base * scale).to(dtype)


def _rows(w, groups):
    w = w.to(torch.float64)
    if groups == "tensor":
        return [w.flatten().tolist()]
    return (w if groups == "row" else w.t()).tolist()


def _relative(actual, expected):
    return abs(actual - expected) / abs(expected) if expected else abs(actual)


def _tolerance(dtype, scale):
    # Relative error of a result stored in `dtype`: a subnormal result has fewer significant bits.
    info = torch.finfo(dtype)
    if scale * 0.25 < info.smallest_normal:
        return 4 * info.smallest_normal * info.eps / (scale * 0.25)
    return 4 * info.eps if dtype != torch.float32 else 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
@pytest.mark.parametrize("dtype, scale", EDGES, ids=[f"{str(d)[6:]}-{s:g}" for d, s in EDGES])
def test_group_lasso_at_the_edges_of_the_range(backend, groups, dtype, scale):
    w = _weights(dtype, scale, groups)
    rows = _rows(w, groups)
    size = len(rows[0])
    norms = [math.hypot(*r) for r in rows]
    gl = 0.5
    tol = _tolerance(dtype, scale)
    with use_backend(backend):
        value = regfast.penalty([w], group_lasso=gl, groups=groups).item()
        p = w.clone().requires_grad_()
        p.grad = torch.zeros_like(p)
        regfast.add_penalty_grad_([p], group_lasso=gl, groups=groups)
        # Through autograd with a negative upstream gradient (-penalty in the loss, or maximizing).
        q = w.clone().requires_grad_()
        (regfast.penalty([q], group_lasso=gl, groups=groups) * -0.75).backward()
        # A step that shrinks the largest group by half and zeroes the others.
        big = max(norms)
        x = w.clone()
        regfast.prox_([x], lr=1.0, group_lasso=big / (2 * math.sqrt(size)), groups=groups)

    expected = gl * math.sqrt(size) * sum(norms)
    assert math.isfinite(value) and _relative(value, expected) <= 4 * tol, (value, expected)

    grad_rows = _rows(p.grad, groups)
    upstream_rows = _rows(q.grad, groups)
    x_rows = _rows(x, groups)
    for r, n, g, u, xr in zip(rows, norms, grad_rows, upstream_rows, x_rows):
        for v, gv, uv, xv in zip(r, g, u, xr):
            want = gl * math.sqrt(size) * v / n if n else 0.0
            assert math.isfinite(gv) and abs(gv - want) <= tol * gl * math.sqrt(size), (gv, want)
            assert math.isfinite(uv) and abs(uv + 0.75 * want) <= tol * gl * math.sqrt(size), (uv, -0.75 * want)
            factor = max(0.0, 1 - big / (2 * n)) if n else 0.0
            # The result is rounded to `dtype`: compare with its spacing at the weights' scale.
            assert abs(xv - v * factor) <= tol * abs(v), (xv, v, factor)


# Adam's metric takes its Newton steps in float64 unscaled: float64 weights beyond about 1e±150 are out of reach.
METRIC_EDGES = [(d, s) for d, s in EDGES if d != torch.float64 or 1e-150 < s < 1e150]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", ["row", "col"])
@pytest.mark.parametrize("dtype, scale", METRIC_EDGES, ids=[f"{str(d)[6:]}-{s:g}" for d, s in METRIC_EDGES])
def test_group_lasso_in_adams_metric_at_the_edges_of_the_range(backend, groups, dtype, scale):
    """A ProxAdamW step with group lasso in Adam's metric on weights whose squares leave the dtype's range: every
    new weight finite, as the torch backend's (float32 weights of 3e19 had overflowed ‖u_g‖² into NaN)."""
    from regfast.optim import ProxAdamW

    results = []
    for name in ("torch", backend):
        p = _weights(dtype, scale, groups).requires_grad_()
        p.grad = (torch.ones_like(p) * scale).to(dtype)
        with use_backend(name):
            ProxAdamW([p], lr=0.1, group_lasso=0.5, groups=groups).step()
        results.append(p.detach())
    expected, actual = results
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), (actual, expected)
    tol = _tolerance(dtype, scale)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=4 * tol, atol=4 * tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norms_propagate_nan_and_inf(backend):
    w = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [3.0, 4.0]])
    with use_backend(backend):
        p = w.clone().requires_grad_()
        p.grad = torch.zeros_like(p)
        regfast.add_penalty_grad_([p], group_lasso=1.0, groups="row")
        x = w.clone()
        regfast.prox_([x], lr=1.0, group_lasso=0.1, groups="row")
    assert p.grad[0].isnan().all()
    assert p.grad[1, 0].isnan()  # inf / inf
    assert torch.isfinite(p.grad[2]).all()
    assert x[0].isnan().all() and torch.isfinite(x[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
@pytest.mark.parametrize("l2", [0.0, 0.25])
def test_gradient_at_infinite_weights_with_group_lasso(backend, device, dtype, groups, l2):
    """With group lasso, the gradient at an infinite weight is NaN (its group term c·w/‖w_g‖₂ is inf/inf), with
    or without l2 (whose 2·l2·w alone would be ±inf), in add_penalty_grad_ and in the penalty's backward (times an
    upstream gradient); the other weights of its group take c·w/inf = 0, as the reference computes them."""
    w = torch.tensor([[1.5, -2.0, 0.5, 3.0], [float("inf"), 0.25, -1.0, 2.0], [-0.75, 4.0, float("-inf"), 1.0],
                      [2.5, -0.5, 1.25, -3.5]], dtype=dtype)
    # A larger tensor after it (groups past the first tensor's, runs of more than a vector), one weight infinite.
    large = torch.randn(37, 70, generator=torch.Generator().manual_seed(0)).to(dtype)
    large[20, 33] = float("inf")
    # And a 1-D tensor of a few elements (one group, fewer than a vector's lanes).
    tiny = torch.tensor([0.5, float("-inf"), 2.0, 1.0, -1.0], dtype=dtype)
    hyper = dict(l1=0.1, l2=l2, group_lasso=0.3, groups=groups)

    def gradients(name, dev):
        with use_backend(name):
            ps = [t.to(dev).requires_grad_() for t in (w, large, tiny)]
            for p in ps:
                p.grad = torch.ones_like(p)
            regfast.add_penalty_grad_(ps, **hyper)
            qs = [t.to(dev).requires_grad_() for t in (w, large, tiny)]
            (3 * regfast.penalty(qs, **hyper)).backward()
        return [t.grad.cpu().double().flatten() for t in ps + qs]

    weights = [t.flatten() for t in (w, large, tiny)] * 2
    for actual, expected, x in zip(gradients(backend, device), gradients("torch", "cpu"), weights, strict=True):
        assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
        assert torch.equal(expected.isnan(), x.isinf())  # NaN at the infinite weights, and only there
        finite = ~expected.isnan()
        torch.testing.assert_close(actual[finite], expected[finite], rtol=RTOL[dtype], atol=RTOL[dtype])


# The CPU backends that run on torch's threads (Triton's interpreter does not).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reductions_do_not_depend_on_the_thread_count(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((300, 700), (70001,), (3, 50000))]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with use_backend(backend):
                out = [regfast.penalty(params, l1=0.3, l2=0.2, group_lasso=0.1, groups=g) for g in ("row", "col")]
                out += list(regfast.norms(params))
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), (a - b).abs().max()


def _rounded(value, dtype):
    """``value`` (a float64 number) correctly rounded to ``dtype``."""
    return torch.tensor(value, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_results_are_rounded_once(backend, dtype):
    """16-bit params are computed in float32 and rounded once: where the terms cancel, a threshold or a term
    rounded to 16 bits on its own would move the result by many units in the last place."""
    w = torch.tensor([1.0, -1440.0], dtype=dtype)
    g = torch.tensor([0.0, 1184.0], dtype=dtype)
    lr, l1, l2 = 0.5, 1.98, 0.41  # the prox of 1.0: 1 − 0.99 = 0.01; the grad of −1440: 1184 − 1.98 − 1180.8
    w64, g64 = w.double(), g.double()
    with use_backend(backend):
        p = w.clone()
        regfast.prox_([p], lr, l1=l1)
        p.grad = g.clone()
        regfast.add_penalty_grad_([p], l1=l1, l2=l2)
        q = w.clone().requires_grad_()
        regfast.penalty([q], l1=l1, l2=l2).backward()
    prox64 = torch.sign(w64) * torch.clamp(w64.abs() - lr * l1, min=0)
    exact = [prox64[0].item(), -0.0 if prox64[1] == 0 else prox64[1].item()]
    for got, want in zip(p.detach(), exact):
        assert abs(got.item() - want) <= abs(_rounded(want, dtype).item() - want) * 1.0001 + 1e-30, (got, want)
    p64 = p.detach().double()
    grad64 = g64 + l1 * torch.sign(p64) + 2 * l2 * p64
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(grad64.abs()))
    assert ((p.grad.double() - grad64).abs() <= ulp).all(), (p.grad, grad64)
    grad64 = l1 * torch.sign(w64) + 2 * l2 * w64
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(grad64.abs()))
    assert ((q.grad.double() - grad64).abs() <= ulp).all(), (q.grad, grad64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefficients_above_the_16_bit_range(backend):
    """A coefficient that no 16-bit number holds (1e20) is applied in float32: infinite gradients where w ≠ 0, 0 at
    w = 0 (never NaN), a prox to zero; a list mixing dtypes gets every group written, none refused halfway."""
    with use_backend(backend):
        a = torch.tensor([1.0, -2.0])
        a.grad = torch.zeros(2)
        h = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float16)
        h.grad = torch.zeros(3, dtype=torch.float16)
        regfast.add_penalty_grad_([a, h], l1=1e20)
        p = torch.tensor([0.0, 0.5, -1.0], dtype=torch.bfloat16)
        regfast.prox_([p], 0.5, l1=1e20)
        w = torch.tensor([0.0, 1e-3, 0.0, -2.0], dtype=torch.float16, requires_grad=True)
        regfast.penalty([w], l1=0.01, l2=1e20).backward()
    assert torch.equal(a.grad, torch.tensor([1e20, -1e20]))
    assert h.grad.tolist() == [0.0, math.inf, -math.inf]
    assert p.tolist() == [0.0, 0.0, 0.0]
    assert w.grad.tolist() == [0.0, math.inf, 0.0, -math.inf]
