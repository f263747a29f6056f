"""Host cost per call of regfast's Python path, beside the naive loop, on many one-element tensors.

    python benchmarks/host_overhead.py [--tensors 2000] [--repeats 30] [--scattered] [--json]

With one element per tensor the arithmetic is negligible, so the time per call is what the
host spends: argument checks, grouping, dispatch and the kernel calls. Rows:

- ``naive loop``: the loops people write (one or more torch ops per tensor); ``penalty`` rows
  include ``backward()``, ``penalty value`` rows are the value alone under ``torch.no_grad()`` (for logging, or
  ``Proximal(compute_penalty=True)``);
- ``torch._foreach_*``: torch's own multi-tensor ops, where one exists;
- ``regfast[cpp]`` / ``regfast[torch]``: the whole public call on that backend;
- ``regfast[triton], launch stubbed``: the whole public call on the Triton backend with each
  kernel launch replaced by a no-op (runs on the CPU with ``TRITON_INTERPRET=1``): regfast's
  host path without Triton's own launch cost, which a GPU adds once per launch;
- optimizer steps (momentum SGD, AdamW; l1 = 1e-4): torch's own (``foreach``, ``fused``) beside
  ``ProxSGD``, ``ProxAdamW`` (both prox modes; and on the Triton backend, launches stubbed) and ``Proximal``
  around torch's SGD;
- ``Proximal``'s own cost: ``Proximal`` around an optimizer whose step does nothing, that step alone and a
  ``prox_`` with the same arguments; its own cost is the difference of the first two (printed beside it, with
  its ratio to the ``prox_``);
- ``torch._foreach_add_(grads, params)``: the cheapest multi-tensor op torch has, as a yardstick.

``--scattered`` lists every call's tensors in a shuffled order: their Python objects, TensorImpls and
grads then lie scattered through memory as a trained model's do (made in one order, grads made during
backward among the graph's own objects), rather than in the order of the list, where the processor's
prefetchers find them.

Prints a table (median and p20/p80 microseconds per call, speed-up over the first row of each op), and
for each row measured at two sizes the cost ratio of the larger to the smaller (10x tensors: 10x is
linear).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the stubbed rows run on the CPU

import torch  # noqa: E402
from cpu_bandwidth import _timings  # noqa: E402  (this folder is on sys.path when run as a script)

import regfast  # noqa: E402
from regfast import _dispatch  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_triton_launches() -> list[tuple[object, str, object]]:
    import importlib

    saved = []
    for name in ("norms", "penalty", "prox", "group", "optim"):
        module = importlib.import_module(f"regfast.triton.{name}")
        for attr in dir(module):
            if attr.endswith("_kernel"):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, _NoLaunch())
    return saved


def _naive_cases(params: list[torch.Tensor]) -> dict[str, object]:
    def penalty():
        loss = torch.zeros(())
        for w in params:
            loss = loss + 1e-4 * w.abs().sum() + 1e-3 * w.square().sum()
        loss.backward()

    def add_grad():
        for w in params:
            w.grad.add_(torch.sign(w), alpha=1e-4).add_(w, alpha=2e-3)

    def prox():
        with torch.no_grad():
            for w in params:
                w.copy_(torch.sign(w) * torch.clamp(w.abs() - 1e-5, min=0) / (1 + 2e-4))

    def norms():
        return [(w.abs().sum(), w.square().sum()) for w in params]

    @torch.no_grad()
    def value():
        loss = torch.zeros(())
        for w in params:
            loss = loss + 1e-4 * w.abs().sum() + 1e-3 * w.square().sum()
        return loss

    return {"norms": norms, "penalty": penalty, "penalty value": value, "add_penalty_grad_": add_grad, "prox_": prox}


def _foreach_cases(params: list[torch.Tensor]) -> dict[str, object]:
    grads = [p.grad for p in params]
    return {
        "norms": lambda: (torch._foreach_norm(params, 1), torch._foreach_norm(params, 2)),
        "add_penalty_grad_": lambda: torch._foreach_add_(grads, torch._foreach_sign(params), alpha=1e-4),
    }


def _regfast_cases(params: list[torch.Tensor]) -> dict[str, object]:
    return {
        "norms": lambda: regfast.norms(params),
        "penalty": lambda: regfast.penalty(params, l1=1e-4, l2=1e-3).backward(),
        "penalty value": torch.no_grad()(lambda: regfast.penalty(params, l1=1e-4, l2=1e-3)),
        "add_penalty_grad_": lambda: regfast.add_penalty_grad_(params, l1=1e-4, l2=1e-3),
        "prox_": lambda: regfast.prox_(params, 0.1, l1=1e-4, l2=1e-3),
    }


def _optimizer_cases() -> dict[str, list[tuple[str, object, str | None]]]:
    """Per optimizer op, (provider, maker of an optimizer over a param list, the regfast backend it is forced to)."""
    from regfast.optim import ProxAdamW, Proximal, ProxSGD

    sgd = dict(lr=0.01, momentum=0.9)
    return {
        "SGD step": [
            ("torch SGD(foreach)", lambda ps: torch.optim.SGD(ps, **sgd, foreach=True), None),
            ("regfast ProxSGD", lambda ps: ProxSGD(ps, **sgd, l1=1e-4), None),
            ("regfast ProxSGD[triton], launch stubbed", lambda ps: ProxSGD(ps, **sgd, l1=1e-4), "triton"),
            ("regfast Proximal(SGD(foreach))", lambda ps: Proximal(torch.optim.SGD(ps, **sgd, foreach=True), l1=1e-4),
             None),
        ],
        "AdamW step": [
            ("torch AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None),
            ("torch AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), None),
            ("regfast ProxAdamW", lambda ps: ProxAdamW(ps, lr=1e-3, l1=1e-4), None),
            ("regfast ProxAdamW(prox=lr)", lambda ps: ProxAdamW(ps, lr=1e-3, l1=1e-4, prox="lr"), None),
            ("regfast ProxAdamW[triton], launch stubbed", lambda ps: ProxAdamW(ps, lr=1e-3, l1=1e-4), "triton"),
        ],
    }


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: what ``Proximal`` adds to a step, alone."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self, closure=None):
        return None


def _proximal_rows(n_tensors: int, repeats: int, scattered: bool) -> list[dict]:
    """``prox_``, a step that does nothing, and ``Proximal`` around it, on the same tensors; the ``Proximal`` row
    also holds its own cost (``own_us``: its median less the step's) and that over the ``prox_``'s
    (``own_over_prox``)."""
    from regfast.optim import Proximal

    params = _params(n_tensors, scattered)
    inner = _NoStep(params)
    proximal = Proximal(inner, l1=1e-4)
    rows = []
    for name, fn in (("regfast prox_", lambda: regfast.prox_(params, 0.01, l1=1e-4)),
                     ("a step that does nothing", inner.step),
                     ("regfast Proximal(that step)", proximal.step)):
        rows.append(_row("Proximal own cost", n_tensors, name, _timings(fn, repeats, warmup=3),
                         rows[0]["median_us"] / 1e6 if rows else None))
    own = rows[2]["median_us"] - rows[1]["median_us"]
    rows[2].update(own_us=own, own_over_prox=own / rows[0]["median_us"])
    return rows


def _group_lasso_rows(n_tensors: int, repeats: int, scattered: bool) -> list[dict]:
    """The calls and steps with group lasso (each tensor one group, with l1; providers ending in "gl"), beside the
    naive loop that adds the group term's gradient ``group_lasso·√|g|·w_g/‖w_g‖`` to each grad; the speed-ups are
    over that loop."""
    from regfast.optim import ProxAdamW, ProxSGD

    hyper = dict(l1=1e-4, group_lasso=1e-3, groups="tensor")
    params = _params(n_tensors, scattered)

    def loop():
        with torch.no_grad():
            for p in params:
                p.grad.add_(p * (hyper["group_lasso"] * math.sqrt(p.numel()) / p.norm()))

    cases = [("naive loop (gradient)", lambda: loop),
             ("regfast add_penalty_grad_ gl", lambda: lambda: regfast.add_penalty_grad_(params, **hyper)),
             ("regfast prox_ gl", lambda: lambda: regfast.prox_(params, 0.01, **hyper)),
             ("regfast ProxSGD gl",
              lambda: ProxSGD(_params(n_tensors, scattered), lr=0.01, momentum=0.9, **hyper).step),
             ("regfast ProxAdamW gl", lambda: ProxAdamW(_params(n_tensors, scattered), lr=1e-3, **hyper).step),
             ("regfast ProxAdamW(prox=lr) gl",
              lambda: ProxAdamW(_params(n_tensors, scattered), lr=1e-3, prox="lr", **hyper).step)]
    rows = []
    for name, make in cases:
        rows.append(_row("group lasso", n_tensors, name, _timings(make(), repeats, warmup=3),
                         rows[0]["median_us"] / 1e6 if rows else None))
    return rows


def _row(op: str, n_tensors: int, name: str, seconds: list[float], base: float | None) -> dict:
    qs = statistics.quantiles(seconds, n=10)
    median = statistics.median(seconds)
    return {"op": op, "tensors": n_tensors, "provider": name, "median_us": median * 1e6, "p20_us": qs[1] * 1e6,
            "p80_us": qs[7] * 1e6, "speedup": (base or median) / median}


def _params(n_tensors: int, scattered: bool) -> list[torch.Tensor]:
    params = [torch.randn(1, requires_grad=True) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(1)
    if scattered:
        random.Random(n_tensors).shuffle(params)
    return params


def run(n_tensors: int, repeats: int, scattered: bool = False) -> list[dict]:
    torch.manual_seed(0)
    params = _params(n_tensors, scattered)
    providers: list[tuple[str, dict[str, object], str | None]] = [
        ("naive loop", _naive_cases(params), None),
        ("torch._foreach_*", _foreach_cases(params), None),
    ]
    for backend in ("cpp", "torch"):
        if _dispatch.unavailable_reason(backend, "cpu") is None:
            providers.append((f"regfast[{backend}]", _regfast_cases(params), backend))
    if _dispatch.unavailable_reason("triton", "cpu") is None:
        providers.append(("regfast[triton], launch stubbed", _regfast_cases(params), "triton"))
    rows = []
    for op in ("norms", "penalty", "penalty value", "add_penalty_grad_", "prox_"):
        base = None
        for name, cases, backend in providers:
            if op not in cases:
                continue
            saved = _stub_triton_launches() if backend == "triton" else []
            try:
                with _dispatch.forced_backend(backend or "auto"):
                    seconds = _timings(cases[op], repeats, warmup=3)
            finally:
                for module, attr, value in saved:
                    setattr(module, attr, value)
            rows.append(_row(op, n_tensors, name, seconds, base))
            base = base or rows[-1]["median_us"] / 1e6
    triton = _dispatch.unavailable_reason("triton", "cpu") is None
    for op, cases in _optimizer_cases().items():
        base = None
        for name, make, backend in cases:
            if backend == "triton" and not triton:
                continue
            saved = _stub_triton_launches() if backend == "triton" else []
            try:
                with _dispatch.forced_backend(backend or "auto"):
                    opt = make(_params(n_tensors, scattered))
                    seconds = _timings(opt.step, repeats, warmup=3)
            finally:
                for module, attr, value in saved:
                    setattr(module, attr, value)
            rows.append(_row(op, n_tensors, name, seconds, base))
            base = base or rows[-1]["median_us"] / 1e6
    rows.extend(_group_lasso_rows(n_tensors, repeats, scattered))
    rows.extend(_proximal_rows(n_tensors, repeats, scattered))
    grads = [p.grad for p in params]
    rows.append(_row("yardstick", n_tensors, "torch._foreach_add_(grads, params)",
                     _timings(lambda: torch._foreach_add_(grads, params), repeats, warmup=3), None))
    return rows


def _ratios(all_rows: list[dict]) -> list[str]:
    """For each (op, provider) measured at more than one size: the cost at the largest over the smallest."""
    lines = []
    by_key: dict[tuple[str, str], dict[int, float]] = {}
    for r in all_rows:
        by_key.setdefault((r["op"], r["provider"]), {})[r["tensors"]] = r["median_us"]
    for (op, provider), sizes in by_key.items():
        if len(sizes) > 1:
            lo, hi = min(sizes), max(sizes)
            lines.append(f"{op:<18} {provider:<42} {hi}/{lo} tensors: {sizes[hi] / sizes[lo]:6.1f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[148, 2000, 20000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--scattered", action="store_true", help="list the tensors in a shuffled order")
    parser.add_argument("--json", action="store_true", help="one JSON row per measurement instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, regfast {regfast.__version__}, python {sys.version.split()[0]}; "
          f"one-element tensors{', listed in a shuffled order' if args.scattered else ''}, 1 thread", file=sys.stderr)
    all_rows = []
    for n in args.tensors:
        rows = run(n, args.repeats, args.scattered)
        all_rows.extend(rows)
        if args.json:
            for row in rows:
                print(json.dumps(row))
            continue
        print(f"\n{n} tensors        {'provider':<42} {'median us (p20-p80)':>26} {'speed-up':>9}")
        for r in rows:
            spread = f"{r['median_us']:.0f} ({r['p20_us']:.0f}-{r['p80_us']:.0f})"
            own = f"  own cost {r['own_us']:.0f} us, {r['own_over_prox']:.2f}x prox_" if "own_us" in r else ""
            print(f"{r['op']:<18} {r['provider']:<42} {spread:>26} {r['speedup']:>8.2f}x{own}")
    if not args.json and len(args.tensors) > 1:
        print("\ncost ratio, largest over smallest size")
        print("\n".join(_ratios(all_rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
