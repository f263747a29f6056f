"""The CPU kernels' instruction-set variants (csrc/cpu_passes.h): the widest the CPU runs (AVX-512, AVX2 + F16C,
the baseline) chosen, the same bits as the baseline variant for every op, dtype, grouping and shape, and AVX and
AVX-512 instructions only in the functions compiled for them (checked on the built extension's disassembly)."""

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CPU_VARIANTS

import regfast
from regfast import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the cpp backend is not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


HAS_AVX2 = CPU_VARIANTS["avx2"]
HAS_AVX512 = CPU_VARIANTS["avx512"]
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 + F16C")
# Every variant, and whether this CPU runs it.
RUNS = CPU_VARIANTS
WIDEST = "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "baseline"
# The library's code compiled for each wide instruction set (namespaces): the CPU passes' variant, the optimizer
# steps' loops and their entry points.
AVX2_SCOPES = ("regfast::cpu::avx2::", "regfast::optim_cpu::fused::", "regfast::optim_cpu::avx2_fma::")
AVX512_SCOPES = ("regfast::cpu::avx512::", "regfast::optim_cpu::avx512_fma::", "regfast::optim_cpu::fused_avx512::")


def _skip_unless_runs(variant: str) -> None:
    if not RUNS[variant]:
        pytest.skip(f"this CPU does not run the {variant} variant")


@pytest.fixture
def isa():
    """Sets the CPU kernels' instruction set for the test; the chosen one is restored after."""
    chosen = _ext._C.cpu_isa()
    yield _ext._C.set_cpu_isa
    _ext._C.set_cpu_isa(chosen)


def test_the_variant_chosen_is_the_widest_this_cpu_runs():
    assert _ext._C.cpu_isa() == os.environ.get("REGFAST_CPU_ISA", WIDEST)


def test_set_cpu_isa_names_the_problem(isa):
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        isa("sse9")
    assert isa("baseline") in RUNS
    assert _ext._C.cpu_isa() == "baseline"
    if not HAS_AVX2:
        with pytest.raises(ValueError, match="does not support AVX2"):
            isa("avx2")
    if not HAS_AVX512:
        with pytest.raises(ValueError, match="does not support AVX-512 F, BW, DQ and VL"):
            isa("avx512")
    for name in RUNS:
        if RUNS[name]:
            isa(name)
            assert _ext._C.cpu_isa() == name


@pytest.mark.parametrize("value, expected", [("baseline", "baseline"), ("sse9", "ValueError")])
def test_the_environment_chooses_the_variant(value, expected):
    code = ("from regfast import _ext\ntry:\n    print(_ext._C.cpu_isa())\nexcept ValueError as e:\n"
            "    print('ValueError', e)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "REGFAST_CPU_ISA": value},
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.split()[0] == expected, out
    if expected == "ValueError":
        assert "REGFAST_CPU_ISA=" in out and "'sse9'" in out, out


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Every shape the kernels treat differently: 0-dim, empty, odd lengths, more than one chunk (32,768
    elements), rows and columns, a non-contiguous view, many tiny tensors; NaN, ±inf, −0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (0,), (1,), (17,), (100_003,), (37, 41), (3, 40_000), (7, 5, 9), (70_000, 2)] + [(3,)] * 40
    ws = [(torch.randn(s, generator=g, dtype=torch.float64) * 3).to(dtype) for s in shapes]
    ws[5] = (torch.randn(41, 37, generator=g) * 3).to(dtype).t()  # a transposed view
    flat = ws[4]
    flat[7], flat[100], flat[2000], flat[3001] = float("nan"), float("inf"), float("-inf"), -0.0
    flat[50:60] = torch.finfo(dtype).tiny / 4 if dtype != torch.bfloat16 else torch.finfo(dtype).tiny
    for w in ws:
        w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype)
    return ws


def _outcome(dtype: torch.dtype, gl: float, groups: str, seed: int) -> list[torch.Tensor]:
    """Every op's results on fresh params of one seed: norms, penalty and its gradient through autograd,
    add_penalty_grad_, prox_ with a float and with a tensor lr, two steps of ProxSGD (momentum, nesterov) and of
    ProxAdamW (preconditioned; amsgrad with prox "lr" and a tensor lr), each with its penalty."""
    from regfast.optim import ProxAdamW, ProxSGD

    hyper = {"l1": 0.01, "l2": 0.3, "group_lasso": gl, "groups": groups}
    ws = _params(dtype, seed)
    out = list(regfast.norms(ws))
    leaves = [w.detach().requires_grad_() for w in ws]
    value = regfast.penalty(leaves, **hyper)
    out += [value, *torch.autograd.grad(value * 1.5, leaves)]
    out += [regfast.add_penalty_grad_(ws, **hyper), *(w.grad for w in ws)]
    for lr in (0.05, torch.tensor(0.05)):
        copies = [w.detach().clone() for w in ws]
        regfast.prox_(copies, lr=lr, **hyper)
        out += copies
    for make in (lambda ps: ProxSGD(ps, lr=0.05, momentum=0.9, nesterov=True, compute_penalty=True, **hyper),
                 lambda ps: ProxAdamW(ps, lr=0.05, compute_penalty=True, **hyper),
                 lambda ps: ProxAdamW(ps, lr=torch.tensor(0.05), amsgrad=True, prox="lr", compute_penalty=True,
                                      **hyper)):
        copies = [w.detach().clone().requires_grad_() for w in ws]
        for copy, w in zip(copies, ws):
            copy.grad = w.grad.clone()
        optimizer = make(copies)
        for _ in range(2):
            optimizer.step()
            out.append(optimizer.last_penalty)
        out += [copy.detach() for copy in copies]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("variant", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gl, groups", [(0.0, "row"), (0.2, "row"), (0.2, "col"), (0.2, "tensor")])
def test_the_wide_variants_give_the_baseline_bits(isa, variant, dtype, gl, groups):
    """The same bits from each wide variant as from the baseline, for every op and the optimizer steps (whose
    element loops are AVX-512 ones in the AVX-512 variant), NaN payloads included: the group-lasso steps of 16-bit
    params, which step float copies, narrow them back with every NaN made canonical (x86 returns the first
    operand's NaN where two meet, and the variants' vector and tail code order operands differently)."""
    from helpers import use_backend

    _skip_unless_runs(variant)
    with use_backend("cpp"):
        for seed in (0, 1):
            isa("baseline")
            base = _outcome(dtype, gl, groups, seed)
            isa(variant)
            wide = _outcome(dtype, gl, groups, seed)
            assert len(base) == len(wide)
            for i, (a, b) in enumerate(zip(base, wide)):
                assert a.shape == b.shape and a.dtype == b.dtype, i
                assert torch.equal(_bits(a), _bits(b)), (i, a, b)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_pattern_converts_alike_in_every_variant(isa, dtype):
    """Each of the 65,536 patterns widened and narrowed back (add_penalty_grad_ with l2 = 0.5 adds w to a zero
    grad): the same bits in every variant this CPU runs, and torch's bits for every pattern but NaN payloads (c10's
    scalar conversion makes every NaN the canonical one, as regfast does)."""
    from helpers import use_backend

    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    got = {}
    with use_backend("cpp"):
        for name in (name for name in RUNS if RUNS[name]):
            isa(name)
            w.grad = torch.zeros_like(w)
            regfast.add_penalty_grad_([w], l2=0.5)
            got[name] = w.grad.view(torch.int16).clone()
    expected = (torch.zeros_like(w).float() + w.float()).to(dtype).view(torch.int16)  # 0 + (−0) is +0
    nan = torch.isnan(w)
    canonical = 0x7E00 if dtype == torch.float16 else 0x7FC0
    for name, bits in got.items():
        assert torch.equal(bits, got["baseline"]), name
        assert torch.equal(bits[~nan], expected[~nan]), name
        assert torch.equal(bits[nan] & 0x7FFF, torch.full_like(bits[nan], canonical)), name


@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_penalty_backward_of_l1_alone_gives_every_16_bit_pattern_the_float_bits(isa, variant, dtype):
    """penalty_backward with l1 alone on 16-bit params picks each element's gradient by the class of its bits
    (csrc/cpu_passes_impl.h, L1Table): every one of the 65,536 patterns, and an odd-length tensor beside them (two
    chunks and a short one), gets the bits of mult·(l1·sign(w)) in float32 rounded as c10 rounds, a NaN made
    canonical (bfloat16 0x7FC0, float16 its sign | 0x7E00), for coefficients and upstream gradients that
    overflow, vanish, are ±0 or infinite."""
    _skip_unless_runs(variant)
    isa(variant)
    g = torch.Generator().manual_seed(3)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    odd = (torch.randn(70_001, generator=g) * 10).to(dtype)
    for l1 in (0.1, 1e-8, 3e38):
        for mult in (1.5, -2.0, 0.0, -0.0, 1e-30, 3e38, float("inf"), float("-inf")):
            grads = torch.ops.regfast_C.penalty_backward(torch.tensor(mult), [every, odd], l1, 0.0, 0.0, "row")
            for w, got in zip((every, odd), grads):
                x = w.float()
                sign = torch.where(x != x, x, (x > 0).float() - (x < 0).float())
                exact = torch.tensor(mult) * (torch.tensor(l1, dtype=torch.float32) * sign)
                expected = exact.to(dtype).view(torch.int16).clone()
                nan = torch.isnan(exact)
                canonical = torch.tensor(0x7E00 if dtype == torch.float16 else 0x7FC0, dtype=torch.int16)
                sign_bit = torch.signbit(exact[nan]).to(torch.int16) * -32768 if dtype == torch.float16 else 0
                expected[nan] = canonical | sign_bit
                assert torch.equal(got.view(torch.int16), expected), (l1, mult)


@pytest.mark.parametrize("variant", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_the_l1_gradient_from_the_sign_bit_gives_the_float_bits(isa, variant, dtype, l2):
    """The gradient pass takes l1·sign(w) from w's sign bit (csrc/cpu_kernels.h, l1_sign_bits_lanes; a NaN w
    selected or carried by the linear term): add_penalty_grad_ and penalty_backward, l1 with and without l2, give the
    bits of g + (l1·sign(w) + 2·l2·w) and mult·(l1·sign(w) + 2·l2·w) computed by torch in float32 and rounded to the
    dtype (a NaN canonical in 16-bit types), for every 16-bit pattern (widened for float32, beside random floats) and
    an odd-length tensor of two chunks and a short one."""
    _skip_unless_runs(variant)
    isa(variant)
    g = torch.Generator().manual_seed(5)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16 if dtype ==
                                                                                  torch.float32 else dtype)
    ws = [every.to(dtype), (torch.randn(70_001, generator=g) * 10).to(dtype)]
    bits = torch.int16 if dtype != torch.float32 else torch.int32

    def expected(exact: torch.Tensor) -> torch.Tensor:
        out = exact.to(dtype).view(bits).clone()
        if dtype != torch.float32:
            nan = torch.isnan(exact)
            sign_bit = torch.signbit(exact[nan]).to(torch.int16) * -32768 if dtype == torch.float16 else 0
            out[nan] = torch.tensor(0x7E00 if dtype == torch.float16 else 0x7FC0, dtype=torch.int16) | sign_bit
        return out

    def inc(w: torch.Tensor, l1: float) -> torch.Tensor:
        """l1·sign(w) + 2·l2·w in float32, as the kernels' lanes form it."""
        x = w.float()
        sign = torch.where(x != x, x, (x > 0).float() - (x < 0).float())
        term = torch.tensor(l1, dtype=torch.float32) * sign
        return term + torch.tensor(2 * l2, dtype=torch.float32) * x if l2 else term

    for l1 in (0.1, 1e-8, 3e38, 1e39):  # 1e39 overflows float32: l1·sign(±0) is NaN there
        for mult in (1.5, -2.0):
            grads = torch.ops.regfast_C.penalty_backward(torch.tensor(mult), ws, l1, l2, 0.0, "row")
            for w, got in zip(ws, grads):
                assert torch.equal(got.view(bits), expected(torch.tensor(mult) * inc(w, l1))), (l1, mult)
        starts = [(torch.randn(w.shape, generator=g) * 5).to(dtype) for w in ws]
        for w, start in zip(ws, starts):
            w.grad = start.clone()
        regfast.add_penalty_grad_(ws, l1=l1, l2=l2)
        for w, start in zip(ws, starts):
            assert torch.equal(w.grad.view(bits), expected(start.float() + inc(w, l1))), l1


@pytest.mark.parametrize("opt", ["ProxSGD", "ProxAdamW"])
def test_the_optimizer_steps_convert_every_float16_pattern_as_c10(opt):
    """Each of the 65,536 float16 patterns widened to float, stepped by nothing (lr 0: −0 added) and narrowed
    back: the same bits, every NaN the canonical one with its sign (c10's scalar conversion, and F16C's where the
    optimizer loops use it)."""
    from helpers import use_backend

    from regfast.optim import ProxAdamW, ProxSGD

    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).clone()
    before = w.view(torch.int16).clone()
    w.requires_grad_()
    # −0 stays −0 in SGD: g·(−0) = −0 is added for g = 1.
    w.grad = torch.ones_like(w)
    with use_backend("cpp"):
        step = ProxSGD([w], lr=0.0) if opt == "ProxSGD" else ProxAdamW([w], lr=0.0, weight_decay=0.0)
        step.step()
    got = w.detach().view(torch.int16)
    nan = torch.isnan(w.detach())
    assert int(nan.sum()) == 2046
    kept = ~nan
    if opt == "ProxAdamW":
        kept &= before != -32768  # −0: the AdamW step of lr 0 itself gives +0
        assert got[before == -32768].item() in (0, -32768)
    assert torch.equal(got[kept], before[kept])
    assert torch.equal(got[nan], (before[nan] & -32768) | 0x7E00)


@functools.cache
def _blocks(so: Path) -> tuple[tuple[str, str], ...]:
    """Each function of the library (demangled name; internal ones may share one) and its disassembly."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(so)], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    return tuple((head.group(1), block) for block in asm.split("\n\n")
                 if (head := re.match(r"[0-9a-f]+ <(.*)>:", block.strip())))


def _functions(so: Path) -> list[tuple[str, list[str]]]:
    """Each function of the library and its instructions' mnemonics."""
    # "  addr:\tmnemonic operands" (no raw bytes)
    return [(name, [line.split("\t", 1)[1].split()[0] for line in block.splitlines()[1:]
                    if "\t" in line and line.split("\t", 1)[1].strip()]) for name, block in _blocks(so)]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 ELF")
def test_only_the_wide_variants_hold_avx_instructions():
    """The baseline build must run on every x86-64 CPU: an AVX (VEX-encoded, v-prefixed) instruction may appear
    only in functions compiled for AVX2 or AVX-512: namespaces regfast::cpu::avx2 and regfast::cpu::avx512, and the
    optimizer steps' loops for each (regfast::optim_cpu::avx2_fma, regfast::optim_cpu::avx512_fma) with their entry
    points (regfast::optim_cpu::fused, regfast::optim_cpu::fused_avx512). And the wide variants' passes convert
    float16 with F16C, the optimizer's loops fuse with FMA."""
    functions = _functions(Path(_ext._C.__file__))
    assert len(functions) > 500 and sum(len(ops) for _, ops in functions) > 100_000  # the parse found the code
    allowed = AVX2_SCOPES + AVX512_SCOPES
    outside = {name: sorted({op for op in ops if op.startswith("v") and op not in ("verr", "verw")})[:5]
               for name, ops in functions if not any(a in name for a in allowed)}
    outside = {name: ops for name, ops in outside.items() if ops}
    assert not outside, outside
    for variant in ("regfast::cpu::avx2::", "regfast::cpu::avx512::"):
        wide = [(name, set(ops)) for name, ops in functions if variant in name]
        # (the gradient's loops: grad_run, or where the compiler inlined it, the grad_core lambdas running it; the
        # prox's: prox_run, or the prox_table and prox_pass lambdas)
        assert any({"vcvtph2ps", "vcvtps2ph"} <= ops for name, ops in wide
                   if "grad_run<c10::Half" in name or "grad_core<c10::Half>" in name)
        assert any({"vcvtph2ps", "vcvtps2ph"} <= ops for name, ops in wide
                   if any(f"{k}<c10::Half" in name for k in ("prox_run", "prox_table", "prox_pass")))
        assert any("vaddps" in ops for name, ops in wide if "tensor_norms<float>" in name)
    # The streaming loops prefetch ahead of their reads and writes into L2 (cpu_kernels.h's prefetch_round), in every
    # variant (the norms' loop: norms_run, or where the compiler inlined it, tensor_norms' lambdas, whose prefetch of
    # a later chunk's first line is a prefetcht0).
    for kernels in (("tensor_norms<c10::BFloat16>", "norms_run<c10::BFloat16"),
                    ("grad_run<c10::BFloat16", "grad_core<c10::BFloat16>"),
                    ("grad_run<float", "grad_core<float>"), ("prox_run<c10::BFloat16", "prox_table<c10::BFloat16>"),
                    ("prox_run<c10::Half", "prox_table<c10::Half>"), ("sumsq_run<float, c10::Half",),
                    ("sumsq_run<float, c10::BFloat16",)):
        for variant in ("regfast::cpu::avx2::", "regfast::cpu::avx512::", "regfast::cpu::baseline::"):
            found = [ops for name, ops in functions if variant in name and any(k in name for k in kernels)]
            assert found and any("prefetcht1" in ops for ops in found), (variant, kernels)
    # penalty_backward of l1 alone on 16-bit params chooses each element's value with packed word compares.
    for variant, compares in (("regfast::cpu::avx2::", {"vpcmpgtw", "vpcmpeqw"}),
                              ("regfast::cpu::avx512::", {"vpcmplew", "vpcmpeqw"}),
                              ("regfast::cpu::baseline::", {"pcmpgtw", "pcmpeqw"})):
        for kernel in ("grad_core<c10::Half>", "grad_core<c10::BFloat16>"):
            assert any(compares <= set(ops) for name, ops in functions if variant in name and kernel in name), kernel
    fma = [set(ops) for name, ops in functions if "regfast::optim_cpu::avx2_fma::" in name]
    assert any("vfmadd231ps" in ops or "vfmadd132ps" in ops or "vfmadd213ps" in ops for ops in fma)
    # The AVX2 + FMA optimizer loops widen and narrow float16 blocks with F16C.
    f16c = [set(ops) for name, ops in functions if "regfast::optim_cpu::avx2_fma::" in name and "_f16c" in name]
    assert any("vcvtph2ps" in ops for ops in f16c) and any("vcvtps2ph" in ops for ops in f16c)
    # The steps with group lasso round their block arrays into float16 params through that variant's narrowing,
    # which goes to the F16C loop (a call or a tail jump).
    blocks = dict(_blocks(Path(_ext._C.__file__)))
    scope = "regfast::optim_cpu::avx2_fma::(anonymous namespace)::"
    rounding = next(block for name, block in blocks.items() if name.startswith(scope + "round_into_run("))
    assert re.search(r"\b(call|jmp)\s+\S+ <void " + re.escape(scope) + r"narrow<c10::Half>", rounding)
    narrowing = next(block for name, block in blocks.items() if name.startswith(f"void {scope}narrow<c10::Half>("))
    assert re.search(r"\b(call|jmp)\s+\S+ <" + re.escape(scope) + r"narrow_f16c\(", narrowing)
    # So do Adam's metric's group shrink and its passes' final rounding, and the packs' shrinks; the passes' group
    # norms (column_squares) and floors (column_floors, the packs' pack_floors) read 16-bit params through the
    # variant's widening, float16 and bfloat16 alike.
    for function, conversion in (("metric_shrink_run(", "narrow"), ("metric_apply_run(", "narrow"),
                                 ("column_floors_run(", "widen"), ("column_squares_run(", "widen"),
                                 ("pack_floors_run(", "widen"), ("pack_metric_shrink_run(", "narrow"),
                                 ("pack_group_shrink_run(", "narrow")):
        # The function, its clones, and the typed function it calls where not inlined (metric_shrink_typed<A, T>).
        typed = f"void {scope}{function.replace('_run(', '_typed<')}"
        code = "\n".join(block for name, block in blocks.items() if name.startswith((scope + function, typed)))
        assert code, function
        for dtype in ("c10::Half", "c10::BFloat16"):
            assert re.search(r"\b(call|jmp)\s+\S+ <void " + re.escape(f"{scope}{conversion}<{dtype}>"), code), \
                (function, dtype)
    widening = next(block for name, block in blocks.items() if name.startswith(f"void {scope}widen<c10::Half>("))
    assert re.search(r"\b(call|jmp)\s+\S+ <" + re.escape(scope) + r"widen_f16c\(", widening)


# An AVX-512 (EVEX-only) operand: a 512-bit register, a mask register, or one of the 16 registers only EVEX names.
EVEX_OPERAND = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 ELF")
def test_only_the_avx512_variant_holds_avx512_instructions():
    """A CPU with AVX2 and without AVX-512 runs the AVX2 code: an AVX-512 operand may appear only in the code
    compiled for AVX-512 (the CPU passes' variant, regfast::cpu::avx512, and the optimizer steps' loops), whose
    loops hold a round of 16 float lanes in one 512-bit register: float16 converted by vcvtph2ps / vcvtps2ph on
    512 bits, bfloat16 narrowed by vpmovdw, the float norms added on 512 bits; the AdamW and SGD steps' loops fuse
    and divide on 512 bits and convert float16 blocks on 512 bits."""
    blocks = _blocks(Path(_ext._C.__file__))
    outside = [name for name, block in blocks
               if not any(scope in name for scope in AVX512_SCOPES) and EVEX_OPERAND.search(block)]
    assert not outside, outside[:5]
    steps = [block for name, block in blocks if "regfast::optim_cpu::avx512_fma::" in name]
    for kernel in ("adamw_elements<float,", "adamw_elements<c10::BFloat16,", "sgd_block<float,"):
        found = [block for name, block in blocks if "regfast::optim_cpu::avx512_fma::" in name and kernel in name]
        assert any(re.search(r"vfmadd\w+ps\s+\S+,%zmm", block) for block in found), kernel
    assert any(re.search(r"vdivps\s+\S+,%zmm", block) for block in steps)
    # The AVX-512 optimizer loops widen and narrow float16 blocks 16 elements a conversion.
    f16c = [block for name, block in blocks if "regfast::optim_cpu::avx512_fma::" in name and "_f16c" in name]
    assert any(re.search(r"vcvtph2ps\s+\S+,%zmm", block) for block in f16c)
    assert any(re.search(r"vcvtps2ph\s+\$0x0,%zmm", block) for block in f16c)
    inside = [(name, block) for name, block in blocks if "regfast::cpu::avx512::" in name]
    assert len(inside) > 50 and sum(bool(EVEX_OPERAND.search(block)) for _, block in inside) > 50

    def has(kernel: str, pattern: str) -> bool:
        return any(re.search(pattern, block) for name, block in inside if kernel in name)

    assert has("prox_table<c10::Half>", r"vcvtph2ps\s+\S+,%zmm")
    assert has("prox_table<c10::Half>", r"vcvtps2ph\s+\$0x0,%zmm")
    assert has("grad_core<c10::BFloat16>", r"vpmovdw\s+%zmm")
    assert has("tensor_norms<float>", r"vaddps\s+\S+,%zmm")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 ELF")
def test_the_adamw_loops_divide_only_where_their_lr_and_prox_need_it():
    """Each AdamW element loop (both variants, float32 and 16-bit params) is compiled for one kind of lr (float or
    tensor) and, for the preconditioned prox, with or without l2: per packed square root (one a vector of elements)
    at most the divisions its formulas take (sqrt(v)/bc2, the update's one or two, the preconditioned prox's lr/d
    and l2 shrink; with group lasso no more: its threshold reuses the l2 shrink), where a loop selecting between
    both kinds computed the divisions of both (seven)."""
    loops = [(name, ops) for name, ops in _functions(Path(_ext._C.__file__))
             if "adamw_elements<" in name and re.search(r"adamw_elements<(float|c10::BFloat16|c10::Half),", name)]
    assert len(loops) >= 24, [name for name, _ in loops]
    for name, ops in loops:
        mode, tensor, l2, _ = re.search(r"\(regfast::ProxMode\)(\d), (true|false), (true|false), (\d), float>",
                                        name).groups()
        divisions = sum(op.removeprefix("v") == "divps" for op in ops)
        roots = sum(op.removeprefix("v") == "sqrtps" for op in ops)
        needed = 2 + (tensor == "true") + (mode == "2") + (l2 == "true")
        assert roots and divisions <= needed * roots, (name, divisions, roots, needed)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 ELF")
def test_the_newton_steps_of_the_metric_group_shrink_divide_packed_vectors():
    """The group shrink in Adam's metric (csrc/optim_cpu_groups.h) divides packed doubles, several lanes an
    instruction, in every variant it is built for: AVX's vdivpd in the AVX2 one, SSE2's divpd in the baseline. The
    Newton steps' sums (group_reduce with MetricNewton) are their own function or inlined into the roots
    (metric_group_roots, or metric_roots called from it) or the shrink, itself perhaps inlined into its dispatcher
    (metric_shrink_run): every MetricNewton function divides packed, and for float and double accumulation one of
    them, the roots or the shrink does, or else the dispatcher that holds them."""
    functions = [(name, set(ops)) for name, ops in _functions(Path(_ext._C.__file__)) if ".cold" not in name]
    for scope, packed in (("regfast::optim_cpu::avx2_fma::", "vdivpd"), ("regfast::optim_cpu::baseline::", "divpd")):
        newton = [(name, ops) for name, ops in functions if scope in name and "MetricNewton<" in name]
        for name, ops in newton:
            assert packed in ops, (name, sorted(ops))
        for acc in ("float", "double"):
            found = [ops for name, ops in functions if scope in name
                     and any(f in name for f in (f"MetricNewton<{acc}>", f"metric_shrink_typed<{acc}, ",
                                                 f"metric_group_roots<{acc}, "))]
            if not found:  # inlined into the dispatcher
                dispatcher = scope + "(anonymous namespace)::metric_shrink_run("
                found = [ops for name, ops in functions if name.startswith(dispatcher)]
            assert any(packed in ops for ops in found), (scope, acc, len(found))


GDB_PROGRAM = """
import torch, regfast
from regfast.optim import ProxAdamW, ProxSGD
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    ws = [torch.randn(100, 37).to(dt).requires_grad_(), torch.randn(5).to(dt).requires_grad_()]
    for w in ws:
        w.grad = torch.randn(w.shape).to(dt)
    regfast.norms(ws)
    for gl in (0.0, 0.5):
        regfast.penalty(ws, l1=0.1, l2=0.1, group_lasso=gl).backward()
        regfast.add_penalty_grad_(ws, l1=0.1, l2=0.2, group_lasso=gl)
        with torch.no_grad():
            regfast.prox_(ws, lr=0.1, l1=0.1, l2=0.1, group_lasso=gl)
    for opt in (ProxSGD(ws, lr=0.1, momentum=0.9, l1=0.01), ProxAdamW(ws, lr=0.1, l1=0.01),
                ProxAdamW(ws, lr=0.1, l1=0.01, group_lasso=0.1, groups="col")):
        opt.step()
        opt.step()
print("finished")
"""




def _symbols(so: Path, scopes: tuple[str, ...]) -> list[str]:
    """The linkage names of the library's functions in ``scopes`` (compiled for AVX2 or AVX-512), or called only
    from them (a template instantiated with one of their lambdas); not the cold parts the compiler splits off a
    function (``.cold``: its error paths, entered only from the function, which is on the list)."""
    names = [line.split()[2] for line in subprocess.run(["nm", "--defined-only", str(so)], capture_output=True,
                                                       text=True, check=True).stdout.splitlines()
             if len(line.split()) == 3 and line.split()[1] in "tTW" and not line.endswith(".cold")]
    plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [n for n, d in zip(names, plain.splitlines()) if any(scope in d for scope in scopes)]


@pytest.mark.skipif(shutil.which("gdb") is None or shutil.which("nm") is None or shutil.which("c++filt") is None,
                    reason="needs gdb, nm and c++filt")
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="x86-64 ELF")
@pytest.mark.parametrize("variant, scopes, enters", [
    ("baseline", AVX2_SCOPES + AVX512_SCOPES, False),
    ("avx2", AVX512_SCOPES, False),
    ("avx2", AVX2_SCOPES, True),
    ("avx512", AVX512_SCOPES, True),
], ids=["baseline", "avx2-not-avx512", "avx2", "avx512"])
def test_a_process_enters_only_the_code_of_its_variant(tmp_path, variant, scopes, enters):
    """Under gdb, with a breakpoint on every function compiled for a wider instruction set: a process told to run
    the baseline code (REGFAST_CPU_ISA=baseline, and torch's default kernels, as on a CPU without AVX2) runs every
    op and optimizer step in every dtype without reaching AVX2 or AVX-512 code, and one told to run AVX2 (as on a
    CPU without AVX-512) without reaching AVX-512 code; the same program reaches the code of its own variant (the
    check can fail)."""
    _skip_unless_runs(variant)
    so = Path(_ext._C.__file__)
    symbols = _symbols(so, scopes)
    assert len(symbols) > 200, len(symbols)
    script = tmp_path / "ops.py"
    script.write_text(GDB_PROGRAM)
    commands = tmp_path / "commands.gdb"
    commands.write_text("\n".join(["set pagination off", "set breakpoint pending off", "set auto-solib-add off",
                                    "catch load regfast/_C", "run", "sharedlibrary regfast/_C",
                                    *(f"break {name}" for name in symbols), "continue"]) + "\n")
    env = {**os.environ, "REGFAST_BACKEND": "cpp", "REGFAST_CPU_ISA": variant}
    if variant == "baseline":
        env["ATEN_CPU_CAPABILITY"] = "default"
    args = ["gdb", "-batch", "-nx", "-x", str(commands), "--args", sys.executable, str(script)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900).stdout
    breakpoints = len(re.findall(r"^Breakpoint \d+ at ", out, flags=re.M))
    assert breakpoints >= len(symbols), (breakpoints, len(symbols), out[-3000:])
    hits = re.findall(r"hit Breakpoint \d+, (.*)", out)
    if not enters:
        assert not hits and "finished" in out, (hits, out[-3000:])
    else:
        assert hits and "finished" not in out, out[-3000:]
