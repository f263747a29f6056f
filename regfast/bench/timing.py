"""How one call is timed: wall time, host overhead, peak extra memory, and the copy-bandwidth ceiling.

On CUDA each timed call starts on an idle device right after an L2 flush, between two CUDA
events: the time includes whatever launch overhead the device cannot hide, and the data comes
from device memory, as it does for a model whose parameters do not fit in L2. The host overhead
is the time for the call to return, before any synchronize. The peak extra memory is
``torch.cuda.max_memory_allocated`` during one call minus the memory allocated before it.

On the CPU each call is timed with ``time.perf_counter``; host overhead and peak memory are not
measured there (the CPU allocator keeps no peak statistic), and left empty.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "copy_bandwidth", "measure", "synchronize"]

# Bigger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB), as triton.testing.do_bench uses.
_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds over ``reps`` timed calls; ``host_ms`` and ``peak_extra_bytes`` are CUDA only."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    host_ms: float | None = None
    peak_extra_bytes: int | None = None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between order statistics."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _flush_l2(device: torch.device) -> None:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def _samples_cuda(fn: Callable[[], object], device: torch.device, min_time: float, min_reps: int,
                  max_reps: int) -> list[float]:
    events = []
    start_wall = time.perf_counter()
    while len(events) < max_reps and (len(events) < min_reps or time.perf_counter() - start_wall < min_time):
        _flush_l2(device)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _samples_cpu(fn: Callable[[], object], min_time: float, min_reps: int, max_reps: int) -> list[float]:
    samples: list[float] = []
    total = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or total < min_time):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        total += elapsed
    return samples


def _host_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def _peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, min_time: float = 0.2,
            min_reps: int = 5, max_reps: int = 200) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then calls until both ``min_reps`` and ``min_time``
    seconds are reached (at most ``max_reps``). ``fn`` must be safe to call repeatedly."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        samples = _samples_cuda(fn, device, min_time, min_reps, max_reps)
        host = _host_ms(fn, device, min(max_reps, 5))
        peak = _peak_extra_bytes(fn, device)
    else:
        samples = _samples_cpu(fn, min_time, min_reps, max_reps)
        host = peak = None
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples),
                  host, peak)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """The device's copy bandwidth in GB/s: a big ``copy_``, counting bytes read plus bytes written.

    ``nbytes`` per buffer defaults to 1 GiB on CUDA, 256 MiB on the CPU.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, min_time=0.2, min_reps=5, max_reps=50)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9
