// CPU kernel: forward substitution (I - A) h = x on a DAG, one topological level at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace chimera {
namespace {

at::Tensor dag_solve_cpu(const at::Tensor& level_ptr_in, const at::Tensor& order_in, const at::Tensor& rowptr_in,
                         const at::Tensor& col_in, const at::Tensor& weight_in, const at::Tensor& x_in) {
  check_csr(rowptr_in, col_in, "chimera::dag_solve");
  check_features(x_in, x_in, "chimera::dag_solve", "x");
  TORCH_CHECK(level_ptr_in.dim() == 1 && level_ptr_in.scalar_type() == at::kLong,
              "chimera::dag_solve: level_ptr must be a 1-D int64 tensor");
  TORCH_CHECK(order_in.dim() == 1 && order_in.scalar_type() == at::kLong && order_in.size(0) == x_in.size(0),
              "chimera::dag_solve: order must be a 1-D int64 permutation of the ", x_in.size(0), " nodes");
  TORCH_CHECK(rowptr_in.size(0) == x_in.size(0) + 1, "chimera::dag_solve: rowptr must have N + 1 = ",
              x_in.size(0) + 1, " entries, got ", rowptr_in.size(0));
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == col_in.size(0) && weight_in.size(1) == x_in.size(1),
              "chimera::dag_solve: weight must have shape [E, H] = [", col_in.size(0), ", ", x_in.size(1), "], got ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "chimera::dag_solve: weight and x must share a dtype");
  const auto level_ptr = level_ptr_in.contiguous();
  const auto order = order_in.contiguous();
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto weight = weight_in.contiguous();
  auto h = x_in.contiguous().clone();
  const int64_t num_nodes = x_in.size(0), heads = x_in.size(1), feat = x_in.size(2);
  const int64_t num_levels = level_ptr.size(0) - 1;
  if (h.numel() == 0 || num_levels <= 0) return h;
  const int64_t* lp = level_ptr.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  TORCH_CHECK(lp[0] == 0 && lp[num_levels] == num_nodes, "chimera::dag_solve: level_ptr must run from 0 to N");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "chimera_dag_solve_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_dag_solve_cpu_index", [&] {
      const index_t* rp = rowptr.data_ptr<index_t>();
      const index_t* cp = col.data_ptr<index_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      // position of every node in `order`: a parent must sit before the current level starts.
      std::vector<int64_t> position(num_nodes, -1);
      for (int64_t k = 0; k < num_nodes; ++k) {
        TORCH_CHECK(op[k] >= 0 && op[k] < num_nodes && position[op[k]] < 0,
                    "chimera::dag_solve: order must be a permutation of 0..N-1");
        position[op[k]] = k;
      }
      int64_t level_begin = 0;
      auto solve_nodes = [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(feat);
        for (int64_t k = begin; k < end; ++k) {
          const int64_t i = op[k];
          for (int64_t hd = 0; hd < heads; ++hd) {
            scalar_t* hi = hp + (i * heads + hd) * feat;
            for (int64_t f = 0; f < feat; ++f) acc[f] = static_cast<acc_t>(hi[f]);
            for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
              const int64_t j = cp[e];
              TORCH_CHECK(j >= 0 && j < num_nodes, "chimera::dag_solve: col[", e, "] = ", j, " is out of range");
              TORCH_CHECK(position[j] < level_begin, "chimera::dag_solve: edge ", j, " -> ", i,
                          " does not go from an earlier level to a later one (a cycle, or wrong levels)");
              axpy(acc.data(), hp + (j * heads + hd) * feat, static_cast<acc_t>(wp[e * heads + hd]), feat);
            }
            for (int64_t f = 0; f < feat; ++f) hi[f] = static_cast<scalar_t>(acc[f]);
          }
        }
      };
      // Levels run in order; the nodes of one level only read finished levels, so they run in
      // parallel. Small levels (a line graph has one node per level) skip the thread pool.
      const int64_t grain = 1 + 8192 / std::max<int64_t>(1, heads * feat);
      for (int64_t l = 0; l < num_levels; ++l) {
        level_begin = lp[l];
        if (lp[l + 1] - lp[l] <= grain) {
          solve_nodes(lp[l], lp[l + 1]);
        } else {
          at::parallel_for(lp[l], lp[l + 1], grain, solve_nodes);
        }
      }
    });
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) { m.impl("dag_solve", &dag_solve_cpu); }

}  // namespace chimera
