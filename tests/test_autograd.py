"""``penalty`` under autograd beyond the first derivative, on every backend, against the plain loop in float64.

Double backward (Hessian-vector products), Hessians, third derivatives, forward mode (``jvp`` and
dual tensors), ``torch.func.grad`` and ``vmap``: each against autograd of the regularization loop
written with torch ops. l1's second derivative is 0 away from w = 0 (inputs are kept away from it).
"""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import use_backend

import regfast
from regfast import _dispatch

BACKENDS = [b for b in ("torch", "cpp", "triton") if _dispatch.unavailable_reason(b, "cpu") is None]
GROUPINGS = ["row", "col", "tensor"]
TERMS = [dict(l2=0.7), dict(group_lasso=0.4), dict(l1=0.3, l2=0.2, group_lasso=0.5)]


def loop(params, l1=0.0, l2=0.0, group_lasso=0.0, groups="row"):
    """The regularization loop a user writes, with the group term by torch.linalg.vector_norm."""
    total = torch.zeros((), dtype=torch.float64)
    for w in params:
        total = total + l1 * w.abs().sum() + l2 * w.square().sum()
        if group_lasso and w.numel():
            if groups == "tensor" or w.dim() < 2:
                norms, size = torch.linalg.vector_norm(w), w.numel()
            else:
                dims = tuple(range(1, w.dim())) if groups == "row" else (0, *range(2, w.dim()))
                norms, size = torch.linalg.vector_norm(w, dim=dims), math.prod(w.shape[d] for d in dims)
            total = total + group_lasso * math.sqrt(size) * norms.sum()
    return total


def _params(seed=0, shapes=((4, 3), (5,), (2, 3, 2))):
    gen = torch.Generator().manual_seed(seed)
    # Away from 0 (|w| ≥ 0.1): l1 is twice differentiable there.
    out = []
    for s in shapes:
        w = torch.rand(s, generator=gen, dtype=torch.float64) + 0.1
        sign = torch.randint(0, 2, s, generator=gen).to(torch.float64) * 2 - 1
        out.append((w * sign).requires_grad_())
    return out


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("hyper", TERMS, ids=["l2", "group", "all"])
def test_gradgradcheck(backend, hyper, groups):
    """First and second derivatives against finite differences; Triton's kernels in its interpreter by torch's
    fast mode (the Jacobians against random vectors, one directional derivative each): with the whole Jacobians a
    case with group lasso took 34-40 s there, 4-5 s in fast mode."""
    params = _params()
    fast = backend == "triton" and _dispatch.triton_interpreted()
    fn = lambda *ws: regfast.penalty(list(ws), groups=groups, **hyper)
    assert torch.autograd.gradcheck(fn, params, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, params, fast_mode=fast)


@pytest.mark.parametrize("groups", GROUPINGS)
def test_hessian_vector_products_match_the_loop(backend, groups):
    hyper = dict(l1=0.3, l2=0.2, group_lasso=0.5, groups=groups)
    params = _params(1)
    vectors = [torch.randn_like(p) for p in params]

    def hvp(fn):
        grads = torch.autograd.grad(fn(params, **hyper), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors))
        return torch.autograd.grad(dot, params)

    for got, expected in zip(hvp(regfast.penalty), hvp(loop)):
        torch.testing.assert_close(got, expected)


def test_hessian_and_third_derivative_match_the_loop(backend):
    w = _params(2, shapes=((3, 4),))[0].detach()
    hyper = dict(l2=0.3, group_lasso=0.6, groups="col")
    torch.testing.assert_close(torch.autograd.functional.hessian(lambda x: regfast.penalty(x, **hyper), w),
                               torch.autograd.functional.hessian(lambda x: loop([x], **hyper), w))

    def third(fn):
        x = w.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), x, create_graph=True)
        return torch.autograd.grad(h.sum(), x)[0]

    torch.testing.assert_close(third(lambda x: regfast.penalty(x, **hyper)), third(lambda x: loop([x], **hyper)))


def test_second_derivative_at_a_zero_group_is_zero_not_nan(backend):
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[0] = 1.0
    hessian = torch.autograd.functional.hessian(lambda x: regfast.penalty(x, group_lasso=0.5), w)
    assert torch.isfinite(hessian).all()
    assert (hessian.reshape(12, 12)[4:, :] == 0).all()


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 3e19), (torch.float32, 3e-20), (torch.float64, 1e160),
                                          (torch.float64, 1e-170)], ids=str)
def test_second_derivative_at_weights_whose_squares_leave_the_range(backend, dtype, scale):
    """The group term's Hessian-vector product where w² overflows or underflows the dtype (as the value, the gradient
    and the prox are exact there): against the formula in float64 on scaled weights; one-element groups get 0."""
    w0 = torch.tensor([[3.0, -4.0, 1.0], [0.5, 0.0, -2.0]], dtype=torch.float64) * scale
    v = torch.tensor([[1.0, 2.0, -0.5], [0.25, -1.0, 3.0]], dtype=torch.float64)
    for groups in ("row", "tensor"):
        w = w0.to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(regfast.penalty([w], group_lasso=0.7, groups=groups), w, create_graph=True)
        (hv,) = torch.autograd.grad((g * v.to(dtype)).sum(), w)
        u = w.detach().double() / scale  # the formula is homogeneous: gl·√|g|/‖w‖·(v − w·⟨w, v⟩/‖w‖²)
        rows = [(u, v)] if groups == "tensor" else list(zip(u, v))
        expected = torch.stack([0.7 * math.sqrt(x.numel()) / x.norm() * (y - x * (x * y).sum() / x.norm() ** 2)
                                for x, y in rows]).reshape(w.shape) / scale
        torch.testing.assert_close(hv.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    w = (torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) * scale).to(dtype).requires_grad_()
    (g,) = torch.autograd.grad(regfast.penalty([w], group_lasso=1.0), w, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), w)
    assert (hv == 0).all(), hv


@pytest.mark.parametrize("hyper", TERMS, ids=["l2", "group", "all"])
def test_forward_mode(backend, hyper):
    params = [p.detach() for p in _params(3)]
    tangents = [torch.randn_like(p) for p in params]
    value, tangent = torch.func.jvp(lambda *ws: regfast.penalty(list(ws), **hyper), tuple(params), tuple(tangents))
    expected_value, expected_tangent = torch.func.jvp(lambda *ws: loop(list(ws), **hyper), tuple(params),
                                                      tuple(tangents))
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(tangent, expected_tangent)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(params, tangents)]
        torch.testing.assert_close(fwAD.unpack_dual(regfast.penalty(duals, **hyper)).tangent, expected_tangent)


def test_jvp_of_l2_is_twice_the_inner_product(backend):
    x, v = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda w: regfast.penalty(w, l2=1.0), (x,), (v,))
    torch.testing.assert_close(tangent, 2 * (x * v).sum())


def test_func_grad_and_vmap(backend):
    hyper = dict(l1=0.3, l2=0.2, group_lasso=0.5)
    w = _params(4, shapes=((4, 3),))[0].detach()
    torch.testing.assert_close(torch.func.grad(lambda x: regfast.penalty(x, **hyper))(w),
                               torch.func.grad(lambda x: loop([x], **hyper))(w))
    batch = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda x: regfast.penalty(x, **hyper))(batch),
                               torch.stack([loop([b], **hyper) for b in batch]))
    per_sample = torch.vmap(torch.func.grad(lambda x: regfast.penalty(x, l2=0.5)))(batch)
    torch.testing.assert_close(per_sample, batch)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("terms", [dict(l1=0.3, l2=0.2), dict(group_lasso=0.4, groups="col"), dict()],
                         ids=["elastic", "group", "none"])
def test_cpu_gradients_reuse_the_blocks_earlier_gradients_freed(dtype, terms):
    """penalty's CPU gradients of 64 KiB or more come from blocks that earlier gradients freed (pages already
    mapped, csrc/penalty_cpu.cpp's OutputCache): the second backward's grads sit where the first's were, and
    every element is written again (the oracle's values, never a stale one; zeros when nothing is asked)."""
    import oracle

    gen = torch.Generator().manual_seed(3)
    shapes = [(1100, 1000), (3, 7), (2_100_000,)]
    ws = [(torch.randn(s, generator=gen) * 2).to(dtype).requires_grad_() for s in shapes]
    with use_backend("cpp"):
        regfast.penalty(ws, **terms).backward()
        first = {w.grad.data_ptr() for w in ws if w.grad.nbytes >= 64 << 10}
        assert len(first) == 2
        for w in ws:
            w.grad.fill_(float("nan"))  # the old blocks go back to the cache full of NaN
            w.grad = None
        for w in ws:
            with torch.no_grad():
                w.mul_(-1)
        regfast.penalty(ws, **terms).backward(torch.tensor(2.0))
    assert {w.grad.data_ptr() for w in ws if w.grad.nbytes >= 64 << 10} == first
    l1, l2, gl = terms.get("l1", 0.0), terms.get("l2", 0.0), terms.get("group_lasso", 0.0)
    for w in ws:
        expected = 2 * oracle.grad(w.detach().double(), l1=l1, l2=l2, gl=gl, groups=terms.get("groups", "row"))
        torch.testing.assert_close(w.grad.double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
