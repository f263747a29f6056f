// The group norms of penalty, add_penalty_grad_, penalty_backward and prox_: ‖u_g‖₂ of every group,
// u = w or the elastic-net step of w, and √|g|.
//
// Groups are split into pieces of at most kChunk elements (a whole-tensor group of 10^9 elements: ~15,000
// pieces), one block per piece; each group's piece sums are then added in a fixed order (sum_partials_kernel),
// so the result depends on neither the grid nor timing.
#include "cuda_launch.h"
#include "norm_parts.h"
#include "reduce.cuh"

namespace regfast {
namespace cuda {
namespace {

template <typename A>
constexpr int kParts = std::is_same<A, double>::value ? 3 : 1;

// One block per piece (tensor, group g, [j0, j1) of the group's elements in [o, g, k] order): the square sum of
// u over the piece in double, in kParts parts (norm_parts.h), written to partials[p·npieces + piece]. A group
// that is one run of memory (outer = 1) is read through 16-byte loads when aligned; any other layout walks its
// elements with a cursor (one division per piece and thread, none per element).
template <typename T>
__global__ void __launch_bounds__(kThreads) group_piece_kernel(const GroupPiece* pieces, int64_t npieces,
                                                               const TensorMeta* meta, Step step, bool elastic,
                                                               double* partials) {
  using A = acc_t<T>;
  constexpr int kP = kParts<A>;
  __shared__ double shared[kThreads / 32];
  ElasticStep<A> u{};
  if (elastic) u = elastic_of<A>(step);
  for (int64_t p = blockIdx.x; p < npieces; p += gridDim.x) {
    const GroupPiece piece = pieces[p];
    const TensorMeta m = meta[piece.tensor];
    const T* w = static_cast<const T*>(m.data);
    const int64_t size = m.numel / m.ngroups, row = m.ngroups * m.inner;
    double parts[3] = {0, 0, 0};
    auto add = [&](T v) {
      A x = to_acc<A>(v);
      if (elastic) x = u(x);
      add_square<kP>(parts, 1, static_cast<double>(x));
    };
    if (size == m.inner) {  // the group is one run: elements g·inner + j
      const T* base = w + piece.group * m.inner;
      for_elements<T>(
          piece.begin, piece.end, aligned16(base) && piece.begin % kVec<T> == 0,
          [&](int64_t j) {
            const Vec<T> v = *reinterpret_cast<const Vec<T>*>(base + j);
#pragma unroll
            for (int k = 0; k < kVec<T>; ++k) add(v.v[k]);
          },
          [&](int64_t j) { add(base[j]); });
    } else {  // element j of the group: (j / inner)·row + g·inner + j % inner
      const int64_t first = piece.begin + threadIdx.x;
      RunCursor at = RunCursor::at(first, m.inner);
      const RunCursor step = RunCursor::at(blockDim.x, m.inner);
      const T* base = w + piece.group * m.inner;
      for (int64_t j = first; j < piece.end; j += blockDim.x) {
        add(base[at.run * row + at.offset]);
        at.advance(step, m.inner);
      }
    }
    for (int k = 0; k < kP; ++k) {
      const double s = block_sum(parts[k], shared);
      if (threadIdx.x == 0) partials[k * npieces + p] = s;
    }
  }
}

// One thread per group: ‖u_g‖₂ from its summed parts (parts[p·total + q]) and √|g|.
template <int kP>
__global__ void __launch_bounds__(kThreads) group_finish_kernel(const GroupPiece* pieces, const int64_t* first,
                                                                int64_t total, const TensorMeta* meta,
                                                                const double* parts, double* norm, double* root) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const TensorMeta m = meta[pieces[first[q]].tensor];
    norm[q] = kP == 1 ? norm_from_parts(parts[q], 0, 0, 1)
                      : norm_from_parts(parts[q], parts[total + q], parts[2 * total + q], 3);
    root[q] = sqrt(static_cast<double>(m.numel / m.ngroups));
  }
}

}  // namespace

void launch_group_norms(DType dtype, const GroupPiece* pieces, int64_t npieces, const int64_t* first,
                        int64_t total_groups, const TensorMeta* meta, const Step* step, double* piece_parts,
                        double* group_parts, double* norm, double* root, cudaStream_t stream) {
  if (total_groups == 0) return;
  auto grid = [](int64_t n) { return static_cast<int>(n < kMaxBlocks ? n : kMaxBlocks); };
  const int parts = dtype == DType::kDouble ? 3 : 1;
  REGFAST_DISPATCH(dtype, {
    group_piece_kernel<scalar_t><<<grid(npieces), kThreads, 0, stream>>>(
        pieces, npieces, meta, step != nullptr ? *step : Step{}, step != nullptr, piece_parts);
  });
  sum_partials_kernel<double><<<grid(total_groups), kThreads, 0, stream>>>(piece_parts, npieces, first, total_groups,
                                                                           group_parts, total_groups, parts);
  const int64_t finish_blocks = (total_groups + kThreads - 1) / kThreads;
  if (parts == 3) {
    group_finish_kernel<3><<<grid(finish_blocks), kThreads, 0, stream>>>(pieces, first, total_groups, meta,
                                                                          group_parts, norm, root);
  } else {
    group_finish_kernel<1><<<grid(finish_blocks), kThreads, 0, stream>>>(pieces, first, total_groups, meta,
                                                                          group_parts, norm, root);
  }
}

}  // namespace cuda
}  // namespace regfast
