"""The main job, ``python -m regfast``, at a small scale: it runs, and the three rows agree with the loop."""

import importlib
import subprocess
import sys

import pytest
import torch

from regfast.__main__ import main


@pytest.mark.parametrize("argv", [["--scale", "0.002", "--repeat", "2"],
                                  ["--scale", "0.01", "--repeat", "1", "--workload", "resnet50", "--dtype", "float64"]])
def test_main_job_agrees_with_the_loop(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("naive loop", "regfast.penalty", "regfast.add_"))]
    assert len(rows) == 3 and all(" yes " in row for row in rows), out
    assert "Backends (REGFAST_BACKEND forces one):" in out


def test_main_job_as_a_module():
    done = subprocess.run([sys.executable, "-m", "regfast", "--scale", "0.001", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "regfast.add_penalty_grad_" in done.stdout


@pytest.mark.parametrize("module, argv, message", [
    ("regfast", ["--repeat", "0"], "--repeat: '0' must be at least 1"),
    ("regfast", ["--scale", "nan"], "--scale: 'nan' is not finite"),
    ("regfast", ["--scale", "-1"], "--scale: '-1' must be > 0"),
    ("regfast", ["--l1", "-0.1"], "--l1: '-0.1' must be >= 0"),
    ("regfast", ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    ("regfast", ["--device", "banana"], "--device: 'banana' is not a device"),
    ("regfast.bench", ["--threads", "0"], "--threads: '0' must be at least 1"),
    ("regfast.bench", ["--budget", "-5"], "--budget: '-5' must be > 0"),
    ("regfast.bench", ["--min-time", "abc"], "--min-time: 'abc' is not a number"),
    ("regfast.bench", ["--markdown", "missing.csv"], "--markdown: 'missing.csv': no such file"),
])
def test_bad_option_values_are_usage_errors(module, argv, message, capsys):
    main = importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err and "Traceback" not in err
