"""The benchmark suite on a tiny workload on the CPU: every provider computes the same thing, the
check catches one that does not, and the CSV, tables and command line produce what they promise."""

import math

import pytest
import torch

import regfast
from regfast import _ext
from regfast.bench import providers as P
from regfast.bench import report
from regfast.bench.__main__ import main
from regfast.bench.suite import TOLERANCE, Config, Provider, State, compare, outcome, run
from regfast.bench.workloads import WORKLOADS, numel, scaled

TINY = [("w1", (33, 17)), ("b1", (17,)), ("conv", (4, 3, 3, 3)), ("one", (1,)), ("w2", (129, 2))]
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_results():
    config = Config(DEVICE, {"tiny": TINY}, [torch.float32, torch.bfloat16], list(P.OPS),
                    warmup=1, min_time=0.0, min_reps=3, max_reps=3)
    return run(config, copy_gbps=10.0)


@pytest.mark.parametrize("name, tensors, params", [
    ("gpt2-small", 148, 124_439_808), ("llama-1b", 147, 953_223_168),
    ("resnet50", 161, 25_557_032), ("many-small", 2000, 2_048_000),
])
def test_workload_shapes(name, tensors, params):
    shapes = WORKLOADS[name]()
    assert len(shapes) == tensors
    assert numel(shapes) == params
    assert len({n for n, _ in shapes}) == tensors
    small = scaled(shapes, 0.01)
    assert len(small) == tensors and numel(small) < params
    assert all(s[1:] == t[1:] for (_, s), (_, t) in zip(small, shapes))


def test_every_provider_agrees_with_the_naive_loop(tiny_results):
    bad = [(r.dtype, r.op, r.provider, r.status, r.check_err, r.note) for r in tiny_results
           if r.status not in ("ok", "skipped")]
    assert not bad
    for dtype in ("float32", "bfloat16"):
        for op in P.OPS:
            rows = [r for r in tiny_results if r.dtype == dtype and r.op == op]
            baseline = rows[0]
            assert baseline.status == "ok" and baseline.provider == baseline.baseline
            checked = [r for r in rows if r.check_err is not None]
            # The torch backend of regfast runs everywhere, so every op has a checked regfast row.
            assert any(r.family == "regfast" and r.backend == "torch" for r in checked), (dtype, op)
            for r in rows:
                if r.status == "skipped":
                    assert r.note
                else:
                    assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms and r.reps == 3
                    assert r.speedup == pytest.approx(baseline.median_ms / r.median_ms)
                    assert r.gbps > 0 and r.pct_copy_bw == pytest.approx(10 * r.gbps)


def test_penalty_values_of_every_loop_match_regfast():
    ws = [t.requires_grad_() for t in
          (torch.randn(s, dtype=torch.float64) for _, s in TINY)]
    expected = sum(P.L1 * w.abs().sum().item() + P.L2 * w.square().sum().item() for w in ws)
    values = [P.penalty_abs_square(ws), P.penalty_torch_norm(ws), P.penalty_foreach(ws),
              regfast.penalty(ws, l1=P.L1, l2=P.L2)]
    for value in values:
        assert value.item() == pytest.approx(expected, rel=1e-12)
    l1, l2sq = P.norms_total(ws)
    assert l1.item() == pytest.approx(sum(w.abs().sum().item() for w in ws), rel=1e-12)
    assert l2sq.item() == pytest.approx(sum(w.square().sum().item() for w in ws), rel=1e-12)


def _grad_l1_only(ws):
    for w in ws:
        w.grad.add_(torch.sign(w), alpha=P.L1)


def _prox_l1_only(ws):
    for w in ws:
        w.copy_(torch.sign(w) * torch.clamp(w.abs() - P.PROX_LR * P.L1, min=0))


@pytest.mark.parametrize("target, right_fn, wrong_fn, dtype", [
    ("grads", P.grad_loop, _grad_l1_only, torch.float32),
    ("grads", P.grad_loop, _grad_l1_only, torch.bfloat16),
    ("params", P.prox_loop, _prox_l1_only, torch.float32),
])
def test_check_catches_a_provider_that_computes_something_else(target, right_fn, wrong_fn, dtype):
    state = State(TINY, dtype, DEVICE, seed=3)
    right = Provider("right", "naive", P._no_grad(right_fn))
    wrong = Provider("l2 term missing", "naive", P._no_grad(wrong_fn))
    state.reset()
    reference = outcome(state, target, right.build(state.params, DEVICE)())
    state.reset()
    assert compare(state, target, P._no_grad(P.grad_foreach if target == "grads" else P.prox_foreach)(
        state.params, DEVICE)(), reference) <= TOLERANCE[dtype]
    state.reset()
    assert compare(state, target, wrong.build(state.params, DEVICE)(), reference) > TOLERANCE[dtype]


def test_check_compares_returned_values():
    state = State(TINY, torch.float32, DEVICE)
    assert compare(state, "", (torch.tensor(1.0), torch.tensor(2.0)),
                   outcome(state, "", (torch.tensor(1.0), torch.tensor(2.5)))) == pytest.approx(0.2)


def test_state_refills_the_same_values():
    state = State(TINY, torch.float32, DEVICE, seed=5)
    first = [p.detach().clone() for p in state.params]
    grads = [p.grad.clone() for p in state.params]
    with torch.no_grad():
        for p in state.params:
            p.mul_(3)
            p.grad = None
    state.reset()
    for p, w, g in zip(state.params, first, grads):
        assert torch.equal(p.detach(), w) and torch.equal(p.grad, g)
        assert p.detach().abs().min() > 0 or p.numel() == 0
    assert torch.equal(state.initial(0, True), grads[0])


def test_csv_markdown_and_table(tiny_results, tmp_path):
    path = tmp_path / "cpu-test.csv"
    writer = report.CsvWriter(path, report.metadata(DEVICE, "quick", 10.0))
    for r in tiny_results:
        writer.write(r)
    writer.close()
    with path.open() as f:
        header = f.readline().strip().split(",")
    assert header == report.COLUMNS
    for column in ("device", "device_name", "torch", "triton", "regfast", "commit", "timestamp", "median_ms",
                   "p20_ms", "p80_ms", "host_ms", "peak_extra_mb", "gbps", "pct_copy_bw", "speedup"):
        assert column in header
    rows = report.read_csv(path)
    assert len(rows) == len(tiny_results)
    assert {r["device"] for r in rows} == {"cpu"} and {r["torch"] for r in rows} == {torch.__version__}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(math.isfinite(float(r["median_ms"])) for r in ok)
    text = report.markdown(rows)
    for op in P.OPS:
        assert f"### {op}" in text
    assert "| tiny | float32 | regfast.penalty[torch] |" in text
    table = report.table(tiny_results)
    assert "regfast.prox_[torch]" in table and "naive ms" in table


def test_command_line_writes_csv_and_renders_markdown(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        status = main(["--device", "cpu", "--workload", "resnet50", "--op", "norms", "prox_", "--scale", "0.02",
                       "--min-time", "0", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0, out
    rows = report.read_csv(tmp_path / "cpu-quick.csv")
    assert {r["op"] for r in rows} == {"norms", "prox_"}
    assert {r["workload"] for r in rows} == {"resnet50"} and {r["tensors"] for r in rows} == {"161"}
    assert "regfast.norms[torch]" in out
    assert main(["--markdown", str(tmp_path / "cpu-quick.csv")]) == 0
    assert "### prox_" in capsys.readouterr().out
    assert main(["--headline", str(tmp_path / "cpu-quick.csv")]) == 0
    assert "regfast.prox_[" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [[], ["--scattered"]], ids=["in-order", "scattered"])
def test_host_overhead_script_runs_every_provider(flags):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--tensors", "7", "--repeats", "3", "--json", *flags],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    providers = {r["provider"] for r in rows}
    assert {"naive loop", "torch._foreach_*", "regfast[torch]", "torch AdamW(fused)", "regfast ProxAdamW",
            "regfast Proximal(SGD(foreach))", "torch._foreach_add_(grads, params)"} <= providers
    assert {r["op"] for r in rows} == {"norms", "penalty", "penalty value", "add_penalty_grad_", "prox_", "SGD step",
                                       "AdamW step", "group lasso", "Proximal own cost", "yardstick"}
    assert all(r["median_us"] > 0 and r["p20_us"] <= r["p80_us"] for r in rows)
    own = [r for r in rows if "own_us" in r]
    assert [r["provider"] for r in own] == ["regfast Proximal(that step)"]
    medians = {r["provider"]: r["median_us"] for r in rows}
    step, prox = medians["a step that does nothing"], medians["regfast prox_"]
    assert own[0]["own_us"] == own[0]["median_us"] - step and own[0]["own_over_prox"] == own[0]["own_us"] / prox


@pytest.mark.skipif(_ext._C is None, reason="the cpp backend is not built")
def test_cpu_bandwidth_script_measures_every_op_dtype_and_loop(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_bandwidth.py"
    out = tmp_path / "rows.jsonl"
    isas = sorted({"baseline", _ext._C.cpu_isa()})  # every instruction set this CPU runs
    subprocess.run([sys.executable, str(script), "--scale", "0.002", "--repeats", "2", "--threads", "1", "2",
                    "--dtypes", "float32", "bfloat16", "--isa", *isas, "--out", str(out)], capture_output=True,
                   text=True, check=True, timeout=900)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {(r["op"], r.get("dtype"), r["threads"], r.get("isa")) for r in rows}
    for threads in (1, 2):
        assert ("copy", "float32", threads, None) in ops
        for dtype in ("float32", "bfloat16"):
            for op in ("norms", "penalty l1", "penalty_backward l2", "add_penalty_grad_ l1+l2", "prox_ l1",
                       "add_penalty_grad_ group_lasso col", "prox_ group_lasso tensor", "ProxSGD step (momentum, l1)",
                       "ProxAdamW step (l1)", "ProxSGD step (momentum, l1, group_lasso row)",
                       "ProxAdamW step (l1, group_lasso col, prox preconditioned)"):
                for isa in isas:
                    assert (op, dtype, threads, isa) in ops, (op, dtype, threads, isa)
    assert all(r["of_bound"] > 0 for r in rows if "of_bound" in r)
    loops = [r for r in rows if r["op"].startswith("loop vs regfast")]
    assert len(loops) == 2 * 5 and all(r["speedup"] > 0 for r in loops)


def test_readme_headline_tables_match_their_results_files():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"<!-- headline: (\S+) -->\n(.*?)<!-- /headline -->", readme, flags=re.S)
    assert blocks, "the README has no headline table"
    for csv_path, table in blocks:
        expected = report.headline(report.read_csv(root / csv_path), markdown=True)
        assert table.strip() == expected.strip(), f"regenerate the README table of {csv_path}"
