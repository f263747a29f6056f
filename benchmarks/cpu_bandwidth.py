"""Throughput of every CPU op of the ``cpp`` backend against the CPU's copy bandwidth, and the user-level
speed-up over the loops it replaces.

    python benchmarks/cpu_bandwidth.py [--repeats 5] [--scale 1.0] [--threads 1 2]
                                       [--dtypes float32 bfloat16 float16 float64] [--isa avx512 avx2 baseline]
                                       [--only NAME ...] [--out FILE]

Parameters are GPT-2 small's (124M elements at ``--scale 1``). Each op is timed on the whole list and
set against the bytes it must move per element (e = the params' element size, a = the optimizer
state's: 4, 8 for float64): ``norms`` and ``penalty`` read w (e); ``penalty_backward`` reads w and writes
the gradient (2e); ``add_penalty_grad_`` reads w and g and writes g (3e); ``prox_`` reads and writes w
(2e); group lasso reads w once more for the group norms (+e); momentum SGD reads g and reads and writes
w and the buffer (3e + 2a); AdamW reads g and reads and writes w and both moments (3e + 4a); the steps with
group lasso (SGD; AdamW with ``prox="lr"`` and ``"preconditioned"``) one more e. The bound
is those bytes at the copy rate measured in the same run (a float32 copy of the same element count,
counting its read and its write); ``of_bound`` is the share of it reached (1.0 = as fast as copying).

The ``loop`` rows time, in float32, what regfast replaces: the penalty written in the loss
(``w.abs().sum()`` / ``w.square().sum()`` per tensor, forward and backward, grads accumulating) against
``regfast.penalty`` in the loss and against ``add_penalty_grad_``, and ``abs().sum()`` + ``square().sum()``
per tensor against ``norms``; ``speedup`` is loop time / regfast time.

``--isa`` runs the op rows with each named instruction set of the CPU kernels (``regfast._C.set_cpu_isa``;
default: the one chosen for this CPU), recorded in each row's ``isa``. The instruction sets take turns call by
call on the same tensors (one op's calls: a warm-up each, then each repeat once in each set), so that the
machine's drift over a run falls on all of them alike.

``--only`` runs just the op rows whose names contain one of its strings (``--only step``: the optimizer steps),
without the loop rows. Prints one JSON row per measurement; ``--out`` also writes them to FILE.
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
from regfast.optim import ProxAdamW, ProxSGD


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


def _timings_by_isa(fn, repeats: int, isas: list[str]) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of ``fn`` per instruction set of the CPU kernels, the sets taking
    turns call by call after a warm-up call in each."""
    from regfast import _C

    out = {isa: [] for isa in isas}
    for isa in isas:
        _C.set_cpu_isa(isa)
        fn()
    for _ in range(repeats):
        for isa in isas:
            _C.set_cpu_isa(isa)
            start = time.perf_counter()
            fn()
            out[isa].append(time.perf_counter() - start)
    return out


def _row(name: str, seconds: list[float], nbytes: int, copy_gbs: float | None) -> dict:
    qs = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else [seconds[0]] * 9
    median = statistics.median(seconds)
    gbs = nbytes / median / 1e9
    row = {"op": name, "median_s": median, "p20_s": qs[1], "p80_s": qs[7], "bytes": nbytes, "gb_s": round(gbs, 2)}
    if copy_gbs is not None:
        row["of_bound"] = round(gbs / copy_gbs, 3)
    return row


def _copy_row(numel: int, repeats: int) -> dict:
    """Copy bandwidth of a ``numel``-element fp32 buffer (the buffers are freed on return)."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    return _row("copy", _timings(lambda: dst.copy_(src), repeats), 8 * numel, None)


def _with_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _op_rows(dtype: torch.dtype, scale: float, repeats: int, copy_gbs: float, isas: list[str],
             only: list[str] | None = None) -> list[dict]:
    """Every op on GPT-2 small's params in ``dtype`` (with ``only``, those whose names contain one of its
    strings), with each instruction set of ``isas``."""
    params = _with_grads([p.detach().requires_grad_() for p in make_params(gpt2_small(), dtype, scale=scale)])
    numel = sum(p.numel() for p in params)
    e = params[0].element_size()
    a = 8 if dtype == torch.float64 else 4
    rows = []

    def add(name: str, fn, bytes_per_element: int) -> None:
        if only and not any(part in name for part in only):
            return
        for isa, seconds in _timings_by_isa(fn, repeats, isas).items():
            rows.append({**_row(name, seconds, bytes_per_element * numel, copy_gbs), "isa": isa})

    detached = [p.detach() for p in params]
    add("norms", lambda: regfast.norms(detached), e)
    for name, hyper in (("l1", {"l1": 1e-5}), ("l2", {"l2": 1e-4}), ("l1+l2", {"l1": 1e-5, "l2": 1e-4})):
        add(f"penalty {name}", lambda h=hyper: regfast.penalty(detached, **h), e)
        add(f"penalty_backward {name}",
            lambda h=hyper: torch.ops.regfast.penalty_backward(torch.ones(()), detached, h.get("l1", 0.0),
                                                               h.get("l2", 0.0), 0.0, "row"), 2 * e)
        add(f"add_penalty_grad_ {name}", lambda h=hyper: regfast.add_penalty_grad_(params, **h), 3 * e)
        add(f"prox_ {name}", lambda h=hyper: regfast.prox_(params, 1e-3, **h), 2 * e)
    for groups in ("row", "col", "tensor"):
        add(f"add_penalty_grad_ group_lasso {groups}",
            lambda g=groups: regfast.add_penalty_grad_(params, group_lasso=1e-4, groups=g), 4 * e)
        add(f"prox_ group_lasso {groups}", lambda g=groups: regfast.prox_(params, 1e-3, group_lasso=1e-4, groups=g),
            3 * e)
    sgd = ProxSGD(params, lr=1e-3, momentum=0.9, l1=1e-5)
    add("ProxSGD step (momentum, l1)", sgd.step, 3 * e + 2 * a)
    del sgd
    adamw = ProxAdamW(params, lr=1e-4, l1=1e-5)
    add("ProxAdamW step (l1)", adamw.step, 3 * e + 4 * a)
    del adamw
    for groups in ("row", "col", "tensor"):
        hyper = {"l1": 1e-5, "group_lasso": 1e-4, "groups": groups}
        sgd = ProxSGD(params, lr=1e-3, momentum=0.9, **hyper)
        add(f"ProxSGD step (momentum, l1, group_lasso {groups})", sgd.step, 4 * e + 2 * a)
        del sgd
        for prox in ("lr", "preconditioned"):
            adamw = ProxAdamW(params, lr=1e-4, prox=prox, **hyper)
            add(f"ProxAdamW step (l1, group_lasso {groups}, prox {prox})", adamw.step, 4 * e + 4 * a)
            del adamw
    return rows


def _loop_rows(scale: float, repeats: int) -> list[dict]:
    """What regfast replaces, beside regfast, float32: penalty in the loss (forward + backward), the gradient
    loop, the norm loop; ``speedup`` = loop / regfast."""
    params = _with_grads([p.detach().requires_grad_() for p in make_params(gpt2_small(), torch.float32,
                                                                           scale=scale)])
    numel = sum(p.numel() for p in params)
    pairs = {}
    for name, term in (("l1", lambda w: w.abs().sum()), ("l2", lambda w: w.square().sum())):
        hyper = {"l1": 1e-5} if name == "l1" else {"l2": 1e-4}
        lam = next(iter(hyper.values()))

        def loop(t=term, lam=lam):
            loss = torch.zeros(())
            for p in params:
                loss = loss + lam * t(p)
            loss.backward()

        def fused(h=hyper):
            regfast.penalty(params, **h).backward()

        pairs[f"penalty in the loss {name}"] = (loop, fused)
        pairs[f"add_penalty_grad_ {name}"] = (loop, lambda h=hyper: regfast.add_penalty_grad_(params, **h))

    def norm_loop():
        with torch.no_grad():
            return [(p.abs().sum(), p.square().sum()) for p in params]

    pairs["norms"] = (norm_loop, lambda: regfast.norms(params))
    rows = []
    for name, (loop, fused) in pairs.items():
        loop_s = statistics.median(_timings(loop, repeats))
        fused_s = statistics.median(_timings(fused, repeats))
        rows.append({"op": f"loop vs regfast: {name}", "loop_s": loop_s, "regfast_s": fused_s,
                     "speedup": round(loop_s / fused_s, 2), "numel": numel})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every dim 0 (quick runs)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--isa", nargs="+", default=None, help="instruction sets of the CPU kernels to run")
    parser.add_argument("--out", default=None, help="also write the JSON rows to this file")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the op rows whose names contain one of these strings (and no loop rows)")
    args = parser.parse_args(argv)
    os.environ["REGFAST_BACKEND"] = "cpp"
    from regfast import _C

    chosen = _C.cpu_isa()
    isas = args.isa or [chosen]
    lines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        numel = sum(p.numel() for p in make_params(gpt2_small(), torch.float32, scale=args.scale))
        copy = _copy_row(numel, args.repeats)
        meta = {"device": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
                "numel": numel, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rows = [{**copy, "dtype": "float32"}]
        try:
            for name in args.dtypes:
                rows += [{**row, "dtype": name}
                         for row in _op_rows(getattr(torch, name), args.scale, args.repeats, copy["gb_s"], isas,
                                             args.only)]
        finally:
            _C.set_cpu_isa(chosen)
        if not args.only:
            rows += [{**row, "isa": chosen} for row in _loop_rows(args.scale, args.repeats)]
        for row in rows:
            line = json.dumps({**meta, **row})
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
