"""DDP and FSDP2 (DTensor) on CPU with gloo and 2 processes, against a single-process run of the same model."""

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import regfast

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform != "linux",
    reason="needs torch.distributed with gloo on Linux",
)

WORLD = 2
HYPERS = [dict(l1=0.01, l2=0.02), dict(group_lasso=0.05, groups="row"), dict(group_lasso=0.05, groups="col"),
          dict(l1=0.01, l2=0.02, group_lasso=0.03, groups="tensor")]


def _model():
    torch.manual_seed(0)
    # 7 and 3 output rows split unevenly over 2 ranks; a 1-D bias of 3 elements too.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 4, bias=False))


def _data(rank):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 4, generator=gen)
    half = slice(4 * rank, 4 * rank + 4)
    return (x, y), (x[half], y[half])


def _close(a, b, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Calls(list):
    original = None


def _count_all_reduces():
    """Count dist.all_reduce calls until dist.all_reduce is restored to ``calls.original``."""
    calls = _Calls()
    calls.original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(args)
        return calls.original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def _check_fsdp(rank, mesh):
    from torch.distributed.fsdp import fully_shard

    ref = _model()
    model = copy.deepcopy(ref)
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "placements") for p in model.parameters())

    n, n_ref = regfast.norms(model), regfast.norms(ref)
    for field in ("l1", "l2sq", "l2", "per_tensor_l1", "per_tensor_l2sq"):
        _close(getattr(n, field), getattr(n_ref, field), f"norms.{field}")

    calls = _count_all_reduces()
    for hyper in HYPERS:
        for fn, args in ((regfast.norms, ()), (regfast.penalty, ()), (regfast.add_penalty_grad_, ()),
                         (regfast.prox_, (0.0,))):
            calls.clear()
            fn(model, *args) if fn is regfast.norms else fn(model, *args, **hyper)
            assert len(calls) <= 1, f"{len(calls)} collectives in one call ({hyper})"
    dist.all_reduce = calls.original

    (xg, yg), (x, y) = _data(rank)
    for hyper in HYPERS:
        # The penalty in the loss of an FSDP training step: counted once, whatever the sharding.
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y) + regfast.penalty(model, **hyper)
        loss.backward()
        ref_loss = nn.functional.mse_loss(ref(xg), yg) + regfast.penalty(ref, **hyper)
        ref_loss.backward()
        _close(regfast.penalty(model, **hyper), regfast.penalty(ref, **hyper), f"penalty {hyper}")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            _close(_full(p.grad), q.grad, f"grad of {name} with the penalty in the loss, {hyper}")

        # add_penalty_grad_ after backward gives the same gradients.
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(ref(xg), yg).backward()
        _close(regfast.add_penalty_grad_(model, **hyper), regfast.add_penalty_grad_(ref, **hyper),
               f"add_penalty_grad_ value {hyper}")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            _close(_full(p.grad), q.grad, f"grad of {name} after add_penalty_grad_, {hyper}")

    for hyper in HYPERS:
        regfast.prox_(model, 0.5, **hyper)
        regfast.prox_(ref, 0.5, **hyper)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            _close(_full(p.detach()), q.detach(), f"prox_ of {name}, {hyper}")


def _check_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = _model()
    model = DDP(copy.deepcopy(ref))
    (xg, yg), (x, y) = _data(rank)
    hyper = dict(l1=0.01, l2=0.02, group_lasso=0.03)

    # The penalty in the loss: DDP averages identical penalty gradients, so it counts once.
    (nn.functional.mse_loss(model(x), y) + regfast.penalty(model, **hyper)).backward()
    (nn.functional.mse_loss(ref(xg), yg) + regfast.penalty(ref, **hyper)).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        _close(p.grad, q.grad, "DDP grad, penalty in the loss")

    # Gradient accumulation under no_sync, then add_penalty_grad_ once.
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    with model.no_sync():
        nn.functional.mse_loss(model(x[:2]), y[:2]).mul(0.5).backward()
    nn.functional.mse_loss(model(x[2:]), y[2:]).mul(0.5).backward()
    regfast.add_penalty_grad_(model, **hyper)
    nn.functional.mse_loss(ref(xg), yg).backward()
    regfast.add_penalty_grad_(ref, **hyper)
    for p, q in zip(model.parameters(), ref.parameters()):
        _close(p.grad, q.grad, "DDP grad, no_sync accumulation then add_penalty_grad_")

    regfast.prox_(model, 0.3, **hyper)
    for p in model.parameters():
        copies = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(copies, p.detach())
        assert torch.equal(copies[0], copies[1]), "replicas diverged after prox_"


def _worker(rank, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        _check_ddp(rank)
        _check_fsdp(rank, init_device_mesh("cpu", (WORLD,)))
        # HSDP: replicated over the first mesh dim, sharded over the second (size 1 here).
        _check_fsdp(rank, init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard")))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_fsdp2_hsdp_match_single_process():
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) is not in this torch")
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    torch.multiprocessing.spawn(_worker, args=(_free_port(), None), nprocs=WORLD, join=True)
