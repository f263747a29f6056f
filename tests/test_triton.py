"""What only the Triton backend has: its launcher's cached tables, unaligned views, launches on the tensors' device,
offsets past int32, CUDA graph capture.

Runs on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` there). Small chunk sizes keep the interpreter fast and still make
tensors span many chunks. Every op of the backend against the oracle: tests/test_backends.py.
"""

import math
from array import array

import oracle
import pytest
import torch
from helpers import DTYPES, assert_close, check_ops, make_params, to64, use_backend

rt = pytest.importorskip("regfast.triton")
if rt.unavailable_reason() is None:
    from regfast.triton import launcher
    from regfast.triton.norms import chunk_norms

pytestmark = pytest.mark.skipif(rt.unavailable_reason() is not None, reason=f"{rt.unavailable_reason()}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GROUPINGS = ["row", "col", "tensor"]
ALL_TERMS = dict(l1=0.05, l2=0.2, group_lasso=0.3)


def _hyper(h: dict) -> tuple[float, float, float]:
    return h.get("l1", 0.0), h.get("l2", 0.0), h.get("group_lasso", 0.0)


def _norms(ts):
    """Per-tensor Σ|w| and Σw² in float64."""
    ref = to64(ts)
    return torch.stack([t.abs().sum() for t in ref]), torch.stack([(t * t).sum() for t in ref])


def test_tables_are_cached_and_follow_storage():
    ts = make_params([(5, 3), (70,)], torch.float32, DEVICE)
    with launcher.chunked(16):
        assert launcher.layout(ts) is launcher.layout(ts)
        assert launcher.pointer_table(ts) is launcher.pointer_table(ts)
        before = launcher.pointer_table(ts)
        ts[1].data = torch.randn(70, device=DEVICE)
        assert launcher.pointer_table(ts) is not before
        assert_close(rt.norms(ts)[0], _norms(ts)[0], torch.float32, scale=70)
        ts[1].data = torch.randn(90, device=DEVICE)
        assert_close(rt.norms(ts)[1], _norms(ts)[1], torch.float32, scale=90)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views(dtype):
    """Contiguous views that start one element into their storage (not 16-byte aligned) take a correct path."""
    storage = make_params([(4000,)], dtype, DEVICE)[0]
    views = [storage[1:31].view(6, 5), storage[41:41 + 3 * 7 * 11].view(3, 7, 11), storage[1001:1001 + 2053]]
    assert all(v.data_ptr() % 16 for v in views)
    table, aligned = launcher.pointer_table(views)
    assert not aligned
    l1, l2, gl = _hyper(ALL_TERMS)
    with use_backend("triton"), launcher.chunked(512):
        for groups in GROUPINGS:
            check_ops(views, ALL_TERMS, groups, api=False)
            before = [v.detach().to("cpu", torch.float64, copy=True) for v in views]
            rt.prox_(views, None, 0.5, l1, l2, gl, groups)  # in place, through the unaligned pointers
            for v, b in zip(views, before):
                assert_close(v, oracle.prox(b, 0.5, l1, l2, gl, groups), dtype)


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


def test_a_list_the_walk_checked_reuses_the_tables_of_a_python_pass():
    """A Walked list (regfast._C's walk read its pointers, numels and contiguity) keys the same cache entries as a
    Python pass over the same tensors, and a list it found non-contiguous is copied as any other."""
    ext = pytest.importorskip("regfast._ext")
    if ext._C is None:
        pytest.skip("regfast._C is not built")
    from regfast import _ops
    from regfast._common import Walked

    ts = make_params([(5, 3), (70,), (0,), (), (2, 2, 9), (0, 5), (3, 0, 2), (4, 3, 0)], torch.float32, DEVICE)
    for groups in GROUPINGS:  # the (outer, ngroups, inner) of each tensor, from the dims the walk reads
        expected = [(1, 1, t.numel()) if groups == "tensor" or t.dim() < 2 else
                    (1, t.shape[0], math.prod(t.shape[1:])) if groups == "row" else
                    (t.shape[0], t.shape[1], math.prod(t.shape[2:])) for t in ts]
        assert launcher._group_shapes(array("q", [v for t in ts for v in launcher._dims_of(t)]).tobytes(),
                                      groups) == expected
    [(walked, _, _)] = ext._C.groups_walk(ts, _ops._PLAIN_TUPLE, True, True, False, True, Walked)
    assert type(walked) is Walked and walked.dense
    with launcher.chunked(16):
        assert launcher.layout(walked) is launcher.layout(ts)
        assert launcher.pointer_table(walked) is launcher.pointer_table(ts)
        for groups in GROUPINGS:
            assert launcher.group_layout(walked, groups) is launcher.group_layout(ts, groups)
    assert launcher.contiguous(walked) is walked
    view = make_params([(6, 4)], torch.float32, DEVICE)[0][:, ::2]
    [(walked, _, _)] = ext._C.groups_walk([view], _ops._PLAIN_TUPLE, True, True, False, False, Walked)
    [copy] = launcher.contiguous(walked)
    assert not walked.dense and copy.is_contiguous() and torch.equal(copy, view)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [[3, 3, 3, 3], [1, 4, 2, 4, 1, 7]], ids=["one count", "several"])
def test_host_step_counts_are_counted_and_give_each_param_its_bias_corrections(counts, acc):
    """AdamW's host step counts, kept as consecutive elements of one tensor (one add) or not (one add each): each
    param gets −lr/(1 − β1ᵗ) and √(1 − β2ᵗ) of its own new count t, computed in float64 and rounded once."""
    from regfast.triton.optim import _count_host_steps

    lr, beta1, beta2 = 0.01, 0.9, 0.999
    new = [c + 1 for c in counts]
    expected = torch.tensor([(lr / (1 - beta1**t)) * -1 for t in new] + [(1 - beta2**t) ** 0.5 for t in new],
                            dtype=acc)
    buffer = torch.tensor(counts, dtype=torch.float32)
    for steps in ([buffer[i] for i in range(len(counts))], [torch.tensor(float(c)) for c in counts]):
        values = _count_host_steps(steps, lr, beta1, beta2, acc, torch.device(DEVICE))
        assert values.dtype == acc and torch.equal(values.cpu(), expected)
        assert [s.item() for s in steps] == new
    assert buffer.tolist() == new


def _extension():
    ext = pytest.importorskip("regfast._ext")
    if ext._C is None:
        pytest.skip("regfast._C is not built")
    return ext


@pytest.mark.parametrize("wide", [False, True], ids=["float32", "float64"])
def test_the_extensions_bias_table_is_the_python_counts_bit_for_bit(monkeypatch, wide):
    """The flat plan's host step counts, counted by the extension in one call: the same new counts (float32 adds,
    which stop at 2**24) and the same bias corrections, bit for bit, as the torch ops that count them without it; one
    version bump of the counts; None, with nothing written, for counts it does not take."""
    ext = _extension()
    from regfast.triton import optim as triton_optim

    acc = torch.float64 if wide else torch.float32
    counts = [0.0, 1.0, 1.0, 7.0, 2.0**24 - 1, 2.0**24, 1e6, 1e6, 3.0]
    for lr, beta1, beta2 in ((1e-3, 0.9, 0.999), (0.37, 0.5, 0.25), (1e-8, 0.0, 0.0)):
        ours, theirs = torch.tensor(counts), torch.tensor(counts)
        version = ours._version
        table = ext._C.host_bias_table(ours, lr, beta1, beta2, wide)
        assert ours._version == version + 1
        with monkeypatch.context() as m:
            m.setattr(triton_optim.HOST, "bias_table", None)
            expected = triton_optim._count_host_steps([theirs[i] for i in range(len(counts))], lr, beta1, beta2,
                                                      acc, torch.device("cpu"))
        assert torch.equal(ours, theirs) and ours[5].item() == 2.0**24
        assert table.dtype == acc and table.shape == (2 * len(counts),)
        assert torch.equal(table.view(torch.int64 if wide else torch.int32),
                           expected.view(torch.int64 if wide else torch.int32))
    refusals = (torch.zeros(6)[::2], torch.zeros(3, dtype=torch.float64), torch.zeros(2, 3), torch.zeros(()),
                torch.zeros(3, requires_grad=True))
    for refused in refusals:
        before = refused.detach().clone()
        assert ext._C.host_bias_table(refused, 1e-3, 0.9, 0.999, wide) is None
        assert torch.equal(refused, before)


def test_a_table_is_taken_from_the_cache_only_for_its_own_bytes(monkeypatch):
    """The table caches hash their keys by the extension's digest of the bytes; an entry whose bytes differ (two lists
    with one digest) is never taken: the call gets its own tables, and one that a captured graph reads is kept."""
    _extension()
    a, b = make_params([(3,), (5,)], torch.float32, DEVICE), make_params([(3,), (5,)], torch.float32, DEVICE)
    words = array("q", [t.data_ptr() for t in a]).tobytes()
    assert launcher._digest(words) == launcher._digest(bytes(bytearray(words)))
    assert launcher._digest(words) != launcher._digest(array("q", [t.data_ptr() for t in b]).tobytes())
    monkeypatch.setattr(launcher, "_digest", lambda data: 7)  # every key collides
    for first, second in ((a, b), (b, a)):
        launcher._addresses.clear()
        table_first, _ = launcher.pointer_table(first)
        table_second, _ = launcher.pointer_table(second)
        assert table_first.tolist() == [t.data_ptr() for t in first]
        assert table_second.tolist() == [t.data_ptr() for t in second]
        assert launcher.pointer_table(second)[0] is table_second
    launcher._addresses.clear()
    monkeypatch.setattr(launcher, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="once before capturing"):
        launcher.pointer_table(a)
    monkeypatch.setattr(launcher, "capturing", lambda device: False)
    pinned, _ = launcher.pointer_table(a)
    monkeypatch.setattr(launcher, "capturing", lambda device: True)
    assert launcher.pointer_table(a)[0] is pinned  # now read by a graph
    monkeypatch.setattr(launcher, "capturing", lambda device: False)
    other, _ = launcher.pointer_table(b)
    assert other.tolist() == [t.data_ptr() for t in b] and launcher.pointer_table(a)[0] is pinned
    launcher.unpin_tables()
    launcher._addresses.clear()


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
        key = (ts[0].device, 16, launcher._digest(array("q", (12, 11)).tobytes()))
        table_key = (ts[0].device, launcher._digest(array("q", [t.data_ptr() for t in ts]).tobytes()))
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
    with use_backend("triton"):
        check_ops(ts, ALL_TERMS, "row")
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
        before, before_grads = to64(ts), [g.detach().to("cpu", torch.float64, copy=True) for g in grads]
        lr.fill_(step)
        graph.replay()
        kw = dict(l1=l1, l2=l2, gl=gl, groups="row")
        assert_close(value, oracle.penalty(before, **kw), torch.float32, scale=2000)
        for t, g, b, bg in zip(ts, grads, before, before_grads):
            assert_close(t, oracle.prox(b, step, **kw), torch.float32)
            assert_close(g, bg + oracle.grad(b, **kw), torch.float32)
