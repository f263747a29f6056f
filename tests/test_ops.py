"""The op layer: schemas checked by opcheck, fake kernels, torch.compile without graph breaks."""

import pytest
import torch
import torch._dynamo.testing
from helpers import make_params
from torch import nn

import regfast
from regfast import _ops

SHAPES = [(5, 4), (3,), (2, 3, 2)]


def _tensors(dtype=torch.float32, requires_grad=False):
    return make_params(SHAPES, dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", ["row", "col", "tensor"])
def test_opcheck(dtype, groups):
    ts = _tensors(dtype)
    torch.library.opcheck(_ops.norms, (ts,))
    torch.library.opcheck(_ops.penalty, (_tensors(dtype, requires_grad=True), 0.1, 0.2, 0.3, groups))
    torch.library.opcheck(_ops.penalty_backward, (torch.tensor(1.5, dtype=dtype), ts, 0.1, 0.2, 0.3, groups))
    torch.library.opcheck(_ops.add_penalty_grad_, (ts, _tensors(dtype), 0.1, 0.2, 0.3, groups))
    torch.library.opcheck(_ops.prox_, (_tensors(dtype), None, 0.1, 0.5, 0.2, 0.3, groups))
    torch.library.opcheck(_ops.prox_, (_tensors(dtype), torch.tensor(0.1, dtype=dtype), 0.0, 0.5, 0.2, 0.3, groups))




def test_compile_training_step_with_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_fn():
        return nn.functional.mse_loss(model(x), y) + regfast.penalty(model, l1=1e-3, l2=1e-2, group_lasso=1e-3)

    eager = loss_fn()
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(loss_fn, fullgraph=True)()
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_eager_penalty_under_compiled_autograd():
    """An eager penalty (on the extension, one autograd node for the list) in a loss whose backward runs under
    compiled autograd: the eager grads."""
    from torch._dynamo import compiled_autograd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_fn():
        return nn.functional.mse_loss(model(x), y) + regfast.penalty(model, l1=1e-3, l2=1e-2, group_lasso=1e-3)

    loss_fn().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = loss_fn()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_compile_add_penalty_grad_and_prox_without_recompiles():
    torch._dynamo.reset()
    ps = [nn.Parameter(t) for t in _tensors()]
    ref = [p.detach().clone() for p in ps]
    counter = torch._dynamo.testing.CompileCounter()

    def update(lr):
        value = regfast.add_penalty_grad_(ps, l1=0.01, l2=0.02, group_lasso=0.03)
        with torch.no_grad():
            for p in ps:
                p.sub_(p.grad, alpha=0.1)
        regfast.prox_(ps, lr, l1=0.5, l2=0.1, group_lasso=0.2)
        return value

    step = torch.compile(update, backend=counter, fullgraph=True)
    for lr in (0.1, 0.05, 0.01):
        for p in ps:
            p.grad = None
        value = step(torch.tensor(lr))
        regfast.add_penalty_grad_(ref, l1=0.01, l2=0.02, group_lasso=0.03)
        expected = regfast.penalty(ref, l1=0.01, l2=0.02, group_lasso=0.03)
        with torch.no_grad():
            for r in ref:
                r.sub_(r.grad, alpha=0.1)
                r.grad = None
        regfast.prox_(ref, lr, l1=0.5, l2=0.1, group_lasso=0.2)
        torch.testing.assert_close(value, expected)
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r)
    assert counter.frame_count == 1


def test_compile_prox_with_float_lr_does_not_recompile_per_value():
    torch._dynamo.reset()
    w = _tensors()
    counter = torch._dynamo.testing.CompileCounter()
    prox = torch.compile(lambda lr: regfast.prox_(w, lr, l1=0.1), backend=counter, fullgraph=True)
    for lr in (0.1, 0.2, 0.3, 0.4):
        prox(lr)
    assert counter.frame_count <= 2  # at most one recompile, after which the float is symbolic
