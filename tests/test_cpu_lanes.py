"""The CPU kernels' lane vectors (csrc/cpu_kernels.h), checked on compiled code.

A small C++ program built with the extension's flags runs the lane-vector norm loop and sign against the
scalar loop they replace (same bits: float, double, float16, bfloat16; odd lengths, NaN, −0, infinities),
and the disassembly of the sign shows packed compares and no scalar compare or branch on NaN.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objdump") is None,
                                reason="needs g++ and objdump")

PROGRAM = r"""
#include "cpu_kernels.h"
#include "elementwise.h"
#include <cstdio>
#include <limits>
#include <random>
using namespace regfast;
using namespace regfast::cpu;

template <typename T, typename A>
void scalar_norms(const T* w, int64_t b, int64_t e, LaneSum<A>& a1, LaneSum<A>& a2) {
  lane_loop(b, e, [&](int64_t i, int j) {
    const A x = static_cast<A>(w[i]);
    a1.v[j] += std::abs(x);
    a2.v[j] += x * x;
  });
}

template <typename T>
bool norms_match(int n, int seed) {
  using A = acc_t<T>;
  std::mt19937 g(seed);
  std::normal_distribution<double> d;
  std::vector<T> w(n);
  for (int i = 0; i < n; ++i) w[i] = static_cast<T>(d(g) * (i % 7 == 0 ? 1e30 : 1.0));
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

int main() {
  bool ok = sign_matches<float>() && sign_matches<double>();
  for (int n : {0, 1, 15, 16, 17, 100, 1000, 4099})
    for (int seed = 0; seed < 3; ++seed)
      ok = ok && norms_match<float>(n, seed) && norms_match<double>(n, seed) && norms_match<c10::Half>(n, seed) &&
           norms_match<c10::BFloat16>(n, seed);
  std::puts(ok ? "same" : "different");
  return ok ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lanes")
    source = out / "lanes.cpp"
    source.write_text(PROGRAM)
    include = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    lib = cpp.library_paths()[0]
    exe = out / "lanes"
    subprocess.run(["g++", *FLAGS, *include, str(source), "-o", str(exe), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"],
                   check=True, capture_output=True, text=True, timeout=600)
    return exe


def test_lane_vectors_give_the_scalar_loops_bits(program):
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stdout + result.stderr


def test_the_lanes_sign_is_vector_code(program):
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(program)], capture_output=True, text=True,
                         check=True).stdout
    for kind in ("float", "double"):
        start = asm.index(f"<void signs<{kind}>(")
        body = asm[start:asm.index("\n\n", start)]
        ops = {line.split()[1] for line in body.splitlines()[1:] if len(line.split()) > 1}
        packed = "ps" if kind == "float" else "pd"
        assert any(op.startswith("cmp") and op.endswith(packed) for op in ops), sorted(ops)
        assert not ops & {"ucomiss", "ucomisd", "comiss", "comisd", "jp", "jnp", "cmovp", "cmovnp"}, sorted(ops)
