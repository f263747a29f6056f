"""The CPU kernels' lane vectors (csrc/cpu_kernels.h), checked on compiled code, in each instruction set's variant.

A small C++ program built with the extension's flags (the AVX2 and AVX-512 variants as the extension builds them:
their headers first, then the kernels under the variant's target switch) runs the lane-vector norm loop, sign,
l1·sign from the sign bit and soft threshold against the scalar code they replace (same bits: float, double,
float16, bfloat16; odd lengths, NaN, −0, infinities), the norms of a chunk shorter than a round against the lane
loop's, the column sums of group norms by columns against the element loop row after row, and the lanes' float16 /
bfloat16 conversions against c10's (every 16-bit pattern, floats at every rounding tie); the disassembly of the
sign, l1·sign and threshold shows packed compares and no scalar compare or branch on NaN, that of the conversions no
branch or call, and that of the column sums packed float-to-double conversions.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp
from helpers import CPU_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objdump") is None,
                                reason="needs g++ and objdump")

# Before the kernels: what the extension's AVX2 and AVX-512 variants include ahead of their target switch (c10's
# conversions, the expected values, stay baseline code), after the AVX-512 file's silencing of GCC 12's false
# warnings on its intrinsics.
PRELUDE = r"""
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>
#include "cpu_work_list.h"
#include "elementwise.h"
#include "groups.h"
#include "kernel_types.h"
#include "norm_parts.h"
"""

VARIANTS = {"baseline": "#define REGFAST_CPU_ISA baseline\n#define REGFAST_CPU_AVX2 0\n#define REGFAST_CPU_AVX512 0\n",
            "avx2": '#pragma GCC target("avx2,f16c")\n#define REGFAST_CPU_ISA avx2\n#define REGFAST_CPU_AVX2 1\n'
                    "#define REGFAST_CPU_AVX512 0\n",
            "avx512": '#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")\n'
                      "#define REGFAST_CPU_ISA avx512\n#define REGFAST_CPU_AVX2 1\n#define REGFAST_CPU_AVX512 1\n"}

PROGRAM = r"""
#include "cpu_kernels.h"
using namespace regfast;
using namespace regfast::cpu;
using namespace regfast::cpu::REGFAST_CPU_ISA;

template <typename T, typename A>
void scalar_norms(const T* w, int64_t b, int64_t e, LaneSum<A>& a1, LaneSum<A>& a2) {
  lane_loop(b, e, [&](int64_t i, int j) {
    const A x = static_cast<A>(w[i]);
    a1.v[j] += std::abs(x);
    a2.v[j] += x * x;
  });
}

// n normal draws of generator g, element i scaled by scale(i).
template <typename T, typename Scale>
std::vector<T> draws(int n, std::mt19937& g, Scale scale) {
  std::normal_distribution<double> d;
  std::vector<T> w(n);
  for (int i = 0; i < n; ++i) w[i] = static_cast<T>(d(g) * scale(i));
  return w;
}

template <typename T>
bool norms_match(int n, int seed) {
  using A = acc_t<T>;
  std::mt19937 g(seed);
  std::vector<T> w = draws<T>(n, g, [](int i) { return i % 7 == 0 ? 1e30 : 1.0; });
  if (n > 5) {
    w[3] = static_cast<T>(-0.0);
    w[5] = static_cast<T>(NAN);
  }
  LaneSum<A> a1, a2, b1, b2;
  for (int s = 0; s < 3; ++s) {
    const int b = s * n / 3, e = (s + 1) * n / 3;
    scalar_norms(w.data(), b, e, a1, a2);
    norms_run(w.data(), b, e, b1, b2);
  }
  return std::memcmp(a1.v, b1.v, sizeof a1.v) == 0 && std::memcmp(a2.v, b2.v, sizeof a2.v) == 0;
}

// short_norms (a chunk shorter than a round: a small tensor) against norms_run and LaneSum::total: the same bits,
// for values of spread exponents (the order of the additions shows) and with −0, NaN or an infinity among them.
template <typename T>
bool short_norms_match(int n, int seed) {
  using A = acc_t<T>;
  std::mt19937 g(seed);
  std::vector<T> w = draws<T>(n, g, [&g](int) { return std::pow(2.0, static_cast<int>(g() % 40) - 20); });
  const double specials[] = {-0.0, NAN, -INFINITY};
  if (seed % 4 != 3) w[g() % n] = static_cast<T>(specials[seed % 4]);
  LaneSum<A> a1, a2;
  norms_run(w.data(), 0, n, a1, a2);
  const A e1 = a1.total(), e2 = a2.total();
  A s1 = 0, s2 = 0;
  short_norms(w.data(), n, s1, s2);
  return std::memcmp(&e1, &s1, sizeof(A)) == 0 && std::memcmp(&e2, &s2, sizeof(A)) == 0;
}

// column_squares (the column sums of group norms by columns: on vectors, four rows at a time for rows of a page or
// more) against the element loop it replaces, row after row: the same bits in every column, for values of spread
// exponents, −0, NaN and infinities among them, sums already under way in `out`, odd row lengths and row counts,
// the identity and elastic steps (threshold, shrink, both) as f.
template <typename T, typename F>
bool column_squares_match(int rows, int m_len, int seed, F f) {
  using A = acc_t<T>;
  std::mt19937 g(seed);
  std::vector<T> w = draws<T>(rows * m_len, g, [&g](int) { return std::pow(2.0, static_cast<int>(g() % 40) - 20); });
  const double specials[] = {-0.0, NAN, -INFINITY, INFINITY};
  for (int k = 0; k < 4 && k < rows * m_len; ++k) w[g() % w.size()] = static_cast<T>(specials[(seed + k) % 4]);
  std::vector<double> expected(m_len), got;
  for (int m = 0; m < m_len; ++m) expected[m] = std::ldexp(static_cast<double>(g() % 1000), -10);
  got = expected;
  for (int r = 0; r < rows; ++r) {
    for (int m = 0; m < m_len; ++m) {
      const double u = static_cast<double>(f(static_cast<A>(w[r * m_len + m])));
      expected[m] += u * u;
    }
  }
  column_squares<A>(w.data(), rows, got.data(), m_len, f);
  return std::memcmp(expected.data(), got.data(), m_len * sizeof(double)) == 0;
}

template <typename T>
bool column_squares_match_all() {
  using A = acc_t<T>;
  const ElasticLanes<A> steps[] = {{ElasticStep<A>{A(0.25), A(1), true, false}},
                                   {ElasticStep<A>{A(0), A(0.75), false, true}},
                                   {ElasticStep<A>{A(0.125), A(0.5), true, true}}};
  bool ok = true;
  for (int m_len : {1, 15, 16, 17, 100, 1030, 2050})
    for (int rows : {1, 3, 4, 5, 9})
      for (int seed = 0; seed < 2; ++seed) {
        ok = ok && column_squares_match<T>(rows, m_len, seed, Identity{});
        for (const auto& step : steps) ok = ok && column_squares_match<T>(rows, m_len, seed, step);
      }
  return ok;
}

template <typename A>
__attribute__((noinline)) void signs(const A* in, A* out) { store_lanes<A>(out, sign_lanes<A>(load_lanes<A>(in))); }

template <typename A>
bool sign_matches() {
  const A inf = std::numeric_limits<A>::infinity(), nan = std::numeric_limits<A>::quiet_NaN();
  const A tiny = std::numeric_limits<A>::denorm_min();
  A v[kLanes] = {A(0), -A(0), A(1.5), A(-2), nan, -nan, inf, -inf, tiny, -tiny, A(3), A(-4), A(1e-30), A(-1e30),
                 A(7), A(0)};
  A out[kLanes];
  signs<A>(v, out);
  for (int j = 0; j < kLanes; ++j) {
    const A e = sign_of(v[j]);
    if (std::memcmp(&e, &out[j], sizeof(A)) != 0) return false;
  }
  return true;
}

template <typename A>
__attribute__((noinline)) void l1_sign_bits(const A* in, A l1, A lin, A* out, A* bare) {
  const Vec<A> x = load_lanes<A>(in);
  store_lanes<A>(bare, l1_sign_bits_lanes<A>(x, l1));
  store_lanes<A>(out, l1_sign_bits_lanes<A>(x, l1) + lin * x);
}

// l1_sign_bits_lanes against l1·sign_of: the same bits wherever x is not NaN, and with the linear term lin·x added (as
// the gradient pass adds it) the same bits everywhere, for l1 of 0, the smallest subnormal, 1 and the largest finite.
template <typename A>
bool l1_sign_bits_match() {
  const A inf = std::numeric_limits<A>::infinity(), nan = std::numeric_limits<A>::quiet_NaN();
  const A tiny = std::numeric_limits<A>::denorm_min(), big = std::numeric_limits<A>::max();
  A v[kLanes] = {A(0), -A(0), A(1.5), A(-2), nan, -nan, inf, -inf, tiny, -tiny, A(3), A(-4), A(1e-30), A(-1e30),
                 big, -big};
  for (A l1 : {A(0), tiny, A(1), A(0.375), big})
    for (A lin : {A(0), tiny, A(2), A(0.1)}) {
      A out[kLanes], bare[kLanes];
      l1_sign_bits<A>(v, l1, lin, out, bare);
      for (int j = 0; j < kLanes; ++j) {
        const A e = l1 * sign_of(v[j]) + lin * v[j], sign_term = l1 * sign_of(v[j]);
        if (std::memcmp(&e, &out[j], sizeof(A)) != 0) return false;
        if (v[j] == v[j] && std::memcmp(&sign_term, &bare[j], sizeof(A)) != 0) return false;
      }
    }
  return true;
}

template <typename A>
__attribute__((noinline)) void thresholds(const A* in, A t, A* out) {
  store_lanes<A>(out, soft_threshold_lanes<A>(load_lanes<A>(in), t));
}

template <typename A>
__attribute__((noinline)) void number_thresholds(const A* in, A t, A* out) {
  store_lanes<A>(out, soft_threshold_number_lanes<A>(load_lanes<A>(in), t));
}

// soft_threshold_lanes (and soft_threshold_number_lanes where t is not NaN) against soft_threshold: special values
// about thresholds ±0, 1, inf, NaN and the smallest subnormal.
template <typename A>
bool threshold_matches() {
  const A inf = std::numeric_limits<A>::infinity(), nan = std::numeric_limits<A>::quiet_NaN();
  const A tiny = std::numeric_limits<A>::denorm_min();
  A v[kLanes] = {A(0), -A(0), A(1), A(-1), nan, -nan, inf, -inf, tiny, -tiny, A(0.5), A(-0.5), A(1.5), A(-2.5),
                 A(1e30), A(-1e-30)};
  for (A t : {A(0), -A(0), A(1), inf, nan, tiny}) {
    A out[kLanes];
    A number_out[kLanes];
    thresholds<A>(v, t, out);
    if (t == t) number_thresholds<A>(v, t, number_out);
    for (int j = 0; j < kLanes; ++j) {
      const A e = soft_threshold(v[j], t);
      if (std::memcmp(&e, &out[j], sizeof(A)) != 0) return false;
      if (t == t && std::memcmp(&e, &number_out[j], sizeof(A)) != 0) return false;
    }
  }
  return true;
}

// 16-bit floats through the lanes' conversions (load_lanes / store_lanes), one call per kLanes elements.
template <typename H>
__attribute__((noinline)) void widen(const H* in, float* out) { store_lanes<float>(out, load_lanes<float>(in)); }
template <typename H>
__attribute__((noinline)) void narrow(const float* in, H* out) { store_lanes<float>(out, load_lanes<float>(in)); }

// Every 16-bit pattern widened, and floats narrowed: all 2^16 high halves and every 2^19-th pattern's
// neighbourhood with the low bits at the rounding ties (bfloat16 rounds 16 bits away, float16 13 or more),
// plus random patterns; c10's scalar conversions give the expected bits.
template <typename H>
bool conversions_match() {
  for (uint32_t base = 0; base < 65536; base += kLanes) {
    uint16_t bits[kLanes];
    for (int j = 0; j < kLanes; ++j) bits[j] = static_cast<uint16_t>(base + j);
    H h[kLanes];
    float out[kLanes];
    std::memcpy(h, bits, sizeof h);
    widen<H>(h, out);
    for (int j = 0; j < kLanes; ++j) {
      const float e = static_cast<float>(h[j]);
      if (std::memcmp(&e, &out[j], sizeof e) != 0) return false;
    }
  }
  std::mt19937 g(7);
  std::vector<uint32_t> patterns;
  const uint32_t lows[] = {0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x7FFF, 0x8000, 0x8001, 0xFFFF};
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t low : lows) patterns.push_back((hi << 13) | (low & 0x1FFF));
    if (hi < (1u << 16)) {
      for (uint32_t low : lows) patterns.push_back((hi << 16) | low);
    }
  }
  for (int k = 0; k < (1 << 22); ++k) patterns.push_back(static_cast<uint32_t>(g()));
  while (patterns.size() % kLanes) patterns.push_back(0x7F800001u);  // a signalling NaN
  for (size_t k = 0; k < patterns.size(); k += kLanes) {
    float in[kLanes];
    H out[kLanes];
    std::memcpy(in, &patterns[k], sizeof in);
    narrow<H>(in, out);
    for (int j = 0; j < kLanes; ++j) {
      const H e = static_cast<H>(in[j]);
      if (std::memcmp(&e, &out[j], sizeof e) != 0) {
        std::printf("narrow %08x: %04x, expected %04x\n", patterns[k + j], out[j].x, e.x);
        return false;
      }
    }
  }
  return true;
}

int main() {
  bool ok = sign_matches<float>() && sign_matches<double>() && threshold_matches<float>() &&
            threshold_matches<double>() && l1_sign_bits_match<float>() && l1_sign_bits_match<double>();
  ok = ok && conversions_match<c10::BFloat16>() && conversions_match<c10::Half>();
  for (int n : {0, 1, 15, 16, 17, 100, 1000, 4099})
    for (int seed = 0; seed < 3; ++seed)
      ok = ok && norms_match<float>(n, seed) && norms_match<double>(n, seed) && norms_match<c10::Half>(n, seed) &&
           norms_match<c10::BFloat16>(n, seed);
  for (int n = 1; n < kLanes; ++n)
    for (int seed = 0; seed < 8; ++seed)
      ok = ok && short_norms_match<float>(n, seed) && short_norms_match<double>(n, seed) &&
           short_norms_match<c10::Half>(n, seed) && short_norms_match<c10::BFloat16>(n, seed);
  ok = ok && column_squares_match_all<float>() && column_squares_match_all<double>() &&
       column_squares_match_all<c10::Half>() && column_squares_match_all<c10::BFloat16>();
  std::puts(ok ? "same" : "different");
  return ok ? 0 : 1;
}
"""


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def program(request, tmp_path_factory) -> Path:
    if not CPU_VARIANTS[request.param]:
        pytest.skip(f"this CPU lacks {request.param}")
    out = tmp_path_factory.mktemp(f"lanes-{request.param}")
    source = out / "lanes.cpp"
    source.write_text(PRELUDE + VARIANTS[request.param] + PROGRAM)
    include = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    lib = cpp.library_paths()[0]
    exe = out / "lanes"
    subprocess.run(["g++", *FLAGS, *include, str(source), "-o", str(exe), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"],
                   check=True, capture_output=True, text=True, timeout=600)
    exe.with_suffix(".variant").write_text(request.param)
    return exe


def test_lane_vectors_give_the_scalar_loops_bits(program):
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stdout + result.stderr


def _disassembly(program: Path) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(program)], capture_output=True, text=True,
                          check=True).stdout


def _text(asm: str, name: str) -> str:
    """The disassembly of function ``name`` (demangled, up to its parameter list) in ``asm``."""
    start = asm.index(f"<{name}(")
    return asm[start:asm.index("\n\n", start)]


def _body(asm: str, name: str) -> set[str]:
    """The instructions of function ``name`` in ``asm``."""
    return {line.split()[1] for line in _text(asm, name).splitlines()[1:] if len(line.split()) > 1}


def test_16_bit_conversions_are_straight_vector_code(program):
    """The lanes' bfloat16 / float16 conversions: no call, no branch (c10's scalar conversions branch on NaN and
    range), packed compares where they select; in the AVX2 variant 256-bit registers and F16C's
    conversions for float16 (with a packed float compare for NaN when narrowing)."""
    asm = _disassembly(program)
    variant = program.with_suffix(".variant").read_text()
    avx2 = variant in ("avx2", "avx512")
    for kind in ("c10::BFloat16", "c10::Half"):
        for fn in ("widen", "narrow"):
            ops = _body(asm, f"void {fn}<{kind}>")
            assert not {op for op in ops if op.startswith("j") or op.startswith("call")}, (fn, kind, sorted(ops))
            if avx2 and kind == "c10::Half":
                assert ("vcvtph2ps" if fn == "widen" else "vcvtps2ph") in ops, (fn, kind, sorted(ops))
                assert fn == "widen" or "vcmpunordps" in ops or "vcmpps" in ops, (fn, kind, sorted(ops))
            elif fn == "narrow" or kind == "c10::Half":  # NaN or range: a packed integer or float compare
                assert any("pcmp" in op or re.fullmatch(r"v?cmp\w*ps", op) for op in ops), (fn, kind, sorted(ops))
            if avx2:
                assert ("%zmm" if variant == "avx512" else "%ymm") in _text(asm, f"void {fn}<{kind}>"), (fn, kind)


def test_the_lanes_sign_and_threshold_are_vector_code(program):
    asm = _disassembly(program)
    for kind in ("float", "double"):
        packed = "ps" if kind == "float" else "pd"
        for fn in ("signs", "thresholds"):
            ops = _body(asm, f"void {fn}<{kind}>")
            assert any(op.removeprefix("v").startswith("cmp") and op.endswith(packed) for op in ops), (fn, sorted(ops))
            scalar = {"ucomiss", "ucomisd", "comiss", "comisd", "jp", "jnp", "cmovp", "cmovnp"}
            assert not {op.removeprefix("v") for op in ops} & scalar, sorted(ops)
        # l1·sign from the sign bit (with the linear term): one packed compare and bit operations, no blend.
        # (AVX-512's integer and, or name their element width: vpandd, vporq.)
        ops = {re.sub(r"^(pand|por)[dq]$", r"\1", op.removeprefix("v"))
               for op in _body(asm, f"void l1_sign_bits<{kind}>")}
        assert any(op.startswith("cmp") and op.endswith(packed) for op in ops), sorted(ops)
        assert ops & {"pand", f"and{packed}"} and ops & {"por", f"or{packed}"}, sorted(ops)
        assert not {op for op in ops if op.startswith(("blend", "pblend", "ucomi", "comi", "j"))}, sorted(ops)
        # A threshold that is not NaN: a packed max and min, no compare, no branch.
        ops = {op.removeprefix("v") for op in _body(asm, f"void number_thresholds<{kind}>")}
        assert {f"max{packed}", f"min{packed}"} <= ops, sorted(ops)
        assert not {op for op in ops if op.startswith(("cmp", "ucomi", "comi", "j", "blend"))}, sorted(ops)


def test_the_column_sums_are_vector_code(program):
    """Group norms by columns add each row's squares to per-column sums in memory, which the compiler left scalar
    (one cvtss2sd per element): they run on vectors, packed float-to-double conversions and additions."""
    asm = _disassembly(program)
    variant = program.with_suffix(".variant").read_text()
    for kind in ("float", "c10::Half", "c10::BFloat16"):
        name = f"bool regfast::cpu::{variant}::column_squares<float, {kind}, regfast::cpu::{variant}::Identity>"
        ops = _body(asm, name)
        packed = {"vcvtps2pd", "vaddpd"} if variant != "baseline" else {"cvtps2pd", "addpd"}
        assert packed <= ops, (kind, sorted(ops))
        if variant != "baseline":
            register = "%zmm" if variant == "avx512" else "%ymm"
            assert re.search(rf"vcvtps2pd\s+\S+,{register}", _text(asm, name)), kind
