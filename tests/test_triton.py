"""The Triton backend against the float64 reference: every backend function, the public API, the launcher's edges.

Runs on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` there). Small chunk sizes keep the interpreter fast and still make
tensors span many chunks.
"""

import math

import pytest
import torch
from helpers import DTYPES, EDGE_SHAPES, RTOL, assert_close, make_params, noncontiguous, to64, use_backend

import regfast
from regfast import _common, reference

rt = pytest.importorskip("regfast.triton")
if rt.unavailable_reason() is None:
    from regfast.triton import launcher
    from regfast.triton.norms import chunk_norms

pytestmark = pytest.mark.skipif(rt.unavailable_reason() is not None, reason=f"{rt.unavailable_reason()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GROUPINGS = ["row", "col", "tensor"]
ALL_TERMS = dict(l1=0.05, l2=0.2, group_lasso=0.3)
SINGLE_TERMS = [dict(l1=0.3), dict(l2=0.7), dict(group_lasso=0.4)]
MIXED_SHAPES = [(6, 5), (7,), (), (3, 4, 2, 2), (0, 3), (1,), (33, 17), (2, 0), (130,)]


def _hyper(h: dict) -> tuple[float, float, float]:
    return h.get("l1", 0.0), h.get("l2", 0.0), h.get("group_lasso", 0.0)


def _acc_rtol(dtype: torch.dtype) -> float:
    """Tolerance of an accumulated value: inputs are exact in float64, only the sum rounds."""
    return RTOL[torch.float64] if dtype == torch.float64 else RTOL[torch.float32]


def check_backend(ts: list[torch.Tensor], hyper: dict, groups: str, lr: float | torch.Tensor = 0.5) -> None:
    """Every backend function of regfast.triton on ``ts`` against regfast.reference on float64 copies."""
    dtype = ts[0].dtype
    l1, l2, gl = _hyper(hyper)
    ref = to64(ts)
    scale = max([t.numel() for t in ts] + [1])

    per_l1, per_l2sq = rt.norms(ts)
    exp_l1, exp_l2sq = reference.norms(ref)
    assert per_l1.dtype == _common.acc_dtype(dtype) and per_l1.shape == (len(ts),)
    assert_close(per_l1, exp_l1, dtype, scale=scale, rtol=_acc_rtol(dtype))
    assert_close(per_l2sq, exp_l2sq, dtype, scale=scale, rtol=_acc_rtol(dtype))

    expected_value = reference.penalty(ref, l1, l2, gl, groups)
    value = rt.penalty(ts, l1, l2, gl, groups)
    assert value.dim() == 0 and value.dtype == _common.acc_dtype(dtype)
    assert_close(value, expected_value, dtype, scale=scale, rtol=_acc_rtol(dtype))

    grads = make_params([t.shape for t in ts], dtype, ts[0].device)
    ref_grads = to64(grads)
    value = rt.add_penalty_grad_(ts, grads, l1, l2, gl, groups)
    reference.add_penalty_grad_(ref, ref_grads, l1, l2, gl, groups)
    assert_close(value, expected_value, dtype, scale=scale, rtol=_acc_rtol(dtype))
    for g, e in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, e, dtype)

    upstream = torch.tensor(1.7, dtype=_common.acc_dtype(dtype), device=ts[0].device)
    outs = rt.penalty_backward(upstream, ts, l1, l2, gl, groups)
    for out, e, t in zip(outs, reference.penalty_backward(upstream.cpu().double(), ref, l1, l2, gl, groups), ts):
        assert out.shape == t.shape and out.dtype == dtype
        assert_close(out, e, dtype, scale=1.7)

    rt.prox_step_(ts, lr, l1, l2, gl, groups)
    reference.prox_step_(ref, lr.item() if isinstance(lr, torch.Tensor) else lr, l1, l2, gl, groups)
    for t, e in zip(ts, ref):
        assert_close(t, e, dtype)
        if dtype == torch.float64:
            # The prox gives exact zeros, the same ones as the reference.
            assert torch.equal(t.cpu() == 0, e == 0)


def test_backend_is_triton_when_forced():
    with use_backend("triton"):
        assert regfast.backend(DEVICE).selected == "triton"
    assert rt.unavailable_reason() is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_all_terms_match_reference(dtype, groups):
    with launcher.chunked(64):
        check_backend(make_params(MIXED_SHAPES, dtype, DEVICE), ALL_TERMS, groups)


@pytest.mark.parametrize("hyper", SINGLE_TERMS, ids=["l1", "l2", "group_lasso"])
@pytest.mark.parametrize("groups", GROUPINGS)
def test_single_terms_match_reference(hyper, groups):
    with launcher.chunked(64):
        check_backend(make_params(MIXED_SHAPES, torch.float32, DEVICE), hyper, groups)


def test_edge_shapes_default_chunk():
    check_backend(make_params(EDGE_SHAPES, torch.float32, DEVICE), ALL_TERMS, "row")


@pytest.mark.parametrize("chunk", [16, 32])
def test_chunk_boundaries(chunk):
    sizes = [chunk - 1, chunk, chunk + 1, 1, 0, 2 * chunk - 1, 2 * chunk, 0, 2 * chunk + 1, 3 * chunk + 5]
    # Rows of chunk ± 1 elements put group boundaries on both sides of chunk boundaries.
    shapes = [(s,) for s in sizes] + [(3, chunk - 1), (3, chunk + 1), (chunk + 1, 3)]
    with launcher.chunked(chunk):
        for groups in ("row", "col"):
            check_backend(make_params(shapes, torch.float32, DEVICE), ALL_TERMS, groups)


def test_many_tensors_of_mixed_sizes():
    chunk = 64
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 12, (320,), generator=gen).tolist()
    shapes = [(s,) if i % 3 else (2, s) for i, s in enumerate(sizes)]
    # Empty, 1-element and multi-chunk tensors among the small ones.
    shapes[10:10] = [(0,), (1,), (4, chunk + 1), (0, 3), (3 * chunk + 7,)]
    with launcher.chunked(chunk):
        check_backend(make_params(shapes, torch.float32, DEVICE), dict(l1=0.1, l2=0.2, group_lasso=0.05), "row")


def test_lr_as_tensor():
    acc = torch.float32
    with launcher.chunked(64):
        for step in (0.5, 0.125):
            lr = torch.tensor(step, dtype=acc, device=DEVICE)
            check_backend(make_params(MIXED_SHAPES, torch.float32, DEVICE), ALL_TERMS, "col", lr=lr)


def test_non_contiguous_inputs():
    ts = make_params([(6, 5), (17,), (4, 3, 2), (9, 1)], torch.float32, DEVICE)
    params = [noncontiguous(t) for t in ts]
    grads = [noncontiguous(g) for g in make_params([t.shape for t in ts], torch.float32, DEVICE)]
    assert not any(p.is_contiguous() for p in params[:3]) and not grads[0].is_contiguous()
    ref, ref_grads = to64(params), to64(grads)
    l1, l2, gl = _hyper(ALL_TERMS)
    with launcher.chunked(16):
        assert_close(rt.norms(params)[1], reference.norms(ref)[1], torch.float32, scale=30)
        assert_close(rt.penalty(params, l1, l2, gl, "col"), reference.penalty(ref, l1, l2, gl, "col"), torch.float32,
                     scale=30)
        rt.add_penalty_grad_(params, grads, l1, l2, gl, "col")
        reference.add_penalty_grad_(ref, ref_grads, l1, l2, gl, "col")
        for g, e in zip(grads, ref_grads):
            assert_close(g, e, torch.float32)
        rt.prox_step_(params, 0.5, l1, l2, gl, "col")
        reference.prox_step_(ref, 0.5, l1, l2, gl, "col")
        for p, e in zip(params, ref):
            assert_close(p, e, torch.float32)


def test_public_api_through_triton():
    l1, l2, gl = _hyper(ALL_TERMS)
    with use_backend("triton"), launcher.chunked(64):
        for dtype in (torch.float32, torch.bfloat16):
            ts = make_params(MIXED_SHAPES, dtype, DEVICE)
            ref = to64(ts)
            n = regfast.norms(ts)
            assert_close(n.per_tensor_l1, reference.norms(ref)[0], dtype, scale=600, rtol=RTOL[torch.float32])
            leaves = [t.clone().requires_grad_() for t in ts]
            value = regfast.penalty(leaves, **ALL_TERMS, groups="row")
            value.backward()
            assert_close(value, reference.penalty(ref, l1, l2, gl, "row"), dtype, scale=600,
                         rtol=RTOL[torch.float32])
            expected_grads = reference.penalty_backward(torch.tensor(1.0, dtype=torch.float64), ref, l1, l2, gl, "row")
            for leaf, e in zip(leaves, expected_grads):
                assert_close(leaf.grad, e, dtype)
            for p in leaves:
                p.grad = None
            regfast.add_penalty_grad_(leaves, **ALL_TERMS, groups="row")
            for leaf, e in zip(leaves, expected_grads):
                assert_close(leaf.grad, e, dtype)
            regfast.prox_(ts, torch.tensor(0.5), **ALL_TERMS, groups="tensor")
            reference.prox_step_(ref, 0.5, l1, l2, gl, "tensor")
            for t, e in zip(ts, ref):
                assert_close(t, e, dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_propagate():
    ts = make_params([(4, 5), (40,), (3,)], torch.float32, DEVICE)
    ts[0][1, 2] = math.nan
    ts[1][17] = math.inf
    ts[2][0] = -math.inf
    ref = to64(ts)
    with launcher.chunked(16):
        for hyper in (dict(l1=0.3), dict(l2=0.2), ALL_TERMS):
            l1, l2, gl = _hyper(hyper)
            norms = rt.norms(ts)
            assert norms[0][0].isnan() and norms[0][1].isinf() and norms[1][2].isinf()
            assert_close(rt.penalty(ts, l1, l2, gl, "row"), reference.penalty(ref, l1, l2, gl, "row"), torch.float32)
            outs = rt.penalty_backward(torch.tensor(1.0, device=DEVICE), ts, l1, l2, gl, "row")
            expected = reference.penalty_backward(torch.tensor(1.0, dtype=torch.float64), ref, l1, l2, gl, "row")
            for out, e in zip(outs, expected):
                assert_close(out, e, torch.float32)
            params, ref_params = [t.clone() for t in ts], [t.clone() for t in ref]
            rt.prox_step_(params, 0.5, l1, l2, gl, "row")
            reference.prox_step_(ref_params, 0.5, l1, l2, gl, "row")
            for p, e in zip(params, ref_params):
                assert_close(p, e, torch.float32)


def test_bitwise_deterministic():
    ts = make_params([(64, 33), (1000,), (5,), (3, 700)], torch.float32, DEVICE)
    l1, l2, gl = _hyper(ALL_TERMS)
    with launcher.chunked(64):
        runs = []
        for _ in range(2):
            grads = [torch.ones_like(t) for t in ts]
            value = rt.add_penalty_grad_(ts, grads, l1, l2, gl, "col")
            runs.append((*rt.norms(ts), rt.penalty(ts, l1, l2, gl, "row"), value, *grads))
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_tables_are_cached_and_follow_storage():
    ts = make_params([(5, 3), (70,)], torch.float32, DEVICE)
    with launcher.chunked(16):
        assert launcher.layout(ts) is launcher.layout(ts)
        assert launcher.pointer_table(ts) is launcher.pointer_table(ts)
        before = launcher.pointer_table(ts)
        ts[1].data = torch.randn(70, device=DEVICE)
        assert launcher.pointer_table(ts) is not before
        assert_close(rt.norms(ts)[0], reference.norms(to64(ts))[0], torch.float32, scale=70)
        ts[1].data = torch.randn(90, device=DEVICE)
        assert_close(rt.norms(ts)[1], reference.norms(to64(ts))[1], torch.float32, scale=90)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views(dtype):
    """Contiguous views that start one element into their storage (not 16-byte aligned) take a correct path."""
    storage = make_params([(4000,)], dtype, DEVICE)[0]
    views = [storage[1:31].view(6, 5), storage[41:41 + 3 * 7 * 11].view(3, 7, 11), storage[1001:1001 + 2053]]
    assert all(v.data_ptr() % 16 for v in views)
    table, aligned = launcher.pointer_table(views)
    assert not aligned
    with launcher.chunked(512):
        for groups in GROUPINGS:
            check_backend(views, ALL_TERMS, groups)


def test_cached_tables_are_not_copied_again(monkeypatch):
    ts = make_params([(5, 3), (70,), (2, 2, 9)], torch.float32, DEVICE)
    grads = [torch.zeros_like(t) for t in ts]
    l1, l2, gl = _hyper(ALL_TERMS)
    with launcher.chunked(16):
        rt.add_penalty_grad_(ts, grads, l1, l2, gl, "col")
        rt.prox_step_(ts, 0.1, l1, l2, gl, "col")
        copies = []
        real_pack = launcher._pack
        monkeypatch.setattr(launcher, "_pack", lambda *a: copies.append(a) or real_pack(*a))
        rt.add_penalty_grad_(ts, grads, l1, l2, gl, "col")
        rt.prox_step_(ts, 0.1, l1, l2, gl, "col")
        rt.norms(ts)
    assert copies == []


def test_tables_read_by_a_captured_graph_are_never_evicted(monkeypatch):
    ts = make_params([(3, 4), (11,)], torch.float32, DEVICE)
    with launcher.chunked(16):
        rt.prox_step_(ts, 0.1, 0.1, 0.0, 0.2, "row")  # warm-up: tables cached outside the capture
        monkeypatch.setattr(launcher, "capturing", lambda device: True)
        rt.prox_step_(ts, 0.1, 0.1, 0.0, 0.2, "row")
        fresh = [torch.zeros(5, 3 + i, device=DEVICE) for i in range(launcher.CACHE_ENTRIES + 1)]
        with pytest.raises(RuntimeError, match="once before capturing"):
            rt.prox_step_(fresh[:1], 0.1, 0.1, 0.0, 0.2, "row")
        monkeypatch.setattr(launcher, "capturing", lambda device: False)
        key = (ts[0].device, 16, (12, 11))
        table_key = (ts[0].device, tuple(t.data_ptr() for t in ts))
        for t in fresh:
            rt.prox_step_([t], 0.1, 0.1, 0.0, 0.2, "row")
        assert key in launcher._layouts and table_key in launcher._addresses
        launcher.unpin_tables()
        for t in fresh:
            rt.prox_step_([t.clone()], 0.1, 0.1, 0.0, 0.2, "row")
        assert key not in launcher._layouts and table_key not in launcher._addresses


def test_launches_run_on_the_tensors_device():
    assert isinstance(launcher.on_device(torch.device("cuda", 1)), torch.cuda.device)
    assert launcher.on_device(torch.device("cuda", 1)).idx == 1
    assert not isinstance(launcher.on_device(torch.device("cpu")), torch.cuda.device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_another_device_than_the_current_one():
    ts = make_params([(64, 33), (1000,)], torch.float32, "cuda:1")
    assert torch.cuda.current_device() == 0
    check_backend(ts, ALL_TERMS, "row")
    assert torch.cuda.current_device() == 0


def test_offsets_past_int32():
    """A work item whose element offset is past 2^31 reads and writes the right memory.

    The table says the tensor starts 2^31 + a few chunks before a real buffer, and the work list
    holds only the chunks that land on the buffer: only int64 offset arithmetic reaches it.
    """
    chunk = 64
    first_chunk = 2**31 // chunk + 3
    buffer = torch.randn(3 * chunk, device=DEVICE)
    numel = (first_chunk + 2) * chunk + 10
    base = buffer.data_ptr() - first_chunk * chunk * buffer.element_size()
    lay = launcher.Layout.from_work([numel], [0, 0, 0], list(range(first_chunk, first_chunk + 3)), chunk,
                                    buffer.device)
    table = torch.tensor([base], dtype=torch.int64, device=DEVICE)
    partials = chunk_norms(table, lay, torch.float32)
    pieces = buffer.double().split([chunk, chunk, 10, chunk - 10])[:3]
    assert_close(partials[0], torch.stack([p.abs().sum() for p in pieces]), torch.float32, scale=chunk)
    assert_close(partials[1], torch.stack([p.square().sum() for p in pieces]), torch.float32, scale=chunk)


@CUDA_ONLY
def test_tensor_over_int32_elements():
    numel = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * numel * 2:
        pytest.skip(f"needs {3 * numel * 2 / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    w = torch.ones(numel, dtype=torch.float16, device="cuda")
    w[-3:] = 2.0
    per_l1, per_l2sq = rt.norms([w, torch.ones(3, dtype=torch.float16, device="cuda")])
    assert per_l1[0].item() == pytest.approx(numel + 3, rel=1e-6)
    assert per_l2sq[0].item() == pytest.approx(numel + 9, rel=1e-6)
    rt.prox_step_([w], 0.5, 1.0, 0.0, 0.0, "row")
    assert w[-1].item() == 1.5 and w[-4].item() == 0.5 and w[0].item() == 0.5
    del w
    torch.cuda.empty_cache()


@CUDA_ONLY
def test_cuda_graph_capture_and_replay():
    ts = make_params([(64, 33), (1000,), (5,)], torch.float32, "cuda")
    grads = [torch.zeros_like(t) for t in ts]
    lr = torch.tensor(0.5, device="cuda")
    l1, l2, gl = _hyper(ALL_TERMS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Warm-up builds and caches the tables and compiles the kernels outside the capture.
        rt.add_penalty_grad_(ts, grads, l1, l2, gl, "row")
        rt.prox_step_(ts, lr, l1, l2, gl, "row")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = rt.add_penalty_grad_(ts, grads, l1, l2, gl, "row")
        rt.prox_step_(ts, lr, l1, l2, gl, "row")
    for step in (0.25, 0.125):
        ref, ref_grads = to64(ts), to64(grads)
        lr.fill_(step)
        graph.replay()
        expected_value = reference.add_penalty_grad_(ref, ref_grads, l1, l2, gl, "row")
        reference.prox_step_(ref, step, l1, l2, gl, "row")
        assert_close(value, expected_value, torch.float32, scale=2000)
        for t, e, g, eg in zip(ts, ref, grads, ref_grads):
            assert_close(t, e, torch.float32)
            assert_close(g, eg, torch.float32)
