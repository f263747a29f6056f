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


def _huge_page_kb(start: int, size: int) -> int:
    """AnonHugePages (kB) of this process's mappings that overlap [start, start + size), from /proc/self/smaps
    (advice on part of a mapping splits it)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < start + size and start < hi
            elif overlaps and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not given on request here")
def test_penalty_backward_asks_huge_pages_for_large_outputs():
    """A large fresh output of penalty_backward is written on huge pages (2 MB faults, not 4 KB ones), where
    the system gives them on request; its values are those of a small one's."""
    w = torch.randn(6 << 20)  # 24 MB
    (out,) = torch.ops.regfast.penalty_backward(torch.tensor(1.5), [w], 0.1, 0.2, 0.0, "row")
    huge = _huge_page_kb(out.data_ptr(), out.numel() * out.element_size())
    assert huge >= 16 << 10, f"{huge} kB of huge pages under the 24 MB output"
    expected = 1.5 * (0.1 * torch.sign(w) + 2 * 0.2 * w)
    torch.testing.assert_close(out, expected)
