// CUDA kernels for CSR sparse-dense products over multi-head node features.
// Untested on a GPU until a device session runs tests/test_kernels.py there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace chimera {
namespace {

// One block per output row; threads stride over the H * F outputs of that row, so loads of
// x[col[e], :, :] are coalesced and no atomics are needed.
template <typename scalar_t, typename index_t>
__global__ void spmm_kernel(const index_t* __restrict__ rowptr, const index_t* __restrict__ col,
                            const scalar_t* __restrict__ weight, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t heads,
                            int64_t feat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t width = heads * feat;
  const index_t begin = rowptr[row], end = rowptr[row + 1];
  for (int64_t t = threadIdx.x; t < width; t += blockDim.x) {
    const int64_t h = t / feat;
    acc_t acc = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[row * width + t]);
    for (index_t e = begin; e < end; ++e) {
      acc += static_cast<acc_t>(weight[e * heads + h]) * static_cast<acc_t>(x[static_cast<int64_t>(col[e]) * width + t]);
    }
    out[row * width + t] = static_cast<scalar_t>(acc);
  }
}

// One warp per (edge, head) pair; lanes split F and reduce with shuffles.
template <typename scalar_t, typename index_t>
__global__ void edge_dot_kernel(const index_t* __restrict__ row, const index_t* __restrict__ col,
                                const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                scalar_t* __restrict__ out, int64_t num_edges, int64_t heads, int64_t feat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= num_edges * heads) return;
  const int64_t e = warp / heads, h = warp % heads;
  const scalar_t* ar = a + (static_cast<int64_t>(row[e]) * heads + h) * feat;
  const scalar_t* br = b + (static_cast<int64_t>(col[e]) * heads + h) * feat;
  acc_t acc = 0;
  for (int64_t f = lane; f < feat; f += 32) acc += static_cast<acc_t>(ar[f]) * static_cast<acc_t>(br[f]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffff, acc, offset);
  if (lane == 0) out[warp] = static_cast<scalar_t>(acc);
}

// Index values live on the device: reading them costs a synchronization, so they are checked
// only in debug mode (torch_geometric.debug() or CHIMERA_DEBUG_CHECKS=1), in one batch. Outside
// it, a rowptr or col out of range reads out of bounds, as the Python wrappers never build one.
void check_csr_values(const at::Tensor& rowptr, const at::Tensor& col, int64_t num_src, const char* op) {
  if (!debug_checks_enabled()) return;
  DeviceChecks checks(op);
  checks.ptr(rowptr, col.size(0), "rowptr", "len(col)");
  checks.range(col, num_src, "col");
  checks.run();
}

at::Tensor spmm_cuda(const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& weight_in,
                     const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in) {
  check_csr(rowptr_in, col_in, "chimera::spmm");
  check_features(x_in, x_in, "chimera::spmm", "x");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == col_in.size(0) && weight_in.size(1) == x_in.size(1),
              "chimera::spmm: weight must have shape [E, H] = [", col_in.size(0), ", ", x_in.size(1), "], got ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "chimera::spmm: weight and x must share a dtype");
  check_device(rowptr_in, x_in, "chimera::spmm", "rowptr");
  check_device(weight_in, x_in, "chimera::spmm", "weight");
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_csr_values(rowptr_in, col_in, x_in.size(0), "chimera::spmm");
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto x = x_in.contiguous();
  const int64_t num_rows = rowptr.size(0) - 1, heads = x.size(1), feat = x.size(2);
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_features(*bias_in, x_in, "chimera::spmm", "bias");
    TORCH_CHECK(bias_in->size(0) == num_rows && bias_in->size(1) == heads && bias_in->size(2) == feat,
                "chimera::spmm: bias must have shape [R, H, F] = [", num_rows, ", ", heads, ", ", feat, "], got ",
                bias_in->sizes());
    bias = bias_in->contiguous();
  }
  auto out = at::empty({num_rows, heads, feat}, x.options());
  if (out.numel() == 0) return out;
  const int threads = static_cast<int>(std::min<int64_t>(256, ((heads * feat + 31) / 32) * 32));
  // The grid size is an unsigned int: a larger count would be silently truncated.
  TORCH_CHECK(num_rows <= std::numeric_limits<int32_t>::max(), "chimera::spmm: at most 2^31 - 1 rows, got ", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chimera_spmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_spmm_cuda_index", [&] {
      spmm_kernel<scalar_t, index_t><<<num_rows, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), weight.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), heads, feat);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor edge_dot_cuda(const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& a_in,
                         const at::Tensor& b_in) {
  check_csr(rowptr_in, col_in, "chimera::edge_dot");
  check_features(a_in, a_in, "chimera::edge_dot", "a");
  check_features(b_in, a_in, "chimera::edge_dot", "b");
  TORCH_CHECK(a_in.size(1) == b_in.size(1) && a_in.size(2) == b_in.size(2),
              "chimera::edge_dot: a and b must agree in H and F, got ", a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK(a_in.size(0) == rowptr_in.size(0) - 1, "chimera::edge_dot: a must have rowptr.numel() - 1 = ",
              rowptr_in.size(0) - 1, " rows, got ", a_in.size(0));
  check_device(rowptr_in, a_in, "chimera::edge_dot", "rowptr");
  const c10::cuda::CUDAGuard guard(a_in.device());
  check_csr_values(rowptr_in, col_in, b_in.size(0), "chimera::edge_dot");
  const auto col = col_in.contiguous();
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const int64_t num_rows = rowptr_in.size(0) - 1, num_edges = col.size(0), heads = a.size(1), feat = a.size(2);
  auto out = at::zeros({num_edges, heads}, a.options());
  if (out.numel() == 0) return out;
  // Expand the CSR row pointer into one row index per edge so that each warp finds its row in O(1).
  const auto counts = rowptr_in.diff();
  // (dim 0, output_size = E: a known size needs no synchronization)
  const auto row = at::repeat_interleave(at::arange(num_rows, rowptr_in.options()), counts, /*dim=*/0,
                                         /*output_size=*/num_edges);
  const int64_t warps = num_edges * heads;
  const int threads = 256;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "chimera::edge_dot: E * H = ", warps,
              " is too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "chimera_edge_dot_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_edge_dot_cuda_index", [&] {
      edge_dot_kernel<scalar_t, index_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          row.data_ptr<index_t>(), col.data_ptr<index_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), num_edges, heads, feat);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("edge_dot", &edge_dot_cuda);
}

}  // namespace chimera
