"""The CUDA launcher's device tables are cached on their contents (csrc/table_cache.h, csrc/cuda_tables.cpp).

On the host: the cache's rules (hits, misses, eviction, tables kept for captured graphs, refill of a table first
copied in a capture) run in tests/table_cache_check.cpp against the header the extension compiles. On a GPU: a
repeated call copies no table, a call captured without a warm-up replays correctly and is refilled before its
first eager use, and a captured optimizer step replays as the reference steps.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_close, make_params, use_backend

import regfast
from regfast import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cache_rules_on_the_host(tmp_path):
    exe = tmp_path / "table_cache_check"
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "table_cache_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "OK" and len(lines) == 21 and all(line.startswith("ok: ") for line in lines[:-1]), run.stdout


def _cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _ext.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    from regfast import _C

    return _C


def _h2d_copies(fn) -> int:
    """Host-to-device copies the profiler sees while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "HtoD" in e.name)


@pytest.mark.parametrize("call", ["norms", "add_penalty_grad_", "prox_", "prox_ groups"])
def test_a_repeated_call_copies_no_table(call):
    C = _cuda_ext()
    params = [torch.nn.Parameter(t) for t in make_params([(300, 7), (70000,), (3,), ()], device="cuda", seed=1)]
    for p in params:
        p.grad = torch.randn_like(p)
    lr = torch.tensor(0.01, device="cuda")
    run = {
        "norms": lambda: regfast.norms(params),
        "add_penalty_grad_": lambda: regfast.add_penalty_grad_(params, l1=0.1, l2=0.2),
        "prox_": lambda: regfast.prox_(params, lr, l1=0.1, l2=0.2),
        "prox_ groups": lambda: regfast.prox_(params, lr, l1=0.1, group_lasso=0.3, groups="col"),
    }[call]
    with use_backend("cuda"):
        run()
        entries, _, hits, misses = C.cuda_table_cache()
        assert _h2d_copies(run) == 0
        after = C.cuda_table_cache()
    assert after[3] == misses and after[2] > hits and after[0] == entries


def test_a_call_captured_without_warm_up_replays_and_is_refilled():
    C = _cuda_ext()
    shapes = [(513, 9), (65536 + 5,), (1,)]
    params = make_params(shapes, device="cuda", seed=2)
    expected = [p.clone() for p in params]
    lr = torch.tensor(0.003, device="cuda")
    hyper = dict(l1=0.5, l2=0.25, group_lasso=0.1, groups="row")

    def reference(steps):
        with use_backend("torch"):
            for _ in range(steps):
                regfast.prox_(expected, lr, **hyper)
        for p, e in zip(params, expected):
            assert_close(p, e, torch.float32)

    kept = C.cuda_table_cache()[1]
    with use_backend("cuda"):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # this list's tables were never built: they are copied inside the graph
            regfast.prox_(params, lr, **hyper)
        assert C.cuda_table_cache()[1] > kept
        # Eagerly before any replay: the tables the capture made hold nothing yet and must be refilled first.
        regfast.prox_(params, lr, **hyper)
        reference(1)
        for _ in range(2):
            graph.replay()
        reference(2)
