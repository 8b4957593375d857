// CPU kernel: forward substitution (I - A) h = x on a DAG, one topological level at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "state_contraction.h"

namespace chimera {
namespace {

at::Tensor dag_solve_cpu(const at::Tensor& level_ptr_in, const at::Tensor& order_in, const at::Tensor& rowptr_in,
                         const at::Tensor& col_in, const at::Tensor& weight_in, const at::Tensor& x_in) {
  check_csr(rowptr_in, col_in, "chimera::dag_solve");
  check_features(x_in, x_in, "chimera::dag_solve", "x");
  TORCH_CHECK(level_ptr_in.dim() == 1 && level_ptr_in.scalar_type() == at::kLong && level_ptr_in.numel() >= 1,
              "chimera::dag_solve: level_ptr must be a 1-D int64 tensor with L + 1 >= 1 entries, got shape ",
              level_ptr_in.sizes(), " and dtype ", level_ptr_in.scalar_type());
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
  const int64_t* lp = level_ptr.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  // The levels must cover every node exactly once, and rows must stay inside col and weight.
  check_ptr_values(lp, level_ptr.size(0), num_nodes, "chimera::dag_solve", "level_ptr", "the number of nodes N");
  const std::vector<int64_t> position = check_permutation(op, num_nodes, "chimera::dag_solve", "order");
  check_rowptr(rowptr, col, "chimera::dag_solve");
  if (h.numel() == 0) return h;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "chimera_dag_solve_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "chimera_dag_solve_cpu_index", [&] {
      const index_t* rp = rowptr.data_ptr<index_t>();
      const index_t* cp = col.data_ptr<index_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      // `position` of every node in `order`: a parent must sit before the current level starts.
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
              TORCH_CHECK(j >= 0 && j < num_nodes, "chimera::dag_solve: col[", e, "] = ", j, " is out of range [0, ",
                          num_nodes, ")");
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


// The DAG solve with the state contraction fused in (as chimera::band_attention):
//   forward:  rhs_i = k_i v_i^T, h = (I - A)^{-1} rhs by levels, y_i = h_i^T q_i        -> (y, h)
//   backward: dq_i = h_i dy_i, g = (I - A)^{-T} (q_i dy_i^T + grad_state) on the reversed DAG
//             (rowptr_t, col_t, weight_t: A^T by target, levels in reverse), dk_i = g_i v_i,
//             dv_i = g_i^T k_i                                                         -> (dq, dk, dv, g)
// The [N, H, S, P] state is written once and read once per pass, with no PyTorch temporaries.
template <typename scalar_t, typename index_t>
void dag_levels(const int64_t* lp, int64_t num_levels, const int64_t* op, const index_t* rp, const index_t* cp,
                const scalar_t* wp, scalar_t* hp, int64_t num_nodes, int64_t heads, int64_t feat, bool reverse,
                const std::vector<int64_t>& position, const char* op_name, const char* col_name) {
  auto solve_nodes = [&](int64_t begin, int64_t end, int64_t level_begin, int64_t level_end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = op[k];
      for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
        const int64_t j = cp[e];
        TORCH_CHECK(j >= 0 && j < num_nodes, op_name, ": ", col_name, "[", e, "] = ", j, " is out of range [0, ",
                    num_nodes, ")");
        TORCH_CHECK(reverse ? position[j] >= level_end : position[j] < level_begin, op_name, ": edge ",
                    j, " -> ", i, " does not go from an earlier level to a later one (a cycle, or wrong levels)");
        for (int64_t hd = 0; hd < heads; ++hd)
          axpy(hp + (i * heads + hd) * feat, hp + (j * heads + hd) * feat, wp[e * heads + hd], feat);
      }
    }
  };
  const int64_t grain = 1 + 8192 / std::max<int64_t>(1, heads * feat);
  for (int64_t step = 0; step < num_levels; ++step) {
    const int64_t l = reverse ? num_levels - 1 - step : step;
    const int64_t begin = lp[l], end = lp[l + 1];
    if (end - begin <= grain) {
      solve_nodes(begin, end, begin, end);
    } else {
      at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { solve_nodes(b, e, begin, end); });
    }
  }
}

struct DagInputs {
  at::Tensor level_ptr, order, rowptr, col, weight;
  std::vector<int64_t> position;
};

DagInputs check_dag_inputs(const at::Tensor& level_ptr, const at::Tensor& order, const at::Tensor& rowptr,
                           const at::Tensor& col, const at::Tensor& weight, const at::Tensor& like, const char* op,
                           const char* rowptr_name = "rowptr", const char* col_name = "len(col)") {
  check_csr(rowptr, col, op);
  const int64_t num_nodes = like.size(0);
  TORCH_CHECK(level_ptr.dim() == 1 && level_ptr.scalar_type() == at::kLong && level_ptr.numel() >= 1, op,
              ": level_ptr must be a 1-D int64 tensor with L + 1 >= 1 entries, got shape ", level_ptr.sizes(),
              " and dtype ", level_ptr.scalar_type());
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.size(0) == num_nodes, op,
              ": order must be a 1-D int64 permutation of the ", num_nodes, " nodes");
  TORCH_CHECK(rowptr.size(0) == num_nodes + 1, op, ": rowptr must have N + 1 = ", num_nodes + 1, " entries");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == col.size(0) && weight.size(1) == like.size(1) &&
                  weight.scalar_type() == like.scalar_type(),
              op, ": weight must have shape [E, H] = [", col.size(0), ", ", like.size(1), "] and the dtype of query");
  DagInputs in{level_ptr.contiguous(), order.contiguous(), rowptr.contiguous(), col.contiguous(), weight.contiguous(),
               {}};
  check_ptr_values(in.level_ptr.data_ptr<int64_t>(), in.level_ptr.size(0), num_nodes, op, "level_ptr",
                   "the number of nodes N");
  in.position = check_permutation(in.order.data_ptr<int64_t>(), num_nodes, op, "order");
  check_rowptr(in.rowptr, in.col, op, rowptr_name, col_name);
  return in;
}

std::vector<at::Tensor> dag_attention_cpu(const at::Tensor& level_ptr, const at::Tensor& order,
                                          const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& weight,
                                          const at::Tensor& query_in, const at::Tensor& key_in,
                                          const at::Tensor& value_in) {
  const char* op = "chimera::dag_attention";
  check_attention_inputs(query_in, key_in, value_in, op);
  const auto in = check_dag_inputs(level_ptr, order, rowptr, col, weight, query_in, op);
  const auto query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const int64_t num_nodes = query.size(0), heads = query.size(1), S = query.size(2), P = value.size(2);
  auto state = at::empty({num_nodes, heads, S * P}, query.options());
  auto y = at::empty({num_nodes, heads, P}, query.options());
  if (num_nodes == 0 || heads == 0) return {y, state};
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "chimera_dag_attention_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(in.col.scalar_type(), "chimera_dag_attention_cpu_index", [&] {
      const scalar_t *qp = query.data_ptr<scalar_t>(), *kp = key.data_ptr<scalar_t>(), *vp = value.data_ptr<scalar_t>();
      scalar_t *hp = state.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, num_nodes * heads, 64, [&](int64_t begin, int64_t end) {
        for (int64_t nh = begin; nh < end; ++nh) outer_state(nh, kp, vp, hp, S, P);
      });
      dag_levels(in.level_ptr.data_ptr<int64_t>(), in.level_ptr.size(0) - 1, in.order.data_ptr<int64_t>(),
                 in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), in.weight.data_ptr<scalar_t>(), hp,
                 num_nodes, heads, S * P, false, in.position, op, "col");
      at::parallel_for(0, num_nodes * heads, 64, [&](int64_t begin, int64_t end) {
        for (int64_t nh = begin; nh < end; ++nh) read_out(nh, qp, hp, yp, S, P);
      });
    });
  });
  return {y, state};
}

std::vector<at::Tensor> dag_attention_backward_cpu(const at::Tensor& level_ptr, const at::Tensor& order,
                                                   const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                                   const at::Tensor& weight_t, const at::Tensor& query_in,
                                                   const at::Tensor& key_in, const at::Tensor& value_in,
                                                   const at::Tensor& state_in, const at::Tensor& grad_y_in,
                                                   const c10::optional<at::Tensor>& grad_state_in) {
  const char* op = "chimera::dag_attention_backward";
  for (const auto& [t, name] : {std::pair{&key_in, "key"}, {&value_in, "value"}, {&state_in, "state"},
                                {&grad_y_in, "grad_y"}})
    check_features(*t, query_in, op, name);
  check_features(query_in, query_in, op, "query");
  const int64_t num_nodes = query_in.size(0), heads = query_in.size(1), S = query_in.size(2), P = value_in.size(2);
  TORCH_CHECK(key_in.sizes() == query_in.sizes() && value_in.sizes() == grad_y_in.sizes() &&
                  value_in.size(0) == num_nodes && value_in.size(1) == heads &&
                  state_in.sizes() == at::IntArrayRef({num_nodes, heads, S * P}),
              op, ": expected query, key [N, H, S], value, grad_y [N, H, P] and state [N, H, S * P], got ",
              query_in.sizes(), ", ", key_in.sizes(), ", ", value_in.sizes(), ", ", grad_y_in.sizes(), " and ",
              state_in.sizes());
  const auto in = check_dag_inputs(level_ptr, order, rowptr_t, col_t, weight_t, query_in, op, "rowptr_t", "len(col_t)");
  const bool has_grad_state = grad_state_in.has_value() && grad_state_in->defined();
  at::Tensor extra_state;
  if (has_grad_state) {
    check_features(*grad_state_in, query_in, op, "grad_state");
    TORCH_CHECK(grad_state_in->sizes() == state_in.sizes(), op, ": grad_state must have the shape of state");
    extra_state = grad_state_in->contiguous();
  }
  const auto query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const auto state = state_in.contiguous(), grad_y = grad_y_in.contiguous();
  auto grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::zeros_like(value);
  auto grad_state = at::empty_like(state);
  if (num_nodes == 0 || heads == 0) return {grad_query, grad_key, grad_value, grad_state};
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "chimera_dag_attention_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(in.col.scalar_type(), "chimera_dag_attention_backward_cpu_index", [&] {
      const scalar_t *qp = query.data_ptr<scalar_t>(), *kp = key.data_ptr<scalar_t>(), *vp = value.data_ptr<scalar_t>(),
                     *hp = state.data_ptr<scalar_t>(), *dyp = grad_y.data_ptr<scalar_t>();
      const scalar_t* extra = has_grad_state ? extra_state.data_ptr<scalar_t>() : nullptr;
      scalar_t *dqp = grad_query.data_ptr<scalar_t>(), *dkp = grad_key.data_ptr<scalar_t>(),
               *dvp = grad_value.data_ptr<scalar_t>(), *gp = grad_state.data_ptr<scalar_t>();
      at::parallel_for(0, num_nodes * heads, 64, [&](int64_t begin, int64_t end) {
        for (int64_t nh = begin; nh < end; ++nh) adjoint_rhs(nh, qp, hp, dyp, extra, dqp, gp, S, P);
      });
      dag_levels(in.level_ptr.data_ptr<int64_t>(), in.level_ptr.size(0) - 1, in.order.data_ptr<int64_t>(),
                 in.rowptr.data_ptr<index_t>(), in.col.data_ptr<index_t>(), in.weight.data_ptr<scalar_t>(), gp,
                 num_nodes, heads, S * P, true, in.position, op, "col_t");
      at::parallel_for(0, num_nodes * heads, 64, [&](int64_t begin, int64_t end) {
        for (int64_t nh = begin; nh < end; ++nh) key_value_grads(nh, gp, kp, vp, dkp, dvp, S, P);
      });
    });
  });
  return {grad_query, grad_key, grad_value, grad_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("dag_solve", &dag_solve_cpu);
  m.impl("dag_attention", &dag_attention_cpu);
  m.impl("dag_attention_backward", &dag_attention_backward_cpu);
}

}  // namespace chimera
