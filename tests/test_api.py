"""The public API against a plain float64 oracle, on fresh random inputs, for every dtype and layout.

The matrix runs on every backend that can serve each device (the ``backend`` fixture of tests/conftest.py):
``torch`` (the spec), ``cpp``, ``cuda`` and ``triton`` (in its interpreter on CPU tensors), each against the
oracle, not only the one chosen by default.
"""

import math

import oracle
import pytest
import torch
from helpers import DTYPES, EDGE_SHAPES, RTOL, assert_close, make_params, noncontiguous, to64, use_backend
from torch import nn

import regfast
from regfast._dispatch import unavailable_reason

HYPERS = [
    dict(l1=0.3),
    dict(l2=0.7),
    dict(l1=0.1, l2=0.25),
    dict(group_lasso=0.4),
    dict(l1=0.05, l2=0.2, group_lasso=0.3),
]
GROUPINGS = ["row", "col", "tensor"]
SHAPES = [(6, 5), (7,), (), (3, 4, 2, 2), (0, 3), (2, 0), (33, 17)]


def _kw(h):
    return dict(l1=h.get("l1", 0.0), l2=h.get("l2", 0.0), gl=h.get("group_lasso", 0.0))


def _layouts(ts):
    """Each tensor as given, and a non-contiguous copy of it."""
    return [ts, [noncontiguous(t) for t in ts]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms(dtype, device, backend):
    ts = make_params(EDGE_SHAPES, dtype, device)
    for layout in _layouts(ts):
        n = regfast.norms(layout)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert n.per_tensor_l1.dtype == acc and n.per_tensor_l1.shape == (len(ts),)
        assert n.l1.device.type == device and n.l1.dim() == 0
        ref = to64(ts)
        exp_l1 = torch.stack([t.abs().sum() for t in ref])
        exp_l2sq = torch.stack([(t * t).sum() for t in ref])
        scale = max(t.numel() for t in ts)
        assert_close(n.per_tensor_l1, exp_l1, dtype, rtol=RTOL[torch.float32] if dtype != torch.float64 else None)
        assert_close(n.per_tensor_l2sq, exp_l2sq, dtype, rtol=RTOL[torch.float32] if dtype != torch.float64 else None)
        assert_close(n.l1, exp_l1.sum(), dtype, scale=scale)
        assert_close(n.l2sq, exp_l2sq.sum(), dtype, scale=scale)
        assert_close(n.l2, exp_l2sq.sum().sqrt(), dtype)


def test_norms_mixed_dtypes_keep_input_order():
    ts = make_params([(3, 4), (5,), (2, 2), (7,)], torch.float32)
    ts[1] = ts[1].half()
    ts[2] = ts[2].double()
    n = regfast.norms(ts)
    assert n.per_tensor_l1.dtype == torch.float64
    for i, t in enumerate(ts):
        assert_close(n.per_tensor_l1[i], t.double().abs().sum(), t.dtype)
        assert_close(n.per_tensor_l2sq[i], t.double().square().sum(), t.dtype)


def test_norms_no_grad_and_deterministic():
    ts = make_params([(64, 65), (1000,)], requires_grad=True)
    a, b = regfast.norms(ts), regfast.norms(ts)
    assert not a.l1.requires_grad
    assert torch.equal(a.per_tensor_l1, b.per_tensor_l1) and torch.equal(a.l2sq, b.l2sq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_penalty_value_and_grad(hyper, groups, dtype, device, backend):
    ts = make_params(SHAPES, dtype, device)
    for layout in _layouts(ts):
        leaves = [t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()
                  for t in layout]
        value = regfast.penalty(leaves, **hyper, groups=groups)
        expected = oracle.penalty(to64(ts), **_kw(hyper), groups=groups)
        assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(value, expected, dtype, rtol=RTOL[torch.float32] if dtype != torch.float64 else None)
        value.backward()
        for leaf, t in zip(leaves, to64(ts)):
            assert leaf.grad.dtype == dtype and leaf.grad.shape == t.shape
            assert_close(leaf.grad, oracle.grad(t, **_kw(hyper), groups=groups), dtype, scale=1.0)


@pytest.mark.parametrize("loop, kwargs", [
    (lambda ts: sum(w.abs().sum() for w in ts), dict(l1=1.0)),
    (lambda ts: sum(torch.norm(w, 1) for w in ts), dict(l1=1.0)),
    (lambda ts: sum(w.square().sum() for w in ts), dict(l2=1.0)),
    (lambda ts: sum(torch.norm(w) ** 2 for w in ts), dict(l2=1.0)),
    (lambda ts: sum(1e-3 * w.abs().sum() + 1e-2 * w.pow(2).sum() for w in ts), dict(l1=1e-3, l2=1e-2)),
])
def test_reproduces_the_loops_people_write(loop, kwargs):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    x = torch.randn(8, 20)
    naive = loop(list(model.parameters()))
    (model(x).sum() + naive).backward()
    naive_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    value = regfast.penalty(model, **kwargs)
    (model(x).sum() + value).backward()
    torch.testing.assert_close(value, naive.detach(), rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), naive_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", GROUPINGS)
def test_gradcheck(groups):
    ts = [t.requires_grad_() for t in make_params([(4, 3), (5,), (2, 3, 2)], torch.float64)]
    fn = lambda *xs: regfast.penalty(xs, l1=0.3, l2=0.2, group_lasso=0.5, groups=groups)
    assert torch.autograd.gradcheck(fn, ts)


def test_penalty_grad_is_zero_at_zero():
    ts = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    regfast.penalty(ts, l1=1.0, l2=1.0, group_lasso=1.0).backward()
    for t in ts:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_add_penalty_grad_(hyper, groups, dtype, device, backend):
    ts = make_params(SHAPES, dtype, device)
    grads0 = make_params(SHAPES, dtype, device)
    for layout in _layouts(ts):
        for t, g in zip(layout, grads0):
            t.grad = g.clone()
        value = regfast.add_penalty_grad_(layout, **hyper, groups=groups)
        assert not value.requires_grad and value.dim() == 0 and value.device.type == device
        assert_close(value, oracle.penalty(to64(ts), **_kw(hyper), groups=groups), dtype,
                     rtol=RTOL[torch.float32] if dtype != torch.float64 else None)
        for t, t64, g0 in zip(layout, to64(ts), to64(grads0)):
            assert_close(t.grad, g0 + oracle.grad(t64, **_kw(hyper), groups=groups), dtype, scale=2.0)


def test_add_penalty_grad_creates_missing_grads_and_matches_autograd():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    hyper = dict(l1=0.01, l2=0.02, group_lasso=0.03)
    regfast.penalty(model, **hyper).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    regfast.add_penalty_grad_(model, **hyper)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert all(p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_prox_(hyper, groups, dtype, device, backend):
    ts = make_params(SHAPES, dtype, device)
    lr = 0.37
    for layout in _layouts(ts):
        work = [t.clone() if t.is_contiguous() else noncontiguous(t) for t in layout]
        regfast.prox_(work, lr, **hyper, groups=groups)
        for w, t64 in zip(work, to64(ts)):
            assert_close(w, oracle.prox(t64, lr, **_kw(hyper), groups=groups), dtype)


def test_prox_is_the_proximal_operator():
    """KKT of argmin_w ½‖w − v‖² + lr·penalty(w): (v − w)/lr − ∇penalty(w) = 0 off zeros, bounded on zeros."""
    v = make_params([(40, 30)], torch.float64)[0]
    w = v.clone()
    lr, l1, l2 = 0.5, 1.0, 0.3
    regfast.prox_(w, lr, l1=l1, l2=l2)
    r = (v - w) / lr
    nz = w != 0
    assert (~nz).any() and nz.any()
    torch.testing.assert_close(r[nz], l1 * torch.sign(w[nz]) + 2 * l2 * w[nz])
    assert (r[~nz].abs() <= l1 + 1e-12).all()


def test_prox_group_kkt():
    v = make_params([(30, 8)], torch.float64, scale=0.5)[0]
    w = v.clone()
    lr, gl = 0.5, 1.0  # threshold 0.5·√8 ≈ the typical row norm (0.5·√8): about half the rows vanish
    regfast.prox_(w, lr, group_lasso=gl, groups="row")
    r = (v - w) / lr
    n = w.norm(dim=1)
    zero = n == 0
    assert zero.any() and (~zero).any()
    c = gl * math.sqrt(8)
    torch.testing.assert_close(r[~zero], c * w[~zero] / n[~zero, None])
    assert (r[zero].norm(dim=1) <= c + 1e-12).all()


def test_prox_exact_zeros_and_lr_tensor_matches_float():
    ts = make_params([(50, 40), (100,)])
    a = [t.clone() for t in ts]
    b = [t.clone() for t in ts]
    regfast.prox_(a, 0.1, l1=5.0, l2=0.5, group_lasso=0.1)
    regfast.prox_(b, torch.tensor(0.1), l1=5.0, l2=0.5, group_lasso=0.1)
    for x, y, t in zip(a, b, ts):
        torch.testing.assert_close(x, y)
        assert (x[t.abs() <= 0.5] == 0).all() and (y[t.abs() <= 0.5] == 0).all()
    assert (a[0] == 0).float().mean() > 0.3


def test_prox_no_coefficients_is_identity():
    ts = make_params([(5, 4)])
    w = ts[0].clone()
    regfast.prox_(w, 1.0)
    assert torch.equal(w, ts[0])


@pytest.mark.parametrize("groups", GROUPINGS)
def test_group_semantics_on_conv_weights(groups):
    w = make_params([(6, 3, 3, 3)], torch.float64)[0]
    value = regfast.penalty(w, group_lasso=1.0, groups=groups)
    if groups == "row":
        expected = math.sqrt(27) * sum(w[i].norm() for i in range(6))
    elif groups == "col":
        expected = math.sqrt(54) * sum(w[:, j].norm() for j in range(3))
    else:
        expected = math.sqrt(162) * w.norm()
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=torch.float64))


def test_layouts_channels_last_and_sliced():
    base = make_params([(4, 3, 5, 6), (10, 12)], torch.float32)
    original = base[1].clone()
    views = [base[0].to(memory_format=torch.channels_last), base[1][::2, 1::3]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    hyper = dict(l1=0.2, l2=0.1, group_lasso=0.3)
    assert_close(regfast.penalty(views, **hyper), oracle.penalty(to64(views), **_kw(hyper)), torch.float32)
    before = [v.clone() for v in views]
    regfast.prox_(views, 0.3, **hyper)
    for v, b in zip(views, to64(before)):
        assert_close(v, oracle.prox(b, 0.3, **_kw(hyper)), torch.float32)
    # The prox of the slice wrote through to the base tensor and nowhere else.
    untouched = torch.ones(10, 12, dtype=torch.bool)
    untouched[::2, 1::3] = False
    assert torch.equal(base[1][untouched], original[untouched])
    assert not torch.equal(base[1], original)


def test_params_forms_and_tied_weights():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    w = emb.weight.detach().double()
    once = w.abs().sum()
    for params in (model, emb.weight, [emb.weight, head.weight], (p for p in model.parameters())):
        torch.testing.assert_close(regfast.penalty(params, l1=1.0).double(), once, rtol=1e-6, atol=0)  # float32 sum
    assert regfast.norms([emb.weight, emb.weight]).per_tensor_l1.shape == (1,)


def test_empty_inputs():
    assert regfast.penalty([], l1=1.0).item() == 0.0
    assert regfast.add_penalty_grad_([], l1=1.0).item() == 0.0
    regfast.prox_([], 0.1, l1=1.0)
    n = regfast.norms([])
    assert n.l1.item() == 0.0 and n.per_tensor_l1.shape == (0,)
    assert regfast.penalty(nn.ReLU(), l1=1.0).item() == 0.0


@pytest.mark.parametrize("terms", [dict(l1=0.1), dict(l2=0.1), dict(group_lasso=0.2), dict(l1=0.1, l2=0.1)],
                         ids=["l1", "l2", "group", "elastic"])
def test_a_nan_step_gives_nan_weights_in_every_backend(terms, backend, device):
    w = torch.randn(3, 4, device=device)
    regfast.prox_(w, torch.tensor(float("nan"), device=device), **terms)
    assert torch.isnan(w).all(), (backend, w)


def test_nan_and_inf_propagate():
    t = torch.tensor([1.0, float("nan"), -2.0], requires_grad=True)
    u = torch.tensor([float("inf"), 1.0])
    assert torch.isnan(regfast.penalty([t], l1=1.0, group_lasso=1.0))
    assert torch.isinf(regfast.penalty([u], l2=1.0))
    assert torch.isnan(regfast.norms([t, u]).l1)
    regfast.penalty([t], l1=1.0, l2=1.0).backward()
    assert torch.isnan(t.grad[1]) and torch.isfinite(t.grad[[0, 2]]).all()
    for backend in ("torch", "cpp"):  # the l1 term alone carries the NaN too (torch.sign(nan) is 0)
        if unavailable_reason(backend, "cpu") is None:
            t.grad = None
            with use_backend(backend):
                regfast.penalty([t], l1=1.0).backward()
                assert torch.isnan(t.grad[1]) and t.grad[0] == 1.0 and t.grad[2] == -1.0
                grad = torch.zeros(3)
                t.grad = grad
                regfast.add_penalty_grad_([t], l1=1.0)
                assert torch.isnan(grad[1]) and grad[0] == 1.0
    w = t.detach().clone()
    regfast.prox_(w, 0.1, l1=1.0, group_lasso=1.0)
    assert torch.isnan(w).all()
    w = t.detach().clone()
    regfast.prox_(w, 0.1, l1=1.0)
    assert torch.isnan(w[1]) and w[0] == 0.9


def test_zero_coefficient_terms_are_skipped():
    u = torch.tensor([float("inf"), 1.0])
    assert regfast.penalty([u], l1=0.0, l2=1.0).isinf()
    assert regfast.penalty([u], l1=1.0, l2=0.0, group_lasso=0.0).isinf()


def test_weights_and_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2))
    ws = regfast.weights(model)
    assert [tuple(w.shape) for w in ws] == [(4, 3, 3, 3), (2, 4)]
    groups = regfast.param_groups(model, lr=0.1, l1=1e-4, weight_decay=0.01)
    assert groups[0]["params"] == ws and groups[0]["l1"] == 1e-4 and groups[0]["lr"] == 0.1
    assert groups[1]["l1"] == 0.0 and groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.1
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    torch.optim.SGD(groups, lr=0.1)


def test_sparsity_table():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[1].bias.fill_(1e-4)
    s = regfast.sparsity(model)
    assert s["0.weight"].zeros == 4 and s["0.weight"].fraction == 4 / 12
    assert s["1.bias"].zeros == 0
    assert regfast.sparsity(model, atol=1e-3)["1.bias"].zeros == 2
    assert s.numel == sum(p.numel() for p in model.parameters()) and s.zeros == 4
    text = str(s)
    assert "0.weight" in text and "total" in text and "3x4" in text
    assert regfast.sparsity([torch.zeros(2, 2)]).fraction == 1.0


def test_backend_report():
    info = regfast.backend("cpu")
    assert info.selected in ("torch", "cpp")
    assert set(info.reasons) == {"torch", "cpp", "cuda", "triton"} - {info.selected}
    assert "cpu" in str(info)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_accumulates_accurately(dtype):
    """Tens of millions of small values: a sequential fp32 sum would be off by percents."""
    w = (torch.randn(1 << 24, dtype=torch.float64) * 0.02 + 0.01).to(dtype)
    w64 = w.double()
    n = regfast.norms([w])
    torch.testing.assert_close(n.l1.double(), w64.abs().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(n.l2sq.double(), w64.square().sum(), rtol=1e-5, atol=0)
    value = regfast.penalty(w, l1=1.0, l2=1.0, group_lasso=1.0, groups="tensor")
    expected = w64.abs().sum() + w64.square().sum() + math.sqrt(w.numel()) * w64.norm()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_mixed_devices_in_one_list():
    ts = make_params([(5, 4), (7,), (3, 3)], torch.float32)
    ts[1] = ts[1].cuda()
    hyper = dict(l1=0.1, l2=0.2, group_lasso=0.3)
    value = regfast.penalty(ts, **hyper)
    assert value.device == ts[0].device
    assert_close(value, oracle.penalty(to64(ts), **_kw(hyper)), torch.float32)
    n = regfast.norms(ts)
    assert_close(n.per_tensor_l1, torch.stack([t.double().abs().sum() for t in to64(ts)]), torch.float32)
    for t in ts:
        t.grad = torch.zeros_like(t)
    regfast.add_penalty_grad_(ts, **hyper)
    before = to64(ts)
    regfast.prox_(ts, 0.2, **hyper)
    for t, b in zip(ts, before):
        assert_close(t.grad, oracle.grad(b, **_kw(hyper)), torch.float32)
        assert_close(t, oracle.prox(b, 0.2, **_kw(hyper)), torch.float32)


def test_in_place_calls_bump_autograd_versions():
    # In eager mode the ops are called without the dispatcher; autograd must still see the writes.
    w = torch.randn(4, 3, requires_grad=True)
    saved = (w * w).sum()  # saves w for backward
    regfast.prox_([w], 0.1, l1=0.01)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    w.grad = torch.randn(4, 3)
    before = w.grad._version
    regfast.add_penalty_grad_([w], l2=0.1)
    assert w.grad._version > before
    for opt in (regfast.optim.ProxSGD([w], lr=0.1, momentum=0.9, l1=0.01), regfast.optim.ProxAdamW([w], lr=0.1)):
        before = w._version
        opt.step()
        assert w._version > before


def test_calls_reach_the_dispatcher_under_a_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ts = make_params([(3, 4), (5,)])
    for t in ts:
        t.grad = torch.randn_like(t)
    expected = [t.detach().clone() for t in ts]
    regfast.prox_(expected, 0.1, l1=0.2)
    with Record() as record:
        regfast.norms(ts)
        regfast.add_penalty_grad_(ts, l1=0.1)
        regfast.prox_(ts, 0.1, l1=0.2)
    assert {"regfast.norms.default", "regfast.add_penalty_grad_.default", "regfast.prox_.default"} <= set(record.ops)
    for t, e in zip(ts, expected):
        torch.testing.assert_close(t.detach(), e)
