// CPU kernels for CSR sparse-dense products over multi-head node features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../checks.h"

namespace chimera {
namespace {

at::Tensor spmm_cpu(const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& weight_in,
                    const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in) {
  check_csr(rowptr_in, col_in, "chimera::spmm");
  check_features(x_in, x_in, "chimera::spmm", "x");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == col_in.size(0) && weight_in.size(1) == x_in.size(1),
              "chimera::spmm: weight must have shape [E, H] = [", col_in.size(0), ", ", x_in.size(1), "], got ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "chimera::spmm: weight and x must share a dtype");
  // Before any dereference: a rowptr past len(col) would read past col and weight.
  check_rowptr(rowptr_in, col_in, "chimera::spmm");
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto x = x_in.contiguous();
  const int64_t num_rows = rowptr.size(0) - 1;
  const int64_t heads = x.size(1), feat = x.size(2), num_src = x.size(0);
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chimera_spmm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_spmm_cpu_index", [&] {
      const index_t* rp = rowptr.data_ptr<index_t>();
      const index_t* cp = col.data_ptr<index_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      // Rows are independent: each thread owns a block of output rows, so no atomics are needed.
      at::parallel_for(0, num_rows, 1 + 16384 / std::max<int64_t>(1, heads * feat), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(feat);
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t h = 0; h < heads; ++h) {
            scalar_t* orow = op + (i * heads + h) * feat;
            // float and double accumulate straight into the output row; half types in a float buffer.
            acc_t* target = nullptr;
            if constexpr (std::is_same_v<acc_t, scalar_t>) {
              target = reinterpret_cast<acc_t*>(orow);  // same type: this branch only runs then
            } else {
              target = acc.data();
            }
            if (bp != nullptr) {
              const scalar_t* brow = bp + (i * heads + h) * feat;
              for (int64_t f = 0; f < feat; ++f) target[f] = static_cast<acc_t>(brow[f]);
            } else {
              std::fill(target, target + feat, acc_t(0));
            }
            for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
              const int64_t j = cp[e];
              TORCH_CHECK(j >= 0 && j < num_src, "chimera::spmm: col[", e, "] = ", j, " is out of range [0, ",
                          num_src, ")");
              axpy(target, xp + (j * heads + h) * feat, static_cast<acc_t>(wp[e * heads + h]), feat);
            }
            if constexpr (!std::is_same_v<acc_t, scalar_t>) {
              for (int64_t f = 0; f < feat; ++f) orow[f] = static_cast<scalar_t>(acc[f]);
            }
          }
        }
      });
    });
  });
  return out;
}

at::Tensor edge_dot_cpu(const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& a_in,
                        const at::Tensor& b_in) {
  check_csr(rowptr_in, col_in, "chimera::edge_dot");
  check_features(a_in, a_in, "chimera::edge_dot", "a");
  check_features(b_in, a_in, "chimera::edge_dot", "b");
  TORCH_CHECK(a_in.size(1) == b_in.size(1) && a_in.size(2) == b_in.size(2),
              "chimera::edge_dot: a and b must agree in H and F, got ", a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK(a_in.size(0) == rowptr_in.size(0) - 1, "chimera::edge_dot: a must have rowptr.numel() - 1 = ",
              rowptr_in.size(0) - 1, " rows, got ", a_in.size(0));
  check_rowptr(rowptr_in, col_in, "chimera::edge_dot");  // a rowptr past len(col) would write past out
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const int64_t num_rows = rowptr.size(0) - 1, num_src = b.size(0);
  const int64_t heads = a.size(1), feat = a.size(2);
  auto out = at::zeros({col.size(0), heads}, a.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "chimera_edge_dot_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_edge_dot_cpu_index", [&] {
      const index_t* rp = rowptr.data_ptr<index_t>();
      const index_t* cp = col.data_ptr<index_t>();
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const scalar_t* bp = b.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, num_rows, 1 + 16384 / std::max<int64_t>(1, heads * feat), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
            const int64_t j = cp[e];
            TORCH_CHECK(j >= 0 && j < num_src, "chimera::edge_dot: col[", e, "] = ", j, " is out of range [0, ",
                        num_src, ")");
            for (int64_t h = 0; h < heads; ++h) {
              const scalar_t* ar = ap + (i * heads + h) * feat;
              const scalar_t* br = bp + (j * heads + h) * feat;
              acc_t acc = 0;
              for (int64_t f = 0; f < feat; ++f) acc += static_cast<acc_t>(ar[f]) * static_cast<acc_t>(br[f]);
              op[e * heads + h] = static_cast<scalar_t>(acc);
            }
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("edge_dot", &edge_dot_cpu);
}

}  // namespace chimera
