"""The C++ walk of the public calls (regfast._C's host path) against the Python path, and when it declines.

The walk checks, dedupes and groups the caller's list and runs each group's kernel itself; wherever it
cannot prove the input valid it declines (returns None, having written nothing) and the Python path runs.
Both must give the same bits, the same version-counter bumps and, through the Python path, the same errors.
"""

import math
import re
import shutil
import subprocess
import sys
from array import array

import oracle
import pytest
import torch
from helpers import assert_close, make_params, noncontiguous, same_layout_copy, use_backend
from torch import nn

import regfast
from regfast import _dispatch, _ext, _ops
from regfast._common import ByAddress, Walked

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"regfast._C is not built: {_ext.unavailable_reason('cpu')}")

SHAPES = [(5, 3), (7,), (), (0,), (4, 2, 3), (2**15 + 3,), (1,)]


def _model(dtypes=(torch.float32,), copies=1):
    """Params of SHAPES (`copies` times over) with grads. Several copies are listed in another order than made,
    so that their objects lie scattered through the list as a trained model's do, and the list is longer than
    the walk looks ahead (csrc/lookahead.h)."""
    params = []
    for i, shape in enumerate(SHAPES * len(dtypes) * copies):
        p = nn.Parameter(make_params([shape], dtypes[i % len(dtypes)], seed=i)[0])
        p.grad = make_params([shape], p.dtype, seed=100 + i)[0]
        params.append(p)
    order = torch.randperm(len(params), generator=torch.Generator().manual_seed(len(params))).tolist()
    return [params[i] for i in order] if copies > 1 else params


CALLS = {
    "norms": lambda ps: regfast.norms(ps),
    "add_penalty_grad_": lambda ps: regfast.add_penalty_grad_(ps, l1=0.01, l2=0.1, group_lasso=0.05, groups="col"),
    "add_penalty_grad_ elastic": lambda ps: regfast.add_penalty_grad_(ps, l1=0.01, l2=0.1),
    "prox_": lambda ps: regfast.prox_(ps, 0.1, l1=0.01, l2=0.1, group_lasso=0.05, groups="row"),
    "prox_ tensor lr": lambda ps: regfast.prox_(ps, torch.tensor(0.1, dtype=torch.float64), l1=0.01, l2=0.1),
}


def _state(ps):
    return [(p.detach().clone(), p.grad.clone(), p._version, p.grad._version) for p in ps]


def _triton_on_cpu() -> bool:
    return _dispatch.unavailable_reason("triton", "cpu") is None


def _recorded_walks(monkeypatch) -> list:
    """The results of every _ops.walk from now on (None where the walk declined), in call order."""
    taken = []
    original = _ops.walk
    monkeypatch.setattr(_ops, "walk", lambda *a: taken.append(r := original(*a)) or r)
    return taken


# The integer dtype whose view of a float tensor compares its bits.
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


# "cpp": the whole call in C++; "triton": the C++ walk checks and groups, Triton launches each group.
_TRITON_SKIP = pytest.mark.skipif(not _triton_on_cpu(), reason="Triton cannot run on the CPU here")
WALKED_BACKENDS = ["cpp", pytest.param("triton", marks=_TRITON_SKIP)]


@pytest.mark.parametrize("backend", WALKED_BACKENDS)
@pytest.mark.parametrize("call", CALLS, ids=str)
@pytest.mark.parametrize("dtypes, copies", [((torch.float32,), 1), ((torch.float16, torch.float64, torch.bfloat16), 1),
                                            ((torch.float32, torch.bfloat16), 9)], ids=str)
def test_walk_matches_the_python_path_bit_for_bit(call, dtypes, copies, backend, monkeypatch):
    if backend == "triton" and copies > 1:
        pytest.skip("the long list tests the walk, which is the same for every backend; interpreted Triton is slow")
    walked, python = _model(dtypes, copies), _model(dtypes, copies)
    taken = _recorded_walks(monkeypatch)
    with use_backend(backend):
        out = CALLS[call](walked + walked[:2])  # repeats count once
        assert taken and taken[-1] is not None, "the walk declined a plain list"
        monkeypatch.setattr(_ops, "walk", lambda *a: None)
        expected = CALLS[call](python + python[:2])
    if out is not None:
        outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
        for a, b in zip(outs, expecteds):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for (w, g, wv, gv), (w2, g2, wv2, gv2) in zip(_state(walked), _state(python)):
        assert torch.equal(w, w2) and torch.equal(g, g2)
        assert (wv, gv) == (wv2, gv2), "version counters bumped differently"


PENALTIES = {
    "group lasso": {"l1": 0.01, "l2": 0.1, "group_lasso": 0.05, "groups": "col"},
    "l1": {"l1": 0.3},
}


def _penalty_and_grads(params, hyper, grad):
    """penalty(params + a repeat), its backward with ``grad``, and the grads it left."""
    value = regfast.penalty(params + params[:2], **hyper)
    value.backward(torch.tensor(grad, dtype=value.dtype))
    return value.detach(), [None if not p.is_leaf or p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("hyper", PENALTIES.values(), ids=PENALTIES.keys())
@pytest.mark.parametrize("dtypes, copies", [((torch.float32,), 1), ((torch.float16, torch.float64, torch.bfloat16), 1),
                                            ((torch.float32, torch.bfloat16), 9)], ids=str)
def test_penalty_walks_with_one_autograd_node_bit_for_bit(dtypes, copies, hyper, monkeypatch):
    walked, python = _model(dtypes, copies), _model(dtypes, copies)
    sources = []
    for ps in (walked, python):  # a param without a grad yet, one that does not require grad, a non-leaf
        ps[0].grad = ps[1].grad = None
        ps[1].requires_grad_(False)
        sources.append(ps[2])
        ps[2] = ps[2] * 1.5
    taken = _recorded_walks(monkeypatch)
    with use_backend("cpp"):
        value, grads = _penalty_and_grads(walked, hyper, 1.7)
        assert taken and taken[-1] is not None, "the walk declined a plain list"
        node = regfast.penalty(walked, **hyper).grad_fn
        assert node.name().endswith("PenaltyFunction>")  # torch's C++ custom function's node
        assert len(node.next_functions) == len(walked)
        with torch.no_grad():
            plain = regfast.penalty(walked, **hyper)
        assert plain.grad_fn is None and not plain.requires_grad
        monkeypatch.setattr(_ops, "walk", lambda *a: None)
        expected, expected_grads = _penalty_and_grads(python, hyper, 1.7)
    assert value.dtype == expected.dtype and torch.equal(value, expected) and torch.equal(plain, expected)
    assert torch.equal(sources[0].grad, sources[1].grad)  # through the non-leaf to its leaf
    for a, b in zip(grads, expected_grads):
        assert (a is None) == (b is None)
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b))
    assert grads[1] is None and grads[0] is not None


def test_penalty_walks_second_derivatives_as_the_python_path(monkeypatch):
    def hessian_vector(params):
        value = regfast.penalty(params, l1=0.2, l2=0.3, group_lasso=0.1, groups="row")
        grads = torch.autograd.grad(value, params, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), params)

    walked, python = _model(), _model()
    taken = _recorded_walks(monkeypatch)
    with use_backend("cpp"):
        out = hessian_vector(walked)
        assert taken[-1] is not None
        monkeypatch.setattr(_ops, "walk", lambda *a: None)
        expected = hessian_vector(python)
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


def test_penalty_walks_node_keeps_torchs_checks_and_hooks():
    w = torch.randn(6, 5, requires_grad=True)
    with use_backend("cpp"):
        value = regfast.penalty([w], l1=0.1, l2=0.2)
        assert value.grad_fn.name().endswith("PenaltyFunction>")
        value.backward(retain_graph=True)
        value.backward()  # retained once
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            value.backward()
        value = regfast.penalty([w], l1=0.1)
        with torch.no_grad():
            w.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*is at version"):
            value.backward()
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append("pack") or t,
                                                       lambda t: seen.append("unpack") or t):
            value = regfast.penalty([w], l2=0.5)
        value.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(len(grad_inputs)))
        w.grad = None
        value.backward()
        assert seen == ["pack", "unpack", 1]
        assert torch.equal(w.grad, (2 * 0.5) * w.detach())


def _sized_list(sizes, dtype):
    """Params for the prox's data table: "small", 3,000 tensors of 0-89 elements (about 2¹⁷ in all, none over one
    chunk of the CPU kernels, so several runs of whole tensors at 2 threads) with a 0-dim one; "chunked", tensors
    past one chunk among small ones. A NaN and an inf among the elements."""
    gen = torch.Generator().manual_seed(3)
    if sizes == "small":
        shapes = [(int(n),) for n in torch.randint(0, 90, (3000,), generator=gen)] + [(), (3, 5)]
    else:
        shapes = [(2**15 + 3,), (5,), (70001,), (0,), (3, 11), (2**15,)]
    ps = [nn.Parameter(t) for t in make_params(shapes, dtype, seed=int(torch.randint(0, 2**31, ())))]
    with torch.no_grad():
        ps[-1].view(-1)[-1] = float("nan")
        ps[0].view(-1)[0] = float("inf")
    return ps


@pytest.mark.parametrize("hyper, lr", [({"l1": 0.01, "l2": 0.1}, 0.5), ({"l1": 0.3}, "tensor"), ({"l2": 0.7}, 0.25),
                                       ({"l1": 0.01, "group_lasso": 0.3, "groups": "tensor"}, 0.5),
                                       ({"l2": 0.1, "group_lasso": 0.5, "groups": "row"}, "tensor"),
                                       ({"group_lasso": 0.2, "groups": "col"}, 0.25)],
                         ids=["elastic", "l1-tensor-lr", "l2", "l1-gl-tensor", "l2-gl-row-tensor-lr", "gl-col"])
@pytest.mark.parametrize("sizes", ["small", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_prox_runs_on_the_walks_data_table(dtype, sizes, hyper, lr, monkeypatch):
    """The walk reads each CPU param's data pointer (and with group lasso its group shape) and the prox runs on that
    table (runs of whole small tensors, or chunks where a tensor is past one): the float64 oracle's values within
    the dtype's rounding (NaN and inf kept, a NaN's group NaN), without group lasso float32 and float64 the reference
    backend's bits (with it, the group norms are summed in another order), and the same bits on 1 and 2 threads and
    as the op's path (the walk declined), the walk taking the call each time."""
    ps = _sized_list(sizes, dtype)
    step = torch.tensor(0.5) if lr == "tensor" else lr
    taken = _recorded_walks(monkeypatch)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            work = [p.detach().clone() for p in ps]
            with use_backend("cpp"):
                regfast.prox_(work, step, **hyper)
            runs.append(work)
        assert taken == [True, True], "the walk declined the list"
        monkeypatch.setattr(_ops, "walk", lambda *a: None)
        work = [p.detach().clone() for p in ps]
        with use_backend("cpp"):
            regfast.prox_(work, step, **hyper)
        runs.append(work)
    finally:
        torch.set_num_threads(threads)
    with use_backend("torch"):
        reference = [p.detach().clone() for p in ps]
        regfast.prox_(reference, step, **hyper)
    bits = _BITS[dtype]
    gl = hyper.get("group_lasso", 0.0)
    for w, one, two, op, ref in zip(ps, *runs, reference, strict=True):
        assert torch.equal(one.view(bits), two.view(bits)) and torch.equal(one.view(bits), op.view(bits))
        expected = oracle.prox(w.detach().double(), 0.5 if lr == "tensor" else lr, hyper.get("l1", 0.0),
                               hyper.get("l2", 0.0), gl, hyper.get("groups", "row"))
        assert_close(one, expected, dtype)
        if dtype in (torch.float32, torch.float64) and not gl:
            assert torch.equal(one.view(bits), ref.view(bits))
    assert runs[0][-1].view(-1)[-1].isnan() and runs[0][0].view(-1)[0].isinf()


def _finite_sized_list(sizes, dtype, strided):
    """_sized_list without its NaN and inf (for sums checked against the oracle), each param with a grad; with
    `strided`, one param a strided view (its group then takes the op's path, on a contiguous copy)."""
    ps = _sized_list(sizes, dtype)
    with torch.no_grad():
        ps[-1].view(-1)[-1] = 0.5
        ps[0].view(-1)[0] = -2.0
    if strided:
        ps[len(ps) // 2] = noncontiguous(make_params([(3, 40)], dtype)[0])
    for p in ps:
        p.grad = make_params([p.shape], dtype)[0]
    return ps


@pytest.mark.parametrize("gl, groups", [(0.0, "row"), (0.3, "tensor"), (0.2, "row"), (0.5, "col")],
                         ids=["no-gl", "gl-tensor", "gl-row", "gl-col"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "a-strided-param"])
@pytest.mark.parametrize("sizes", ["small", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_norms_and_add_penalty_grad_run_on_the_walks_data_table(dtype, sizes, strided, gl, groups, monkeypatch):
    """norms and add_penalty_grad_ (with group lasso or without) run on the data pointers (and group shapes) the walk
    read while every param of the group is contiguous: per-tensor sums, the penalty's value and the grads as the
    float64 oracle within the dtype's rounding, the same bits on 1 and 2 threads and as the Python path (the walk
    declined), the walk taking each call."""
    ps = _finite_sized_list(sizes, dtype, strided)
    taken = _recorded_walks(monkeypatch)
    bits = _BITS[dtype]

    assert strided == any(not p.is_contiguous() for p in ps)

    def run():
        work = [same_layout_copy(p.detach()) for p in ps]
        assert strided == any(not w.is_contiguous() for w in work)
        for w, p in zip(work, ps):
            w.grad = p.grad.clone()
        norms = regfast.norms(work)
        value = regfast.add_penalty_grad_(work, l1=0.01, l2=0.2, group_lasso=gl, groups=groups)
        return [norms.per_tensor_l1, norms.per_tensor_l2sq, value.reshape(1)] + [w.grad for w in work]

    threads = torch.get_num_threads()
    runs = []
    try:
        with use_backend("cpp"):
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(run())
            assert len(taken) == 4 and all(r is not None for r in taken), "the walk declined the list"
            monkeypatch.setattr(_ops, "walk", lambda *a: None)
            runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a.view(bits) if a.dtype == dtype else a, b.view(bits) if b.dtype == dtype else b)
    l1, l2sq, value, *grads = runs[0]
    w64 = [p.detach().double() for p in ps]
    assert_close(l1, torch.stack([w.abs().sum() for w in w64]), dtype, scale=1.0)
    assert_close(l2sq, torch.stack([(w * w).sum() for w in w64]), dtype, scale=1.0)
    assert_close(value[0], oracle.penalty(w64, l1=0.01, l2=0.2, gl=gl, groups=groups), dtype)
    for g, w, p in zip(grads, w64, ps, strict=True):
        assert_close(g, p.grad.double() + oracle.grad(w, l1=0.01, l2=0.2, gl=gl, groups=groups), dtype, scale=1.0)


@pytest.mark.parametrize("call, op", [("norms", "norms"), ("add_penalty_grad_ elastic", "add_penalty_grad_"),
                                      ("prox_ tensor lr", "prox_")])
def test_a_profiler_sees_the_walks_cpu_ops(call, op):
    """The walk runs a CPU group's work without its op (the walk made the op's checks), except while a profiler
    listens: then through the op, which the profiler records; the same bits either way."""
    from torch.profiler import ProfilerActivity, profile

    quiet, profiled = _model(), _model()
    with use_backend("cpp"):
        expected = CALLS[call](quiet)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = CALLS[call](profiled)
    assert any(e.name == f"regfast_C::{op}" for e in prof.events()), sorted({e.name for e in prof.events()})
    if out is not None:
        outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
        assert all(torch.equal(a, b) for a, b in zip(outs, expecteds))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(_state(quiet), _state(profiled)))


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux"), reason="needs objdump")
def test_the_walks_inline_the_tensor_accessors_of_their_checks():
    """The walks are compiled flattened (csrc/host_path.cpp): in the built library's disassembly they call none of
    TensorImpl's inline accessors (layout, sizes, device, dtype, numel, contiguity) out of line."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _ext._C.__file__], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    walks = {}
    for block in asm.split("\n\n"):
        head = re.match(r"[0-9a-f]+ <(regfast::host::(?:\(anonymous namespace\)::)?"
                        r"(walk|walk_plan|walk_flat|grads_ready))\(", block.strip())
        if head:
            walks.setdefault(head.group(2), []).extend(
                line.split("<", 1)[1] for line in block.splitlines() if "\tcall" in line and "<" in line)
    assert set(walks) == {"walk", "walk_plan", "walk_flat", "grads_ready"}, sorted(walks)
    accessors = re.compile(r"c10::TensorImpl::(layout|sizes|device|dtype|numel|is_contiguous|scalar_type)\(|"
                           r"at::TensorBase::(sizes|layout|device|is_contiguous)\(")
    for name, calls in walks.items():
        assert not [c for c in calls if accessors.search(c)], (name, calls)


@pytest.mark.parametrize("container", [list, tuple, "module"])
def test_the_walk_takes_lists_tuples_and_modules(container):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = model if container == "module" else container(model.parameters())
    from regfast.api import _listed
    assert _ops.walk("add_penalty_grad", _listed(params), 0.1, 0.0, 0.0, "row") is not None
    assert _ops.walk("norms", _listed(params)) is not None
    assert _ops.walk("prox", _listed(params), None, 0.1, 0.1, 0.0, 0.0, "row") is True


class _Sub(torch.Tensor):
    pass


def _value(t):
    """A copy of t's value to compare (meta tensors have none; sparse ones compare dense)."""
    if t is None or not torch.is_tensor(t):
        return t
    if t.is_meta:
        return ("meta", t.dtype, t.shape)
    return (t.to_dense() if t.is_sparse else t).detach().clone()


def _equal(a, b):
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _snapshot(params):
    return [(_value(p), _value(p.grad) if torch.is_tensor(p) else None) for p in params]


def _same(a, b):
    """Two outcomes: the same exception, or params and grads of the same values."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        return a == b
    return len(a) == len(b) and all(_equal(x[0], y[0]) and _equal(x[1], y[1]) for x, y in zip(a, b))


def _declines(name, params, *args):
    listed = params if isinstance(params, (list, tuple)) else []
    snapshot = _snapshot(listed)
    assert _ops.walk(name, params, *args) is None
    assert _same(_snapshot(listed), snapshot)


def test_the_walk_declines_what_it_cannot_prove_and_writes_nothing():
    ps = _model()
    grad_args = (0.1, 0.1, 0.1, "row")
    prox_args = (None, 0.1, 0.1, 0.1, 0.1, "row")
    _declines("add_penalty_grad", (p for p in ps), *grad_args)  # a generator: the Python path consumes it
    _declines("add_penalty_grad", [], *grad_args)
    missing = _model()
    missing[2].grad = None
    _declines("add_penalty_grad", missing, *grad_args)  # a grad to create
    strided_grad = _model()
    strided_grad[0].grad = noncontiguous(strided_grad[0].grad)
    _declines("add_penalty_grad", strided_grad, *grad_args)
    sub = _model()
    sub[1] = torch.randn(7).as_subclass(_Sub)
    _declines("norms", sub)
    ints = _model()
    ints[0] = torch.ones(3, dtype=torch.int32)
    _declines("norms", ints)
    view = _model()
    view[0] = noncontiguous(view[0].detach())
    _declines("prox", view, *prox_args)  # a strided param to write: the Python path checks it is stored once
    with torch.inference_mode():
        frozen = [torch.randn(3)]
    _declines("prox", frozen, *prox_args)
    with use_backend("torch"):
        _declines("norms", ps)
        _declines("prox", ps, *prox_args)


def _long_with(k, change):
    """A long scattered list whose k-th param `change` spoils (far beyond the first stages of the walk's lookahead,
    which reads the objects of later tensors before the walk checks them)."""
    ps = _model(copies=12)
    change(ps, k)
    return ps


def _set_grad(value):
    def change(ps, k):
        ps[k].grad = value(ps[k])
    return change


def _set_data(value):
    def change(ps, k):
        with torch.no_grad():
            ps[k].data = value(ps[k])
    return change


def _replace(value):
    def change(ps, k):
        ps[k] = value(ps[k])
    return change


SPOILERS = {
    "no grad": _set_grad(lambda p: None),
    "sparse grad": _set_grad(lambda p: torch.zeros(p.shape).to_sparse()),
    "grad of another dtype": _set_data(lambda p: p.detach().double()),  # the grad left behind is float32
    "grad of another shape": _set_data(lambda p: torch.zeros(2, 2)),
    "not a tensor": _replace(lambda p: 3.0),
    "subclass": _replace(lambda p: p.detach().as_subclass(_Sub)),
    "tensor without autograd metadata": _replace(lambda p: p.detach().clone()),
    "sparse param": _replace(lambda p: nn.Parameter(torch.zeros(3, 3).to_sparse())),
    "meta param": _replace(lambda p: nn.Parameter(torch.zeros(3, device="meta"))),
    "int param": _replace(lambda p: torch.ones(3, dtype=torch.int32)),
}


def _outcome(run, params):
    """What `run(params)` did: its exception (type and message), or the values of the params and grads after it."""
    try:
        run(params)
    except Exception as e:  # noqa: BLE001 - the outcome compared is the exception itself
        return type(e), str(e)
    return _snapshot(params)


@pytest.mark.parametrize("spoiler", SPOILERS, ids=str)
@pytest.mark.parametrize("k", [0, 40, 83])
def test_a_bad_tensor_anywhere_in_a_long_list_is_declined_by_the_walk(spoiler, k, monkeypatch):
    """The walk reads the objects of later tensors before it checks them (csrc/lookahead.h): whatever sits at k
    of a long list, it declines with nothing written, grads_ready says no, and every public call and optimizer
    step raises or runs exactly as the Python path does."""
    ps = _long_with(k, SPOILERS[spoiler])
    _declines("add_penalty_grad", ps, 0.1, 0.1, 0.0, "row")
    assert not _ops.grads_ready(ps)
    original = _ops.walk
    for call in CALLS.values():
        walked, python = _long_with(k, SPOILERS[spoiler]), _long_with(k, SPOILERS[spoiler])
        got = _outcome(call, walked)
        monkeypatch.setattr(_ops, "walk", lambda *a: None)
        expected = _outcome(call, python)
        monkeypatch.setattr(_ops, "walk", original)
        assert _same(got, expected)
    outcomes = []
    for walk in (original, lambda *a: None):  # a step from the plan, then the same step without a walk
        params = _model(copies=12)
        opt = regfast.optim.ProxAdamW(params, lr=0.01, l1=0.01)
        opt.step()
        SPOILERS[spoiler](opt.param_groups[0]["params"], k)
        monkeypatch.setattr(_ops, "walk", walk)
        outcomes.append(_outcome(lambda _, step=opt.step: step(), opt.param_groups[0]["params"]))
        monkeypatch.setattr(_ops, "walk", original)
    assert _same(*outcomes)


@pytest.mark.parametrize(("backend", "numel"),
                         [("cpp", 1), ("cpp", 2**20 + 1), pytest.param("triton", 1, marks=_TRITON_SKIP)],
                         ids=["cpp-small", "cpp-large", "triton-small"])  # large: the kernels run without the GIL
def test_the_walk_leaves_reference_counts_as_it_found_them(backend, numel):
    """The walk borrows the caller's tensors (no reference taken) and, where it releases the interpreter lock,
    takes references first: every count is back where it was, and results match a fresh Python-path run."""
    import sys

    ps = [nn.Parameter(torch.randn(numel)) for _ in range(3)] + _model()
    for p in ps[:3]:
        p.grad = torch.randn(numel)
    before = [(sys.getrefcount(p), sys.getrefcount(p.grad)) for p in ps]
    with use_backend(backend):
        for _ in range(3):
            for call in CALLS.values():
                call(ps)
            regfast.optim.ProxAdamW(ps, lr=0.01, l1=0.01).step()
            regfast.optim.ProxSGD(ps, lr=0.01, momentum=0.9, l1=0.01).step()
    assert [(sys.getrefcount(p), sys.getrefcount(p.grad)) for p in ps] == before


def test_errors_come_from_the_python_path_unchanged():
    ps = _model()
    ps[1].grad = torch.randn(7)
    with torch.no_grad():
        ps[1].data = torch.randn(3)  # leaves a grad of another shape behind
    with pytest.raises(ValueError, match="params\\[1\\].grad \\(\\(7,\\).*does not match params\\[1\\]"):
        regfast.add_penalty_grad_(ps, l1=0.1)
    ps = _model()
    ps[3] = torch.ones(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="params\\[3\\] has dtype torch.int64"):
        regfast.norms(ps)


OPTIMIZERS = {
    "sgd": lambda ps: regfast.optim.ProxSGD(ps, lr=0.05, momentum=0.9, l1=0.01, l2=0.1, compute_penalty=True),
    "sgd plain": lambda ps: regfast.optim.ProxSGD(ps, lr=torch.tensor(0.05), l1=0.01),
    "sgd group lasso": lambda ps: regfast.optim.ProxSGD(ps, lr=0.05, momentum=0.9, group_lasso=0.05, groups="col"),
    "adamw": lambda ps: regfast.optim.ProxAdamW(ps, lr=0.01, l1=0.01, amsgrad=True, compute_penalty=True),
    "adamw lr": lambda ps: regfast.optim.ProxAdamW(ps, lr=torch.tensor(0.01), l2=0.1, prox="lr"),
    "adamw group lasso": lambda ps: regfast.optim.ProxAdamW(ps, lr=0.01, l1=0.01, group_lasso=0.05),
    "sgd nesterov group lasso": lambda ps: regfast.optim.ProxSGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                                 weight_decay=0.01, l1=0.01, group_lasso=0.05,
                                                                 compute_penalty=True),
    "adamw lr group lasso": lambda ps: regfast.optim.ProxAdamW(ps, lr=0.01, l1=0.01, l2=0.1, prox="lr", amsgrad=True,
                                                               group_lasso=0.05, groups="col", compute_penalty=True),
    "adamw group lasso by columns": lambda ps: regfast.optim.ProxAdamW(ps, lr=0.01, l2=0.1, group_lasso=0.05,
                                                                       groups="col", maximize=True,
                                                                       compute_penalty=True),
}
# The extension's group steps from the walk's table and flat plan: the Triton path's group lasso is the two above.
EXTENSION_ONLY = {"sgd nesterov group lasso", "adamw lr group lasso", "adamw group lasso by columns"}


def _steps(make, params, n, monkeypatch, walk):
    taken = []
    original = _ops.walk
    monkeypatch.setattr(_ops, "walk", (lambda *a: taken.append(r := original(*a)) or r) if walk else (lambda *a: None))
    opt = make(params)
    penalties = []
    for k in range(n):
        for p in params:
            p.grad = make_params([p.shape], p.dtype, seed=1000 * k + p.numel())[0]
        opt.step()
        penalties.append(opt.last_penalty)
    return opt, penalties, taken


@pytest.mark.parametrize("backend", WALKED_BACKENDS)
@pytest.mark.parametrize("make", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("dtypes, copies", [((torch.float32,), 1), ((torch.bfloat16, torch.float64), 1),
                                            ((torch.float32, torch.float64), 9)], ids=str)
def test_optimizer_steps_walk_from_their_plan_bit_for_bit(make, dtypes, copies, backend, monkeypatch):
    """From the second step on, a step walks from the group's plan: the whole step in C++ ("cpp"), or the walk's
    groups launched from Python ("triton"); the same bits, states and penalties as the Python path's steps."""
    if backend == "triton" and copies > 1:
        pytest.skip("the long list tests the walk, which is the same for every backend; interpreted Triton is slow")
    if backend == "triton" and make in EXTENSION_ONLY:
        pytest.skip("the extension's group steps; interpreted Triton is slow")
    walked, python = _model(dtypes, copies), _model(dtypes, copies)
    with use_backend(backend):
        opt, pens, taken = _steps(OPTIMIZERS[make], walked, 4, monkeypatch, walk=True)
        assert len(taken) == 3 and all(t is not None for t in taken), "every step after the first walks from the plan"
        ref, ref_pens, _ = _steps(OPTIMIZERS[make], python, 4, monkeypatch, walk=False)
    for p, q in zip(walked, python):
        assert torch.equal(p, q) and p._version == q._version
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
        if "step" in opt.state[p]:  # the plan keeps the host step counts as views of one buffer per group
            assert opt.state[p]["step"]._base is not None
    for a, b in zip(pens, ref_pens):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_plan_is_dropped_when_the_group_or_the_state_changes(monkeypatch):
    params = _model()
    opt = regfast.optim.ProxAdamW(params[:3], lr=0.01, l1=0.01)
    opt.step()
    assert opt._plans
    opt.add_param_group({"params": params[3:]})
    assert not opt._plans
    opt.step()
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert not opt._plans
    opt.step()
    opt.state.clear()  # a fresh state: the plan's tensors are no longer the state
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in params)
    params[0].grad = None  # a param without a grad: the walk declines, the Python path skips it
    before = params[0].detach().clone()
    opt.step()
    assert torch.equal(params[0].detach(), before) and opt.state[params[1]]["step"].item() == 2


FLAT = {
    "sgd": lambda ps: regfast.optim.ProxSGD(ps, lr=0.05, momentum=0.9, l1=0.01, l2=0.1),
    "adamw": lambda ps: regfast.optim.ProxAdamW(ps, lr=0.01, l1=0.01, amsgrad=True, compute_penalty=True),
}


def _grads(params, k, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else make_params([p.shape], p.dtype, seed=1000 * k + i)[0]


@_TRITON_SKIP
@pytest.mark.parametrize("make", FLAT, ids=str)
def test_a_flat_plan_walk_bumps_the_version_counters_as_the_launcher_did(make, monkeypatch):
    """Where the walk hands a flat plan's states by their addresses (Triton), it bumps the stepped params and the
    states' buffers itself, before the launch; handed as lists, the launcher bumps them after it. The same values and
    the same version counters either way, params without a grad included."""
    skips = [(), (0, 4, 9), (), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13), ()]

    def run(by_address):
        if not by_address:  # the lists' path: the launcher bumps
            monkeypatch.setattr(_ops, "_by_address", lambda step, hyper: (False, False))
        ps = _model((torch.float32, torch.bfloat16, torch.float64))
        with use_backend("triton"):
            opt = FLAT[make](ps)
            for k, skip in enumerate(skips):
                _grads(ps, k, skip)
                opt.step()
        monkeypatch.undo()
        return ps, opt

    walked, opt = run(True)
    listed, ref = run(False)
    for p, q in zip(walked, listed):
        assert torch.equal(p, q) and p._version == q._version
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value) and opt.state[p][key]._version == value._version, key


@pytest.mark.parametrize("backend", WALKED_BACKENDS)
@pytest.mark.parametrize("make", FLAT, ids=str)
def test_states_move_into_flat_buffers_and_params_without_grads_are_skipped(make, backend, monkeypatch):
    """On the CPU's extension ("cpp": the whole step in C++) and on a backend that launches from Python ("triton":
    the walk lists each group's state views with their addresses in the buffers), a plan moves the states into one
    buffer per state and (device, dtype); a step skips the params without a grad, as the Python path does."""
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    walked, python = _model(dtypes), _model(dtypes)
    taken = []
    original = _ops.walk
    monkeypatch.setattr(_ops, "walk", lambda *a: taken.append((a[0], r := original(*a))) or r)
    # Some params without a grad; then the whole of one dtype (float64, every third param) without one.
    skips = [(), (), (0, 4, 9), (), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13), (), tuple(range(2, 21, 3)), ()]
    with use_backend(backend):
        opt = FLAT[make](walked)
        for k, skip in enumerate(skips):
            _grads(walked, k, skip)
            versions = [p._version for p in walked]
            opt.step()
            if k:
                assert taken[-1][0].endswith("_flat" if backend == "cpp" else "_launch")
                assert taken[-1][1] is not None, "the step walked from the flat plan"
                for i, p in enumerate(walked):
                    assert (p._version > versions[i]) == (i not in skip)
    # Each state of the params of one dtype is a view of one buffer, in param order.
    for key in opt.state[walked[0]]:
        for dtype in dtypes:
            views = [opt.state[p][key] for p in walked if p.dtype == dtype]
            assert all(v._base is not None and v._base is views[0]._base for v in views), key
    monkeypatch.setattr(_ops, "walk", lambda *a: None)
    with use_backend(backend):
        ref = FLAT[make](python)
        for k, skip in enumerate(skips):
            _grads(python, k, skip)
            ref.step()
    for p, q in zip(walked, python):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    if make == "adamw":
        assert torch.equal(opt.last_penalty, ref.last_penalty)


@pytest.mark.parametrize("backend", WALKED_BACKENDS)
def test_flat_states_survive_a_state_dict_round_trip_and_a_change_of_hyperparameters(backend, monkeypatch):
    """Group lasso set on a flat plan's group (in Adam's metric, which the Triton backend steps through each state
    tensor, not through the states' addresses alone) and taken off again: the same bits as the Python path."""
    import io

    def run(walk):
        if not walk:
            monkeypatch.setattr(_ops, "walk", lambda *a: None)
        params = _model((torch.float32, torch.float16))
        opt = regfast.optim.ProxAdamW(params, lr=0.01, l1=0.01)
        for k in range(3):
            _grads(params, k)
            opt.step()
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt = regfast.optim.ProxAdamW(params, lr=0.01, l1=0.01)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
        for k in range(3, 5):
            _grads(params, k)
            opt.step()
        opt.param_groups[0]["group_lasso"] = 0.05  # still stepped from the flat plan: the states stay views
        for k in range(5, 7):
            _grads(params, k)
            opt.step()
        opt.param_groups[0]["group_lasso"] = 0.0
        for k in range(7, 9):
            _grads(params, k)
            opt.step()
        return params, opt

    with use_backend(backend):
        walked, opt = run(True)
        python, ref = run(False)
    for p, q in zip(walked, python):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert opt.state[walked[1]]["step"].item() == 9


def _int64(values) -> bytes:
    return array("q", values).tobytes()


def _assert_read(listed, tensors, sizes: bool, dims: bool | None = None):
    """``listed`` is a Walked list of ``tensors`` (in order) with what a Python pass over them reads (the params'
    sizes, and their dims where asked: by default with the sizes)."""
    assert type(listed) is Walked and len(listed) == len(tensors) and all(a is b for a, b in zip(listed, tensors))
    assert listed.addresses == _int64(t.data_ptr() for t in tensors)
    assert listed.sizes == (_int64(t.numel() for t in tensors) if sizes else None)
    read = [(t.dim(), t.numel(), t.shape[0] if t.dim() else 0, t.shape[1] if t.dim() > 1 else 0,
             math.prod(t.shape[1:]), math.prod(t.shape[2:])) for t in tensors]
    assert listed.dims == (_int64(v for d in read for v in d) if (sizes if dims is None else dims) else None)
    assert listed.dense == all(t.is_contiguous() for t in tensors)
    assert listed.shared is False


def test_the_walk_lists_its_groups_with_what_it_read_for_a_python_launcher():
    """For a backend that launches from Python (Triton), the walk hands each group's params and grads as Walked
    lists that carry the data pointers, numels and contiguity it read in C++; plain lists when not asked."""
    ps = _model((torch.float32, torch.float64))
    view = torch.randn(6, 4)[:, ::2]  # a call that writes nothing takes a non-contiguous param
    listed = ps + [ps[0], view]  # the repeat is dropped
    groups = _ext._C.groups_walk(listed, _ops._PLAIN_TUPLE, True, False, False, False, Walked)
    assert len(groups) == 2
    for (params, grads, index), dtype in zip(groups, (torch.float32, torch.float64)):
        expected = [p for p in ps if p.dtype == dtype] + ([view] if dtype == torch.float32 else [])
        _assert_read(params, expected, sizes=True)
        assert grads is None and params.flat is None and len(index) == len(expected)
    assert not groups[0][0].dense and groups[1][0].dense
    # With grads, one group of every tensor once: the caller's objects in its order.
    ps = _model()
    [(params, grads, index)] = _ext._C.groups_walk(tuple(ps), _ops._PLAIN_TUPLE, True, False, True, True, Walked)
    _assert_read(params, ps, sizes=True)
    _assert_read(grads, [p.grad for p in ps], sizes=False)
    assert index is None
    [(params, grads, _)] = _ext._C.groups_walk(ps, _ops._PLAIN_TUPLE, True, False, True, True)
    assert type(params) is list and type(grads) is list
    # Without the dims (a call without group lasso), the rest the same.
    [(params, grads, index)] = _ext._C.groups_walk(ps, _ops._PLAIN_TUPLE, True, False, True, True, Walked, False)
    _assert_read(params, ps, sizes=True, dims=False)
    _assert_read(grads, [p.grad for p in ps], sizes=False)
    # The grads by their addresses (add_penalty_grad_'s launch reads nothing else), bumped by the walk itself: once
    # each, and only when the whole list was taken.
    versions = [p.grad._version for p in ps]
    ps32 = _model((torch.float32, torch.float64))
    versions32 = [p.grad._version for p in ps32]
    assert _ext._C.groups_walk(ps32 + [ps32[0].detach()], _ops._PLAIN_TUPLE, True, False, True, False, Walked, False,
                               ByAddress) is None  # declined (a param without a grad): nothing bumped
    assert [p.grad._version for p in ps32] == versions32
    for dims in (False, True):
        groups = _ext._C.groups_walk(ps32, _ops._PLAIN_TUPLE, True, False, True, False, Walked, dims, ByAddress)
        assert len(groups) == 2
        for params, grads, _ in groups:
            mine = [p for p in ps32 if p.dtype == params[0].dtype]
            _assert_read(params, mine, sizes=True, dims=dims)
            assert type(grads) is ByAddress and len(grads) == len(mine) and grads[0] is mine[0].grad
            assert grads.addresses == _int64(p.grad.data_ptr() for p in mine) and grads.dense
            assert grads.shared is False and grads.flat is None
    assert [p.grad._version for p in ps32] == [v + 2 for v in versions32]
    # Not for a call without grads, nor without a Walked type (plain lists).
    [(params, grads, _)] = _ext._C.groups_walk(ps, _ops._PLAIN_TUPLE, True, False, False, True, Walked, False,
                                               ByAddress)
    assert grads is None and type(params) is Walked
    [(params, grads, _)] = _ext._C.groups_walk(ps, _ops._PLAIN_TUPLE, True, False, True, True, None, False, ByAddress)
    assert type(grads) is list and [p.grad._version for p in ps] == versions


@pytest.mark.parametrize("consecutive", [True, False])
def test_the_plan_walk_lists_states_and_a_view_over_consecutive_step_counts(consecutive):
    ps = _model((torch.float32, torch.bfloat16))
    n = len(ps)
    buffer = torch.arange(n, dtype=torch.float32)
    counts = tuple(buffer[i] for i in range(n)) if consecutive else tuple(torch.tensor(float(i)) for i in range(n))
    avgs = tuple(torch.zeros_like(p, dtype=torch.float32) for p in ps)
    sqs = tuple(torch.ones_like(p, dtype=torch.float32) for p in ps)
    groups = _ext._C.plan_groups_walk(ps, _ops._PLAIN_TUPLE, True, False, tuple(ps), (avgs, sqs, (), counts), 3,
                                      Walked)
    assert len(groups) == 2
    for params, grads, (avg, sq, maxs, steps) in groups:
        mine = [i for i, p in enumerate(ps) if p.dtype == params[0].dtype]
        _assert_read(params, [ps[i] for i in mine], sizes=True)
        _assert_read(grads, [ps[i].grad for i in mine], sizes=False)
        for state, source in ((avg, avgs), (sq, sqs), (steps, counts)):
            _assert_read(state, [source[i] for i in mine], sizes=False)
        assert maxs == [] and avg.flat is None
        # Consecutive counts only in a group of consecutive params (a view over the group's counts).
        runs = mine == list(range(mine[0], mine[0] + len(mine)))
        assert (steps.flat is not None) == (consecutive and runs)
    groups = _ext._C.plan_groups_walk(ps, _ops._PLAIN_TUPLE, True, False, tuple(ps), (avgs, sqs, (), counts), 3,
                                      Walked, False)
    for params, _, _ in groups:
        _assert_read(params, [p for p in ps if p.dtype == params[0].dtype], sizes=True, dims=False)
    one = [p for p in ps if p.dtype == torch.float32]
    [(_, _, (_, _, _, steps))] = _ext._C.plan_groups_walk(one, _ops._PLAIN_TUPLE, True, False, tuple(one),
                                                          ((), (), (), counts[:len(one)]), 3, Walked)
    if consecutive:
        assert steps.flat.shape == (len(one),) and steps.flat.data_ptr() == buffer.data_ptr()
        steps.flat.add_(1)  # counts them all, through one add
        assert buffer[:len(one)].tolist() == [i + 1.0 for i in range(len(one))]
    else:
        assert steps.flat is None


def test_the_extension_bumps_version_counters_as_torch_does():
    ours, theirs = ([torch.zeros(2) for _ in range(40)] for _ in range(2))
    def torch_bump(*lists):
        for ts in lists:
            if _ops._BUMP_LISTS:
                torch._C._increment_version(list(ts))
            else:
                for t in ts:
                    torch._C._increment_version(t)

    for ts, bump in ((ours, _ext._C.bump_versions), (theirs, torch_bump)):
        bump(ts[:30], tuple(ts[10:]), [ts[0], ts[0]], [])
    for ts in ours, theirs:
        assert [t._version for t in ts] == [3] + [1] * 9 + [2] * 20 + [1] * 10
    with pytest.raises(TypeError, match="lists or tuples of tensors"):
        _ext._C.bump_versions([ours[0], 3])
    with torch.inference_mode():
        frozen = torch.zeros(1)  # no version counter: torch leaves it alone, and so does the extension
    torch_bump([frozen])
    _ext._C.bump_versions([frozen], ours[:1])
    assert ours[0]._version == 4


@pytest.mark.parametrize("skip", [(), (0, 3, 8)], ids=["all grads", "some without"])
def test_the_flat_plan_walk_lists_each_state_view_at_its_address_in_its_buffer(skip):
    from regfast.optim._base import _flat_states

    ps = _model((torch.float32, torch.float64))
    _grads(ps, 0, skip)
    states = [{"exp_avg": torch.randn(p.shape, dtype=p.dtype), "exp_avg_sq": torch.rand(p.shape, dtype=p.dtype),
               "step": torch.tensor(float(i))} for i, p in enumerate(ps)]
    keys = ("exp_avg", "exp_avg_sq", None, "step")
    buffers = _flat_states(ps, states, keys, {"cpu"})
    assert buffers is not None and all(len(b) == 2 for b in buffers if b)  # per state, one buffer per dtype
    tuples = tuple(tuple(s[key] for s in states) if key else () for key in keys)
    numels = torch.tensor([p.numel() for p in ps])
    groups = _ext._C.plan_groups_flat_walk(ps, _ops._PLAIN_TUPLE, True, False, tuple(ps), numels, tuple(buffers),
                                           tuples, 3, Walked)
    assert len(groups) == 2
    for b, (params, grads, (avg, sq, maxs, steps)) in enumerate(groups):
        mine = [i for i, p in enumerate(ps) if p.dtype == params[0].dtype and i not in skip]
        _assert_read(params, [ps[i] for i in mine], sizes=True)
        _assert_read(grads, [ps[i].grad for i in mine], sizes=False)
        assert maxs == []
        for state, key in ((avg, "exp_avg"), (sq, "exp_avg_sq"), (steps, "step")):
            views = [states[i][key] for i in mine]
            assert type(state) is Walked and all(a is v for a, v in zip(state, views)) and len(state) == len(views)
            assert state.addresses == _int64(v.data_ptr() for v in views) and state.dense and state.shared
        assert (steps.flat is buffers[3][b]) == (not skip) and (steps.flat is None) == bool(skip)
    # A buffer that is no longer the plan's size: the walk declines.
    short = tuple((b[0][:-1], b[1]) if b else () for b in buffers)
    assert _ext._C.plan_groups_flat_walk(ps, _ops._PLAIN_TUPLE, True, False, tuple(ps), numels, short, tuples, 3,
                                         Walked) is None
    # Where the launcher reads the states (and grads) only through their addresses: each is a ByAddress (no list of
    # the tensors), the counts too when they are the whole buffer on the host (else a Walked list, which the counts'
    # adds need).
    for grads_too in (False, True):
        groups = _ext._C.plan_groups_flat_walk(ps, _ops._PLAIN_TUPLE, True, False, tuple(ps), numels, tuple(buffers),
                                               tuples, 3, Walked, ByAddress, grads_too, grads_too)
        for b, (params, grads, (avg, sq, maxs, steps)) in enumerate(groups):
            mine = [i for i, p in enumerate(ps) if p.dtype == params[0].dtype and i not in skip]
            _assert_read(params, [ps[i] for i in mine], sizes=True, dims=grads_too)
            assert maxs == []
            if not grads_too:
                _assert_read(grads, [ps[i].grad for i in mine], sizes=False)
            for state, tensors, shared in ((avg, [states[i]["exp_avg"] for i in mine], True),
                                           (sq, [states[i]["exp_avg_sq"] for i in mine], True),
                                           (steps, [states[i]["step"] for i in mine], True),
                                           *([(grads, [ps[i].grad for i in mine], False)] if grads_too else [])):
                assert type(state) is (Walked if state is steps and skip else ByAddress)
                assert state.addresses == _int64(v.data_ptr() for v in tensors) and state.dense
                assert state.shared is shared and len(state) == len(tensors)
                assert state[0] is tensors[0] and state[:1] == [tensors[0]]
                if type(state) is ByAddress:
                    for index in (1, slice(None), -1, slice(1, 2)):
                        with pytest.raises(TypeError, match="through their addresses"):
                            state[index]
                    with pytest.raises(TypeError, match="through their addresses"):
                        list(state)
            assert (steps.flat is buffers[3][b]) == (not skip)


@_TRITON_SKIP
@pytest.mark.parametrize("group_lasso", [0.0, 0.05])
def test_a_launcher_in_python_is_handed_the_params_dims_only_for_group_lasso(group_lasso, monkeypatch):
    """The walk lists the params' dims (the key of the group-lasso tables) for a Triton call or step with group lasso,
    and only then: listed for every call they were 96 bytes per param made and freed per call, which at 20,000 params
    the allocator handed back to the system and took again, page by page, on every step. add_penalty_grad_'s grads
    come by their addresses (test_walk_matches_the_python_path_bit_for_bit checks its bits and version bumps)."""
    walked, grads_by_address = [], []

    def spying(walk):
        def spy(*args):
            groups = walk(*args)
            walked.extend(params.dims is not None for params, _, _ in groups or ())
            grads_by_address.extend(type(grads) is ByAddress for _, grads, _ in groups or ())
            return groups
        return spy

    for name in ("groups_walk", "plan_groups_walk", "plan_groups_flat_walk"):
        monkeypatch.setattr(_ext._C, name, spying(getattr(_ext._C, name)))
    ps = _model((torch.float32, torch.bfloat16))
    hyper = {"l1": 0.01, "group_lasso": group_lasso}
    calls = {"prox_": lambda: regfast.prox_(ps, 0.1, **hyper), "norms": lambda: regfast.norms(ps),
             "add_penalty_grad_": lambda: regfast.add_penalty_grad_(ps, **hyper)}
    for make in (lambda: regfast.optim.ProxSGD(ps, lr=0.01, momentum=0.9, **hyper),
                 lambda: regfast.optim.ProxAdamW(ps, lr=0.01, **hyper)):
        opt = make()
        calls[type(opt).__name__] = opt.step
    with use_backend("triton"):
        for name, call in calls.items():
            for _ in range(2):  # an optimizer's first step makes its states
                del walked[:], grads_by_address[:]
                call()
            assert walked, name  # the call was walked, one group per dtype
            assert all(listed == (bool(group_lasso) and name != "norms") for listed in walked), name
            if name == "add_penalty_grad_":  # its launch reads the grads through their addresses alone
                assert all(grads_by_address), name


@pytest.mark.parametrize("backend", WALKED_BACKENDS)
@pytest.mark.parametrize("make", FLAT, ids=str)
def test_a_first_step_makes_the_states_where_every_later_step_keeps_them(make, backend, monkeypatch):
    """A fresh optimizer's first step makes its states as views of the buffers its plan keeps, and runs on them: no
    later step moves them (device tables cached by the first step stay valid, as a CUDA graph captured after it
    needs), and every step from the plan marks them written."""
    params = _model((torch.float32, torch.float64))
    launched = {}  # where the first step's op found the first state of each param
    original = _ops.call
    monkeypatch.setattr(_ops, "call", lambda name, *args: launched.update(
        (id(p), s.data_ptr()) for p, s in zip(args[0], args[2])) or original(name, *args))
    with use_backend(backend):
        opt = FLAT[make](params)
        _grads(params, 0)
        opt.step()
        keys = list(opt.state[params[0]])
        assert all(opt.state[p][key]._base is not None for p in params for key in keys)
        where = [[opt.state[p][key].data_ptr() for p in params] for key in keys]
        first = "momentum_buffer" if make == "sgd" else "exp_avg"
        assert [launched[id(p)] for p in params] == where[keys.index(first)]
        for k in range(1, 4):
            _grads(params, k)
            versions = [[opt.state[p][key]._version for p in params] for key in keys]
            opt.step()
            assert [[opt.state[p][key].data_ptr() for p in params] for key in keys] == where
            for key, before in zip(keys, versions):
                assert all(opt.state[p][key]._version > v for p, v in zip(params, before)), key


def test_no_state_moves_while_a_cuda_graph_is_being_captured(monkeypatch):
    """States moved during a capture would leave the captured step updating their old memory: none is moved then."""
    from regfast.optim import _base

    params = _model()
    _grads(params, 0)
    opt = FLAT["adamw"](params)
    states = [{"exp_avg": torch.zeros_like(p), "step": torch.tensor(0.0)} for p in params]
    keys = ("exp_avg", None, None, "step")
    monkeypatch.setattr(_base, "capturing", lambda: True)
    assert _base._flat_states(params, states, keys, {"cpu"}) is None
    assert not opt._fresh_states_flat(opt.param_groups[0], params, True, True)
    assert all(s["exp_avg"]._base is None for s in states)
    monkeypatch.setattr(_base, "capturing", lambda: False)
    assert _base._flat_states(params, states, keys, {"cpu"}) is not None
    assert opt._fresh_states_flat(opt.param_groups[0], params, True, True)
    assert all(s["exp_avg"]._base is not None for s in states)
