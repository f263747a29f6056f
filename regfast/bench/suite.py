"""Running the cases: one per (workload, dtype, operation, provider), each checked, then timed.

For each case the parameters and their gradients are refilled with the same random values
(seeded per tensor: ``std`` 0.02 for the weights, 1e-4 for the gradients, never zeros), the
provider is built, and its first call is compared with the baseline's first call: the returned
values, and the change it made to the gradients or the weights. Then the call is timed
(:func:`regfast.bench.timing.measure`). A provider that cannot run here, fails, or runs past the
time budget gives a row that says so; the suite itself never stops on one.

``torch.compile`` cases run after all others (compiling takes seconds to minutes per case), so
that a time budget cuts them first.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .._dispatch import forced_backend
from .providers import OPS, Provider, providers
from .timing import Timing, measure, synchronize
from .workloads import WORKLOADS, Shapes, numel, scaled

__all__ = ["Case", "Config", "Result", "State", "TOLERANCE", "compare", "default_config", "first_call",
           "forced_backend", "outcome", "plan", "reference_outcome", "run", "skip_reason"]

PARAM_STD = 0.02
GRAD_STD = 1e-4

# A provider agrees with the baseline when the relative difference of the values, and of the
# changes made to grads or weights, is under this. Changes are measured against the target's
# own rounding (eps · its norm), so that a change under a dtype's resolution is not a failure.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}

# A quick CPU run shrinks each workload to about this many elements.
QUICK_CPU_ELEMENTS = 2_000_000

# Dynamo unrolls the loop: past this many tensors, compiling takes minutes.
MAX_COMPILE_TENSORS = 500


@dataclass
class Config:
    """What to run: ``workloads`` maps a name to its (already scaled) shapes."""

    device: torch.device
    workloads: dict[str, Shapes]
    dtypes: list[torch.dtype]
    ops: list[str]
    compile: bool = False
    warmup: int = 2
    min_time: float = 0.2
    min_reps: int = 5
    max_reps: int = 200
    budget: float | None = None
    seed: int = 0


def default_config(device: torch.device, full: bool = False, workloads: list[str] | None = None,
                   dtypes: list[torch.dtype] | None = None, ops: list[str] | None = None, scale: float | None = None,
                   compile: bool | None = None, min_time: float | None = None,
                   budget: float | None = None) -> Config:
    """The quick (default) or full run, narrowed by the given filters.

    Quick: float32; on the CPU each workload shrunk (dim 0 of every tensor) to about
    :data:`QUICK_CPU_ELEMENTS` elements; no ``torch.compile``; 0.1 s of timed calls per case.
    Full: float32 and bfloat16, full size, ``torch.compile``, 0.2 s per case.
    """
    chosen = {}
    for name in workloads or WORKLOADS:
        shapes = WORKLOADS[name]()
        factor = scale
        if factor is None:
            factor = min(1.0, QUICK_CPU_ELEMENTS / numel(shapes)) if device.type == "cpu" and not full else 1.0
        chosen[name] = scaled(shapes, factor)
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16] if full else [torch.float32]
    if min_time is None:
        min_time = 0.2 if full else 0.1
    return Config(device, chosen, dtypes, list(ops or OPS), compile=full if compile is None else compile,
                  warmup=3 if full else 2, min_time=min_time, budget=budget)


@dataclass(frozen=True)
class Case:
    """One provider of one operation on one (workload, dtype)."""

    workload: str
    dtype: torch.dtype
    op: str
    provider: Provider
    baseline: Provider


@dataclass
class Result:
    """One row of results (see :data:`regfast.bench.report.COLUMNS`); times in ms, bandwidth in GB/s."""

    workload: str
    dtype: str
    op: str
    provider: str
    family: str
    backend: str
    tensors: int
    elements: int
    bytes_moved: int
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int | None = None
    host_ms: float | None = None
    peak_extra_mb: float | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    baseline: str = ""
    baseline_ms: float | None = None
    speedup: float | None = None
    check_err: float | None = None
    note: str = ""


class State:
    """The parameters of one (workload, dtype) on a device, each with a ``.grad``, refilled on demand."""

    def __init__(self, shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 workload: str = "") -> None:
        self.workload, self.dtype, self.device, self.seed = workload, dtype, device, seed
        self.params = [torch.empty(shape, dtype=dtype, device=device, requires_grad=True) for _, shape in shapes]
        self._gen = torch.Generator(device=device)
        self.reset()

    def _fill_(self, t: Tensor, index: int, is_grad: bool) -> Tensor:
        # One seed per tensor: any tensor's start value can be rebuilt alone, without the others'.
        self._gen.manual_seed(self.seed * 1_000_003 + 2 * index + int(is_grad))
        return t.normal_(0.0, GRAD_STD if is_grad else PARAM_STD, generator=self._gen)

    def initial(self, index: int, is_grad: bool) -> Tensor:
        """A new tensor holding the start value of param ``index`` (or of its grad)."""
        return self._fill_(torch.empty_like(self.params[index], requires_grad=False), index, is_grad)

    def reset(self) -> None:
        """Refill every param and grad with its start value (a replaced ``.grad`` is put back)."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self._fill_(p, i, False)
                if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                    p.grad = torch.empty_like(p)
                self._fill_(p.grad, i, True)


@dataclass
class Outcome:
    """A call's returned values (float64, CPU) and the change it made to its op's target, per tensor."""

    values: Tensor
    deltas: list[Tensor]
    scale: float


def _values(returned: object) -> Tensor:
    items = returned if isinstance(returned, tuple) else (returned,)
    tensors = [t.detach().to("cpu", torch.float64).reshape(()) for t in items if isinstance(t, Tensor)]
    return torch.stack(tensors) if tensors else torch.zeros(0, dtype=torch.float64)


def _deltas(state: State, target: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(change, start value) of each target tensor, in float32, one tensor at a time."""
    if not target:
        return
    is_grad = target == "grads"
    for i, p in enumerate(state.params):
        now = p.grad if is_grad else p.detach()
        start = state.initial(i, is_grad).float()
        yield now.float() - start, start


def outcome(state: State, target: str, returned: object) -> Outcome:
    """What the first call of a provider did, kept whole: the reference the others are compared with."""
    deltas, scale_sq = [], 0.0
    for delta, start in _deltas(state, target):
        deltas.append(delta)
        scale_sq += start.double().square().sum().item()
    return Outcome(_values(returned), deltas, math.sqrt(scale_sq))


def compare(state: State, target: str, returned: object, reference: Outcome) -> float:
    """The relative difference between this call's outcome and ``reference`` (the larger of values and changes)."""
    eps = torch.finfo(state.dtype).eps
    values = _values(returned)
    err = 0.0
    if values.numel() and reference.values.numel():
        if values.numel() != reference.values.numel():
            return math.inf
        err = ((values - reference.values).abs() / reference.values.abs().clamp_min(1e-30)).max().item()
    if reference.deltas:
        diff_sq = ref_sq = 0.0
        for (delta, _), ref in zip(_deltas(state, target), reference.deltas):
            diff_sq += (delta - ref).double().square().sum().item()
            ref_sq += ref.double().square().sum().item()
        err = max(err, math.sqrt(diff_sq) / (math.sqrt(ref_sq) + eps * reference.scale))
    return err


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``float32``."""
    return str(dtype).removeprefix("torch.")


def plan(config: Config) -> list[Case]:
    """Every case of ``config`` in run order: all but the compiled ones first, each op's baseline first."""
    cases: list[list[Case]] = [[], []]
    for workload in config.workloads:
        for dtype in config.dtypes:
            for op in config.ops:
                listed = [p for p in providers(op) if config.device.type in p.devices]
                for provider in listed:
                    cases[provider.family == "compile"].append(Case(workload, dtype, op, provider, listed[0]))
    # Compiled float32 cases first: a time budget then cuts the other dtypes' compiles first.
    return cases[0] + sorted(cases[1], key=lambda case: config.dtypes.index(case.dtype))


def skip_reason(case: Case, config: Config) -> str | None:
    """Why ``case`` does not run under ``config`` here, or None."""
    if case.provider.family == "compile":
        if not config.compile:
            return "torch.compile runs only in --full runs (or with --compile)"
        count = len(config.workloads[case.workload])
        if count > MAX_COMPILE_TENSORS:
            return f"not compiled: dynamo unrolls the loop over {count} tensors (minutes)"
    return case.provider.unavailable(config.device)


def _new_result(case: Case, shapes: Shapes) -> Result:
    elements = numel(shapes)
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    return Result(case.workload, dtype_name(case.dtype), case.op, case.provider.name, case.provider.family,
                  case.provider.backend or "", len(shapes), elements, OPS[case.op].passes * elements * itemsize,
                  baseline=case.baseline.name, note=case.provider.note)


def first_call(provider: Provider, state: State) -> tuple[Callable[[], object], object]:
    """Refill ``state``, build the provider's callable and call it once: (callable, what it returned)."""
    state.reset()
    fn = provider.build(state.params, state.device)
    returned = fn()
    synchronize(state.device)
    return fn, returned


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def run_case(case: Case, state: State, config: Config, reference: Outcome | None, result: Result,
             copy_gbps: float | None = None) -> Outcome | None:
    """Check and time one case into ``result``; for the baseline, return its outcome (the reference)."""
    target = OPS[case.op].target
    own = fn = None
    try:
        with forced_backend(case.provider.backend):
            fn, returned = first_call(case.provider, state)
            if case.provider is case.baseline:
                own = outcome(state, target, returned)
            elif case.provider.comparable and reference is not None:
                result.check_err = compare(state, target, returned, reference)
                if not result.check_err <= TOLERANCE[state.dtype]:
                    result.status = "mismatch"
            del returned
            timing = measure(fn, config.device, warmup=config.warmup, min_time=config.min_time,
                             min_reps=config.min_reps, max_reps=config.max_reps)
    except Exception as exc:  # one provider's failure is a row, not the end of the run
        result.status, result.note = "error", _error(exc)
        fn = None
        _release(config.device)
        return own
    finally:
        del fn
        if case.provider.family == "compile":
            torch._dynamo.reset()
    _fill_timing(result, timing, copy_gbps)
    return own


def _fill_timing(result: Result, timing: Timing, copy_gbps: float | None) -> None:
    result.median_ms, result.p20_ms, result.p80_ms, result.reps = (timing.median_ms, timing.p20_ms, timing.p80_ms,
                                                                   timing.reps)
    result.host_ms = timing.host_ms
    if timing.peak_extra_bytes is not None:
        result.peak_extra_mb = timing.peak_extra_bytes / 2**20
    result.gbps = result.bytes_moved / (timing.median_ms * 1e-3) / 1e9
    if copy_gbps:
        result.pct_copy_bw = 100 * result.gbps / copy_gbps


def reference_outcome(case: Case, state: State) -> Outcome | None:
    """The baseline's first-call outcome for ``case``'s group, computed without timing (None if it fails)."""
    try:
        with forced_backend(case.baseline.backend):
            _, returned = first_call(case.baseline, state)
            return outcome(state, OPS[case.op].target, returned)
    except Exception:  # the compared case then reports no check
        return None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(config: Config, on_result: Callable[[Result], None] | None = None,
        on_start: Callable[[int, int, Case], None] | None = None, copy_gbps: float | None = None) -> list[Result]:
    """Run every case of ``config``; ``on_start(i, n, case)`` before each, ``on_result(row)`` after each.

    ``copy_gbps`` (the device's copy bandwidth) gives each row its percent of it.
    """
    cases = plan(config)
    started = time.perf_counter()
    results: list[Result] = []
    state: State | None = None
    # Only the current group's reference is kept: it can be as big as the params in float32.
    reference: tuple[tuple[str, torch.dtype, str], Outcome | None] | None = None
    baseline_ms: dict[tuple[str, torch.dtype, str], float | None] = {}
    for i, case in enumerate(cases):
        if on_start is not None:
            on_start(i, len(cases), case)
        group = (case.workload, case.dtype, case.op)
        result = _new_result(case, config.workloads[case.workload])
        if config.budget is not None and time.perf_counter() - started > config.budget:
            reason = f"time budget of {config.budget:g} s used up"
        else:
            reason = skip_reason(case, config)
        if reason:
            result.status, result.note = "skipped", reason
        else:
            if state is None or (state.workload, state.dtype) != (case.workload, case.dtype):
                state = reference = None
                _release(config.device)
                state = State(config.workloads[case.workload], case.dtype, config.device, config.seed,
                              workload=case.workload)
            if case.provider is not case.baseline and (reference is None or reference[0] != group):
                reference = (group, reference_outcome(case, state))
            own = run_case(case, state, config, reference[1] if reference else None, result, copy_gbps)
            if case.provider is case.baseline:
                reference = (group, own)
                baseline_ms[group] = result.median_ms
        base = baseline_ms.get(group)
        result.baseline_ms = base
        if base and result.median_ms:
            result.speedup = base / result.median_ms
        results.append(result)
        if on_result is not None:
            on_result(result)
    state = reference = None
    _release(config.device)
    return results
