// CPU kernels of every regfast_C op.
//
// Each tensor is split into fixed-size chunks of kChunk elements; the (tensor, chunk) work list
// is spread over threads with at::parallel_for. A reduction writes one partial per chunk and the
// partials are summed in list order afterwards, so results do not depend on the thread count.
// Inside a chunk, sums run over kLanes independent accumulators (one per lane, vectorized by
// the compiler) combined pairwise in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "acc_type.h"
#include "cpu_work_list.h"
#include "groups.h"
#include "norm_parts.h"

namespace regfast {
namespace {

using cpu::Chunk;
using cpu::contiguous_all;
using cpu::for_each_chunk;
using cpu::kChunk;
using cpu::make_work_list;
using cpu::WorkList;
using cpu::write_back;

constexpr int kLanes = 16;

// The kLanes values of v summed pairwise, in a fixed order.
template <typename A>
inline A pairwise_total(const A* v) {
  A s[kLanes];
  std::copy(v, v + kLanes, s);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  }
  return s[0];
}

template <typename A>
struct LaneSum {
  A v[kLanes];

  LaneSum() { std::fill(v, v + kLanes, A(0)); }

  A total() const { return pairwise_total(v); }
};

// Calls body(i, lane) for i in [begin, end): whole rounds of kLanes first, so that the lane
// index is a compile-time pattern the vectorizer maps onto registers, then the tail.
template <typename Body>
inline void lane_loop(int64_t begin, int64_t end, Body&& body) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int j = 0; i < end; ++i, ++j) body(i, j);
}

// sign(w) that keeps NaN as NaN, so a NaN weight gives a NaN gradient. Written as independent
// selects (no nested conditionals) so that it compiles to vector compares and blends, not branches.
template <typename A>
inline A sign_of(A w) {
  const A pos = w > A(0) ? A(1) : A(0);
  const A neg = w < A(0) ? A(1) : A(0);
  return w != w ? w : pos - neg;
}

// Per-element scale of a run of elements, one value for the run or one per element: element i is
// multiplied by q(i)·(· p(i)), p a power of two that keeps both factors in range (see split_coefficient).
template <typename A>
struct ConstScale {
  A value, pre;
  A operator()(int64_t) const { return value; }
  A p(int64_t) const { return pre; }
};

template <typename A>
struct RowScale {
  const A* values;  // values[i - offset] is the scale of element i
  const A* pres;    // pres[i - offset] its power-of-two pre-scale
  int64_t offset;
  A operator()(int64_t i) const { return values[i - offset]; }
  A p(int64_t i) const { return pres[i - offset]; }
};

void check_group(at::TensorList ts, const char* name) {
  TORCH_CHECK(!ts.empty(), name, " must not be empty");
  const auto dtype = ts[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), name, " must be floating point");
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name,
                " must all be CPU tensors of one dtype, got ", t.device(), " ", t.scalar_type(), " and ", dtype);
  }
}

// The lane sums of a run of elements live in local arrays and `w` is restrict-qualified, so that
// the compiler knows the loads cannot alias the sums and vectorizes the loop (as in grad_run).
template <typename T, typename A>
inline void norms_run(const T* __restrict__ w, int64_t begin, int64_t end, LaneSum<A>& abs_sum, LaneSum<A>& sq_sum) {
  A s1[kLanes], s2[kLanes];
  std::copy(abs_sum.v, abs_sum.v + kLanes, s1);
  std::copy(sq_sum.v, sq_sum.v + kLanes, s2);
  lane_loop(begin, end, [&](int64_t i, int j) {
    const A x = static_cast<A>(w[i]);
    s1[j] += std::abs(x);
    s2[j] += x * x;
  });
  std::copy(s1, s1 + kLanes, abs_sum.v);
  std::copy(s2, s2 + kLanes, sq_sum.v);
}

// Parts of a group's square sum (see norm_parts.h): three for double, one otherwise.
template <typename A>
constexpr int kParts = std::is_same_v<A, double> ? 3 : 1;

// Σ f(w)² over a run in lane order (see norms_run), unscaled, into *out; for double also whether an
// element is out of range (then the run is summed again by parts, see square_parts_run).
template <typename A, typename T, typename F>
inline bool sumsq_run(const T* __restrict__ w, int64_t begin, int64_t end, F f, double* out) {
  double s[kLanes] = {}, flags[kLanes] = {};
  lane_loop(begin, end, [&](int64_t i, int j) {
    const double u = static_cast<double>(f(static_cast<A>(w[i])));
    s[j] += u * u;
    if constexpr (kParts<A> > 1) flags[j] += out_of_range(u) ? 1.0 : 0.0;
  });
  *out = pairwise_total(s);
  return kParts<A> > 1 && pairwise_total(flags) != 0;
}

// Σ f(w)² over a run by parts (see kParts), into out[0], out[stride], out[2·stride].
template <typename A, typename T, typename F>
inline void square_parts_run(const T* __restrict__ w, int64_t begin, int64_t end, F f, double* out, int64_t stride) {
  constexpr int kP = kParts<A>;
  double parts[kP][kLanes] = {};
  lane_loop(begin, end, [&](int64_t i, int j) {
    add_square<kP>(&parts[0][j], kLanes, static_cast<double>(f(static_cast<A>(w[i]))));
  });
  for (int p = 0; p < kP; ++p) out[p * stride] = pairwise_total(parts[p]);
}

// out[m] += f(row[m])² for a row of columns, unscaled; for double also whether an element is out of range
// (a count in lanes, as in sumsq_run, so that the loop vectorizes). Its own function so that the
// restrict parameters reach the vectorizer.
template <typename A, typename T, typename F>
__attribute__((noinline)) bool column_squares(const T* __restrict__ row, double* __restrict__ out, int64_t m_len,
                                              F f) {
  double flags[kLanes] = {};
  lane_loop(0, m_len, [&](int64_t m, int j) {
    const double u = static_cast<double>(f(static_cast<A>(row[m])));
    out[m] += u * u;
    if constexpr (kParts<A> > 1) flags[j] += out_of_range(u) ? 1.0 : 0.0;
  });
  return kParts<A> > 1 && pairwise_total(flags) != 0;
}

// c·x computed as q·(x·p) with p a power of two, for c = weight/norm: p = 1 and q = c unless c is far
// from 1 (a group of tiny or huge weights), where c itself may leave the range of A (or of double):
// then p and q each carry about half of c's exponent, and x·p stays within a few powers of two of
// weight (|x| ≤ norm).
inline void split_coefficient(double weight, double norm, double& p, double& q) {
  int ew = 0, en = 0;
  const double mw = std::frexp(weight, &ew), mn = std::frexp(norm, &en);
  const int e = ew - en;
  if (!(std::isfinite(weight) && std::isfinite(norm) && weight > 0) || (e > -60 && e < 60)) {
    p = 1;
    q = weight / norm;
    return;
  }
  p = std::ldexp(1.0, e / 2);
  q = (mw / mn) * std::ldexp(1.0, e - e / 2);
}

// Per-tensor Σ|w| and Σw², from per-chunk partials summed in order.
template <typename T>
void tensor_norms(const std::vector<at::Tensor>& ts, std::vector<acc_t<T>>& l1, std::vector<acc_t<T>>& l2sq) {
  using A = acc_t<T>;
  const WorkList wl = make_work_list(ts);
  std::vector<A> p1(wl.chunks.size()), p2(wl.chunks.size());
  for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
    LaneSum<A> s1, s2;
    norms_run(ts[ch.tensor].const_data_ptr<T>(), ch.begin, ch.end, s1, s2);
    p1[c] = s1.total();
    p2[c] = s2.total();
  });
  l1.assign(ts.size(), A(0));
  l2sq.assign(ts.size(), A(0));
  for (size_t t = 0; t < ts.size(); ++t) {
    for (int64_t c = wl.first[t]; c < wl.first[t + 1]; ++c) {
      l1[t] += p1[c];
      l2sq[t] += p2[c];
    }
  }
}

// ‖f(w_g)‖₂ of every group of every tensor, concatenated, in double: tensor t's groups start at offsets[t].
// No overflow or underflow for any finite input (see kParts).
//
// Stage 1 writes partials for fixed pieces of each tensor; stage 2 sums them in a fixed order:
//   outer == 1, inner <= kChunk: pieces are runs of whole groups, one partial per group;
//   outer == 1, inner > kChunk: each group is split into kChunk pieces, one partial per piece;
//   outer > 1: pieces are runs of whole rows [o, :, :], one partial per (piece, column).
template <typename T, typename F>
std::vector<double> group_norms(const std::vector<at::Tensor>& ts, const std::vector<GroupShape>& shapes, F f,
                                  std::vector<int64_t>& offsets) {
  using A = acc_t<T>;
  constexpr int kP = kParts<A>;
  struct Piece {
    int64_t tensor, begin, end, slot;  // begin/end: groups, flat elements or rows, by the tensor's kind
  };
  enum Kind { kWholeGroups, kSplitGroups, kRows };
  const size_t nt = ts.size();
  std::vector<Kind> kinds(nt);
  std::vector<int64_t> slot_base(nt), splits(nt, 1);
  std::vector<Piece> pieces;
  int64_t slots = 0, groups = 0;
  offsets.assign(nt + 1, 0);
  for (size_t t = 0; t < nt; ++t) {
    offsets[t] = groups;
    slot_base[t] = slots;
    if (ts[t].numel() == 0) continue;
    const GroupShape& s = shapes[t];
    groups += s.ngroups;
    const auto ti = static_cast<int64_t>(t);
    if (s.outer == 1 && s.inner <= kChunk) {
      kinds[t] = kWholeGroups;
      const int64_t per_piece = std::max<int64_t>(1, kChunk / s.inner);
      for (int64_t g = 0; g < s.ngroups; g += per_piece) pieces.push_back({ti, g, std::min(s.ngroups, g + per_piece), slots + g});
      slots += s.ngroups;
    } else if (s.outer == 1) {
      kinds[t] = kSplitGroups;
      splits[t] = (s.inner + kChunk - 1) / kChunk;
      for (int64_t g = 0; g < s.ngroups; ++g) {
        for (int64_t p = 0; p < splits[t]; ++p) {
          const int64_t b = g * s.inner + p * kChunk;
          pieces.push_back({ti, b, std::min(b + kChunk, (g + 1) * s.inner), slots + g * splits[t] + p});
        }
      }
      slots += s.ngroups * splits[t];
    } else {
      kinds[t] = kRows;
      const int64_t rows = std::max<int64_t>(1, kChunk / s.row_length());
      splits[t] = (s.outer + rows - 1) / rows;
      for (int64_t p = 0; p < splits[t]; ++p) {
        pieces.push_back({ti, p * rows, std::min(s.outer, (p + 1) * rows), slots + p * s.row_length()});
      }
      slots += splits[t] * s.row_length();
    }
  }
  offsets[nt] = groups;

  // Part-major: part p of slot i at partial[p·slots + i]. Stage 1a sums every piece unscaled into the
  // middle part and flags the pieces with an out-of-range element (double only); stage 1b sums those
  // pieces again by parts. The small and big parts exist only if a piece was flagged.
  std::vector<double> partial(slots, 0.0);
  std::vector<char> flagged(pieces.size(), 0);
  auto run_piece = [&](int64_t q, bool by_parts) {
    const Piece& pc = pieces[q];
    const T* w = ts[pc.tensor].template const_data_ptr<T>();
    const GroupShape& s = shapes[pc.tensor];
    double* base = partial.data();  // stage 1a: the middle part only; stage 1b: all parts
    bool flag = false;
    switch (kinds[pc.tensor]) {
      case kWholeGroups:
        for (int64_t g = pc.begin; g < pc.end; ++g) {
          double* out = base + pc.slot + g - pc.begin;
          if (by_parts) square_parts_run<A>(w, g * s.inner, (g + 1) * s.inner, f, out, slots);
          else flag |= sumsq_run<A>(w, g * s.inner, (g + 1) * s.inner, f, out);
        }
        break;
      case kSplitGroups:
        if (by_parts) square_parts_run<A>(w, pc.begin, pc.end, f, base + pc.slot, slots);
        else flag = sumsq_run<A>(w, pc.begin, pc.end, f, base + pc.slot);
        break;
      case kRows: {
        const int64_t m_len = s.row_length();
        if (by_parts) {
          for (int p = 0; p < kP; ++p) std::fill_n(base + p * slots + pc.slot, m_len, 0.0);
          for (int64_t o = pc.begin; o < pc.end; ++o) {
            for (int64_t m = 0; m < m_len; ++m) {
              add_square<kP>(base + pc.slot + m, slots, static_cast<double>(f(static_cast<A>(w[o * m_len + m]))));
            }
          }
        } else {
          for (int64_t o = pc.begin; o < pc.end; ++o) flag |= column_squares<A>(w + o * m_len, base + pc.slot, m_len, f);
        }
        break;
      }
    }
    flagged[q] = flag ? 1 : 0;
  };
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) run_piece(q, false);
  });
  int parts = 1;
  if (kP > 1 && std::find(flagged.begin(), flagged.end(), 1) != flagged.end()) {
    std::vector<double> middle = std::move(partial);
    partial.assign(slots * kP, 0.0);
    std::copy(middle.begin(), middle.end(), partial.begin() + slots);
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        if (flagged[q]) run_piece(q, true);
      }
    });
    parts = kP;
  }

  std::vector<double> norms(groups, 0.0);
  at::parallel_for(0, static_cast<int64_t>(nt), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (ts[t].numel() == 0) continue;
      const GroupShape& s = shapes[t];
      const double* p = partial.data() + slot_base[t];
      if (kinds[t] == kRows) {
        // Pieces in the outer loop, so that each piece's row of partials is read in order; each group's
        // sum still runs over the pieces in order, then over k.
        std::vector<double> acc(parts * s.ngroups, 0.0);
        for (int i = 0; i < parts; ++i) {
          const double* part = p + i * slots;
          double* sums = acc.data() + i * s.ngroups;
          for (int64_t q = 0; q < splits[t]; ++q) {
            const double* row = part + q * s.row_length();
            for (int64_t k = 0; k < s.inner; ++k) {
              for (int64_t g = 0; g < s.ngroups; ++g) sums[g] += row[g * s.inner + k];
            }
          }
        }
        for (int64_t g = 0; g < s.ngroups; ++g) {
          double sums[3] = {};
          for (int i = 0; i < parts; ++i) sums[i] = acc[i * s.ngroups + g];
          norms[offsets[t] + g] = norm_from_parts(sums[0], sums[1], sums[2], parts);
        }
        continue;
      }
      for (int64_t g = 0; g < s.ngroups; ++g) {
        double acc[3] = {};
        for (int i = 0; i < parts; ++i) {
          for (int64_t q = 0; q < splits[t]; ++q) acc[i] += p[i * slots + g * splits[t] + q];
        }
        norms[offsets[t] + g] = norm_from_parts(acc[0], acc[1], acc[2], parts);
      }
    }
  });
  return norms;
}

// Calls body(b, e, scale) over the runs of chunk [begin, end) that share a scale accessor:
// no per-group scale (`scales` empty: `fixed` everywhere, pre-scale 1), one group at a time
// (outer == 1), or one row of columns at a time with a per-column scale (outer > 1; `scales` then
// holds one value per column of the row, i.e. per (g, k)). `pres` is laid out as `scales`.
template <typename A, typename Body>
void for_scale_runs(const GroupShape& s, const A* scales, const A* pres, A fixed, int64_t begin, int64_t end,
                    Body&& body) {
  if (scales == nullptr) {
    body(begin, end, ConstScale<A>{fixed, A(1)});
    return;
  }
  if (s.outer == 1) {
    for (int64_t i = begin; i < end;) {
      const int64_t g = i / s.inner;
      const int64_t e = std::min(end, (g + 1) * s.inner);
      body(i, e, ConstScale<A>{scales[g], pres[g]});
      i = e;
    }
    return;
  }
  const int64_t m_len = s.row_length();
  for (int64_t i = begin; i < end;) {
    const int64_t row_start = i - i % m_len;
    const int64_t e = std::min(end, row_start + m_len);
    body(i, e, RowScale<A>{scales, pres, row_start});
    i = e;
  }
}

// Per-group values turned into the layout for_scale_runs reads: per group when outer == 1,
// per column (g, k) of a row when outer > 1.
template <typename A>
std::vector<A> expand_scales(const std::vector<A>& per_group, const std::vector<int64_t>& offsets,
                             const std::vector<GroupShape>& shapes, const std::vector<at::Tensor>& ts,
                             std::vector<int64_t>& scale_offsets) {
  std::vector<A> out;
  scale_offsets.assign(ts.size(), 0);
  for (size_t t = 0; t < ts.size(); ++t) {
    scale_offsets[t] = static_cast<int64_t>(out.size());
    if (ts[t].numel() == 0) continue;
    const GroupShape& s = shapes[t];
    const A* g = per_group.data() + offsets[t];
    if (s.outer == 1) {
      out.insert(out.end(), g, g + s.ngroups);
    } else {
      for (int64_t j = 0; j < s.ngroups; ++j) out.insert(out.end(), s.inner, g[j]);
    }
  }
  return out;
}

std::vector<GroupShape> shapes_of(const std::vector<at::Tensor>& ts, Grouping grouping) {
  std::vector<GroupShape> shapes;
  shapes.reserve(ts.size());
  for (const auto& t : ts) shapes.push_back(t.numel() ? group_shape(t, grouping) : GroupShape{1, 1, 0});
  return shapes;
}

// One run of the gradient pass: out[i] = [out[i] +] mult·(l1·sign(w) + scale(i)·(w·scale.p(i))) for i in
// [begin, end) (scale(i)·p(i) is 2·l2 plus the group coefficient), adding |w| and w² to the lane sums.
// The sums live in local arrays and the pointers are restrict-qualified so that the stores to `out`
// cannot alias them and the loop vectorizes.
template <typename T, bool kL1, bool kLin, bool kAccumulate, typename A, typename Scale>
inline void grad_run(const T* __restrict__ w, T* __restrict__ out, int64_t begin, int64_t end, A l1, A mult,
                     Scale scale, LaneSum<A>& abs_sum, LaneSum<A>& sq_sum) {
  A s1[kLanes], s2[kLanes];
  std::copy(abs_sum.v, abs_sum.v + kLanes, s1);
  std::copy(sq_sum.v, sq_sum.v + kLanes, s2);
  lane_loop(begin, end, [&](int64_t i, int j) {
    const A x = static_cast<A>(w[i]);
    s1[j] += std::abs(x);
    s2[j] += x * x;
    A inc = 0;
    if constexpr (kL1) inc += l1 * sign_of(x);
    if constexpr (kLin) inc += scale(i) * (x * scale.p(i));
    if constexpr (kAccumulate) {
      out[i] = static_cast<T>(static_cast<A>(out[i]) + mult * inc);
    } else {
      out[i] = static_cast<T>(mult * inc);
    }
  });
  std::copy(s1, s1 + kLanes, abs_sum.v);
  std::copy(s2, s2 + kLanes, sq_sum.v);
}

// The gradient pass: out = [g +] mult·(l1·sign(w) + (2·l2 + gscale)·w), with per-chunk Σ|w| and Σw².
// The group-lasso part of the value, gl·Σ √|g|·‖w_g‖, is added by the caller from the group norms.
template <typename T>
acc_t<T> grad_pass(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& outs, bool accumulate,
                   double l1, double l2, double gl, Grouping grouping, double mult) {
  using A = acc_t<T>;
  const size_t nt = ws.size();
  std::vector<GroupShape> shapes;
  std::vector<A> scales, pres;
  std::vector<int64_t> scale_offsets;
  double group_value = 0;
  if (gl != 0) {
    shapes = shapes_of(ws, grouping);
    std::vector<int64_t> offsets;
    const std::vector<double> norms = group_norms<T>(ws, shapes, [](A x) { return x; }, offsets);
    std::vector<A> per_group(norms.size()), pre(norms.size());
    for (size_t t = 0; t < nt; ++t) {
      if (ws[t].numel() == 0) continue;
      const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
      for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) {
        const double norm = norms[g];
        group_value += root * norm;
        double p = 1, q = 0;
        if (norm != 0) split_coefficient(gl * root, norm, p, q);
        // (2·l2 + c)·w as (2·l2/p + q)·(w·p): with p = 1 the sum the element loop would form.
        per_group[g] = static_cast<A>(2 * l2 / p) + static_cast<A>(q);
        pre[g] = static_cast<A>(p);
      }
    }
    scales = expand_scales(per_group, offsets, shapes, ws, scale_offsets);
    pres = expand_scales(pre, offsets, shapes, ws, scale_offsets);
  } else {
    shapes.assign(nt, GroupShape{1, 1, 1});
  }
  const WorkList wl = make_work_list(ws);
  std::vector<A> p1(wl.chunks.size()), p2(wl.chunks.size());
  const A a_l1 = static_cast<A>(l1), a_lin = static_cast<A>(2 * l2), a_mult = static_cast<A>(mult);
  const bool has_l1 = l1 != 0, has_lin = l2 != 0 || gl != 0;

  auto run = [&](auto l1_tag, auto lin_tag, auto acc_tag) {
    constexpr bool kL1 = decltype(l1_tag)::value, kLin = decltype(lin_tag)::value;
    constexpr bool kAccumulate = decltype(acc_tag)::value;
    for_each_chunk(wl, [&](int64_t c, const Chunk& ch) {
      const T* w = ws[ch.tensor].const_data_ptr<T>();
      T* out = outs[ch.tensor].data_ptr<T>();
      const A* sc = gl != 0 ? scales.data() + scale_offsets[ch.tensor] : nullptr;
      const A* pr = gl != 0 ? pres.data() + scale_offsets[ch.tensor] : nullptr;
      LaneSum<A> s1, s2;
      for_scale_runs(shapes[ch.tensor], sc, pr, a_lin, ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        grad_run<T, kL1, kLin, kAccumulate>(w, out, b, e, a_l1, a_mult, scale, s1, s2);
      });
      p1[c] = s1.total();
      p2[c] = s2.total();
    });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (accumulate) {
    if (has_l1 && has_lin) run(T_{}, T_{}, T_{});
    else if (has_l1) run(T_{}, F_{}, T_{});
    else if (has_lin) run(F_{}, T_{}, T_{});
  } else {
    if (has_l1 && has_lin) run(T_{}, T_{}, F_{});
    else if (has_l1) run(T_{}, F_{}, F_{});
    else if (has_lin) run(F_{}, T_{}, F_{});
  }
  A abs_sum = 0, sq_sum = 0;
  for (size_t c = 0; c < wl.chunks.size(); ++c) {
    abs_sum += p1[c];
    sq_sum += p2[c];
  }
  A value = 0;
  if (l1 != 0) value += static_cast<A>(l1) * abs_sum;
  if (l2 != 0) value += static_cast<A>(l2) * sq_sum;
  if (gl != 0) value += static_cast<A>(gl * group_value);
  return value;
}

std::tuple<at::Tensor, at::Tensor> norms_cpu(at::TensorList params) {
  check_group(params, "params");
  const auto ws = contiguous_all(params);
  const auto acc = acc_type(params[0].scalar_type());
  at::Tensor l1 = at::empty({static_cast<int64_t>(ws.size())}, params[0].options().dtype(acc));
  at::Tensor l2sq = at::empty_like(l1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_norms_cpu", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> v1, v2;
    tensor_norms<scalar_t>(ws, v1, v2);
    std::copy(v1.begin(), v1.end(), l1.data_ptr<A>());
    std::copy(v2.begin(), v2.end(), l2sq.data_ptr<A>());
  });
  return {l1, l2sq};
}

at::Tensor penalty_cpu(at::TensorList params, double l1, double l2, double gl, c10::string_view groups) {
  check_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  const auto ws = contiguous_all(params);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_cpu", [&] {
    using A = acc_t<scalar_t>;
    A v = 0;
    if (l1 != 0 || l2 != 0) {
      std::vector<A> v1, v2;
      tensor_norms<scalar_t>(ws, v1, v2);
      A s1 = 0, s2 = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        s1 += v1[t];
        s2 += v2[t];
      }
      if (l1 != 0) v += static_cast<A>(l1) * s1;
      if (l2 != 0) v += static_cast<A>(l2) * s2;
    }
    if (gl != 0) {
      const auto shapes = shapes_of(ws, grouping);
      std::vector<int64_t> offsets;
      const auto norms = group_norms<scalar_t>(ws, shapes, [](A x) { return x; }, offsets);
      double term = 0;
      for (size_t t = 0; t < ws.size(); ++t) {
        if (ws[t].numel() == 0) continue;
        const double root = std::sqrt(static_cast<double>(shapes[t].group_size()));
        for (int64_t g = offsets[t]; g < offsets[t + 1]; ++g) term += root * norms[g];
      }
      v += static_cast<A>(gl * term);
    }
    value = static_cast<double>(v);
  });
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

std::vector<at::Tensor> penalty_backward_cpu(const at::Tensor& grad, at::TensorList params, double l1, double l2,
                                             double gl, c10::string_view groups) {
  check_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  const auto ws = contiguous_all(params);
  std::vector<at::Tensor> outs;
  outs.reserve(ws.size());
  for (const auto& w : ws) outs.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  const double mult = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_penalty_backward_cpu",
                                  [&] {
                                    if (l1 == 0 && l2 == 0 && gl == 0) {
                                      for (auto& o : outs) o.zero_();
                                    } else {
                                      grad_pass<scalar_t>(ws, outs, false, l1, l2, gl, grouping, mult);
                                    }
                                  });
  // Results take the layout of their param, like the fake kernel's empty_like.
  for (size_t i = 0; i < outs.size(); ++i) {
    if (!params[i].is_contiguous()) outs[i] = at::empty_like(params[i]).copy_(outs[i]);
  }
  return outs;
}

at::Tensor add_penalty_grad_cpu(at::TensorList params, at::TensorList grads, double l1, double l2, double gl,
                                c10::string_view groups) {
  check_group(params, "params");
  TORCH_CHECK(grads.size() == params.size(), "grads and params differ in length");
  const Grouping grouping = parse_grouping(groups);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].device() == params[i].device(),
                "grads[", i, "] does not match params[", i, "] in shape, dtype or device");
  }
  const auto ws = contiguous_all(params);
  const auto gs = contiguous_all(grads);
  const auto acc = acc_type(params[0].scalar_type());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_add_penalty_grad_cpu",
                                  [&] { value = grad_pass<scalar_t>(ws, gs, true, l1, l2, gl, grouping, 1.0); });
  write_back(grads, gs);
  return at::scalar_tensor(value, params[0].options().dtype(acc));
}

// clamp(x, −t, t) for the soft threshold x − clamp(x, −t, t): NaN for a NaN threshold (a NaN step), so that
// the threshold propagates NaN instead of giving 0.
template <typename A>
inline A soft_clamp(A x, A t) {
  const A lower = std::max(x, -t);
  return lower <= t ? lower : t;
}

template <typename T>
void prox_impl(const std::vector<at::Tensor>& ws, double lr, double l1, double l2, double gl, Grouping grouping) {
  using A = acc_t<T>;
  const bool has_t = l1 != 0, has_shrink = l2 != 0;
  const double shrink_d = has_shrink ? 1.0 / (1.0 + 2.0 * lr * l2) : 1.0;
  const A t = static_cast<A>(lr * l1), shrink = static_cast<A>(shrink_d);
  // The elastic-net step u(w), whose group norms set the group shrink.
  auto elastic = [=](A x) {
    if (has_t) x = x - soft_clamp(x, t);
    if (has_shrink) x = x * shrink;
    return x;
  };
  const size_t nt = ws.size();
  std::vector<GroupShape> shapes;
  std::vector<A> scales;
  std::vector<int64_t> scale_offsets;
  if (gl != 0) {
    shapes = shapes_of(ws, grouping);
    std::vector<int64_t> offsets;
    const auto norms = group_norms<T>(ws, shapes, elastic, offsets);
    std::vector<A> factor(norms.size());
    for (size_t i = 0; i < nt; ++i) {
      if (ws[i].numel() == 0) continue;
      const double c = lr * gl * std::sqrt(static_cast<double>(shapes[i].group_size())) * shrink_d;
      for (int64_t g = offsets[i]; g < offsets[i + 1]; ++g) {
        const double norm = norms[g];
        // In double: a tiny norm gives c/norm = inf and factor 0. std::max(x, 0) keeps a NaN x, so a NaN
        // group stays NaN.
        factor[g] = norm == 0 ? A(0) : static_cast<A>(std::max(1 - c / norm, 0.0));
      }
    }
    scales = expand_scales(factor, offsets, shapes, ws, scale_offsets);
  } else {
    shapes.assign(nt, GroupShape{1, 1, 1});
  }
  const WorkList wl = make_work_list(ws);
  auto run = [&](auto t_tag, auto shrink_tag, auto group_tag) {
    constexpr bool kT = decltype(t_tag)::value, kShrink = decltype(shrink_tag)::value;
    constexpr bool kGroup = decltype(group_tag)::value;
    for_each_chunk(wl, [&](int64_t, const Chunk& ch) {
      T* w = ws[ch.tensor].data_ptr<T>();
      const A* sc = kGroup ? scales.data() + scale_offsets[ch.tensor] : nullptr;
      // The prox multiplies by the factor alone: no pre-scale is read, so the factors stand in for them.
      for_scale_runs(shapes[ch.tensor], sc, sc, A(0), ch.begin, ch.end, [&](int64_t b, int64_t e, auto scale) {
        for (int64_t i = b; i < e; ++i) {
          A x = static_cast<A>(w[i]);
          if constexpr (kT) x = x - soft_clamp(x, t);
          if constexpr (kShrink) x = x * shrink;
          if constexpr (kGroup) x = x * scale(i);
          w[i] = static_cast<T>(x);
        }
      });
    });
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (gl != 0) {
    if (has_t && has_shrink) run(T_{}, T_{}, T_{});
    else if (has_t) run(T_{}, F_{}, T_{});
    else if (has_shrink) run(F_{}, T_{}, T_{});
    else run(F_{}, F_{}, T_{});
  } else {
    if (has_t && has_shrink) run(T_{}, T_{}, F_{});
    else if (has_t) run(T_{}, F_{}, F_{});
    else if (has_shrink) run(F_{}, T_{}, F_{});
  }
}

void prox_cpu(at::TensorList params, const std::optional<at::Tensor>& lr_tensor, double lr, double l1, double l2,
              double gl, c10::string_view groups) {
  check_group(params, "params");
  const Grouping grouping = parse_grouping(groups);
  if (l1 == 0 && l2 == 0 && gl == 0) return;
  const double step = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const auto ws = contiguous_all(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "regfast_prox_cpu",
                                  [&] { prox_impl<scalar_t>(ws, step, l1, l2, gl, grouping); });
  write_back(params, ws);
}

}  // namespace

TORCH_LIBRARY_IMPL(regfast_C, CPU, m) {
  m.impl("norms", &norms_cpu);
  m.impl("penalty", &penalty_cpu);
  m.impl("penalty_backward", &penalty_backward_cpu);
  m.impl("add_penalty_grad_", &add_penalty_grad_cpu);
  m.impl("prox_", &prox_cpu);
}

}  // namespace regfast
