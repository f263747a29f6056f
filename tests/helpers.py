"""Shared test tools: random parameter sets, per-dtype tolerances, backend forcing, every op against the oracle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import oracle
import pytest
import torch

import regfast
from regfast import _dispatch
from regfast._dispatch import forced_backend as use_backend  # noqa: F401  (re-exported for the tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Relative tolerance of a kernel's result against the float64 reference, per dtype.
# fp16/bf16 results are rounded once to the param dtype (grads, prox) or accumulated in fp32.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}



def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


# Each instruction-set variant of the CPU kernels and whether this CPU runs it: the flags it needs
# (csrc/cpu_passes_baseline.cpp asks the same of the CPU) against /proc/cpuinfo's.
CPU_VARIANTS = {name: needs <= _cpu_flags() for name, needs in (
    ("baseline", set()), ("avx2", {"avx2", "f16c"}),
    ("avx512", {"avx2", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"}))}

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

# Shapes that stress the launchers: empty, 0-dim, 1 element, odd sizes, multi-dim, large.
EDGE_SHAPES = [(), (0,), (1,), (7,), (3, 0), (0, 5), (5, 3), (17, 33), (4, 3, 5, 2), (1031,), (2, 65537)]


def make_params(shapes, dtype=torch.float32, device="cpu", seed=None, scale=1.0, requires_grad=False):
    """Fresh random tensors of the given shapes (a new seed each call unless one is given)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    out = []
    for s in shapes:
        t = (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        out.append(t.requires_grad_(requires_grad))
    return out


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: transposed (dim >= 2) or every other element (dim 1)."""
    t = t.detach()
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.dim() == 1:
        return torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)
    return t.clone()


def to64(tensors):
    """float64 CPU copies, for the reference."""
    return [t.detach().to(device="cpu", dtype=torch.float64) for t in tensors]


def assert_close(actual, expected, dtype, scale=1.0, rtol=None):
    """``actual`` (any dtype) against a float64 ``expected``: |a − e| ≤ rtol·(|e| + scale)."""
    rtol = RTOL[dtype] if rtol is None else rtol
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
                               rtol=rtol, atol=rtol * scale, equal_nan=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions of ``dtype`` tensors accumulate and return in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreted(backend: str, device: str) -> bool:
    """Whether ``backend`` runs in Triton's CPU interpreter on ``device``: slow, so its cases are kept small."""
    return backend == "triton" and device == "cpu"


def skip_in_interpreter(backend: str, device: str, why: str) -> None:
    """Skip the test in Triton's CPU interpreter, saying ``why`` (what covers it there instead)."""
    if interpreted(backend, device):
        pytest.skip(f"Triton's CPU interpreter is slow: {why}")


def select(device) -> object:
    """The backend object that serves ``device`` tensors now: one function per op of regfast._schema."""
    return _dispatch.select(torch.device(device))


# Elements per work item of the compiled kernels; Triton's is a parameter (:func:`launching`).
KERNEL_CHUNK = {"cpp": 2**15, "cuda": 2**16}


@contextlib.contextmanager
def launching(backend: str, chunk: int | None) -> Iterator[None]:
    """Inside the block Triton launches with ``chunk`` elements per work item (None: its default); the other
    backends' chunks are fixed."""
    if backend != "triton" or chunk is None:
        yield
        return
    from regfast.triton import launcher

    with launcher.chunked(chunk):
        yield


def same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in new storage, contiguous or not as ``t`` is."""
    return t.clone() if t.is_contiguous() else noncontiguous(t.contiguous())


def check_ops(ts, hyper: dict, groups: str, lr: float | torch.Tensor = 0.5, api: bool = True) -> None:
    """Every function of the backend serving ``ts`` (one device and dtype) against the oracle on ``ts``:
    norms, penalty, penalty_backward, add_penalty_grad_ (on grads of the same layouts) and prox_ (on copies of
    the same layouts; ``lr`` a float or a 0-dim tensor). With ``api``, the public API too: penalty, its gradient
    through autograd, add_penalty_grad_ on ``.grad`` and prox_. ``ts`` is left as it is.

    Reductions are held to the accumulation dtype's tolerance, elementwise results to the input dtype's; in
    float64 the prox zeroes exactly the oracle's zeros."""
    device, dtype = ts[0].device, ts[0].dtype
    acc = acc_dtype(dtype)
    l1, l2, gl = hyper.get("l1", 0.0), hyper.get("l2", 0.0), hyper.get("group_lasso", 0.0)
    kw = dict(l1=l1, l2=l2, gl=gl, groups=groups)
    step = float(lr) if isinstance(lr, torch.Tensor) else lr
    ref = to64(ts)
    expected = oracle.penalty(ref, **kw)
    exp_grads = [oracle.grad(r, **kw) for r in ref]
    exp_prox = [oracle.prox(r, step, **kw) for r in ref]
    ops = select(device)

    per_l1, per_l2sq = ops.norms(ts)
    assert per_l1.dtype == acc and per_l1.shape == (len(ts),) and per_l1.device == device
    assert_close(per_l1, torch.stack([r.abs().sum() for r in ref]), acc)
    assert_close(per_l2sq, torch.stack([(r * r).sum() for r in ref]), acc)

    value = ops.penalty(ts, l1, l2, gl, groups)
    assert value.dim() == 0 and value.dtype == acc and value.device == device
    assert_close(value, expected, acc)

    outs = ops.penalty_backward(torch.tensor(1.5, dtype=acc, device=device), ts, l1, l2, gl, groups)
    for out, t, g in zip(outs, ts, exp_grads, strict=True):
        assert out.shape == t.shape and out.dtype == dtype and out.device == device
        assert_close(out, 1.5 * g, dtype)

    grads = [g if t.is_contiguous() else noncontiguous(g)
             for t, g in zip(ts, make_params([t.shape for t in ts], dtype, device))]
    before = [g.detach().to("cpu", torch.float64, copy=True) for g in grads]
    assert_close(ops.add_penalty_grad_(ts, grads, l1, l2, gl, groups), expected, acc)
    for g, b, e in zip(grads, before, exp_grads):
        assert g.dtype == dtype
        assert_close(g, b + e, dtype)

    work = [same_layout_copy(t) for t in ts]
    if isinstance(lr, torch.Tensor):
        ops.prox_(work, lr.to(device, acc), 0.0, l1, l2, gl, groups)
    else:
        ops.prox_(work, None, lr, l1, l2, gl, groups)
    for w, t, e in zip(work, ts, exp_prox):
        assert w.dtype == dtype and w.is_contiguous() == t.is_contiguous()
        assert_close(w, e, dtype)
        if dtype == torch.float64:
            assert torch.equal(w.cpu() == 0, e == 0)

    if not api:
        return
    value = regfast.penalty(ts, groups=groups, **hyper)
    assert value.device == device and value.dtype == acc
    assert_close(value, expected, acc)
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    regfast.penalty(leaves, groups=groups, **hyper).mul(1.5).backward()
    owners = [t.detach().clone() for t in ts]
    for o, b in zip(owners, grads):
        o.grad = b.clone()
    after = to64(grads)
    assert_close(regfast.add_penalty_grad_(owners, groups=groups, **hyper), expected, acc)
    for leaf, o, b, e in zip(leaves, owners, after, exp_grads):
        assert leaf.grad.dtype == dtype and o.grad.dtype == dtype
        assert_close(leaf.grad, 1.5 * e, dtype)
        assert_close(o.grad, b + e, dtype)
    stepped = [same_layout_copy(t) for t in ts]
    regfast.prox_(stepped, lr, groups=groups, **hyper)
    for s, e in zip(stepped, exp_prox):
        assert s.dtype == dtype
        assert_close(s, e, dtype)
