// CPU kernels of the banded exact path: a reverse Cuthill-McKee ordering per graph, a band LU
// factorization of M = I - A per graph and head, and solves with M or M^T.
//
// Molecules are long chains with short side groups: under RCM their bandwidth b is about 5, so
// the factorization costs O(n b^2) and a solve O(n b F) per graph, instead of the O(n^3) of a
// dense inverse. No pivoting: I - A is strictly diagonally dominant by rows whenever every row
// of |A| sums to less than 1 (the "general" adjacency), and elimination keeps that property.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <vector>

#include "../checks.h"
#include "state_contraction.h"

namespace chimera {
namespace {

// Shapes and values of a schedule: node_ptr runs from 0 to N without decreasing, every bandwidth
// lies in [0, n_g - 1] (it sizes the band storage and the loops over it) and `order` is a
// permutation of the N nodes (it picks the rows every solve writes).
void check_schedule(const at::Tensor& node_ptr_in, const at::Tensor& order_in, const at::Tensor& bandwidth_in,
                    int64_t num_nodes, const char* op, const char* order_name = "order") {
  TORCH_CHECK(node_ptr_in.dim() == 1 && node_ptr_in.scalar_type() == at::kLong && node_ptr_in.numel() >= 1, op,
              ": node_ptr must be a 1-D int64 tensor with G + 1 entries, got shape ", node_ptr_in.sizes(),
              " and dtype ", node_ptr_in.scalar_type());
  TORCH_CHECK(order_in.dim() == 1 && order_in.scalar_type() == at::kLong && order_in.size(0) == num_nodes, op, ": ",
              order_name, " must be a 1-D int64 permutation of the ", num_nodes, " nodes, got shape ",
              order_in.sizes(), " and dtype ", order_in.scalar_type());
  TORCH_CHECK(bandwidth_in.dim() == 1 && bandwidth_in.scalar_type() == at::kLong &&
                  bandwidth_in.size(0) == node_ptr_in.size(0) - 1,
              op, ": bandwidth must be a 1-D int64 tensor with one entry per graph (", node_ptr_in.size(0) - 1,
              "), got shape ", bandwidth_in.sizes(), " and dtype ", bandwidth_in.scalar_type());
  const auto node_ptr = node_ptr_in.contiguous(), order = order_in.contiguous(), bandwidth = bandwidth_in.contiguous();
  const int64_t num_graphs = node_ptr.size(0) - 1;
  const int64_t* np = node_ptr.data_ptr<int64_t>();
  const int64_t* bw = bandwidth.data_ptr<int64_t>();
  check_ptr_values(np, num_graphs + 1, num_nodes, op, "node_ptr", "the number of nodes N");
  for (int64_t g = 0; g < num_graphs; ++g) {
    const int64_t n = np[g + 1] - np[g];
    TORCH_CHECK(bw[g] >= 0 && bw[g] <= std::max<int64_t>(n - 1, 0), op, ": bandwidth[", g, "] = ", bw[g],
                " must lie in [0, ", std::max<int64_t>(n - 1, 0), "] for a graph of ", n, " nodes");
  }
  check_permutation(order.data_ptr<int64_t>(), num_nodes, op, order_name);
}

// Offsets of every graph's band storage: graph g holds n_g rows of 2 b_g + 1 entries.
std::vector<int64_t> band_offsets(const int64_t* np, const int64_t* bw, int64_t num_graphs) {
  std::vector<int64_t> offset(num_graphs + 1, 0);
  for (int64_t g = 0; g < num_graphs; ++g) offset[g + 1] = offset[g] + (np[g + 1] - np[g]) * (2 * bw[g] + 1);
  return offset;
}

// Reverse Cuthill-McKee within every graph of a symmetric pattern (rowptr, col); `nodes` lists the
// nodes grouped by graph (node_ptr). Returns the new order, each graph's bandwidth under it and the
// number of off-diagonal structural nonzeros of its LU factors.
std::vector<at::Tensor> band_order_cpu(const at::Tensor& node_ptr_in, const at::Tensor& nodes_in,
                                       const at::Tensor& rowptr_in, const at::Tensor& col_in) {
  check_csr(rowptr_in, col_in, "chimera::band_order");
  const int64_t num_nodes = rowptr_in.size(0) - 1;
  const auto node_ptr = node_ptr_in.contiguous();
  const auto nodes = nodes_in.contiguous();
  const auto rowptr = rowptr_in.to(at::kLong).contiguous();
  const auto col = col_in.to(at::kLong).contiguous();
  check_schedule(node_ptr, nodes, at::zeros({std::max<int64_t>(node_ptr.size(0) - 1, 0)}, node_ptr.options()),
                 num_nodes, "chimera::band_order", "nodes");
  check_rowptr(rowptr, col, "chimera::band_order");
  const int64_t num_graphs = node_ptr.size(0) - 1;
  const int64_t* np = node_ptr.data_ptr<int64_t>();
  const int64_t* nd = nodes.data_ptr<int64_t>();
  // A binary search in each graph's nodes gives a node's local index: they must be sorted.
  for (int64_t g = 0; g < num_graphs; ++g)
    for (int64_t k = np[g] + 1; k < np[g + 1]; ++k)
      TORCH_CHECK(nd[k - 1] < nd[k], "chimera::band_order: nodes must be sorted within each graph, got nodes[", k - 1,
                  "] = ", nd[k - 1], " >= nodes[", k, "] = ", nd[k], " in graph ", g);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  auto order = at::empty({num_nodes}, node_ptr.options());
  auto bandwidth = at::zeros({num_graphs}, node_ptr.options());
  auto factor_nnz = at::zeros({num_graphs}, node_ptr.options());
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* bp = bandwidth.data_ptr<int64_t>();
  int64_t* zp = factor_nnz.data_ptr<int64_t>();
  std::vector<int64_t> graph_of(num_nodes, -1);
  for (int64_t g = 0; g < num_graphs; ++g)
    for (int64_t k = np[g]; k < np[g + 1]; ++k) graph_of[nd[k]] = g;

  at::parallel_for(0, num_graphs, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<int64_t> local_order, position(0);
    std::vector<char> seen;
    std::vector<int64_t> neighbors;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t begin = np[g], n = np[g + 1] - np[g];
      auto degree = [&](int64_t i) { return rp[i + 1] - rp[i]; };
      std::vector<int64_t> members(nd + begin, nd + begin + n);
      // Start every component from a node of least degree (a chain end, for a molecule).
      std::stable_sort(members.begin(), members.end(), [&](int64_t a, int64_t b) { return degree(a) < degree(b); });
      local_order.clear();
      seen.assign(n, 0);
      // Nodes are sorted within a graph (Python passes them so): a binary search gives a local index.
      auto local_index = [&](int64_t i) { return std::lower_bound(nd + begin, nd + begin + n, i) - (nd + begin); };
      for (int64_t start : members) {
        if (seen[local_index(start)]) continue;
        std::deque<int64_t> queue{start};
        seen[local_index(start)] = 1;
        while (!queue.empty()) {
          const int64_t u = queue.front();
          queue.pop_front();
          local_order.push_back(u);
          neighbors.clear();
          for (int64_t e = rp[u]; e < rp[u + 1]; ++e) {
            const int64_t v = cp[e];
            TORCH_CHECK(v >= 0 && v < num_nodes && graph_of[v] == g,
                        "chimera::band_order: an edge leaves its graph or is out of range");
            const int64_t lv = local_index(v);
            if (!seen[lv]) {
              seen[lv] = 1;
              neighbors.push_back(v);
            }
          }
          std::stable_sort(neighbors.begin(), neighbors.end(),
                           [&](int64_t a, int64_t b) { return degree(a) < degree(b); });
          for (int64_t v : neighbors) queue.push_back(v);
        }
      }
      std::reverse(local_order.begin(), local_order.end());
      position.assign(n, 0);
      for (int64_t k = 0; k < n; ++k) {
        op[begin + k] = local_order[k];
        position[local_index(local_order[k])] = k;
      }
      int64_t width = 0;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t u = local_order[k];
        for (int64_t e = rp[u]; e < rp[u + 1]; ++e)
          width = std::max<int64_t>(width, std::abs(position[local_index(cp[e])] - k));
      }
      bp[g] = width;
      // Symbolic elimination inside the band: the structural nonzeros of L and U (fill included)
      // are what the solves touch, which is what the cost model needs (trees fill little of the band).
      const int64_t w = 2 * width + 1;
      std::vector<char> pattern(n * w, 0);
      auto at_ = [&](int64_t p, int64_t q) -> char& { return pattern[p * w + (q - p + width)]; };
      for (int64_t k = 0; k < n; ++k) {
        at_(k, k) = 1;
        const int64_t u = local_order[k];
        for (int64_t e = rp[u]; e < rp[u + 1]; ++e) at_(k, position[local_index(cp[e])]) = 1;
      }
      int64_t nonzeros = 0;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t last = std::min(n - 1, k + width);
        for (int64_t p = k + 1; p <= last; ++p) {
          if (!at_(p, k)) continue;
          for (int64_t q = k + 1; q <= last; ++q)
            if (at_(k, q)) at_(p, q) = 1;
        }
        for (int64_t q = std::max<int64_t>(0, k - width); q <= last; ++q) nonzeros += at_(k, q) && q != k;
      }
      zp[g] = nonzeros;
    }
  });
  return {order, bandwidth, factor_nnz};
}

// LU factors of M = I - A (no pivoting) for every graph and head, in band storage:
// factors[offset_g + (p * (2 b + 1) + (q - p + b)), h] holds row p, column q (local positions).
at::Tensor band_factor_cpu(const at::Tensor& node_ptr_in, const at::Tensor& order_in, const at::Tensor& bandwidth_in,
                           const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& weight_in,
                           int64_t band_size) {
  check_csr(rowptr_in, col_in, "chimera::band_factor");
  const int64_t num_nodes = rowptr_in.size(0) - 1;
  check_schedule(node_ptr_in, order_in, bandwidth_in, num_nodes, "chimera::band_factor");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == col_in.size(0),
              "chimera::band_factor: weight must have shape [E, H] with E = ", col_in.size(0), ", got ",
              weight_in.sizes());
  check_rowptr(rowptr_in, col_in, "chimera::band_factor");
  const auto node_ptr = node_ptr_in.contiguous();
  const auto order = order_in.contiguous();
  const auto bandwidth = bandwidth_in.contiguous();
  const auto rowptr = rowptr_in.to(at::kLong).contiguous();
  const auto col = col_in.to(at::kLong).contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t num_graphs = node_ptr.size(0) - 1, heads = weight.size(1);
  const int64_t* np = node_ptr.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* bw = bandwidth.data_ptr<int64_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  const auto offset = band_offsets(np, bw, num_graphs);
  TORCH_CHECK(offset[num_graphs] == band_size, "chimera::band_factor: band_size must be ", offset[num_graphs],
              ", got ", band_size);
  auto factors = at::zeros({band_size, heads}, weight.options());
  std::vector<int64_t> position(num_nodes, -1), graph_of(num_nodes, -1);
  for (int64_t g = 0; g < num_graphs; ++g)
    for (int64_t k = np[g]; k < np[g + 1]; ++k) {
      TORCH_CHECK(op[k] >= 0 && op[k] < num_nodes && position[op[k]] < 0,
                  "chimera::band_factor: order must be a permutation of 0..N-1");
      position[op[k]] = k - np[g];
      graph_of[op[k]] = g;
    }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "chimera_band_factor_cpu", [&] {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* fp = factors.data_ptr<scalar_t>();
    at::parallel_for(0, num_graphs * heads, 1, [&](int64_t task_begin, int64_t task_end) {
      std::vector<scalar_t> band;
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t g = task / heads, hd = task % heads;
        const int64_t n = np[g + 1] - np[g], b = bw[g], width = 2 * b + 1;
        band.assign(n * width, scalar_t(0));
        auto at_ = [&](int64_t p, int64_t q) -> scalar_t& { return band[p * width + (q - p + b)]; };
        for (int64_t p = 0; p < n; ++p) {
          at_(p, p) += scalar_t(1);
          const int64_t i = op[np[g] + p];
          for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
            const int64_t j = cp[e];
            TORCH_CHECK(j >= 0 && j < num_nodes && graph_of[j] == g,
                        "chimera::band_factor: an edge leaves its graph or is out of range");
            const int64_t q = position[j];
            TORCH_CHECK(std::abs(q - p) <= b, "chimera::band_factor: edge outside the band (wrong bandwidth)");
            at_(p, q) -= wp[e * heads + hd];
          }
        }
        for (int64_t k = 0; k < n; ++k) {  // right-looking elimination inside the band
          const scalar_t pivot = at_(k, k);
          const int64_t last = std::min(n - 1, k + b);
          for (int64_t p = k + 1; p <= last; ++p) {
            scalar_t& lower = at_(p, k);
            if (lower == scalar_t(0)) continue;
            lower /= pivot;
            for (int64_t q = k + 1; q <= last; ++q) at_(p, q) -= lower * at_(k, q);
          }
        }
        scalar_t* out = fp + offset[g] * heads + hd;
        for (int64_t t = 0; t < n * width; ++t) out[t * heads] = band[t];
      }
    });
  });
  return factors;
}

// Forward / backward substitution of one graph and head, in place on rows of `state` (order[base + p] is
// the node at local position p).
struct NoRowHook {
  void operator()(int64_t) const {}
};

// Two sweeps: L then U (or U^T then L^T). `first(p)` runs just before row p's first-sweep update
// (to build its right-hand side in place) and `last(p)` right after row p is final in the second
// sweep (to contract it), so the state crosses memory once less in each direction.
template <typename scalar_t, typename First = NoRowHook, typename Last = NoRowHook>
void band_substitute(const scalar_t* fp, const int64_t* op, int64_t offset_g, int64_t base, int64_t n, int64_t b,
                     int64_t hd, int64_t heads, scalar_t* state, int64_t feat, bool transpose, First first = {},
                     Last last = {}) {
  const int64_t width = 2 * b + 1;
  auto entry = [&](int64_t p, int64_t q) { return fp[(offset_g + p * width + (q - p + b)) * heads + hd]; };
  auto row = [&](int64_t p) { return state + (op[base + p] * heads + hd) * feat; };
  auto scale = [&](int64_t p, scalar_t s) {
    scalar_t* r = row(p);
    for (int64_t f = 0; f < feat; ++f) r[f] *= s;
  };
  if (!transpose) {  // L (unit lower) then U
    for (int64_t p = 0; p < n; ++p) {
      first(p);
      for (int64_t k = std::max<int64_t>(0, p - b); k < p; ++k)
        if (const scalar_t l = entry(p, k)) axpy(row(p), row(k), -l, feat);
    }
    for (int64_t p = n - 1; p >= 0; --p) {
      for (int64_t k = p + 1; k <= std::min(n - 1, p + b); ++k)
        if (const scalar_t u = entry(p, k)) axpy(row(p), row(k), -u, feat);
      scale(p, scalar_t(1) / entry(p, p));
      last(p);
    }
  } else {  // U^T (lower) then L^T (unit upper)
    for (int64_t p = 0; p < n; ++p) {
      first(p);
      for (int64_t k = std::max<int64_t>(0, p - b); k < p; ++k)
        if (const scalar_t u = entry(k, p)) axpy(row(p), row(k), -u, feat);
      scale(p, scalar_t(1) / entry(p, p));
    }
    for (int64_t p = n - 1; p >= 0; --p) {
      for (int64_t k = p + 1; k <= std::min(n - 1, p + b); ++k)
        if (const scalar_t l = entry(k, p)) axpy(row(p), row(k), -l, feat);
      last(p);
    }
  }
}

// h = M^{-1} x (transpose = false) or M^{-T} x (transpose = true) with the factors above.
at::Tensor band_solve_cpu(const at::Tensor& node_ptr_in, const at::Tensor& order_in, const at::Tensor& bandwidth_in,
                          const at::Tensor& factors_in, const at::Tensor& x_in, bool transpose) {
  check_features(x_in, x_in, "chimera::band_solve", "x");
  const int64_t num_nodes = x_in.size(0), heads = x_in.size(1), feat = x_in.size(2);
  check_schedule(node_ptr_in, order_in, bandwidth_in, num_nodes, "chimera::band_solve");
  TORCH_CHECK(factors_in.dim() == 2 && factors_in.size(1) == heads && factors_in.scalar_type() == x_in.scalar_type(),
              "chimera::band_solve: factors must have shape [band_size, H] and the dtype of x");
  const auto node_ptr = node_ptr_in.contiguous();
  const auto order = order_in.contiguous();
  const auto bandwidth = bandwidth_in.contiguous();
  const auto factors = factors_in.contiguous();
  auto h = x_in.contiguous().clone();
  const int64_t num_graphs = node_ptr.size(0) - 1;
  if (h.numel() == 0) return h;
  const int64_t* np = node_ptr.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* bw = bandwidth.data_ptr<int64_t>();
  const auto offset = band_offsets(np, bw, num_graphs);
  TORCH_CHECK(offset[num_graphs] == factors.size(0), "chimera::band_solve: factors must have ", offset[num_graphs],
              " rows for this schedule, got ", factors.size(0));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "chimera_band_solve_cpu", [&] {
    const scalar_t* fp = factors.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, num_graphs * heads, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t g = task / heads, hd = task % heads;
        const int64_t base = np[g], n = np[g + 1] - np[g], b = bw[g];
        band_substitute(fp, op, offset[g], base, n, b, hd, heads, hp, feat, transpose);
      }
    });
  });
  return h;
}


// The band solve with the state contraction fused in, so that the [N, H, S, P] state is written
// once and read once per pass instead of going through several PyTorch temporaries:
//   forward:  h_i = solve(M, k_i v_i^T),  y_i = h_i^T q_i                         -> (y, h)
//   backward: dq_i = h_i dy_i,  g = solve(M^T, q_i dy_i^T),  dk_i = g_i v_i,
//             dv_i = g_i^T k_i                                                      -> (dq, dk, dv, g)
template <typename Body>
void for_each_graph_head(int64_t num_graphs, int64_t heads, Body body) {
  at::parallel_for(0, num_graphs * heads, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) body(task / heads, task % heads);
  });
}

struct BandInputs {
  at::Tensor node_ptr, order, bandwidth, factors;
  std::vector<int64_t> offset;
};

BandInputs check_band_inputs(const at::Tensor& node_ptr, const at::Tensor& order, const at::Tensor& bandwidth,
                             const at::Tensor& factors, const at::Tensor& like, const char* op) {
  check_schedule(node_ptr, order, bandwidth, like.size(0), op);
  TORCH_CHECK(factors.dim() == 2 && factors.size(1) == like.size(1) && factors.scalar_type() == like.scalar_type(),
              op, ": factors must have shape [band_size, H] and the dtype of the features");
  BandInputs in{node_ptr.contiguous(), order.contiguous(), bandwidth.contiguous(), factors.contiguous(), {}};
  const int64_t num_graphs = in.node_ptr.size(0) - 1;
  const int64_t* np = in.node_ptr.data_ptr<int64_t>();
  in.offset = band_offsets(np, in.bandwidth.data_ptr<int64_t>(), num_graphs);
  TORCH_CHECK(in.offset[num_graphs] == in.factors.size(0), op, ": factors must have ", in.offset[num_graphs],
              " rows for this schedule, got ", in.factors.size(0));
  return in;
}

std::vector<at::Tensor> band_attention_cpu(const at::Tensor& node_ptr, const at::Tensor& order,
                                           const at::Tensor& bandwidth, const at::Tensor& factors,
                                           const at::Tensor& query_in, const at::Tensor& key_in,
                                           const at::Tensor& value_in) {
  const char* op = "chimera::band_attention";
  check_attention_inputs(query_in, key_in, value_in, op);
  const auto in = check_band_inputs(node_ptr, order, bandwidth, factors, query_in, op);
  const auto query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const int64_t num_nodes = query.size(0), heads = query.size(1), S = query.size(2), P = value.size(2);
  auto state = at::empty({num_nodes, heads, S * P}, query.options());
  auto y = at::empty({num_nodes, heads, P}, query.options());
  if (num_nodes == 0 || heads == 0) return {y, state};
  const int64_t num_graphs = in.node_ptr.size(0) - 1;
  const int64_t* np = in.node_ptr.data_ptr<int64_t>();
  const int64_t* opp = in.order.data_ptr<int64_t>();
  const int64_t* bw = in.bandwidth.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "chimera_band_attention_cpu", [&] {
    const scalar_t *fp = in.factors.data_ptr<scalar_t>(), *qp = query.data_ptr<scalar_t>(),
                   *kp = key.data_ptr<scalar_t>(), *vp = value.data_ptr<scalar_t>();
    scalar_t *hp = state.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    for_each_graph_head(num_graphs, heads, [&](int64_t g, int64_t hd) {
      const int64_t base = np[g];
      band_substitute(
          fp, opp, in.offset[g], base, np[g + 1] - base, bw[g], hd, heads, hp, S * P, false,
          [&](int64_t p) { outer_state(opp[base + p] * heads + hd, kp, vp, hp, S, P); },
          [&](int64_t p) { read_out(opp[base + p] * heads + hd, qp, hp, yp, S, P); });
    });
  });
  return {y, state};
}

std::vector<at::Tensor> band_attention_backward_cpu(const at::Tensor& node_ptr, const at::Tensor& order,
                                                    const at::Tensor& bandwidth, const at::Tensor& factors,
                                                    const at::Tensor& query_in, const at::Tensor& key_in,
                                                    const at::Tensor& value_in, const at::Tensor& state_in,
                                                    const at::Tensor& grad_y_in,
                                                    const c10::optional<at::Tensor>& grad_state_in) {
  const char* op = "chimera::band_attention_backward";
  check_features(query_in, query_in, op, "query");
  check_features(key_in, query_in, op, "key");
  check_features(value_in, query_in, op, "value");
  check_features(state_in, query_in, op, "state");
  check_features(grad_y_in, query_in, op, "grad_y");
  const int64_t num_nodes = query_in.size(0), heads = query_in.size(1), S = query_in.size(2), P = value_in.size(2);
  TORCH_CHECK(key_in.sizes() == query_in.sizes() && value_in.sizes() == grad_y_in.sizes() &&
                  value_in.size(0) == num_nodes && value_in.size(1) == heads &&
                  state_in.sizes() == at::IntArrayRef({num_nodes, heads, S * P}),
              op, ": expected query, key [N, H, S], value, grad_y [N, H, P] and state [N, H, S * P], got ",
              query_in.sizes(), ", ", key_in.sizes(), ", ", value_in.sizes(), ", ", grad_y_in.sizes(), " and ",
              state_in.sizes());
  const auto in = check_band_inputs(node_ptr, order, bandwidth, factors, query_in, op);
  const auto query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const auto state = state_in.contiguous(), grad_y = grad_y_in.contiguous();
  // A gradient that reaches the returned state directly adds to the right-hand side of the adjoint solve.
  const bool has_grad_state = grad_state_in.has_value() && grad_state_in->defined();
  at::Tensor grad_state_extra;
  if (has_grad_state) {
    check_features(*grad_state_in, query_in, op, "grad_state");
    TORCH_CHECK(grad_state_in->sizes() == state_in.sizes(), op, ": grad_state must have the shape of state");
    grad_state_extra = grad_state_in->contiguous();
  }
  auto grad_query = at::zeros_like(query), grad_key = at::zeros_like(key), grad_value = at::zeros_like(value);
  auto grad_state = at::empty_like(state);
  if (num_nodes == 0 || heads == 0) return {grad_query, grad_key, grad_value, grad_state};
  const int64_t num_graphs = in.node_ptr.size(0) - 1;
  const int64_t* np = in.node_ptr.data_ptr<int64_t>();
  const int64_t* opp = in.order.data_ptr<int64_t>();
  const int64_t* bw = in.bandwidth.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "chimera_band_attention_backward_cpu", [&] {
    const scalar_t *fp = in.factors.data_ptr<scalar_t>(), *qp = query.data_ptr<scalar_t>(),
                   *kp = key.data_ptr<scalar_t>(), *vp = value.data_ptr<scalar_t>(),
                   *hp = state.data_ptr<scalar_t>(), *dyp = grad_y.data_ptr<scalar_t>();
    scalar_t *dqp = grad_query.data_ptr<scalar_t>(), *dkp = grad_key.data_ptr<scalar_t>(),
             *dvp = grad_value.data_ptr<scalar_t>(), *gp = grad_state.data_ptr<scalar_t>();
    const scalar_t* extra = has_grad_state ? grad_state_extra.data_ptr<scalar_t>() : nullptr;
    for_each_graph_head(num_graphs, heads, [&](int64_t g, int64_t hd) {
      const int64_t base = np[g];
      band_substitute(
          fp, opp, in.offset[g], base, np[g + 1] - base, bw[g], hd, heads, gp, S * P, true,
          [&](int64_t p) { adjoint_rhs(opp[base + p] * heads + hd, qp, hp, dyp, extra, dqp, gp, S, P); },
          [&](int64_t p) { key_value_grads(opp[base + p] * heads + hd, gp, kp, vp, dkp, dvp, S, P); });
    });
  });
  return {grad_query, grad_key, grad_value, grad_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("band_order", &band_order_cpu);
  m.impl("band_factor", &band_factor_cpu);
  m.impl("band_solve", &band_solve_cpu);
  m.impl("band_attention", &band_attention_cpu);
  m.impl("band_attention_backward", &band_attention_backward_cpu);
}

}  // namespace chimera
