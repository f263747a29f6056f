"""What only the compiled extension has: why it cannot serve a device, and its kernels' own argument checks.

Every op of ``cpp`` / ``cuda`` against the oracle: tests/test_backends.py; their fused steps: tests/test_fused_steps.py.
"""

import pytest
import torch
from helpers import make_params

import regfast
from regfast import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"regfast._C is not built: {_ext.unavailable_reason('cpu')}")


def test_unavailable_reason():
    assert _ext.unavailable_reason("cpu") is None
    assert "mps" in _ext.unavailable_reason("mps")
    if not _ext._C.WITH_CUDA:
        assert "without CUDA" in _ext.unavailable_reason("cuda")
    assert regfast.backend("cpu").selected == "cpp"


def test_adamw_step_rejects_an_unknown_prox():
    params = make_params([(9, 7), (13,)], torch.float32)
    grads = make_params([(9, 7), (13,)], torch.float32)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    with pytest.raises(RuntimeError, match="prox"):
        _ext.OPS.adamw_step_(params, grads, *state, [], steps, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0.1,
                             0.0, 0.0, "row", "bogus", False)
