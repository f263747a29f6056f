"""regfast.optim against torch.optim and the proximal-step reference, on fresh random problems."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from helpers import DEVICES, make_params, use_backend
from torch import nn

import regfast
from regfast import _common, _ops, reference
from regfast._dispatch import unavailable_reason
from regfast.optim import ProxAdamW, Proximal, ProxSGD

SHAPES = [(6, 5), (7,), (), (3, 4, 2), (0, 3), (9, 1)]
LOW = (torch.float16, torch.bfloat16)
STEPS = 25

# Allowed |ours − expected| relative to the expected value and to the params' scale, per dtype.
# fp32/fp64: op for op the same arithmetic as torch's foreach optimizers (differences are
# rounding-order noise); fp16/bf16: both sides are float32 math rounded once per step, so at
# most one unit in the last place of the low-precision dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}

SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
]
ADAMW_CONFIGS = [
    dict(),
    dict(weight_decay=0.0, betas=(0.8, 0.99)),
    dict(amsgrad=True, eps=1e-6),
    dict(maximize=True, weight_decay=0.1),
]


def _params(dtype, device="cpu", shapes=SHAPES, scale=1.0):
    return [nn.Parameter(t) for t in make_params(shapes, dtype, device, scale=scale)]


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol,
                               atol=tol * scale)


class MasterCopy:
    """A torch optimizer run on float32 (or float64) copies that are reset from the params before each step.

    For float16/bfloat16 params this is "torch's optimizer on fp32 master copies, rounded to the
    param dtype after every step": the same arithmetic the fused step does, so both round the same way.
    """

    def __init__(self, params, make):
        self.params = params
        self.copies = [nn.Parameter(p.detach().to(_common.acc_dtype(p.dtype)).clone()) for p in params]
        self.opt = make(self.copies)

    def step(self):
        with torch.no_grad():
            for p, c in zip(self.params, self.copies):
                c.copy_(p)
                c.grad = None if p.grad is None else p.grad.to(c.dtype)
            self.opt.step()

    def rounded(self):
        return [c.detach().to(p.dtype) for p, c in zip(self.params, self.copies)]


def _random_grads(params, skip=(), scale=1.0):
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn_like(p) * scale


def _run_against(ours, params, expected, steps=STEPS, after=None, grad_scale=1.0):
    """Step ``ours`` and ``expected`` (a MasterCopy) on the same fresh random grads; compare the params."""
    dtype = params[0].dtype
    for _ in range(steps):
        _random_grads(params, scale=grad_scale)
        expected.step()
        if after is not None:
            after(expected)
        ours.step()
        for p, e in zip(params, expected.rounded()):
            _close(p, e, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_prox_sgd_matches_torch_sgd(config, dtype, device):
    params = _params(dtype, device)
    expected = MasterCopy(params, lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=True, **config))
    opt = ProxSGD(params, lr=0.05, **config)
    _run_against(opt, params, expected)
    if config.get("momentum"):
        for p, c in zip(params, expected.copies):
            buf = opt.state[p]["momentum_buffer"]
            assert buf.dtype == _common.acc_dtype(dtype)
            _close(buf, expected.opt.state[c]["momentum_buffer"], torch.float32 if dtype in LOW else dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ADAMW_CONFIGS)
def test_prox_adamw_matches_torch_adamw(config, dtype, device):
    params = _params(dtype, device)
    expected = MasterCopy(params, lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True, **config))
    opt = ProxAdamW(params, lr=0.01, **config)
    _run_against(opt, params, expected)
    for p in params:
        state = opt.state[p]
        assert state["step"].item() == STEPS
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == _common.acc_dtype(dtype)


def test_tensor_lr_and_capturable_match_float_lr():
    params = _params(torch.float32)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    sgd = (ProxSGD(params, lr=torch.tensor(0.05), momentum=0.9, l1=0.01),
           ProxSGD(twins, lr=0.05, momentum=0.9, l1=0.01))
    for _ in range(5):
        _random_grads(params)
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        for opt in sgd:
            opt.step()
    for p, t in zip(params, twins):
        _close(p, t, torch.float32)
    for capturable in (False, True):
        adams = (ProxAdamW(params, lr=torch.tensor(0.01), capturable=capturable, group_lasso=0.01),
                 ProxAdamW(twins, lr=0.01, group_lasso=0.01))
        for _ in range(5):
            _random_grads(params)
            for p, t in zip(params, twins):
                t.grad = p.grad.clone()
            for opt in adams:
                opt.step()
        for p, t in zip(params, twins):
            _close(p, t, torch.float32, scale=10.0)


def _metric_prox_oracle(w, s, l1, l2, gl, groups):
    """Independent float64 oracle of the prox in the metric of per-element steps ``s``: bisection per group."""
    w, s = w.double(), s.double()
    u = torch.sign(w) * torch.clamp(w.abs() - s * l1, min=0) / (1 + 2 * s * l2)
    if not gl or w.numel() == 0:
        return u
    a = gl * math.sqrt(_common.group_size(w, groups)) * s / (1 + 2 * s * l2)
    dims = _common.group_dims(w, groups)
    move = (lambda t: t.reshape(1, -1)) if dims is None else (lambda t: t.movedim(0 if groups == "row" else 1, 0)
                                                              .reshape(t.shape[0 if groups == "row" else 1], -1))
    uu, aa = move(u), move(a)
    out = torch.zeros_like(uu)
    for i in range(uu.shape[0]):
        ug, ag = uu[i], aa[i]
        if (ug / ag).square().sum() <= 1:
            continue
        lo, hi = 0.0, ug.norm().item()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (ug / (mid + ag)).square().sum() > 1 else (lo, mid)
        out[i] = ug * lo / (lo + ag)
    if dims is None:
        return out.reshape(w.shape)
    axis = 0 if groups == "row" else 1
    moved_shape = (w.shape[axis], *[n for d, n in enumerate(w.shape) if d != axis])
    return out.reshape(moved_shape).movedim(0, axis)


@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
@pytest.mark.parametrize("hyper", [dict(l1=0.3), dict(l1=0.1, l2=0.5), dict(group_lasso=0.4),
                                   dict(l1=0.05, l2=0.2, group_lasso=0.3)])
def test_metric_prox_against_oracle(hyper, groups):
    kw = dict(l1=hyper.get("l1", 0.0), l2=hyper.get("l2", 0.0), gl=hyper.get("group_lasso", 0.0))
    for shape in [(8, 6), (5,), (4, 3, 2), (1, 7)]:
        w = torch.randn(shape, dtype=torch.float64)
        w[0] *= 0.05  # a group likely to vanish
        s = 10 ** torch.empty(shape, dtype=torch.float64).uniform_(-2, 1)
        out = w.clone()
        reference.metric_prox_(out, s, kw["l1"], kw["l2"], kw["gl"], groups)
        torch.testing.assert_close(out, _metric_prox_oracle(w, s, **kw, groups=groups), rtol=1e-10, atol=1e-12)
        # With one step for every element it is the scalar-step prox.
        scalar = w.clone()
        reference.metric_prox_(scalar, torch.full_like(w, 0.7), kw["l1"], kw["l2"], kw["gl"], groups)
        expected = w.clone()
        reference.prox_step_([expected], 0.7, kw["l1"], kw["l2"], kw["gl"], groups)
        torch.testing.assert_close(scalar, expected, rtol=1e-12, atol=1e-14)


def _penalty_gradient_oracle(w, l1, l2, gl, groups):
    """|∂penalty/∂w_i| for w_i ≠ 0 (l1 + 2·l2·|w_i| + gl·√|g|·|w_i|/‖w_g‖), float64, written out on its own."""
    w = w.double()
    out = l1 + 2 * l2 * w.abs()
    if gl and w.numel():
        dims = _common.group_dims(w, groups)
        norm = w.norm() if dims is None else w.norm(dim=dims, keepdim=True)
        size = math.sqrt(_common.group_size(w, groups))
        out = out + gl * size * w.abs() / torch.where(norm == 0, torch.ones_like(norm), norm)
    return out


def _prox_after(group_hyper, prox="lr"):
    """Apply, to the MasterCopy's float copies, the prox each group's hyperparameters ask for.

    ``"preconditioned"``: torch's AdamW step divided by ``d = √v̂ + eps``; the expected step divides
    by ``d' = max(d, |∇penalty(w)|)`` at the weights before the step (the params, not yet stepped),
    so the update is corrected by ``lr·m̂·(1/d − 1/d')`` and the prox takes the steps ``lr/d'``.
    """

    def apply(expected):
        opt = expected.opt
        before = {id(c): p for p, c in zip(expected.params, expected.copies)}
        with torch.no_grad():
            for group, hyper in zip(opt.param_groups, group_hyper):
                ps = [p for p in group["params"] if p.grad is not None]
                if not ps or not any(hyper.get(k) for k in ("l1", "l2", "group_lasso")):
                    continue
                args = (hyper.get("l1", 0.0), hyper.get("l2", 0.0), hyper.get("group_lasso", 0.0),
                        hyper.get("groups", "row"))
                if prox == "lr":
                    reference.prox_step_(ps, group["lr"], *args)
                    continue
                beta1, beta2 = group["betas"]
                for p in ps:
                    state = opt.state[p]
                    bc1 = 1 - beta1 ** state["step"].item()
                    bc2 = 1 - beta2 ** state["step"].item()
                    d = (state["exp_avg_sq"].sqrt() / math.sqrt(bc2) + group["eps"]).double()
                    floor = _penalty_gradient_oracle(before[id(p)], *args)
                    d_floor = torch.maximum(d, floor)
                    lr = group["lr"]
                    moved = p.double() + lr / bc1 * state["exp_avg"].double() * (1 / d - 1 / d_floor)
                    p.copy_(_metric_prox_oracle(moved, lr / d_floor, *args))

    return apply


HYPERS = [dict(l1=0.02), dict(l2=0.3, groups="col"), dict(group_lasso=0.05),
          dict(l1=0.01, l2=0.1, group_lasso=0.03, groups="tensor")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", HYPERS)
def test_regularized_steps_match_reference(hyper, dtype):
    # Small params and grads, so that the prox sets some weights (or groups) exactly to zero.
    sparse = bool(hyper.get("l1") or hyper.get("group_lasso"))
    params = _params(dtype, scale=0.1)
    expected = MasterCopy(params, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True))
    _run_against(ProxSGD(params, lr=0.1, momentum=0.9, **hyper), params, expected,
                 after=_prox_after([hyper]), grad_scale=0.01)
    assert any((p == 0).any() for p in params) == sparse
    for prox in ("lr", "preconditioned"):
        params = _params(dtype, scale=0.1)
        expected = MasterCopy(params, lambda ps: torch.optim.AdamW(ps, lr=0.02, foreach=True))
        _run_against(ProxAdamW(params, lr=0.02, prox=prox, **hyper), params, expected,
                     after=_prox_after([hyper], prox), grad_scale=0.01)
        if prox == "preconditioned":  # the scalar step lr is too small here to reach zero
            assert any((p == 0).any() for p in params) == sparse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proximal_wrapper_equals_fused_sgd(dtype):
    hyper = dict(l1=0.02, l2=0.1, group_lasso=0.05)
    params = _params(dtype)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused = ProxSGD(params, lr=0.1, momentum=0.9, **hyper, compute_penalty=True)
    wrapped = Proximal(torch.optim.SGD(twins, lr=0.1, momentum=0.9, foreach=True), **hyper, compute_penalty=True)
    for _ in range(STEPS if dtype == torch.float32 else 1):
        _random_grads(params)
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        fused.step()
        wrapped.step()
    for p, t in zip(params, twins):
        # bf16: the wrapper rounds after SGD and after the prox, the fused step once.
        _close(p, t, dtype, scale=2.0 if dtype == torch.bfloat16 else 1.0)
    torch.testing.assert_close(fused.last_penalty, regfast.penalty(params, **hyper))
    torch.testing.assert_close(wrapped.last_penalty, regfast.penalty(twins, **hyper))


def test_last_penalty():
    params = _params(torch.float32) + _params(torch.float64, shapes=[(4, 4)])
    for make in (lambda ps, **kw: ProxSGD(ps, lr=0.1, l1=0.01, group_lasso=0.02, **kw),
                 lambda ps, **kw: ProxAdamW(ps, lr=0.1, l1=0.01, group_lasso=0.02, **kw),
                 lambda ps, **kw: Proximal(torch.optim.Adam(ps, lr=0.1), l1=0.01, group_lasso=0.02, **kw)):
        assert make(params).last_penalty is None
        opt = make(params, compute_penalty=True)
        _random_grads(params, skip={1})
        opt.step()
        updated = [p for i, p in enumerate(params) if i != 1]
        assert opt.last_penalty.dtype == torch.float64 and opt.last_penalty.dim() == 0
        # float64 total of a float32 part summed in two different orders: float32 rounding apart.
        torch.testing.assert_close(opt.last_penalty, regfast.penalty(updated, l1=0.01, group_lasso=0.02), rtol=1e-5,
                                   atol=0)


@pytest.mark.parametrize("kind", ["prox_sgd", "proximal", "prox_adamw", "prox_adamw_lr"])
def test_per_group_hyperparameters(kind):
    params = _params(torch.float32, scale=0.1)
    # The constructor's l2 applies to the second group only; the first overrides it.
    own = [dict(l1=0.02, l2=0.0, groups="col"), dict(group_lasso=0.05)]
    defaults = dict(l2=0.1)
    hyper = [{**defaults, **own[0]}, {**defaults, **own[1]}]

    def groups(ps):
        return [{"params": ps[:3], "lr": 0.1, **own[0]}, {"params": ps[3:], "lr": 0.05, **own[1]}]

    if kind in ("prox_sgd", "proximal"):
        expected = MasterCopy(params, lambda ps: torch.optim.SGD(groups(ps), lr=0.1, momentum=0.9, foreach=True))
        if kind == "prox_sgd":
            opt = ProxSGD(groups(params), lr=0.1, momentum=0.9, **defaults)
        else:
            opt = Proximal(torch.optim.SGD(groups(params), lr=0.1, momentum=0.9, foreach=True), **defaults)
        after = _prox_after(hyper)
    else:
        prox = "lr" if kind == "prox_adamw_lr" else "preconditioned"
        expected = MasterCopy(params, lambda ps: torch.optim.AdamW(groups(ps), foreach=True))
        opt = ProxAdamW(groups(params), prox=prox, **defaults)
        after = _prox_after(hyper, prox)
    _run_against(opt, params, expected, after=after, grad_scale=0.01)


def test_param_groups_of_a_model():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = ProxSGD(regfast.param_groups(model, lr=0.1, l1=0.05, group_lasso=0.02, groups="col"))
    assert opt.param_groups[0]["groups"] == "col" and opt.param_groups[1]["l1"] == 0.0
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert regfast.sparsity(regfast.weights(model)).zeros > 0
    assert all((b != 0).all() for b in (model[0].bias, model[2].bias))


@pytest.mark.parametrize("make", [
    lambda ps: ProxSGD(ps, lr=0.1, momentum=0.9, l1=0.5),
    lambda ps: ProxAdamW(ps, lr=0.1, l1=0.5, amsgrad=True),
    lambda ps: Proximal(torch.optim.SGD(ps, lr=0.1, momentum=0.9), l1=0.5),
])
def test_grad_none_is_skipped(make):
    params = _params(torch.float32)
    before = params[0].detach().clone()
    opt = make(params)
    for _ in range(3):
        _random_grads(params, skip={0})
        opt.step()
    torch.testing.assert_close(params[0].detach(), before, rtol=0, atol=0)
    assert params[0] not in opt.state
    assert all(p in opt.state for p in params[1:] if p.numel())


@pytest.mark.parametrize("group_lasso", [0.0, 0.05])
@pytest.mark.parametrize("make", [
    lambda ps, gl: ProxSGD(ps, lr=0.1, momentum=0.9, l1=0.01, group_lasso=gl, compute_penalty=True),
    lambda ps, gl: ProxAdamW(ps, lr=0.05, l1=0.01, group_lasso=gl, compute_penalty=True),
    lambda ps, gl: ProxAdamW(ps, lr=0.05, l1=0.01, group_lasso=gl, prox="lr", compute_penalty=True),
], ids=["sgd", "adamw", "adamw-lr"])
@pytest.mark.parametrize("without", ["a param group", "a dtype of a param group"])
def test_a_whole_bucket_without_grads_after_planned_steps(without, make, group_lasso):
    """After steps that made the optimizer's plan, a step where no param of a (device, dtype) bucket has a grad (a
    param group frozen, or one dtype of a mixed group): those params are left alone, the others step as on the
    Python path, and the penalty covers the params stepped."""
    torch.manual_seed(0)
    wide = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(7))]
    narrow = [nn.Parameter(torch.randn(5, 2).to(torch.float16)), nn.Parameter(torch.randn(3).to(torch.float16))]
    frozen = {2, 3} if without == "a dtype of a param group" else {0, 1}  # positions in wide + narrow
    twins = [nn.Parameter(p.detach().clone()) for p in wide + narrow]
    runs = []
    for params, backend in ((wide + narrow, None), (twins, "torch")):
        split = [params[:2], params[2:]]
        groups = [{"params": split[0] + split[1]}] if without == "a dtype of a param group" else \
            [{"params": split[0]}, {"params": split[1]}]
        runs.append((params, make(groups, group_lasso), backend))
    for step in range(4):
        grads = [torch.randn_like(p) for p in wide + narrow]
        for params, opt, backend in runs:
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if step == 3 and i in frozen else g.clone()
            before = [p.detach().clone() for p in params]
            with use_backend(backend):
                opt.step()
            if step == 3:
                for i in frozen:
                    torch.testing.assert_close(params[i].detach(), before[i], rtol=0, atol=0)
    (ours, opt, _), (theirs, twin, _) = runs
    for p, t in zip(ours, theirs):
        _close(p, t, p.dtype)
    torch.testing.assert_close(opt.last_penalty, twin.last_penalty, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_frozen_then_unfrozen_matches_torch(kind):
    params = _params(torch.float32)
    if kind == "sgd":
        expected = MasterCopy(params, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.2,
                                                                 foreach=True))
        opt = ProxSGD(params, lr=0.05, momentum=0.9, dampening=0.2)
    else:
        expected = MasterCopy(params, lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True))
        opt = ProxAdamW(params, lr=0.05)
    for step in range(12):
        _random_grads(params, skip={0, 3} if step < 5 else ())
        expected.step()
        opt.step()
        for p, e in zip(params, expected.rounded()):
            _close(p, e, torch.float32)
    if kind == "adamw":
        assert opt.state[params[0]]["step"].item() == 7 and opt.state[params[1]]["step"].item() == 12


@pytest.mark.parametrize("wrap", [True, False])
def test_lr_schedulers(wrap):
    params = _params(torch.float32)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    if wrap:
        opt = Proximal(torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True), l1=0.01)
    else:
        opt = ProxSGD(params, lr=0.1, momentum=0.9, l1=0.01)
    manual = torch.optim.SGD(twins, lr=0.1, momentum=0.9, foreach=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(6):
        _random_grads(params)
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        opt.step()
        manual.step()
        lrs.append(manual.param_groups[0]["lr"])
        with torch.no_grad():
            regfast.prox_(twins, manual.param_groups[0]["lr"], l1=0.01)
        sched.step()
        manual.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    for p, t in zip(params, twins):
        _close(p, t, torch.float32)
    inner = torch.optim.AdamW(_params(torch.float32), lr=0.01)
    cycle = torch.optim.lr_scheduler.OneCycleLR(Proximal(inner, l1=0.01), max_lr=0.1, total_steps=10)
    cycle.optimizer.step()
    cycle.step()
    assert inner.param_groups[0]["betas"][0] != 0.9 and inner.param_groups[0]["lr"] != 0.01


@pytest.mark.parametrize("make", [
    lambda ps: Proximal(torch.optim.SGD(ps, lr=0.1), l1=5.0),
    lambda ps: ProxSGD(ps, lr=0.1, l1=5.0),
    lambda ps: ProxAdamW(ps, lr=0.1, l1=5.0),
])
def test_grad_scaler_skips_prox_on_inf(make):
    # Threshold lr·l1 = 0.5: about 4 in 10 of the N(0, 1) weights become exact zeros in the second step.
    params = _params(torch.float32)
    opt = make(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = [p.detach().clone() for p in params]
    loss = sum((p * torch.randn_like(p)).sum() for p in params)
    scaler.scale(loss).backward()
    params[0].grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert scaler.get_scale() == 2.0
    opt.zero_grad()
    loss = sum((p * torch.randn_like(p)).sum() for p in params)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any((p == 0).any() for p in params)


def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


MAKERS = {
    "prox_sgd": lambda ps: ProxSGD(ps, lr=0.05, momentum=0.9, l1=0.01, group_lasso=0.01),
    "prox_adamw": lambda ps: ProxAdamW(ps, lr=0.02, l1=0.01, group_lasso=0.01, amsgrad=True),
    "proximal": lambda ps: Proximal(torch.optim.Adam(ps, lr=0.02), l1=0.01, group_lasso=0.01),
}


def _twin_steps(pairs, steps):
    for _ in range(steps):
        grads = None
        for params, opt in pairs:
            if grads is None:
                _random_grads(params)
                grads = [p.grad for p in params]
            else:
                for p, g in zip(params, grads):
                    p.grad = g.clone()
            opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_bitwise_resume(name, dtype):
    params = _params(dtype)
    opt = MAKERS[name](params)
    _twin_steps([(params, opt)], 4)
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = MAKERS[name](resumed_params)
    resumed.load_state_dict(_save_load(opt.state_dict()))
    if name != "proximal":
        for p in resumed_params:
            for key, value in resumed.state[p].items():
                if key != "step":
                    assert value.dtype == _common.acc_dtype(dtype)
    _twin_steps([(params, opt), (resumed_params, resumed)], 4)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_load_state_dict_without_regularization_keys():
    params = _params(torch.float32)
    for torch_opt, ours in [(torch.optim.SGD(params, lr=0.1, momentum=0.9), ProxSGD(params, lr=0.1, l1=0.3)),
                            (torch.optim.AdamW(params, lr=0.1), ProxAdamW(params, lr=0.1, l1=0.3)),
                            (torch.optim.SGD(params, lr=0.1), Proximal(torch.optim.SGD(params, lr=0.1), l1=0.3))]:
        _random_grads(params)
        torch_opt.step()
        saved = _save_load(torch_opt.state_dict())
        assert "l1" not in saved["param_groups"][0]
        ours.load_state_dict(saved)
        assert ours.param_groups[0]["l1"] == 0.3 and ours.param_groups[0]["groups"] == "row"
        ours.step()


def test_proximal_shares_param_groups():
    params = _params(torch.float32)
    inner = torch.optim.SGD(params[:2], lr=0.1)
    opt = Proximal(inner, l1=0.1)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.add_param_group({"params": params[2:], "l1": 0.2})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["l1"] == 0.2
    assert inner.param_groups[1]["l2"] == 0.0 and inner.param_groups[1]["lr"] == 0.1
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and inner.param_groups[1]["l1"] == 0.2
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    assert opt.defaults["lr"] == 0.1 and opt.defaults["l1"] == 0.1


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_deepcopy_and_pickle(clone, name):
    params = _params(torch.float32)
    opt = MAKERS[name](params)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # wraps opt.step, which must not stop pickling
    _twin_steps([(params, opt)], 2)
    twin = clone(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(t is not p and torch.equal(t, p) for t, p in zip(twin_params, params))
    if name == "proximal":
        assert twin.param_groups is twin.optimizer.param_groups
    _twin_steps([(params, opt), (twin_params, twin)], 3)
    for p, t in zip(params, twin_params):
        assert torch.equal(p, t)


@pytest.mark.parametrize("name", list(MAKERS))
def test_hooks(name):
    params = _params(torch.float32)
    opt = MAKERS[name](params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", regfast.sparsity(params).zeros)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load", "extra" in sd)))
    for p in params:
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        params[0][0] = 1e-4  # shrunk to exactly zero by the prox, which the post hook must see
    opt.step()
    assert calls[0] == ("pre", True) and calls[1][0] == "post" and calls[1][1] > 0
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls[-1] == ("load", True)


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_profiler_sees_each_step_under_torchs_label(name, monkeypatch):
    """The step wrapper enters its record_function only while a profiler records (none without one): then the
    step appears as torch labels an optimizer's step, once per step."""
    from torch.profiler import ProfilerActivity, profile

    params = _params(torch.float32)
    opt = MAKERS[name](params)
    for p in params:
        p.grad = torch.ones_like(p)
    entered = []
    with monkeypatch.context() as m:
        original = torch.autograd.profiler.record_function
        m.setattr(torch.autograd.profiler, "record_function", lambda *a: entered.append(a) or original(*a))
        opt.step()
    assert entered == []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
        opt.step()
    label = f"Optimizer.step#{type(opt).__name__}.step"
    assert sum(e.name == label for e in prof.events()) == 2, sorted({e.name for e in prof.events()})


@pytest.mark.parametrize("make, message", [
    (lambda ps: ProxSGD(ps, lr=-0.1), "learning rate"),
    (lambda ps: ProxSGD(ps, lr=0.1, momentum=-1), "momentum"),
    (lambda ps: ProxSGD(ps, lr=0.1, nesterov=True), "Nesterov"),
    (lambda ps: ProxSGD(ps, lr=0.1, l1=-1e-3), "l1"),
    (lambda ps: ProxSGD(ps, lr=0.1, l2=math.inf), "l2"),
    (lambda ps: ProxSGD(ps, lr=0.1, group_lasso=-1.0), "group_lasso"),
    (lambda ps: ProxSGD(ps, lr=0.1, groups="rows"), "groups"),
    (lambda ps: ProxAdamW(ps, betas=(0.9, 1.0)), "beta"),
    (lambda ps: ProxAdamW(ps, betas=(-0.1, 0.9)), "beta"),
    (lambda ps: ProxAdamW(ps, eps=-1e-8), "epsilon"),
    (lambda ps: ProxAdamW(ps, weight_decay=-0.1), "weight_decay"),
    (lambda ps: ProxAdamW(ps, prox="exact"), "prox"),
    (lambda ps: ProxAdamW([{"params": ps, "l1": -1.0}]), "l1"),
    (lambda ps: Proximal(torch.optim.SGD(ps, lr=0.1), group_lasso=-1.0), "group_lasso"),
    (lambda ps: Proximal(torch.optim.SGD(ps, lr=0.1), groups="block"), "groups"),
    (lambda ps: Proximal(torch.optim.SGD([{"params": ps, "l2": -2.0}], lr=0.1)), "l2"),
])
def test_invalid_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make(_params(torch.float32))


def test_proximal_rejects_non_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        Proximal(_params(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    def tensors():
        return make_params([(5, 4), (3,), (2, 3, 2)], dtype)

    def state():
        return [torch.zeros_like(t, dtype=torch.float32) for t in tensors()]

    for lr_tensor in (None, torch.tensor(0.1)):
        torch.library.opcheck(_ops.sgd_step_, (tensors(), tensors(), state(), lr_tensor, 0.1, 0.9, 0.1, False,
                                                    1e-2, False, False, 0.01, 0.1, 0.02, "row", True))
        steps = [torch.full((), 3.0) for _ in range(3)]
        torch.library.opcheck(_ops.adamw_step_, (
            tensors(), tensors(), state(), [s.abs_() for s in state()], [], steps, lr_tensor, 0.1, 0.9, 0.999,
            1e-8, 1e-2, False, False, 0.01, 0.1, 0.02, "col", "preconditioned", True))


COMPILED = {
    "prox_sgd": lambda ps, lr: ProxSGD(ps, lr=lr, momentum=0.9, l1=0.01, group_lasso=0.01),
    "prox_adamw": lambda ps, lr: ProxAdamW(ps, lr=lr, l1=0.01, group_lasso=0.01, amsgrad=True),
    "proximal": lambda ps, lr: Proximal(torch.optim.Adam(ps, lr=lr), l1=0.01, group_lasso=0.01),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_step_matches_eager(name):
    """The fused steps compile to one graph (after the first step creates the state), with a tensor lr
    that changes between steps and no recompiling; aot_eager runs the fake kernels and functionalization.
    Nothing traced calls the extension's Python functions (dynamo would warn that it cannot trace them)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    params = _params(torch.float32) + _params(torch.bfloat16, shapes=[(4, 3)])
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    eager, compiled = COMPILED[name](params, torch.tensor(0.02)), COMPILED[name](twins, torch.tensor(0.02))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(compiled.step, backend=counter, fullgraph=name != "proximal")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            _random_grads(params)
            for p, t in zip(params, twins):
                t.grad = p.grad.clone()
            eager.step()
            compiled_step()
            for opt in (eager, compiled):
                opt.param_groups[0]["lr"].fill_(0.01 * (i + 2))
    assert not [w for w in caught if "regfast._C" in str(w.message)]
    for p, t in zip(params, twins):
        if name == "proximal" and p.dtype == torch.float32:
            # torch's own Adam takes another code path when compiled: float32 rounding differences.
            torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
        else:
            _close(p, t, p.dtype, scale=10.0)
    if name != "proximal":
        assert counter.frame_count <= 2


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("lr", [0.05, "tensor"])
@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True)], ids=["sgd-for-loop", "sgd-foreach"])
def test_bit_for_bit_with_the_torch_paths_the_readme_names(impl, lr, backend):
    reason = unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)
    params = _params(torch.float32)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(momentum=0.9, nesterov=True, weight_decay=0.01)
    lr_t = torch.tensor(0.05) if lr == "tensor" else lr
    lr_o = torch.tensor(0.05) if lr == "tensor" else lr
    theirs = torch.optim.SGD(twins, lr=lr_t, **hyper, **impl)
    ours = ProxSGD(params, lr=lr_o, **hyper)
    for _ in range(STEPS):
        _random_grads(params)
        for t, p in zip(twins, params):
            t.grad = p.grad.clone()
        theirs.step()
        with use_backend(backend):
            ours.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp", "triton") if unavailable_reason(b, "cpu") is None])
def test_preconditioned_prox_moves_never_updated_rows_by_at_most_lr(backend):
    """An embedding with three rows in the batch: the other 97 have v̂ = 0, where Adam's denominator alone
    (eps) would make the prox step lr/eps and wipe them. With the penalty's gradient as the floor of the
    denominator, l1 moves each of them by lr, as Adam with l1 in the loss would."""
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8)
    before = emb.weight.detach().clone()
    lr, l1 = 1e-3, 1e-4
    opt = ProxAdamW(emb.parameters(), lr=lr, l1=l1, weight_decay=0.0)
    used = torch.tensor([1, 5, 7])
    with use_backend(backend):
        emb(used).sum().backward()
        opt.step()
    after = emb.weight.detach()
    unused = torch.ones(100, dtype=torch.bool)
    unused[used] = False
    expected = torch.sign(before) * torch.clamp(before.abs() - lr, min=0)
    torch.testing.assert_close(after[unused], expected[unused], rtol=1e-6, atol=1e-7)
    assert not (after == 0).all(dim=1).any()
    # The rows in the batch: Adam's own step (gradient 1, so d = 1 + eps > l1), then the prox with step lr/d.
    step = before[used] - lr * 1 / (1 + 1e-8)
    torch.testing.assert_close(after[used], torch.sign(step) * torch.clamp(step.abs() - lr * l1, min=0))
