"""Bad input gets a clear error naming the culprit, and leaves every param and grad untouched."""

import numpy as np
import pytest
import torch
from helpers import make_params, use_backend

import regfast


def _snapshot(ts):
    return [(t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in ts]


def _assert_untouched(ts, snap):
    for t, (value, grad) in zip(ts, snap):
        assert torch.equal(t.detach(), value)
        assert (t.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(t.grad.to_dense(), grad.to_dense())


def _all_calls(params, **kw):
    """Every public call, each to be tried on the same bad input."""
    return [
        lambda: regfast.penalty(params, **kw),
        lambda: regfast.add_penalty_grad_(params, **kw),
        lambda: regfast.prox_(params, 0.1, **kw),
        lambda: regfast.norms(params),
    ]


def _good():
    ts = make_params([(3, 4), (5,)])
    ts[0].grad = torch.randn(3, 4)
    return ts


@pytest.mark.parametrize("bad, match", [
    (torch.ones(3, dtype=torch.int64), "params\\[2\\] has dtype torch.int64"),
    (torch.ones(3, dtype=torch.bool), "params\\[2\\] has dtype torch.bool"),
    (torch.ones(3, dtype=torch.complex64), "params\\[2\\] has dtype torch.complex64"),
    ([1.0, 2.0], "params\\[2\\] is a list, not a torch.Tensor"),
    (3.0, "params\\[2\\] is a float"),
    (torch.eye(3).to_sparse(), "params\\[2\\] is a torch.sparse_coo tensor"),
])
def test_bad_tensors_are_named(bad, match):
    ts = _good()
    snap = _snapshot(ts)
    for call in _all_calls([*ts, bad], l1=0.1):
        with pytest.raises(TypeError, match=match):
            call()
    _assert_untouched(ts, snap)


def test_bad_params_container():
    with pytest.raises(TypeError, match="params must be an nn.Module, a tensor or an iterable"):
        regfast.penalty(3, l1=0.1)


@pytest.mark.parametrize("name", ["l1", "l2", "group_lasso"])
@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (float("nan"), ValueError),
                                          (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_coefficients(name, value, error):
    ts = _good()
    snap = _snapshot(ts)
    for call in _all_calls(ts, **{name: value})[:3]:
        with pytest.raises(error, match=name):
            call()
    _assert_untouched(ts, snap)


@pytest.mark.parametrize("lr, error, match", [
    (-1.0, ValueError, "lr must be finite and >= 0"),
    (float("nan"), ValueError, "lr must be finite and >= 0"),
    (torch.tensor([0.1, 0.2]), ValueError, "lr must be a number or a one-element tensor"),
    (torch.tensor(1, dtype=torch.int64), TypeError, "lr has dtype torch.int64"),
    (None, TypeError, "lr must be a number"),
])
def test_bad_lr(lr, error, match):
    ts = _good()
    snap = _snapshot(ts)
    with pytest.raises(error, match=match):
        regfast.prox_(ts, lr, l1=0.1)
    _assert_untouched(ts, snap)


def test_lr_one_element_tensor_is_accepted():
    ts, ref = _good(), _good()
    for a, b in zip(ts, ref):
        b.data.copy_(a)
    regfast.prox_(ts, torch.tensor([0.1]), l1=1.0)
    regfast.prox_(ref, 0.1, l1=1.0)
    for a, b in zip(ts, ref):
        torch.testing.assert_close(a, b)


def test_unknown_groups():
    ts = _good()
    snap = _snapshot(ts)
    for call in _all_calls(ts, group_lasso=0.1, groups="rows")[:3]:
        with pytest.raises(ValueError, match="groups must be one of 'row', 'col', 'tensor', got 'rows'"):
            call()
    _assert_untouched(ts, snap)


def test_self_overlapping_tensor_refused_in_place():
    ts = _good()
    expanded = torch.randn(1, 4).expand(3, 4)
    snap = _snapshot(ts)
    with pytest.raises(ValueError, match="params\\[2\\] .*overlaps itself"):
        regfast.prox_([*ts, expanded], 0.1, l1=0.1)
    _assert_untouched(ts, snap)
    assert regfast.penalty([expanded], l1=1.0).item() == pytest.approx(3 * expanded[0].abs().sum().item(), rel=1e-6)


def test_bad_grads():
    ts = _good()
    ts[1].grad = torch.randn(5).to_sparse()
    snap = _snapshot(ts)
    with pytest.raises(TypeError, match="params\\[1\\].grad is a torch.sparse_coo tensor"):
        regfast.add_penalty_grad_(ts, l1=0.1)
    _assert_untouched(ts, snap)
    ts = _good()
    ts[1].grad = torch.randn(1).expand(5)
    snap = _snapshot(ts)
    with pytest.raises(ValueError, match="params\\[1\\].grad .*overlaps itself"):
        regfast.add_penalty_grad_(ts, l1=0.1)
    _assert_untouched(ts, snap)


def test_bad_backend_name():
    with use_backend("fastest"), pytest.raises(ValueError, match="REGFAST_BACKEND='fastest' is not a backend"):
        regfast.penalty(_good(), l1=0.1)


def test_forced_unavailable_backend_raises():
    from regfast import _dispatch

    if _dispatch.unavailable_reason("cpp", "cpu") is None:
        pytest.skip("the compiled extension is built here; nothing to refuse")
    with use_backend("cpp"), pytest.raises(RuntimeError, match="REGFAST_BACKEND=cpp but the cpp backend cannot serve"):
        regfast.penalty(_good(), l1=0.1)


def test_names_count_the_caller_list_with_duplicates():
    ts = _good()
    snap = _snapshot(ts)
    for call in _all_calls([ts[0], ts[0], ts[1], torch.ones(2, dtype=torch.int32)], l1=0.1):
        with pytest.raises(TypeError, match="params\\[3\\] has dtype torch.int32"):
            call()
    _assert_untouched(ts, snap)


def test_grad_left_behind_by_a_data_swap_is_refused():
    # torch refuses a .grad of another shape, but `p.data = ...` can still leave one behind.
    ts = _good()
    ts[1].grad = torch.randn(5)
    ts[0].data = torch.randn(4, 3)
    snap = _snapshot(ts)
    match = "params\\[0\\].grad \\(\\(3, 4\\).*does not match params\\[0\\] \\(\\(4, 3\\)"
    with pytest.raises(ValueError, match=match):
        regfast.add_penalty_grad_(ts, l1=0.1)
    _assert_untouched(ts, snap)
    for opt in (regfast.optim.ProxSGD(ts, lr=0.1, l1=0.1), regfast.optim.ProxAdamW(ts, lr=0.1, l1=0.1)):
        with pytest.raises(ValueError, match="does not match its param"):
            opt.step()
        _assert_untouched(ts, snap)


NUMBERS = [0.25, 1, np.float32(0.25), np.float64(0.25), np.int64(1), np.float16(0.5)]


def _optimizers(params, **coefs):
    """The ways to give regularization coefficients to an optimizer."""
    return [
        lambda: regfast.optim.ProxSGD(params, lr=0.1, **coefs),
        lambda: regfast.optim.ProxAdamW(params, lr=0.1, **coefs),
        lambda: regfast.optim.Proximal(torch.optim.SGD(params, lr=0.1), **coefs),
        lambda: regfast.optim.ProxSGD([{"params": params, **coefs}], lr=0.1),
        lambda: regfast.optim.Proximal(torch.optim.SGD([{"params": params, **coefs}], lr=0.1)),
    ]


@pytest.mark.parametrize("value", NUMBERS, ids=lambda v: type(v).__name__)
def test_every_real_number_type_is_accepted_everywhere(value):
    ts = _good()
    expected = regfast.penalty(ts, l1=float(value))
    torch.testing.assert_close(regfast.penalty(ts, l1=value), expected)
    regfast.prox_([t.detach().clone() for t in ts], value, l2=value)
    for make in _optimizers([t.detach().clone().requires_grad_() for t in ts], l1=value):
        opt = make()
        assert all(isinstance(g["l1"], float) and g["l1"] == float(value) for g in opt.param_groups)


@pytest.mark.parametrize("value, error", [
    (torch.tensor(0.1), TypeError), (True, TypeError), ("0.1", TypeError), (10**400, ValueError),
    (-np.float32(0.5), ValueError), (np.float64("nan"), ValueError),
], ids=["tensor", "bool", "str", "huge-int", "negative-numpy", "nan-numpy"])
def test_bad_coefficients_get_the_same_error_everywhere(value, error):
    ts = _good()
    snap = _snapshot(ts)
    for call in _all_calls(ts, l1=value)[:3]:
        with pytest.raises(error, match="l1 must be"):
            call()
    for make in _optimizers(ts, l1=value):
        with pytest.raises(error, match="l1 must be"):
            make()
    _assert_untouched(ts, snap)


@pytest.mark.parametrize("make", [
    lambda ps: regfast.optim.ProxAdamW(ps, lr=0.1, l1=0.1),
    lambda ps: regfast.optim.ProxSGD(ps, lr=0.1, momentum=0.9, l1=0.1),
    lambda ps: regfast.optim.Proximal(torch.optim.SGD(ps, lr=0.1, momentum=0.9), l1=0.1),
], ids=["ProxAdamW", "ProxSGD", "Proximal"])
@pytest.mark.parametrize("key, value, error", [("l1", -0.5, ValueError), ("groups", "rows", ValueError),
                                              ("l2", torch.tensor(0.1), TypeError)])
def test_a_bad_state_dict_is_refused_before_anything_loads(make, key, value, error):
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    params[0].grad = torch.randn(3, 4)
    opt = make(params)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    bad = {**saved, "param_groups": [{**g, key: value} for g in saved["param_groups"]]}
    bad["state"] = {k: {n: torch.zeros_like(t) if isinstance(t, torch.Tensor) else t for n, t in s.items()}
                    for k, s in saved["state"].items()}
    with pytest.raises(error):
        opt.load_state_dict(bad)
    assert opt.param_groups[0][key] == saved["param_groups"][0][key]
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v)


@pytest.mark.parametrize("make", [
    lambda ps: regfast.optim.ProxAdamW(ps, lr=0.1, l1=0.1, group_lasso=0.01),
    lambda ps: regfast.optim.ProxSGD(ps, lr=0.1, momentum=0.9, l1=0.1, group_lasso=0.01),
    lambda ps: regfast.optim.Proximal(torch.optim.SGD(ps, lr=0.1, momentum=0.9), l1=0.1, group_lasso=0.01),
], ids=["ProxAdamW", "ProxSGD", "Proximal"])
@pytest.mark.parametrize("key, value, error", [
    ("l1", -0.5, ValueError), ("group_lasso", float("nan"), ValueError), ("groups", "rows", ValueError),
    ("l2", torch.tensor(0.1), TypeError), ("lr", -1.0, ValueError),
])
def test_a_bad_value_put_into_a_group_is_refused_before_any_group_steps(make, key, value, error):
    """A group's value changed after the optimizer was made (as a schedule would change it) is checked at the next
    step, every group before any steps: nothing is written, neither in the bad group nor in the good one before it;
    set back, the steps go on."""
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = make([{"params": params[:1]}, {"params": params[1:]}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()  # the second step runs from the optimizer's plan where it keeps one
    states = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]
    snap = _snapshot(params)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    if key == "lr" and isinstance(opt, regfast.optim.Proximal):
        pytest.skip("torch's SGD checks its lr only when made; the wrapper's prox checks it after the step")
    with pytest.raises(error):
        opt.step()
    _assert_untouched(params, snap)
    for p, before in zip(params, states):
        for k, v in before.items():
            assert torch.equal(opt.state[p][k], v)
    opt.param_groups[1][key] = good
    opt.step()
    assert not any(torch.equal(p.detach(), v) for p, (v, _) in zip(params, snap))


def _sgd_proximal(model_params):
    return regfast.optim.Proximal(torch.optim.SGD(model_params, lr=0.1, momentum=0.9), l1=0.01)


def test_proximal_refuses_before_the_inner_step_runs():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = _sgd_proximal(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    weight = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), weight) and not opt.state

    lin = torch.nn.Linear(3, 2)
    opt = _sgd_proximal(lin.parameters())
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["groups"] = "rows"
    snapshot = [p.detach().clone() for p in lin.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in lin.parameters()]
    with pytest.raises(ValueError, match="groups must be one of"):
        opt.step()
    for p, before, buf in zip(lin.parameters(), snapshot, buffers):
        assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["momentum_buffer"], buf)


def test_a_mapping_of_named_tensors():
    ts = _good()
    named = {"encoder.weight": ts[0], "encoder.bias": ts[1], "tied": ts[0]}
    torch.testing.assert_close(regfast.penalty(named, l1=0.5), regfast.penalty(ts, l1=0.5))
    with pytest.raises(TypeError, match="encoder.bias has dtype torch.int64"):
        regfast.penalty({"encoder.weight": ts[0], "encoder.bias": torch.ones(3, dtype=torch.int64)})
    with pytest.raises(TypeError, match="params\\['scale'\\] is a float, not a torch.Tensor"):
        regfast.penalty({"scale": 1.0})


def test_inference_tensors_are_updated_only_in_inference_mode():
    with torch.inference_mode():
        w = torch.randn(3, 4)
    before = w.clone()
    with pytest.raises(RuntimeError, match="params is an inference tensor"):
        regfast.prox_(w, 0.1, l1=0.1)
    assert torch.equal(w, before)
    with torch.inference_mode():
        regfast.prox_(w, 1.0, l1=100.0)
    assert (w == 0).all()


@pytest.mark.parametrize("size, stride", [((3, 3), (1, 1)), ((3, 3), (2, 1)), ((4, 2), (1, 3))])
def test_every_self_overlapping_view_is_refused_before_any_write(size, stride):
    base = torch.randn(20)
    view = base.as_strided(size, stride)
    snap = base.clone()
    with pytest.raises(ValueError, match="overlaps itself"):
        regfast.prox_([torch.randn(5), view], 0.1, l1=0.1)
    assert torch.equal(base, snap)
    regfast.prox_(base.as_strided((3, 3), (1, 3)), 0.1, l1=0.1)  # a transposed view: each element once


def test_proximal_fires_each_step_hook_once():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    calls = []
    lin = torch.nn.Linear(3, 2)
    inner = torch.optim.SGD(lin.parameters(), lr=0.1)
    opt = regfast.optim.Proximal(inner, l1=0.01)
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", type(o).__name__))),
               inner.register_step_pre_hook(lambda o, a, k: calls.append(("inner pre", type(o).__name__))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("outer post", type(o).__name__)))]
    try:
        lin(torch.randn(4, 3)).sum().backward()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted([("global pre", "Proximal"), ("global post", "Proximal"), ("inner pre", "SGD"),
                                    ("outer post", "Proximal")])


@pytest.mark.parametrize("make, match", [
    (lambda ps: regfast.optim.ProxAdamW(ps, l1=0.01), "capturable=False"),
    (lambda ps: regfast.optim.ProxSGD(ps, lr=torch.tensor(0.1), momentum=0.9), "lr is a CPU tensor"),
    (lambda ps: regfast.optim.ProxAdamW(ps, lr=torch.tensor(0.1), capturable=True), "lr is a CPU tensor"),
])
def test_steps_that_would_freeze_host_values_into_a_cuda_graph_are_refused(monkeypatch, make, match):
    """Inside a CUDA graph capture, a step whose host values (AdamW's CPU step counts, a CPU lr) the graph would
    replay forever raises before anything is written; outside a capture the same optimizer steps."""
    params = make_params([(3, 4), (5,)])
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    snap = _snapshot(params)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_untouched(params, snap)
    assert not opt.state
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()
    assert not all(torch.equal(p.detach(), s) for p, (s, _) in zip(params, snap))


def test_capturable_adamw_steps_inside_a_capture(monkeypatch):
    params = make_params([(3, 4), (5,)])
    for p in params:
        p.grad = torch.randn_like(p)
    opt = regfast.optim.ProxAdamW(params, capturable=True, l1=0.01)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    opt.step()
    assert all(s["step"].item() == 1 for s in opt.state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_cpu_lr_is_refused_inside_a_cuda_graph_capture(backend):
    """The ops read a CPU lr once, at capture: refused there, before anything is captured or written."""
    params = make_params([(64, 33), (5,)], device="cuda")
    lr = torch.tensor(0.1)
    with use_backend(backend):
        regfast.prox_(params, lr, l1=0.01)  # outside a capture: fine
        snap = _snapshot(params)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with pytest.raises(RuntimeError, match="lr is a CPU tensor"), torch.cuda.graph(graph, stream=stream):
            regfast.prox_(params, lr, l1=0.01)
    _assert_untouched(params, snap)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_the_cuda_ops_refuse_grads_on_another_device():
    """The C++ ops check each grad's device against its param's (the Python API checks it too), before writing."""
    from regfast import _ext

    if _ext.unavailable_reason("cuda") is not None:
        pytest.skip(_ext.unavailable_reason("cuda"))
    params = [torch.randn(5, device="cuda:0"), torch.randn(3, device="cuda:0")]
    grads = [torch.randn(5, device="cuda:1"), torch.randn(3, device="cuda:1")]
    snap = _snapshot(params + grads)
    match = r"grads\[0\] does not match params\[0\] in shape, dtype or device"
    with pytest.raises(RuntimeError, match=match):
        _ext.OPS.add_penalty_grad_(params, grads, 0.1, 0.2, 0.0, "row")
    with pytest.raises(RuntimeError, match=match):
        _ext.OPS.sgd_step_(params, grads, [], None, 0.1, 0.0, 0.0, False, 0.0, False, False, 0.1, 0.0, 0.0, "row",
                           False)
    _assert_untouched(params + grads, snap)
