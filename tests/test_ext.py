"""What only the compiled extension has: why it cannot serve a device, and its kernels' own argument checks.

Every op of ``cpp`` / ``cuda`` against the oracle: tests/test_backends.py; their fused steps: tests/test_fused_steps.py.
"""

import os

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


@pytest.mark.parametrize("cache", ["1", "0"])
def test_penalty_backward_large_outputs_with_and_without_the_cache(cache):
    """penalty_backward's outputs of 64 KiB or more from the cache of freed blocks (csrc/penalty_cpu.cpp's
    OutputCache), or from the system with REGFAST_CPU_OUTPUT_CACHE=0: the values of the formula either way,
    and with the cache a second call's output takes the block the first one freed."""
    import subprocess
    import sys

    code = (
        "import torch, regfast\n"
        "w = torch.randn(6 << 20)\n"
        "(out,) = torch.ops.regfast.penalty_backward(torch.tensor(1.5), [w], 0.1, 0.2, 0.0, 'row')\n"
        "first = out.data_ptr()\n"
        "out.fill_(float('nan'))\n"
        "del out\n"
        "(out,) = torch.ops.regfast.penalty_backward(torch.tensor(1.5), [w], 0.1, 0.2, 0.0, 'row')\n"
        "torch.testing.assert_close(out, 1.5 * (0.1 * torch.sign(w) + 2 * 0.2 * w))\n"
        "print('reused' if out.data_ptr() == first else 'fresh')\n")
    env = {**os.environ, "REGFAST_CPU_OUTPUT_CACHE": cache, "REGFAST_BACKEND": "cpp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    if cache == "1":
        assert out == ["reused"], out


def test_a_step_keeps_its_block_arrays_for_the_next_with_the_scratch_cache():
    """The fused steps' block arrays come from a pool that keeps them from step to step (csrc/optim_cpu.cpp's
    ScratchPool), or from the system at every step with REGFAST_CPU_SCRATCH_CACHE=0: a float64 tensor of 3M
    elements as one group in Adam's metric is one block, two arrays of 24 MB (above the C library's largest
    threshold for keeping freed memory: mapped anew each time). Without the pool each step faults their pages in
    again; with it the steps after the first fault (almost) none, also beside a second optimizer of smaller
    arrays, and the params come out the same bits."""
    import subprocess
    import sys

    code = (
        "import resource, torch, regfast\n"
        "from regfast.optim import ProxAdamW\n"
        "torch.manual_seed(0)\n"
        "w = torch.randn(3 << 20, dtype=torch.float64, requires_grad=True)\n"
        "w.grad = torch.randn_like(w)\n"
        "opt = ProxAdamW([w], lr=1e-3, l1=1e-4, group_lasso=1e-3, groups='tensor', prox='preconditioned')\n"
        "opt.step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    opt.step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "v = torch.randn(1 << 20, dtype=torch.float64, requires_grad=True)\n"
        "v.grad = torch.randn_like(v)\n"
        "other = ProxAdamW([v], lr=1e-3, group_lasso=1e-3, groups='tensor', prox='preconditioned')\n"
        "opt.step(); other.step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    opt.step(); other.step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(w.detach().sum().item().hex(), w.detach().abs().max().item().hex(), v.detach().sum().item().hex())\n")
    runs = {}
    for cache in ("1", "0"):
        env = {**os.environ, "REGFAST_CPU_SCRATCH_CACHE": cache, "REGFAST_BACKEND": "cpp"}
        runs[cache] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True, timeout=300).stdout.split()
    assert runs["1"][2:] == runs["0"][2:]
    # Alone, 3 steps × 48 MB: 36,864 pages of 4 KiB (72 of 2 MiB, were the kernel to map huge pages). Beside a
    # second optimizer whose arrays take 16 MB (less than half the first's, so it cannot take those): both kept.
    for k in (0, 1):
        pooled, fresh = int(runs["1"][k]), int(runs["0"][k])
        assert fresh >= 3 * 20, runs
        assert pooled * 4 < fresh, runs
