"""Compile every Triton kernel of ``regfast.triton`` for a CUDA GPU this machine does not have.

Triton's JIT runs in full (argument binder, specialization, TTIR → TTGIR → LLVM → PTX → cubin with
the ptxas that Triton ships) when a driver answers its target, device and stream queries. The
:class:`StubDriver` here answers them for ``sm_<arch>``, and takes each launch without running it:
its launcher checks the arguments against the compiled signature, records the launch, and returns.
The backend's host code runs as in a GPU process, on CPU tensors.

Run as a script, it calls every backend function over a matrix of dtypes, groupings, terms, step
kinds and optimizer options, then reads each compiled variant (its PTX, and the SASS of its cubin
through the ``nvdisasm`` Triton ships) and writes a JSON report that ``tests/test_triton_compile.py``
checks::

    python tests/triton_offline.py --arch 90 --out report.json

It must run in a process where ``TRITON_INTERPRET`` is unset (Triton picks compiled or interpreted
kernels when they are defined).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

KERNEL_MODULES = ("norms", "penalty", "prox", "group", "optim")

# Shared memory per block, as the CUDA driver reports it (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _Utils:
    """The driver utilities Triton calls when it loads a compiled kernel."""

    def __init__(self, arch: int):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads): spills are read off the SASS instead.
        return 1, 1, 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.arch, 101376), "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class StubDriver:
    """A Triton driver for ``GPUTarget("cuda", arch, 32)`` that compiles and never runs.

    ``launches`` records (kernel name, grid, argument count) of each launch; ``devices`` the device
    index current at each launch.
    """

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)
        self.launches: list[tuple[str, tuple[int, int, int], int]] = []

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the stub driver runs nothing")

    def launcher_cls(self, src, metadata):
        signature = dict(src.signature)
        name = src.name if hasattr(src, "name") else str(src)
        launches = self.launches

        def launch(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                   exit_hook, *args):
            _check_arguments(name, signature, args)
            for g in (grid_0, grid_1, grid_2):
                if not (isinstance(g, int) and 0 <= g < 2**31):
                    raise ValueError(f"{name}: grid dimension {g!r} is not a valid CUDA grid size")
            launches.append((name, (grid_0, grid_1, grid_2), len(args)))

        return launch


_INT_RANGES = {"i1": (0, 1), "i8": (-2**7, 2**7 - 1), "i16": (-2**15, 2**15 - 1), "i32": (-2**31, 2**31 - 1),
               "i64": (-2**63, 2**63 - 1), "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1)}


def _check_arguments(name: str, signature: dict, args: tuple) -> None:
    """What the CUDA launcher checks: a pointer argument has a data pointer, an integer fits its type."""
    types = list(signature.values())
    names = list(signature.keys())
    if len(types) != len(args):
        raise TypeError(f"{name}: {len(args)} arguments for a signature of {len(types)}")
    for arg_name, ty, arg in zip(names, types, args):
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            if not hasattr(arg, "data_ptr"):
                raise TypeError(f"{name}: argument {arg_name} ({ty}) is {type(arg).__name__}, not a tensor")
        elif ty in _INT_RANGES:
            lo, hi = _INT_RANGES[ty]
            if not isinstance(arg, int) or not lo <= arg <= hi:
                raise TypeError(f"{name}: argument {arg_name} ({ty}) = {arg!r}")
        elif ty.startswith("fp") or ty.startswith("bf"):
            if not isinstance(arg, (int, float)):
                raise TypeError(f"{name}: argument {arg_name} ({ty}) = {arg!r}")


def install(arch: int) -> StubDriver:
    """Make a :class:`StubDriver` for ``sm_<arch>`` Triton's active driver; returns it."""
    from triton.runtime.driver import driver

    stub = StubDriver(arch)
    driver.set_active(stub)
    return stub


# --- reading the compiled code ---------------------------------------------------------------------

def _triton_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def sass(cubin: bytes) -> str:
    """The SASS of a cubin, through the ``nvdisasm`` that Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_triton_tool("nvdisasm"), "-c", "-hex", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr}")
    return out.stdout


def _loops(lines: list[str], label_re: str, branch_re: str, exit_re: str) -> list[list[str]]:
    """The instructions of every loop: from a label to the last branch back to it (nested loops included).

    A range that holds the kernel's exit is not a loop: it is a join block laid out before code that
    jumps to it (the compiler places blocks in any order).
    """
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            labels[m.group(1)] = i
    bodies = {}
    for i, line in enumerate(lines):
        m = re.search(branch_re, line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            bodies[m.group(1)] = (labels[m.group(1)], i)
    return [lines[a:b + 1] for a, b in bodies.values() if not any(re.search(exit_re, x) for x in lines[a:b + 1])]


def sass_loops(text: str) -> list[list[str]]:
    """The loop bodies of a SASS listing (nvdisasm's ``.L_x_N:`` labels and ``BRA `(.L_x_N)``)."""
    return _loops(text.splitlines(), r"^\s*(\.L_x_\d+):", r"BRA\s+`?\(?(\.L_x_\d+)\)?", r"\bEXIT\b")


def ptx_loops(text: str) -> list[list[str]]:
    """The loop bodies of a PTX listing (``$L__BB0_N:`` labels and ``bra $L__BB0_N``)."""
    return _loops(text.splitlines(), r"^\s*(\$L__BB\d+_\d+):", r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+)", r"^\s*ret;")


def _count(lines: list[str], pattern: str) -> int:
    return sum(1 for line in lines if re.search(pattern, line))


def resources(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread of a cubin's kernel (``cuobjdump -res-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_triton_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out.stdout))
    return {"registers": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1))}


# A conversion of a float32 / float64 value into float16 / bfloat16 in PTX; group 1 its modifiers (.rn: rounded to
# nearest even). tests/test_cuda_compile.py reads the CUDA kernels' PTX with it too.
NARROWING = re.compile(r"\bcvt((?:\.\w+)*?)\.b?f16(?:x2)?\.f(?:32|64)\b")


def analyze(kernel) -> dict:
    """What a compiled kernel's PTX and SASS show: vector width, local memory, divisions, rounding."""
    ptx = kernel.asm["ptx"]
    text = sass(kernel.asm["cubin"])
    lines = [line for line in text.splitlines() if "/*" in line]
    loops = sass_loops(text)
    in_loops = [line for body in loops for line in body]
    ptx_in_loops = [line for body in ptx_loops(ptx) for line in body]
    narrowing = NARROWING.findall(ptx)
    return {
        "ldg128": _count(lines, r"\bLDG\.E\.128\b"),
        "stg128": _count(lines, r"\bSTG\.E\.128\b"),
        "loop_ldg128": _count(in_loops, r"\bLDG\.E\.128\b"),
        "loop_stg128": _count(in_loops, r"\bSTG\.E\.128\b"),
        "loop_ldg_narrow": _count(in_loops, r"\bLDG\.E\b(?!\.128)"),
        "loop_stg_narrow": _count(in_loops, r"\bSTG\.E\b(?!\.128)"),
        "loops": len(loops),
        "local_memory": _count(lines, r"\b(LDL|STL)\b"),
        "loop_local_memory": _count(in_loops, r"\b(LDL|STL)\b"),
        "ptx_loop_div64": _count(ptx_in_loops, r"\b(div|rem)\.[su]64\b"),
        "ptx_div64": _count(ptx.splitlines(), r"\b(div|rem)\.[su]64\b"),
        "approx": sorted(set(re.findall(r"\b(?:sqrt|div|rcp|rsqrt)\.(?:approx|full)(?:\.ftz)?\.f(?:32|64)\b", ptx))),
        "fma": _count(ptx.splitlines(), r"\bfma\.rn"),
        # Conversions from float32 / float64 to 16 bits in any rounding but to nearest even, and those to nearest.
        "narrowing": sorted({m for m in narrowing if not m.startswith(".rn")}),
        "narrowing_rn": sum(m.startswith(".rn") for m in narrowing),
        "enable_fp_fusion": getattr(kernel.metadata, "enable_fp_fusion", None),
        "num_warps": kernel.metadata.num_warps,
        **resources(kernel.asm["cubin"]),
    }


def compiled_kernels() -> dict[str, dict]:
    """Every compiled variant of every kernel of ``regfast.triton``: {kernel name: {variant key: kernel}}."""
    import importlib

    import triton

    found = {}
    for mod_name in KERNEL_MODULES:
        module = importlib.import_module(f"regfast.triton.{mod_name}")
        for attr, fn in vars(module).items():
            if isinstance(fn, triton.runtime.jit.JITFunction) and attr.endswith("_kernel"):
                variants = {}
                for caches in fn.device_caches.values():
                    variants.update(caches[0])
                found[f"{mod_name}.{attr}"] = variants
    return found


def variant_counts() -> dict[str, int]:
    return {name: len(v) for name, v in compiled_kernels().items()}


# --- the matrix of calls -----------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
GROUPINGS = ("row", "col", "tensor")
TERMS = {"l1": (0.1, 0.0, 0.0), "l2": (0.0, 0.2, 0.0), "gl": (0.0, 0.0, 0.3), "all": (0.1, 0.2, 0.3)}


def model_a(dtype: torch.dtype) -> list[torch.Tensor]:
    """Sizes that stress the launcher: empty, one element, odd, more than one chunk, 2-D to 4-D."""
    shapes = [(0,), (1,), (7,), (3, 5), (1031,), (2, 65537), (64, 96), (8, 4, 3, 3), ()]
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def model_b(dtype: torch.dtype) -> list[torch.Tensor]:
    """Another model: other sizes, another tensor count."""
    shapes = [(768, 64), (64,), (33, 7), (5,), (3, 0), (130, 2, 2, 2), (70001,), (12, 12), (2,), (4, 4, 4)]
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def model_rows(dtype: torch.dtype) -> list[torch.Tensor]:
    """Every row and column 16 bytes long or a multiple (as in most models): the group passes load vectors."""
    shapes = [(64, 96), (96,), (40, 16, 8), (3, 5, 8, 8), (1,), (16, 16, 3, 3), (8, 65552)]
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def model_unaligned(dtype: torch.dtype) -> list[torch.Tensor]:
    """Contiguous views that start one element into their storage: no 16-byte alignment."""
    storage = torch.zeros(70000, dtype=dtype)
    return [storage[1:1 + 6 * 5].view(6, 5), storage[100:100 + 67000], storage[67201:67201 + 9]]


def _like(ts):
    return [torch.zeros_like(t) for t in ts]


def _lrs(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {"float": 0.05, "tensor": torch.tensor(0.05, dtype=acc)}


def calls(model, terms=TERMS, groupings=GROUPINGS) -> list[tuple[str, object]]:
    """(description, thunk) for every backend function over the matrix, on tensors from ``model(dtype)``."""
    import regfast.triton as rt

    out = []
    for dname, dtype in DTYPES.items():
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        out.append((f"norms {dname}", lambda dtype=dtype: rt.norms(model(dtype))))
        for groups in groupings:
            for tname, (l1, l2, gl) in terms.items():
                if groups != "row" and not gl:
                    continue  # without group lasso the grouping changes nothing
                hyper = (l1, l2, gl, groups)
                tag = f"{dname} {groups} {tname}"
                out.append((f"penalty {tag}", lambda dtype=dtype, h=hyper: rt.penalty(model(dtype), *h)))
                out.append((f"add_penalty_grad_ {tag}", lambda dtype=dtype, h=hyper: rt.add_penalty_grad_(
                    model(dtype), _like(model(dtype)), *h)))
                out.append((f"penalty_backward {tag}", lambda dtype=dtype, h=hyper, acc=acc: rt.penalty_backward(
                    torch.tensor(1.5, dtype=acc), model(dtype), *h)))
                for lname, lr in _lrs(dtype).items():
                    out.append((f"prox_ {tag} lr={lname}",
                                lambda dtype=dtype, h=hyper, lr=lr: rt.prox_step_(model(dtype), lr, *h)))
        for lname, lr in _lrs(dtype).items():
            for tname, (l1, l2, _) in terms.items():
                if tname == "gl":
                    continue  # with a group term the steps run the fused kernel, then prox_'s group kernels
                for momentum, init, nesterov in ((0.0, False, False), (0.9, True, False), (0.9, False, False),
                                                 (0.9, False, True)):
                    out.append((f"sgd_step_ {dname} {tname} lr={lname} momentum={momentum} init={init} "
                                f"nesterov={nesterov}", lambda dtype=dtype, lr=lr, l1=l1, l2=l2, m=momentum,
                                init=init, nest=nesterov, acc=acc: _sgd(rt, model(dtype), lr, m, init, nest, l1, l2,
                                                                          acc)))
                for amsgrad in (False, True):
                    for prox in ("lr", "preconditioned"):
                        for steps_on in ("cpu", "device"):
                            out.append((f"adamw_step_ {dname} {tname} lr={lname} amsgrad={amsgrad} prox={prox} "
                                        f"steps={steps_on}", lambda dtype=dtype, lr=lr, l1=l1, l2=l2, a=amsgrad,
                                        p=prox, s=steps_on, acc=acc: _adamw(rt, model(dtype), lr, a, p, s, l1, l2,
                                                                            acc)))
    return out


def _split(lr):
    """An op's ``(lr_tensor, lr)`` pair for a float or tensor ``lr``."""
    return (lr, 0.0) if isinstance(lr, torch.Tensor) else (None, lr)


def _sgd(rt, params, lr, momentum, init, nesterov, l1, l2, acc):
    buffers = [torch.zeros(p.shape, dtype=acc) for p in params] if momentum else []
    return rt.sgd_step_(params, _like(params), buffers, *_split(lr), momentum, 0.0, nesterov, 0.01, False, init, l1,
                        l2, 0.0, "row", True)


def _adamw(rt, params, lr, amsgrad, prox, steps_on, l1, l2, acc):
    state = [[torch.zeros(p.shape, dtype=acc) for p in params] for _ in range(3)]
    # "device" step counts are float32 tensors on the params' device (capturable), read through pointers.
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    if steps_on == "cpu" and not isinstance(lr, torch.Tensor):
        steps = [torch.zeros(()) for _ in params]
    return rt.adamw_step_(params, _like(params), state[0], state[1], state[2] if amsgrad else [], steps, *_split(lr),
                          0.9, 0.999, 1e-8, 0.01, amsgrad, False, l1, l2, 0.0, "row", prox, True)


def _run_calls(model, failures: list, **matrix) -> None:
    for name, thunk in calls(model, **matrix):
        try:
            thunk()
        except Exception:
            failures.append({"call": f"{model.__name__}: {name}", "error": traceback.format_exc(limit=4)})


def run(arch: int) -> dict:
    """Every call of :func:`calls` on model A, on aligned rows, on unaligned views, then on model B
    (which must compile nothing new); the report of every compiled variant."""
    stub = install(arch)
    failures = []
    _run_calls(model_a, failures)
    _run_calls(model_rows, failures, terms={"gl": TERMS["gl"], "all": TERMS["all"]})
    _run_calls(model_unaligned, failures, terms={"all": TERMS["all"], "l1": TERMS["l1"]}, groupings=("row", "col"))
    after_a = variant_counts()
    _run_calls(model_b, failures)
    after_b = variant_counts()
    variants = []
    for kname, compiled in compiled_kernels().items():
        for key, kernel in compiled.items():
            entry = {"kernel": kname, "key": str(key)[:2000]}
            names = kernel.src.fn.arg_names
            entry["constants"] = {names[k[0]] if isinstance(k, tuple) else str(k): str(getattr(v, "value", v))
                                  for k, v in kernel.src.constants.items()}
            entry.update(analyze(kernel))
            variants.append(entry)
    import triton

    return {"arch": arch, "triton": triton.__version__, "torch": torch.__version__, "calls": len(calls(model_a)),
            "launches": len(stub.launches), "failures": failures, "variants_after_a": after_a,
            "variants_after_b": after_b, "variants": variants}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON report goes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    report = run(args.arch)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"sm_{args.arch}: {report['calls']} calls, {report['launches']} launches, "
          f"{len(report['variants'])} variants, {len(report['failures'])} failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
