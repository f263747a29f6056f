"""The CUDA kernels' host-device code run on the CPU: the optimizer steps' element math against torch's CUDA
formulas, and the group cursors against the divisions they replace.

csrc/optim_math.h holds the per-element SGD and AdamW steps the CUDA kernels run; it compiles for the host
too. tests/cuda_math_check.cpp runs those functions against torch's foreach SGD / AdamW written as torch's CUDA
kernels compute them (one rounding per op, the fmas of pointwise_op_impl and of nvcc's contraction), float32 and
float64, several steps, NaN / ±inf / ±0 / subnormals among the values: same bits. It is built with the
extension's host flags (no contraction; the kernels compile with -fmad=false, which test_cuda_compile.py checks
on their PTX). The formulas it writes down are checked here against the sources of the installed torch, so
that a torch that changes them fails this test instead of silently leaving the claim behind.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH = Path(torch.__file__).resolve().parent
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_element_math_is_torchs_cuda_foreach_step(tmp_path):
    exe = tmp_path / "cuda_math_check"
    subprocess.run(["g++", *FLAGS, f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "cuda_math_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "OK"
    cases = [line for line in lines if line.startswith(("sgd ", "adamw "))]
    assert len(cases) == 11 and all(line.endswith("float 0, double 0 differ") for line in cases), run.stdout
    # The comparison is sharp enough to see one rounding: the CPU's second-moment formula differs somewhere.
    assert int(re.search(r"otherwise: (\d+)", run.stdout).group(1)) > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_group_cursors_find_every_elements_group(tmp_path):
    """csrc/group_cursor.h's cursors, walked as the group kernels walk them (every thread of a block, vectors then
    the scalar tail, a group's pieces), give each element's group and position as i / inner % ngroups and
    i % inner would: layouts [outer, ngroups, inner] with sizes around the block and vector widths."""
    exe = tmp_path / "group_cursor_check"
    subprocess.run(["g++", *FLAGS, "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "group_cursor_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "OK" and int(lines[0].split()[0]) > 10**9, run.stdout


def _source(relative: str) -> str:
    path = TORCH / relative
    if not path.exists():
        pytest.skip(f"torch {torch.__version__} ships no {relative}")
    return re.sub(r"\s+", " ", path.read_text())


@pytest.mark.parametrize("relative, formulas", [
    # a + alpha·b: _foreach_add with alpha (SGD's weight decay, momentum and update).
    ("include/ATen/native/cuda/ForeachFunctors.cuh", ["alpha * static_cast<opmath_t>(r_args[1][ii])"]),
    # _foreach_addcmul_ / _foreach_addcdiv_.
    ("include/ATen/native/cuda/DeviceAddCmulCdiv.cuh",
     ["return std::fma(tensor1, tensor2, input);", "return input + op(tensor1, tensor2);",
      "return std::fma(alpha, op(tensor1, tensor2), input);"]),
    ("include/ATen/native/Lerp.h",
     ["std::abs(weight) < scalar_t(0.5)",
      "? self + weight * (end - self) : end - (end - self) * (opmath_t(1) - weight);"]),
    ("optim/sgd.py",
     ["torch._foreach_add( # type: ignore[assignment] device_grads, device_params, alpha=weight_decay )",
      "torch._foreach_mul_(bufs, momentum) torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)",
      "torch._foreach_add_(device_grads, bufs, alpha=momentum)",
      "torch._foreach_add_(device_params, device_grads, alpha=-lr)"]),
    ("optim/adam.py",
     ["torch._foreach_mul_(device_params, 1 - lr * weight_decay)",
      "torch._foreach_lerp_( device_exp_avgs, device_grads, cast(float, 1 - device_beta1) )",
      "torch._foreach_mul_(device_exp_avg_sqs, beta2)",
      "torch._foreach_addcmul_( device_exp_avg_sqs, scaled_device_grads, device_grads, value )",
      "1 - beta1 ** _get_value(step) for step in device_state_steps",
      "step_size = _stack_if_compiling([(lr / bc) * -1 for bc in bias_correction1])",
      "bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]",
      "torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt) torch._foreach_add_(exp_avg_sq_sqrt, eps) "
      "torch._foreach_addcdiv_( device_params, device_exp_avgs, exp_avg_sq_sqrt, step_size,"]),
])
def test_torch_still_computes_what_the_check_reproduces(relative, formulas):
    text = _source(relative)
    missing = [f for f in formulas if re.sub(r"\s+", " ", f) not in text]
    assert not missing, (f"torch {torch.__version__}'s {relative} no longer holds {missing}: re-derive "
                         "csrc/optim_math.h and tests/cuda_math_check.cpp from its CUDA formulas")
