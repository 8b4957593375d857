// CUDA kernel: forward substitution (I - A) h = x on a DAG, one launch per topological level.
// Untested on a GPU until a device session runs tests/ops/test_dag_kernel.py there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace chimera {
namespace {

// One block per node of the level; threads stride over its H * F state entries.
template <typename scalar_t, typename index_t>
__global__ void dag_level_kernel(const int64_t* __restrict__ order, int64_t level_begin,
                                 const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                 const scalar_t* __restrict__ weight, scalar_t* __restrict__ h, int64_t heads,
                                 int64_t feat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = order[level_begin + blockIdx.x];
  const int64_t width = heads * feat;
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    const int64_t hd = t / feat;
    acc_t acc = static_cast<acc_t>(h[i * width + t]);
    for (index_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
      acc += static_cast<acc_t>(weight[e * heads + hd]) * static_cast<acc_t>(h[static_cast<int64_t>(col[e]) * width + t]);
    }
    h[i * width + t] = static_cast<scalar_t>(acc);
  }
}

at::Tensor dag_solve_cuda(const at::Tensor& level_ptr_in, const at::Tensor& order_in, const at::Tensor& rowptr_in,
                          const at::Tensor& col_in, const at::Tensor& weight_in, const at::Tensor& x_in) {
  const char* op = "chimera::dag_solve";
  check_csr(rowptr_in, col_in, op);
  check_features(x_in, x_in, op, "x");
  const int64_t num_nodes = x_in.size(0), heads = x_in.size(1), feat = x_in.size(2);
  TORCH_CHECK(level_ptr_in.dim() == 1 && level_ptr_in.scalar_type() == at::kLong && level_ptr_in.numel() >= 1,
              "chimera::dag_solve: level_ptr must be a 1-D int64 tensor with L + 1 >= 1 entries, got shape ",
              level_ptr_in.sizes(), " and dtype ", level_ptr_in.scalar_type());
  TORCH_CHECK(order_in.dim() == 1 && order_in.scalar_type() == at::kLong && order_in.size(0) == num_nodes,
              "chimera::dag_solve: order must be a 1-D int64 permutation of the ", num_nodes, " nodes");
  TORCH_CHECK(rowptr_in.size(0) == num_nodes + 1, "chimera::dag_solve: rowptr must have N + 1 = ", num_nodes + 1,
              " entries, got ", rowptr_in.size(0));
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == col_in.size(0) && weight_in.size(1) == heads,
              "chimera::dag_solve: weight must have shape [E, H] = [", col_in.size(0), ", ", heads, "], got ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "chimera::dag_solve: weight and x must share a dtype");
  check_device(order_in, x_in, op, "order");
  check_device(rowptr_in, x_in, op, "rowptr");
  check_device(weight_in, x_in, op, "weight");
  const c10::cuda::CUDAGuard guard(x_in.device());
  // The level boundaries drive the launches from the host: one copy, then no more syncs. Being on
  // the host, they are checked on every call.
  const auto level_ptr = level_ptr_in.to(at::kCPU).contiguous();
  check_ptr_values(level_ptr.data_ptr<int64_t>(), level_ptr.size(0), num_nodes, op, "level_ptr",
                   "the number of nodes N");
  const auto order = order_in.contiguous();
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto weight = weight_in.contiguous();
  if (debug_checks_enabled()) {
    // order, rowptr and col on the device (one synchronization), then, with those known to be
    // valid, that every edge goes from an earlier level to a later one (a second).
    DeviceChecks checks(op);
    checks.permutation(order, num_nodes, "order");
    checks.ptr(rowptr, col.size(0), "rowptr", "len(col)");
    checks.range(col, num_nodes, "col");
    checks.run();
    if (col.numel() > 0) {
      auto level = at::empty({num_nodes}, order.options());
      level.index_copy_(0, order, at::repeat_interleave(at::arange(level_ptr.size(0) - 1, level_ptr.options()),
                                                        level_ptr.diff(), /*dim=*/0, /*output_size=*/num_nodes)
                                      .to(order.device()));
      const auto row = at::repeat_interleave(at::arange(num_nodes, rowptr.options()), rowptr.diff(), /*dim=*/0,
                                             /*output_size=*/col.size(0));
      checks.require((level.index_select(0, col) < level.index_select(0, row)).all(),
                     "every edge must go from an earlier level to a later one (a cycle, or wrong levels)");
      checks.run();
    }
  }
  auto h = x_in.contiguous().clone();
  if (h.numel() == 0) return h;
  TORCH_CHECK(num_nodes <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 nodes, got ", num_nodes);
  const int64_t* lp = level_ptr.data_ptr<int64_t>();
  const int threads = static_cast<int>(std::min<int64_t>(256, ((heads * feat + 31) / 32) * 32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "chimera_dag_solve_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_dag_solve_cuda_index", [&] {
      for (int64_t l = 0; l + 1 < level_ptr.size(0); ++l) {
        const int64_t count = lp[l + 1] - lp[l];
        if (count == 0) continue;
        dag_level_kernel<scalar_t, index_t><<<count, threads, 0, stream>>>(
            order.data_ptr<int64_t>(), lp[l], rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(),
            weight.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), heads, feat);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CUDA, m) { m.impl("dag_solve", &dag_solve_cuda); }

}  // namespace chimera
