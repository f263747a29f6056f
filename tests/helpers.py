"""Shared test tools: random parameter sets, per-dtype tolerances, backend forcing."""

from __future__ import annotations

import torch

from regfast._dispatch import forced_backend as use_backend  # noqa: F401  (re-exported for the tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Relative tolerance of a kernel's result against the float64 reference, per dtype.
# fp16/bf16 results are rounded once to the param dtype (grads, prox) or accumulated in fp32.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

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
