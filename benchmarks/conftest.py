"""Options of the pytest-benchmark cases: ``pytest benchmarks/ --benchmark-only [--bench-full] [--bench-device D]``.

The cases are those of ``python -m regfast.bench`` (quick by default, ``--bench-full`` for the
full run), one test per (workload, dtype, op, provider).
"""

import pytest
import torch

from regfast.bench.suite import default_config, dtype_name, plan


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("regfast.bench")
    group.addoption("--bench-full", action="store_true",
                    help="the cases of python -m regfast.bench --full (full size, bfloat16, torch.compile)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def bench_config(config: pytest.Config):
    """The suite's configuration for this pytest run."""
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return default_config(torch.device(name), full=config.getoption("--bench-full"))


@pytest.fixture(scope="session")
def config(pytestconfig: pytest.Config):
    """The suite's configuration (device, workloads, dtypes...) of this run."""
    return bench_config(pytestconfig)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = plan(bench_config(metafunc.config))
        ids = [f"{c.workload}-{dtype_name(c.dtype)}-{c.op}-{c.provider.name}".replace(" ", "") for c in cases]
        metafunc.parametrize("case", cases, ids=ids)
