"""Every op of every backend against the float64 oracle, the backend as a parameter (the ``backend`` fixture).

The backend functions themselves (``regfast._dispatch.select``) and the public API on them: all dtypes, the
edge shapes, chunk boundaries, hundreds of tiny tensors between big ones, non-contiguous layouts, a tensor
step, NaN and inf, bitwise determinism (across thread counts on the CPU backends), every grouping and zero
groups. Triton launches with small chunks here, so that small tensors span many of them; in its CPU
interpreter, which is slow, the cases are small (:func:`helpers.interpreted`).
"""

import math

import oracle
import pytest
import torch
from helpers import (
    DTYPES,
    EDGE_SHAPES,
    KERNEL_CHUNK,
    acc_dtype,
    assert_close,
    check_ops,
    interpreted,
    launching,
    make_params,
    noncontiguous,
    same_layout_copy,
    select,
    skip_in_interpreter,
    to64,
)

import regfast
from regfast import _ext, reference
from regfast._schema import SCHEMAS

HYPERS = [
    dict(l1=0.3),
    dict(l2=0.7),
    dict(group_lasso=0.4),
    dict(l1=0.05, l2=0.2, group_lasso=0.3),
]
ALL_TERMS = HYPERS[-1]
GROUPINGS = ["row", "col", "tensor"]
# Small tensors for Triton's launches over chunks of 64 elements: (33, 17) spans 9 of them.
SMALL_SHAPES = [(6, 5), (7,), (), (3, 4, 2, 2), (0, 3), (1,), (33, 17), (2, 0), (130,)]


def _kw(h):
    return dict(l1=h.get("l1", 0.0), l2=h.get("l2", 0.0), gl=h.get("group_lasso", 0.0))


def _args(h):
    return h.get("l1", 0.0), h.get("l2", 0.0), h.get("group_lasso", 0.0)


def chunks(backend: str) -> list[int]:
    """The chunk sizes whose edges a backend is tested at: the compiled kernels' own; two small ones for Triton
    (launched with them); the CPU kernels' for the torch backend, which does not chunk."""
    return [16, 32] if backend == "triton" else [KERNEL_CHUNK.get(backend, KERNEL_CHUNK["cpp"])]


def chunk_shapes(c: int) -> list[tuple[int, ...]]:
    """Tensors of c − 1, c, c + 1, 2c ± 1 and 3c + 5 elements for chunks of ``c``, empty and 1-element ones
    between them, and rows of c ± 1 and c/2 + 1 elements that put group boundaries on both sides of chunk
    boundaries."""
    sizes = [c - 1, c, c + 1, 1, 0, 2 * c - 1, 2 * c, 0, 2 * c + 1, 3 * c + 5]
    return [(s,) for s in sizes] + [(3, c - 1), (3, c + 1), (c + 1, 3), (3, c // 2 + 1), (2 * c + 3, 2)]


def test_forced_backend_is_selected(backend, device):
    """The forced backend serves ``device``, and its object has one function per op of the schema."""
    assert regfast.backend(device).selected == backend
    ops = select(device)
    if backend == "triton":
        import regfast.triton as expected
    else:
        expected = reference if backend == "torch" else _ext.OPS
    assert ops is expected
    for name in SCHEMAS:
        assert callable(getattr(ops, name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_edge_shapes(backend, device, dtype):
    """Per-tensor norms of the edge shapes, contiguous and not, in the accumulation dtype."""
    ts = make_params(EDGE_SHAPES, dtype, device)
    acc = acc_dtype(dtype)
    ref = to64(ts)
    exp_l1 = torch.stack([t.abs().sum() for t in ref])
    exp_l2sq = torch.stack([(t * t).sum() for t in ref])
    for layout in (ts, [noncontiguous(t) for t in ts]):
        per_l1, per_l2sq = select(device).norms(layout)
        assert per_l1.dtype == acc and per_l1.shape == (len(ts),) and per_l1.device.type == device
        assert_close(per_l1, exp_l1, acc)
        assert_close(per_l2sq, exp_l2sq, acc)


def _op_cases(backend, device, dtype, groups):
    """(shapes, Triton's chunk, hyperparameter sets, step) of one case of :func:`test_ops`."""
    if not interpreted(backend, device):
        cases = [(EDGE_SHAPES, None, HYPERS, 0.1)]
        if backend == "triton":
            cases.append((SMALL_SHAPES, 64, HYPERS, 0.5))
        return cases
    # The interpreter: the small tensors, all terms alone in float32 only; the edge shapes once.
    cases = [(SMALL_SHAPES, 64, HYPERS if dtype == torch.float32 else [ALL_TERMS], 0.5)]
    if dtype == torch.float32 and groups == "row":
        cases.append((EDGE_SHAPES, None, [ALL_TERMS], 0.5))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_ops(backend, device, dtype, groups):
    """Every op on the edge shapes (empty, 0-dim, 1-element, odd, multi-dim, large), each term alone and all
    together; the public API too, except in the interpreter (tests/test_api.py runs it there)."""
    for shapes, chunk, hypers, lr in _op_cases(backend, device, dtype, groups):
        ts = make_params(shapes, dtype, device)
        with launching(backend, chunk):
            for h in hypers:
                check_ops(ts, h, groups, lr, api=not interpreted(backend, device))


@pytest.mark.parametrize("groups", GROUPINGS)
def test_noncontiguous(backend, device, groups):
    """Non-contiguous params, grads and prox targets (transposed, strided 1-D), written in place as they are."""
    if groups != "col":
        skip_in_interpreter(backend, device, "the col grouping covers non-contiguous inputs there")
    shapes = [(6, 5), (17,), (4, 3, 2), (9, 1)]
    if not interpreted(backend, device):
        shapes += [(17, 33), (4, 3, 5, 2), (1031,)]
    ts = [noncontiguous(t) for t in make_params(shapes, torch.float32, device)]
    assert not any(t.is_contiguous() for t in ts[:3] + ts[4:])
    with launching(backend, 16):
        check_ops(ts, ALL_TERMS, groups, 0.1, api=not interpreted(backend, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_boundaries(backend, device, dtype):
    """Tensors and groups ending just before, at and just after chunk boundaries (:func:`chunk_shapes`)."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers the chunk boundaries there")
    groupings = ["row", "col"] if interpreted(backend, device) else GROUPINGS
    for c in chunks(backend):
        ts = make_params(chunk_shapes(c), dtype, device)
        with launching(backend, c):
            for groups in groupings:
                check_ops(ts, ALL_TERMS, groups, 0.1, api=not interpreted(backend, device))


def many_shapes(c: int) -> list[tuple[int, ...]]:
    """300 tiny tensors (0 to 60 elements), with empty, 1-element and multi-chunk ones (for chunks of ``c``)
    among them."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(s,) if i % 3 else (2, s) for i, s in enumerate(torch.randint(0, 31, (300,), generator=gen).tolist())]
    big = [(0,), (1,), (4, c + 1), (0, 3), (3 * c + 7,), (c - 1,), (3, 4), (c + 1,), (5, 1, 2), (2 * c + 3, 2)]
    for i, s in enumerate(big):
        shapes.insert(10 + 29 * i, s)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors(backend, device, dtype):
    """Hundreds of tiny tensors in one call, big ones between them."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers many tensors there")
    c = 64 if backend == "triton" else KERNEL_CHUNK.get(backend, KERNEL_CHUNK["cpp"])
    ts = make_params(many_shapes(c), dtype, device)
    groupings = ["row"] if interpreted(backend, device) else GROUPINGS
    with launching(backend, c):
        for groups in groupings:
            check_ops(ts, dict(l1=0.1, l2=0.2, group_lasso=0.05), groups, 0.1, api=not interpreted(backend, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lr_tensor(backend, device, dtype):
    """A 0-dim tensor step: the prox of the oracle, the same bits from the backend function as from the API."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers the tensor step there")
    ts = make_params([(9, 7), (13,), (), (0, 3), (2, 3, 4), (33, 17)], dtype, device)
    with launching(backend, 64):
        for step in (0.5,) if interpreted(backend, device) else (0.05, 0.5):
            lr = torch.tensor(step, dtype=dtype, device=device)
            for groups in GROUPINGS:
                for h in HYPERS:
                    stepped = [t.clone() for t in ts]
                    regfast.prox_(stepped, lr, groups=groups, **h)
                    for s, t in zip(stepped, ts):
                        assert_close(s, oracle.prox(t.double(), step, groups=groups, **_kw(h)), dtype)
                    direct = [t.clone() for t in ts]
                    select(device).prox_(direct, lr.to(acc_dtype(dtype)), 0.0, *_args(h), groups)
                    for a, b in zip(direct, stepped):
                        assert torch.equal(a, b)


def _assert_nonfinite_rules(actual, r, h, groups, grad, backend):
    """``actual``, the gradient (``grad``) or the prox at ``r``, against the oracle's under the library's rules for
    non-finite weights: a zero coefficient is no term (where the oracle's absent l2 makes 0·inf, the l1 gradient
    at ±inf is ±l1); with group lasso a group that holds a NaN is NaN throughout, and the gradient at ±inf, whose
    group term is inf/inf, is NaN, or for the compiled kernels NaN or inf of the weight's sign (both allowed:
    tests/test_numerics.py)."""
    l1, l2, gl = _args(h)
    kw = dict(l1=l1, l2=l2, gl=gl, groups=groups)
    expected = oracle.grad(r, **kw) if grad else oracle.prox(r, 0.1, **kw)
    if grad and not l2 and not gl:
        expected = torch.where(r.isinf(), l1 * torch.sign(r), expected)
    if gl:
        rows = oracle.groups_of(r, groups)
        nan_rows = rows.isnan().any(dim=1, keepdim=True).expand_as(rows)
        expected[oracle.from_groups(nan_rows, r, groups)] = math.nan
        if grad and backend in ("cpp", "cuda"):
            inf = r.isinf()
            got = actual.detach().cpu().double()
            assert (got[inf].isnan() | (got[inf] == r[inf])).all()
            expected = torch.where(inf, got, expected)
    assert_close(actual, expected, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("groups", GROUPINGS)
def test_nan_and_inf_propagate(backend, device, groups):
    """NaN and ±inf weights give NaN and inf norms, penalties, gradients and prox results where the math does,
    and leave the other tensors' (and groups') results as they are."""
    if groups != "row":
        skip_in_interpreter(backend, device, "the row grouping covers NaN and inf there")
    ts = make_params([(6, 5), (8,), (4, 3, 2), (4, 5), (40,), (3,)], torch.float32, device)
    ts[0][2, 3] = math.nan
    ts[1][5] = math.inf
    ts[3][1, 2] = math.nan
    ts[4][17] = math.inf
    ts[5][0] = -math.inf
    ref = to64(ts)
    ops = select(device)
    per_l1, per_l2sq = ops.norms(ts)
    assert per_l1[0].isnan() and per_l2sq[0].isnan() and per_l1[1].isinf() and per_l2sq[1].isinf()
    assert per_l1[5].isinf() and per_l2sq[5].isinf()
    assert torch.isfinite(per_l1[2]) and torch.isfinite(per_l2sq[2])
    with launching(backend, 16):
        for h in HYPERS:
            assert regfast.penalty(ts, groups=groups, **h).isnan()
            assert_close(ops.penalty(ts, *_args(h), groups), oracle.penalty(ref, groups=groups, **_kw(h)),
                         torch.float32)
            outs = ops.penalty_backward(torch.tensor(1.0, device=device), ts, *_args(h), groups)
            grads = [torch.zeros_like(t) for t in ts]
            ops.add_penalty_grad_(ts, grads, *_args(h), groups)
            assert grads[0][2, 3].isnan() and torch.isfinite(grads[2]).all()
            for out, g, r in zip(outs, grads, ref):
                _assert_nonfinite_rules(out, r, h, groups, True, backend)
                _assert_nonfinite_rules(g, r, h, groups, True, backend)
            stepped, direct = [t.clone() for t in ts], [t.clone() for t in ts]
            regfast.prox_(stepped, 0.1, groups=groups, **h)
            ops.prox_(direct, None, 0.1, *_args(h), groups)
            assert stepped[0][2, 3].isnan() and not torch.isfinite(stepped[1][5])
            for s, d, r in zip(stepped, direct, ref):
                _assert_nonfinite_rules(s, r, h, groups, False, backend)
                _assert_nonfinite_rules(d, r, h, groups, False, backend)
        # A zero coefficient is an absent term: 0·inf must not appear.
        assert regfast.penalty(ts[1:3], l1=0.3, groups=groups).isinf()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_across_thread_counts(backend, device, dtype):
    """The same bits on every call; with 1 and 2 CPU threads for the CPU kernels."""
    if dtype != torch.float32:
        skip_in_interpreter(backend, device, "float32 covers determinism there")
    small = backend == "triton"
    shapes = [(64, 33), (1000,), (5,), (3, 700)] if small else [(300, 257), (2**16 + 5,), (65, 3, 17), (0,), ()]
    ts = make_params(shapes, dtype, device)
    ops = select(device)
    groupings = ["col"] if interpreted(backend, device) else GROUPINGS

    def run():
        grads = [torch.ones_like(t) for t in ts]
        stepped = [t.clone() for t in ts]
        out = [*ops.norms(ts)]
        for groups in groupings:
            out.append(ops.penalty(ts, 0.1, 0.2, 0.3, groups))
            out.append(ops.add_penalty_grad_(ts, grads, 0.1, 0.2, 0.3, groups))
            ops.prox_(stepped, None, 0.01, 0.1, 0.2, 0.3, groups)
        return out + grads + stepped

    threaded = backend == "cpp"
    threads = torch.get_num_threads()
    runs = []
    with launching(backend, 64):
        try:
            for n in (1, 2, 2) if threaded else (threads, threads):
                torch.set_num_threads(n)
                runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_group_lasso_groupings_and_zero_groups(backend, device):
    """Every grouping of a 3-D weight with zero rows and columns: zero groups have zero gradient and stay zero;
    a large step zeroes every group; the "tensor" group's norm scales with √numel."""
    w = torch.randn(7, 6, 3, dtype=torch.float64, device=device)
    w[2] = 0
    w[:, 4] = 0
    v = torch.randn(5, dtype=torch.float64, device=device)
    ops = select(device)
    for groups in GROUPINGS:
        expected = oracle.penalty([w.cpu(), v.cpu()], gl=0.7, groups=groups)
        assert_close(ops.penalty([w, v], 0.0, 0.0, 0.7, groups), expected, torch.float64)
        out = ops.penalty_backward(torch.tensor(2.0, dtype=torch.float64, device=device), [w, v], 0.0, 0.0, 0.7, groups)
        assert_close(out[0], 2 * oracle.grad(w.cpu(), gl=0.7, groups=groups), torch.float64)
        assert_close(out[1], 2 * oracle.grad(v.cpu(), gl=0.7, groups=groups), torch.float64)
        for lr in (0.01, 10.0):
            stepped = [same_layout_copy(w), v.clone()]
            ops.prox_(stepped, None, lr, 0.0, 0.0, 0.7, groups)
            assert_close(stepped[0], oracle.prox(w.cpu(), lr, gl=0.7, groups=groups), torch.float64)
            assert_close(stepped[1], oracle.prox(v.cpu(), lr, gl=0.7, groups=groups), torch.float64)
    big = [w.clone()]
    ops.prox_(big, None, 100.0, 0.0, 0.0, 0.7, "tensor")
    assert (big[0] == 0).all()
    assert math.isclose(float(ops.penalty([w], 0.0, 0.0, 1.0, "tensor")), math.sqrt(w.numel()) * float(w.norm()),
                        rel_tol=1e-12)
