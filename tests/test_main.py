"""The main job, ``python -m regfast``, at a small scale: it runs, and the three rows agree with the loop."""

import subprocess
import sys

import pytest

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
