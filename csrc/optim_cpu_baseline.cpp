// The per-element loops of the fused optimizer steps for the baseline instruction set: a·b + c
// rounded twice, as ATen rounds it without AVX2 kernels. On other architectures than x86-64 the
// fused loops are built here too (std::fma is part of their baseline; see optim_cpu_fma.cpp).
#define REGFAST_OPTIM_LOOPS baseline
#include "optim_cpu_math.h"
#include "optim_cpu_groups.h"

namespace regfast {
namespace optim_cpu {

namespace rounded_twice {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  sgd_dispatch<false>(args, t, begin, end, sums);
}

void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  adamw_dispatch<false>(args, t, begin, end, sums);
}

const GroupPasses kGroupPasses = {&group_floors_run,   &metric_shrink_run, &round_into_run,  &group_shrink_run,
                                  &column_largest_run, &column_squares_run, &column_floors_run, &metric_sums_run,
                                  &metric_apply_run,   &column_scale_round_run, &pack_floors_run,
                                  &pack_metric_shrink_run, &pack_group_shrink_run};
}  // namespace rounded_twice

#if !defined(__x86_64__)
namespace fused {
void sgd_run(const SgdArgs& args, const SgdTensor& t, int64_t begin, int64_t end, double* sums) {
  sgd_dispatch<true>(args, t, begin, end, sums);
}

void adamw_run(const AdamWArgs& args, const AdamWTensor& t, int64_t begin, int64_t end, double* sums) {
  adamw_dispatch<true>(args, t, begin, end, sums);
}
}  // namespace fused
#endif

}  // namespace optim_cpu
}  // namespace regfast
