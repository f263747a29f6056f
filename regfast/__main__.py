"""``python -m regfast``: which backend serves each device here, then the naive loop against regfast.

Runs on a generated GPT-2-small parameter set (124M params, 148 tensors) on the best device
present: the regularization loop people write (in the loss, then backward), ``regfast.penalty``
in the loss, and ``regfast.add_penalty_grad_`` after backward. Checks that values and gradients
agree, and prints the time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

import regfast
from regfast import _cli
from regfast.bench.workloads import WORKLOADS, make_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m regfast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=_cli.device, default=None,
                   help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--workload", default="gpt2-small", choices=sorted(WORKLOADS))
    p.add_argument("--scale", type=_cli.positive_float, default=1.0,
                   help="shrink every tensor's dim 0 by this factor for a quicker run (default 1: full size)")
    p.add_argument("--l1", type=_cli.nonnegative_float, default=1e-5, help="L1 coefficient (default 1e-5)")
    p.add_argument("--l2", type=_cli.nonnegative_float, default=1e-4, help="L2 coefficient (default 1e-4)")
    p.add_argument("--repeat", type=_cli.positive_int, default=5,
                   help="timed runs of each (median reported; default 5)")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    l1, l2 = args.l1, args.l2

    print(f"regfast {regfast.__version__} · torch {torch.__version__} · Python {platform.python_version()}")
    print("Backends (REGFAST_BACKEND forces one):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        print("  " + str(regfast.backend(d)).replace("\n", "\n  "))

    params = make_params(WORKLOADS[args.workload](), dtype=dtype, device=device, scale=args.scale)
    numel = sum(p.numel() for p in params)
    print(f"\nWorkload: {args.workload}, {len(params)} tensors, {numel:,} params, {args.dtype}, on {device}; "
          f"penalty = {l1:g}·Σ|w| + {l2:g}·Σw²")

    def naive() -> torch.Tensor:
        loss = l1 * sum(w.abs().sum() for w in params) + l2 * sum(w.square().sum() for w in params)
        loss.backward()
        return loss

    def in_loss() -> torch.Tensor:
        loss = regfast.penalty(params, l1=l1, l2=l2)
        loss.backward()
        return loss

    def into_grad() -> torch.Tensor:
        return regfast.add_penalty_grad_(params, l1=l1, l2=l2)

    results = []
    for name, fn in [("naive loop, in the loss", naive), ("regfast.penalty, in the loss", in_loss),
                     ("regfast.add_penalty_grad_", into_grad)]:
        for p in params:
            p.grad = torch.zeros_like(p)
        value = fn().detach().double().item()
        grads = [p.grad.clone() for p in params]
        ms = _time(fn, device, args.repeat)
        results.append((name, value, grads, ms))

    base_value, base_grads, base_ms = results[0][1], results[0][2], results[0][3]
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    ok = True
    print(f"\n{'':32}{'time (ms)':>12}{'speed-up':>10}{'value':>16}  agrees with the loop")
    for name, value, grads, ms in results:
        value_ok = math.isclose(value, base_value, rel_tol=tol)
        grad_err = max(((g.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                       for g, b in zip(grads, base_grads))
        agree = value_ok and grad_err <= 10 * tol
        ok &= agree
        print(f"{name:32}{ms:12.2f}{base_ms / ms:9.2f}x{value:16.6g}  "
              f"{'yes' if agree else 'NO'} (max grad rel. diff {grad_err:.1e})")
    print(f"\nregfast backend on {device}: {regfast.backend(device).selected}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
