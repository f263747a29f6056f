"""The cases of ``python -m regfast.bench`` under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each case is first checked against the naive loop (as the suite does), then timed by
pytest-benchmark (with a synchronize after each call on CUDA). ``extra_info`` holds the bytes
the operation must move and the effective bandwidth at the median.
"""

import gc

import pytest
import torch

from regfast.bench.providers import OPS
from regfast.bench.suite import (
    TOLERANCE,
    Case,
    Config,
    State,
    compare,
    dtype_name,
    first_call,
    forced_backend,
    reference_outcome,
    skip_reason,
)
from regfast.bench.timing import synchronize
from regfast.bench.workloads import numel


@pytest.fixture(scope="session")
def states():
    """The state of the current (workload, dtype): one at a time, as it can be as big as a model."""
    held: dict[tuple[str, torch.dtype], State] = {}

    def get(config: Config, case: Case) -> State:
        key = (case.workload, case.dtype)
        if key not in held:
            held.clear()
            gc.collect()
            if config.device.type == "cuda":
                torch.cuda.empty_cache()
            held[key] = State(config.workloads[case.workload], case.dtype, config.device, config.seed, case.workload)
        return held[key]

    yield get
    held.clear()


def test_case(benchmark, case: Case, config, states):
    reason = skip_reason(case, config)
    if reason:
        pytest.skip(reason)
    state = states(config, case)
    op = OPS[case.op]
    reference = None if case.provider is case.baseline else reference_outcome(case, state)
    with forced_backend(case.provider.backend):
        fn, returned = first_call(case.provider, state)
        if reference is not None and case.provider.comparable:
            err = compare(state, op.target, returned, reference)
            assert err <= TOLERANCE[case.dtype], f"differs from {case.baseline.name} by {err:.2e}"
        del returned
        for _ in range(config.warmup):
            fn()
        synchronize(config.device)

        def timed() -> None:
            fn()
            synchronize(config.device)

        elements = numel(config.workloads[case.workload])
        bytes_moved = op.passes * elements * torch.empty((), dtype=case.dtype).element_size()
        benchmark.group = f"{case.workload} {dtype_name(case.dtype)} {case.op}"
        benchmark.extra_info.update(workload=case.workload, dtype=dtype_name(case.dtype), op=case.op,
                                    provider=case.provider.name, backend=case.provider.backend or "",
                                    device=config.device.type, elements=elements, bytes_moved=bytes_moved)
        benchmark(timed)
    benchmark.extra_info["gbps"] = bytes_moved / benchmark.stats.stats.median / 1e9
