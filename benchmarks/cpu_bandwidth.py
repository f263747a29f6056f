"""Throughput of the ``cpp`` backend's add_penalty_grad_ and prox_ against the CPU's copy bandwidth.

    python benchmarks/cpu_bandwidth.py [--repeats 10] [--scale 1.0] [--threads N]

Parameters are GPT-2 small's (124M fp32 elements). Bytes moved per element: add_penalty_grad_
reads w and g and writes g (12), prox_ reads and writes w (8), a copy reads and writes (8).
Prints one JSON row per measurement: median and p20/p80 seconds, GB/s and the share of copy
bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import regfast
from regfast.bench.workloads import gpt2_small, make_params


def _timings(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _row(name: str, seconds: list[float], nbytes: int, copy_gbs: float | None) -> dict:
    qs = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else [seconds[0]] * 9
    median = statistics.median(seconds)
    gbs = nbytes / median / 1e9
    row = {"op": name, "median_s": median, "p20_s": qs[1], "p80_s": qs[7], "bytes": nbytes, "gb_s": round(gbs, 2)}
    if copy_gbs is not None:
        row["of_copy"] = round(gbs / copy_gbs, 3)
    return row


def _copy_row(numel: int, repeats: int) -> dict:
    """Copy bandwidth of a ``numel``-element fp32 buffer (the buffers are freed on return)."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    return _row("copy", _timings(lambda: dst.copy_(src), repeats), 8 * numel, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every dim 0 (quick runs)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["REGFAST_BACKEND"] = "cpp"

    params = [p.detach() for p in make_params(gpt2_small(), torch.float32, scale=args.scale)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    numel = sum(p.numel() for p in params)

    copy = _copy_row(numel, args.repeats)
    copy_gbs = copy["gb_s"]

    rows = [
        copy,
        _row("add_penalty_grad_ l1+l2", _timings(lambda: regfast.add_penalty_grad_(params, l1=1e-5, l2=1e-4),
                                                 args.repeats), 12 * numel, copy_gbs),
        _row("prox_ l1+l2", _timings(lambda: regfast.prox_(params, 1e-3, l1=1e-5, l2=1e-4), args.repeats),
             8 * numel, copy_gbs),
    ]
    meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "numel": numel, "backend": str(regfast.backend("cpu")).splitlines()[0],
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for row in rows:
        print(json.dumps({**meta, **row}))


if __name__ == "__main__":
    main()
