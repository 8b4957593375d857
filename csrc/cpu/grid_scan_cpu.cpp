// chimera::grid_attention: resolvent attention on directed grid DAGs (and lines), row by row.
//
// Every graph g is a grid of rows of row_width[g] positions, walked in the order nodes[graph_ptr[g]:...]
// (raster order of the walk; a permutation of the graph's nodes, so one kernel serves the four
// directions of Fig. 3). The position p of a walk has at most two parents: p - W (the position above,
// weight[node, 0]) and p - 1 (the position before it in its row, weight[node, 1]):
//
//     H_p = weight[p, 0] H_{p-W} + weight[p, 1] H_{p-1} + K_p V_p^T,      y_p = H_p^T Q_p.
//
// Why a kernel of its own: the level-by-level DAG solve materializes H for every node (N x H x S x P,
// half a gigabyte for 64 images of 32 x 32 patches) and is bound by that memory traffic. Here one
// (graph, head) task keeps two rows of states in cache, and the forward writes only y and the states
// of every segment_rows-th row. The backward walks the segments in reverse: it recomputes a segment's
// states from its checkpoint (segment_rows + 1 rows in cache) and runs the adjoint recurrence
//
//     G_p = Q_p dY_p^T + weight[p + W, 0] G_{p+W} + weight[p + 1, 1] G_{p+1}
//
// with dQ_p = H_p dY_p, dK_p = G_p V_p, dV_p = G_p^T K_p, dweight[p, 0] = <G_p, H_{p-W}> and
// dweight[p, 1] = <G_p, H_{p-1}>. Row 0 has no parent above and column 0 none before it: their
// weights are ignored and get zero gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>
#include <vector>

#include "../checks.h"
#include "state_contraction.h"

namespace chimera {
namespace {

struct GridLayout {
  at::Tensor graph_ptr, row_width, nodes;
  std::vector<int64_t> checkpoint_ptr;  // per graph, first checkpoint position (G + 1 entries)
  int64_t dags;                         // D walks (stacked inputs), or 1
  bool stacked;
  std::vector<int64_t> groups;          // stacked: the query/key set of every DAG (query[:, groups[d]])
};

// Checkpoints of a graph with `rows` rows: the last row of every segment but the final one,
// ceil(rows / segment_rows) - 1, written so that no segment_rows up to INT64_MAX overflows.
inline int64_t checkpoint_rows(int64_t rows, int64_t segment_rows) {
  return rows == 0 ? 0 : (rows - 1) / segment_rows;
}

// The two forms of the inputs: one DAG (nodes [N], weight [N, 2, H], query and key [N, H, S]) or D
// DAGs stacked, the heads sharing query and key (nodes [D, N], weight [D, N, 3, H] whose third slot
// scales the key per head, query and key [N, sets, 1, S], DAG d reading set groups[d]: by default
// sets = D and groups[d] = d); value [N, H, P] either way, its rows may be strided (a column block of
// a wider tensor: read in place, not copied).
void check_grid_features(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const char* op) {
  if (query.dim() == 3) {
    check_attention_inputs(query, key, value, op);
    return;
  }
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4, op, ": query and key must have shape [N, H, S] (one DAG) or "
              "[N, D, H, S] (D DAGs), got ", query.sizes(), " and ", key.sizes());
  check_features(value, value, op, "value");
  for (const auto& [t, name] : {std::pair{&query, "query"}, {&key, "key"}}) {
    TORCH_CHECK(t->device() == value.device(), op, ": ", name, " must be on ", value.device(), ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == value.scalar_type(), op, ": ", name, " must have dtype ", value.scalar_type(),
                ", got ", t->scalar_type());
  }
  const int64_t N = value.size(0);
  TORCH_CHECK(key.size(0) == N && key.size(2) == 1, op, ": key must have shape [N, sets, 1, S] = [", N,
              ", sets, 1, S] (stacked DAGs: the heads share it), got ", key.sizes());
  TORCH_CHECK(query.sizes() == key.sizes(), op, ": query must have the shape of key ", key.sizes(), ", got ",
              query.sizes());
}

GridLayout check_grid_inputs(const at::Tensor& graph_ptr, const at::Tensor& row_width, const at::Tensor& nodes,
                             const at::Tensor& weight, const at::Tensor& query, const at::Tensor& value,
                             int64_t segment_rows, int64_t num_checkpoints, at::OptionalIntArrayRef groups_in,
                             const char* op) {
  const bool stacked = query.dim() == 4;
  TORCH_CHECK(stacked || !groups_in.has_value(), op, ": groups applies to stacked DAGs only (query [N, sets, 1, S])");
  const int64_t sets = stacked ? query.size(1) : 1;
  std::vector<int64_t> groups;
  if (groups_in.has_value()) {
    groups.assign(groups_in->begin(), groups_in->end());
    for (size_t d = 0; d < groups.size(); ++d)
      TORCH_CHECK(groups[d] >= 0 && groups[d] < sets, op, ": groups[", d, "] must be a set of query and key in [0, ",
                  sets, "), got ", groups[d]);
  } else {
    for (int64_t d = 0; d < sets; ++d) groups.push_back(d);
  }
  const int64_t num_nodes = value.size(0), heads = value.size(1), dags = static_cast<int64_t>(groups.size());
  TORCH_CHECK(graph_ptr.dim() == 1 && graph_ptr.scalar_type() == at::kLong && graph_ptr.numel() >= 1, op,
              ": graph_ptr must be a 1-D int64 tensor with G + 1 >= 1 entries, got shape ", graph_ptr.sizes(),
              " and dtype ", graph_ptr.scalar_type());
  const int64_t num_graphs = graph_ptr.numel() - 1;
  TORCH_CHECK(row_width.dim() == 1 && row_width.scalar_type() == at::kLong && row_width.numel() == num_graphs, op,
              ": row_width must be a 1-D int64 tensor with G = ", num_graphs, " entries, got shape ", row_width.sizes(),
              " and dtype ", row_width.scalar_type());
  if (stacked) {
    TORCH_CHECK(nodes.dim() == 2 && nodes.scalar_type() == at::kLong && nodes.size(0) == dags &&
                    nodes.size(1) == num_nodes,
                op, ": nodes must be a [D, N] = [", dags, ", ", num_nodes, "] int64 tensor, one walk (a permutation of ",
                "the nodes) per DAG, got shape ", nodes.sizes());
    TORCH_CHECK(weight.dim() == 4 && weight.size(0) == dags && weight.size(1) == num_nodes && weight.size(2) == 3 &&
                    weight.size(3) == heads && weight.scalar_type() == query.scalar_type(),
                op, ": weight must have shape [D, N, 3, H] = [", dags, ", ", num_nodes, ", 3, ", heads,
                "] (above, before in the row, key scale) and the dtype of query, got ", weight.sizes(), " and ",
                weight.scalar_type());
  } else {
    TORCH_CHECK(nodes.dim() == 1 && nodes.scalar_type() == at::kLong && nodes.numel() == num_nodes, op,
                ": nodes must be a 1-D int64 permutation of the ", num_nodes, " nodes, got shape ", nodes.sizes());
    TORCH_CHECK(weight.dim() == 3 && weight.size(0) == num_nodes && weight.size(1) == 2 && weight.size(2) == heads &&
                    weight.scalar_type() == query.scalar_type(),
                op, ": weight must have shape [N, 2, H] = [", num_nodes, ", 2, ", heads, "] and the dtype of query, got ",
                weight.sizes(), " and ", weight.scalar_type());
  }
  for (const auto& [t, name] : {std::pair{&graph_ptr, "graph_ptr"}, {&row_width, "row_width"}, {&nodes, "nodes"},
                                {&weight, "weight"}})
    check_device(*t, query, op, name);
  TORCH_CHECK(segment_rows >= 1, op, ": segment_rows must be at least 1, got ", segment_rows);
  GridLayout layout{graph_ptr.contiguous(), row_width.contiguous(), nodes.contiguous(), {}, dags, stacked, groups};
  const int64_t* ptr = layout.graph_ptr.data_ptr<int64_t>();
  const int64_t* width = layout.row_width.data_ptr<int64_t>();
  check_ptr_values(ptr, num_graphs + 1, num_nodes, op, "graph_ptr", "the number of nodes N");
  layout.checkpoint_ptr.assign(num_graphs + 1, 0);
  for (int64_t g = 0; g < num_graphs; ++g) {
    const int64_t size = ptr[g + 1] - ptr[g];
    TORCH_CHECK(size == 0 || (width[g] >= 1 && size % width[g] == 0), op, ": row_width[", g,
                "] must be positive and divide the graph's ", size, " nodes, got ", width[g]);
    const int64_t rows = size == 0 ? 0 : size / width[g];
    layout.checkpoint_ptr[g + 1] = layout.checkpoint_ptr[g] + checkpoint_rows(rows, segment_rows) * (size ? width[g] : 0);
  }
  TORCH_CHECK(num_checkpoints == layout.checkpoint_ptr.back(), op, ": num_checkpoints must be the number of "
              "checkpointed positions, sum over graphs of row_width * (ceil(rows / segment_rows) - 1) = ",
              layout.checkpoint_ptr.back(), ", got ", num_checkpoints);
  // Every walk must stay inside its graph: a permutation of N that maps every graph's range onto itself.
  for (int64_t dag = 0; dag < dags; ++dag) {
    const int64_t* order = layout.nodes.data_ptr<int64_t>() + dag * num_nodes;
    check_permutation(order, num_nodes, op, stacked ? ("nodes[" + std::to_string(dag) + "]").c_str() : "nodes");
    for (int64_t g = 0; g < num_graphs; ++g)
      for (int64_t p = ptr[g]; p < ptr[g + 1]; ++p)
        TORCH_CHECK(order[p] >= ptr[g] && order[p] < ptr[g + 1], op, ": nodes[", stacked ? dag : p, stacked ? ", " : "",
                    stacked ? std::to_string(p) : std::string(), "] = ", order[p], " leaves graph ", g, " (nodes ",
                    ptr[g], " to ", ptr[g + 1] - 1, "); every graph's walk must be a permutation of its own nodes");
  }
  return layout;
}

// Inlined into the vector clones below (a call to the cloned axpy would dispatch on every row).
#define CHIMERA_INLINE inline __attribute__((always_inline))

template <typename scalar_t>
CHIMERA_INLINE void add_scaled(scalar_t* __restrict__ acc, const scalar_t* __restrict__ x, scalar_t w, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * x[f];
}

// 64-byte vectors of GCC's vector extensions: one AVX-512 register in the x86-64-v4 clone, two AVX
// registers in the x86-64-v3 one, four SSE registers in the baseline; loaded and stored unaligned.
// The helpers are always inlined, so the ABI of passing such vectors (GCC's -Wpsabi note) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename scalar_t>
struct Vector {
  static constexpr int64_t kLanes = 64 / sizeof(scalar_t);
  typedef scalar_t type __attribute__((vector_size(64)));
};

template <typename scalar_t>
CHIMERA_INLINE typename Vector<scalar_t>::type load_vector(const scalar_t* p) {
  typename Vector<scalar_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
CHIMERA_INLINE void store_vector(scalar_t* p, const typename Vector<scalar_t>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum of a vector's lanes: halves added twice as vectors (64 -> 32 -> 16 bytes), then the last
// lanes one by one; a loop over all the lanes would be 16 dependent scalar additions.
template <typename scalar_t>
CHIMERA_INLINE scalar_t sum_lanes(const typename Vector<scalar_t>::type& v) {
  typedef scalar_t half_t __attribute__((vector_size(32)));
  typedef scalar_t quarter_t __attribute__((vector_size(16)));
  half_t lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const half_t half = lo + hi;
  quarter_t a, b;
  std::memcpy(&a, &half, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&half) + 16, 16);
  const quarter_t quarter = a + b;
  scalar_t sum = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(16 / sizeof(scalar_t)); ++l) sum += quarter[l];
  return sum;
}

// One DAG of a call: its walk, weights and the start of its query and key (node after node,
// qk_stride apart). One DAG per call: query, key [N, H, S], weight [N, 2, H]. Stacked DAGs: the
// heads share query and key ([N, D, 1, S]) and weight [D, N, 3, H] has a third slot, the key's
// scale per head (K_ih = key_i * weight[i, 2, h]); a task then runs every head of its graph, so
// dQ and dK sum over the heads without a race. `accumulate`: y and dV add to what an earlier DAG
// of the same call wrote (the first DAG writes them).
template <typename scalar_t>
struct GridTask {
  const int64_t *graph_ptr, *row_width, *nodes, *checkpoint_ptr;
  const scalar_t *weight, *query, *key, *value;
  int64_t heads, S, P, segment_rows;
  int64_t qk_stride, value_row;  // value_row: elements from one node's values to the next's (H * P if contiguous)
  int64_t grad_qk_stride;        // dQ and dK rows: contiguous, or the feature rows of grid_mixer
  const scalar_t* skip;          // grid_mixer: y starts at skip[h] * v (Mamba's D); nullptr: at 0
  bool shared_heads, accumulate;
  bool writes_qk;  // the first DAG reading its query/key set: writes dQ, dK (later ones of the set add)
  int64_t slots() const { return shared_heads ? 3 : 2; }
  scalar_t weight_of(int64_t i, int64_t slot, int64_t h) const { return weight[(i * slots() + slot) * heads + h]; }
  scalar_t key_scale(int64_t i, int64_t h) const { return shared_heads ? weight_of(i, 2, h) : scalar_t(1); }
  int64_t qk_row(int64_t i, int64_t h) const { return i * qk_stride + (shared_heads ? 0 : h) * S; }
  int64_t grad_qk_row(int64_t i, int64_t h) const { return i * grad_qk_stride + (shared_heads ? 0 : h) * S; }
};

// Rows of states are processed in blocks of state rows s (the recurrences of different s are
// independent; only the read-out sums over s), one row of a block (W x block x P values) near this
// size: wide images keep the rows a step touches in cache, narrow ones take every s in one pass
// (64 images of 32 x 32, S = 16, P = 32, one thread: 8 KiB blocks 62 + 178 ms forward + backward per
// DAG, 32 KiB 53 + 145 ms, all of S 46 + 155 ms).
constexpr int64_t kRowBlockBytes = 32 * 1024;

inline int64_t state_block(int64_t W, int64_t S, int64_t P, int64_t element_size) {
  return std::max<int64_t>(1, std::min<int64_t>(S, kRowBlockBytes / std::max<int64_t>(1, W * P * element_size)));
}

// One (graph, head): y and the checkpoint rows. Two rows of a block of states live in `rows`
// (forward_scratch values, allocated by the caller: nothing in a vector clone may throw, since with
// GCC 12 an exception leaving a target_clones function terminates the process).
// kP > 0: the head dimension P known at compile time (the loops over it unrolled, accumulators
// kept in registers); kP = 0: any P.
template <typename scalar_t, int64_t kP>
CHIMERA_INLINE void grid_forward_task(const GridTask<scalar_t>& t, int64_t g, int64_t h, scalar_t* y,
                                      scalar_t* checkpoints, scalar_t* rows) {
  const int64_t base = t.graph_ptr[g], size = t.graph_ptr[g + 1] - base;
  if (size == 0) return;
  const int64_t P = kP > 0 ? kP : t.P;
  const int64_t W = t.row_width[g], R = size / W, S = t.S, SP = S * P, H = t.heads;
  const int64_t block = state_block(W, S, P, sizeof(scalar_t)), BP = block * P;
  // Only the zero block is cleared: every state is written before it is read (a missing parent
  // reads `zeros`), and clearing the rows cost as much as a tenth of the kernel.
  scalar_t* zeros = rows + 2 * W * BP;  // the state of a missing parent
  std::fill(zeros, zeros + BP, scalar_t(0));
  for (int64_t s0 = 0; s0 < S; s0 += block) {
    const int64_t sn = std::min(block, S - s0);
    scalar_t *above = rows, *current = rows + W * BP;
    int64_t checkpoint = t.checkpoint_ptr[g];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < W; ++c) {
        const int64_t i = t.nodes[base + r * W + c];
        const scalar_t w_up = r > 0 ? t.weight_of(i, 0, h) : scalar_t(0);
        const scalar_t w_left = c > 0 ? t.weight_of(i, 1, h) : scalar_t(0);
        const scalar_t k_scale = t.key_scale(i, h);
        const scalar_t *up = r > 0 ? above + c * BP : zeros, *left = c > 0 ? current + (c - 1) * BP : zeros;
        const scalar_t *q = t.query + t.qk_row(i, h) + s0, *k = t.key + t.qk_row(i, h) + s0;
        const scalar_t* __restrict__ v = t.value + i * t.value_row + h * P;
        scalar_t* state = current + c * BP;
        scalar_t* __restrict__ out = y + (i * H + h) * P;
        const bool first = s0 == 0 && !t.accumulate;  // the first block (of the first DAG) writes y, later ones add
        if constexpr (kP > 0) {
          // P fixed: v and the output row stay in registers over the block's state rows.
          using vec_t = typename Vector<scalar_t>::type;
          constexpr int64_t kLanes = Vector<scalar_t>::kLanes, kV = kP / kLanes;
          static_assert(kP % kLanes == 0, "the fixed head dimensions are multiples of a vector");
          vec_t v_v[kV], out_v[kV];
          for (int64_t j = 0; j < kV; ++j) {
            v_v[j] = load_vector(v + j * kLanes);
            out_v[j] = !first ? load_vector(out + j * kLanes) : t.skip ? t.skip[h] * v_v[j] : vec_t{};
          }
          for (int64_t s = 0; s < sn; ++s) {
            const scalar_t ks = k[s] * k_scale, qs = q[s];
            for (int64_t j = 0; j < kV; ++j) {  // a missing parent: zero weight times the zero state
              const int64_t f = s * P + j * kLanes;
              const vec_t state_v = ks * v_v[j] + w_up * load_vector(up + f) + w_left * load_vector(left + f);
              store_vector(state + f, state_v);
              out_v[j] += qs * state_v;
            }
          }
          for (int64_t j = 0; j < kV; ++j) store_vector(out + j * kLanes, out_v[j]);
        } else {
          if (first)
            for (int64_t f = 0; f < P; ++f) out[f] = t.skip ? t.skip[h] * v[f] : scalar_t(0);
          for (int64_t s = 0; s < sn; ++s) {
            scalar_t* __restrict__ hs = state + s * P;
            const scalar_t* __restrict__ us = up + s * P;
            const scalar_t* __restrict__ ls = left + s * P;
            const scalar_t ks = k[s] * k_scale, qs = q[s];
            for (int64_t f = 0; f < P; ++f) {  // a missing parent: zero weight times the zero state
              const scalar_t state_f = ks * v[f] + w_up * us[f] + w_left * ls[f];
              hs[f] = state_f;
              out[f] += qs * state_f;
            }
          }
        }
      }
      if ((r + 1) % t.segment_rows == 0 && r + 1 < R) {  // the row a later segment restarts from
        for (int64_t c = 0; c < W; ++c)
          std::memcpy(checkpoints + ((checkpoint + c) * H + h) * SP + s0 * P, current + c * BP,
                      sn * P * sizeof(scalar_t));
        checkpoint += W;
      }
      std::swap(above, current);
    }
  }
}

template <typename scalar_t>
struct GridGrads {
  const scalar_t *grad_y, *checkpoints;
  scalar_t *grad_query, *grad_key, *grad_value, *grad_weight;
  int64_t grad_value_row;  // elements from one node's dV to the next's: H * P, or the feature rows of grid_mixer
  scalar_t* grad_skip;     // grid_mixer: [G, H] partial sums of <dy, v> per image and head; nullptr: none
};

// One (graph, head) of the backward (gradients of value and weight accumulate over the blocks:
// the first block writes them). `buffer` holds the segment's states (segment_rows + 1 rows, the first being
// the checkpoint it restarts from) and two rows of adjoint states, for one block of state rows.
template <typename scalar_t, int64_t kP>
CHIMERA_INLINE void grid_backward_task(const GridTask<scalar_t>& t, const GridGrads<scalar_t>& d, int64_t g,
                                       int64_t h, scalar_t* buffer) {
  const int64_t base = t.graph_ptr[g], size = t.graph_ptr[g + 1] - base;
  if (size == 0) return;
  const int64_t P = kP > 0 ? kP : t.P;
  const int64_t W = t.row_width[g], R = size / W, S = t.S, SP = S * P, H = t.heads;
  // A segment never holds more than the image's rows: the buffer below is sized by it, and a
  // segment_rows past the tallest image (no checkpoints) must not allocate for rows that do not exist.
  const int64_t C = std::min(t.segment_rows, R), segments = (R + C - 1) / C;
  const int64_t block = state_block(W, S, P, sizeof(scalar_t)), BP = block * P, row = W * BP;
  // Only the zero block is cleared: every state and adjoint is written before it is read (a missing
  // neighbour reads `zeros`; the segment's first row is its checkpoint), and clearing the segment's
  // rows, a megabyte per image, head and DAG, cost a fifth of the backward.
  scalar_t* zeros = buffer + (C + 3) * row;  // the state or adjoint of a missing neighbour
  std::fill(zeros, zeros + BP, scalar_t(0));
  auto weight = [&](int64_t i, int64_t slot) { return t.weight_of(i, slot, h); };
  for (int64_t s0 = 0; s0 < S; s0 += block) {
    const int64_t sn = std::min(block, S - s0);
    scalar_t* states = buffer;  // row 0: the row above the segment
    scalar_t *adjoint_below = buffer + (C + 1) * row, *adjoint = adjoint_below + row;
    for (int64_t segment = segments - 1; segment >= 0; --segment) {
      const int64_t r0 = segment * C, r1 = std::min(R, r0 + C);
      if (segment > 0) {
        const int64_t checkpoint = t.checkpoint_ptr[g] + (segment - 1) * W;
        for (int64_t c = 0; c < W; ++c)
          std::memcpy(states + c * BP, d.checkpoints + ((checkpoint + c) * H + h) * SP + s0 * P,
                      sn * P * sizeof(scalar_t));
      }
      // Recompute the segment's states (the forward without the read-out).
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t *above = states + (r - r0) * row, *current = above + row;
        for (int64_t c = 0; c < W; ++c) {
          const int64_t i = t.nodes[base + r * W + c];
          const scalar_t w_up = r > 0 ? weight(i, 0) : scalar_t(0);
          const scalar_t w_left = c > 0 ? weight(i, 1) : scalar_t(0);
          const scalar_t* k = t.key + t.qk_row(i, h) + s0;
          const scalar_t k_scale = t.key_scale(i, h);
          const scalar_t* __restrict__ v = t.value + i * t.value_row + h * P;
          const scalar_t *up = r > 0 ? above + c * BP : zeros, *left = c > 0 ? current + (c - 1) * BP : zeros;
          if constexpr (kP > 0) {
            using vec_t = typename Vector<scalar_t>::type;
            constexpr int64_t kLanes = Vector<scalar_t>::kLanes, kV = kP / kLanes;
            vec_t v_v[kV];
            for (int64_t j = 0; j < kV; ++j) v_v[j] = load_vector(v + j * kLanes);
            for (int64_t s = 0; s < sn; ++s) {
              const scalar_t ks = k[s] * k_scale;
              for (int64_t j = 0; j < kV; ++j) {
                const int64_t f = s * P + j * kLanes;
                store_vector(current + c * BP + f,
                             ks * v_v[j] + w_up * load_vector(up + f) + w_left * load_vector(left + f));
              }
            }
          } else {
            for (int64_t s = 0; s < sn; ++s) {
              scalar_t* __restrict__ hs = current + c * BP + s * P;
              const scalar_t* __restrict__ us = up + s * P;
              const scalar_t* __restrict__ ls = left + s * P;
              const scalar_t ks = k[s] * k_scale;
              for (int64_t f = 0; f < P; ++f) hs[f] = ks * v[f] + w_up * us[f] + w_left * ls[f];
            }
          }
        }
      }
      // Adjoint recurrence over the segment, last position first.
      for (int64_t r = r1 - 1; r >= r0; --r) {
        const scalar_t *above = states + (r - r0) * row, *current = above + row;
        for (int64_t c = W - 1; c >= 0; --c) {
          const int64_t p = base + r * W + c, i = t.nodes[p];
          const scalar_t w_down = r + 1 < R ? weight(t.nodes[p + W], 0) : scalar_t(0);
          const scalar_t w_right = c + 1 < W ? weight(t.nodes[p + 1], 1) : scalar_t(0);
          const scalar_t *q = t.query + t.qk_row(i, h) + s0, *k = t.key + t.qk_row(i, h) + s0;
          const scalar_t k_scale = t.key_scale(i, h);
          const scalar_t* __restrict__ v = t.value + i * t.value_row + h * P;
          const scalar_t* __restrict__ dy = d.grad_y + (i * H + h) * P;
          const scalar_t *below = r + 1 < R ? adjoint_below + c * BP : zeros;
          const scalar_t* right = c + 1 < W ? adjoint + (c + 1) * BP : zeros;
          const scalar_t *state = current + c * BP, *up = r > 0 ? above + c * BP : zeros;
          const scalar_t* left = c > 0 ? current + (c - 1) * BP : zeros;
          // Shared heads: dQ, dK sum over the heads (the first head writes), dK through the key's scale.
          scalar_t *dq = d.grad_query + t.grad_qk_row(i, h) + s0, *dk = d.grad_key + t.grad_qk_row(i, h) + s0;
          const bool first_head = !t.shared_heads || (h == 0 && t.writes_qk);
          scalar_t d_scale = 0;  // sum_s key_s dK_eff_s: the gradient of the key's scale
          scalar_t* __restrict__ dv = d.grad_value + i * d.grad_value_row + h * P;
          const bool first_dv = s0 == 0 && !t.accumulate;  // the first block (of the first DAG) writes dV, later ones add
          if (first_dv && d.grad_skip) {  // the skip y += D_h v: dV starts at D_h dy, dD_h sums <dy, v>
            scalar_t dot = 0;
            for (int64_t f = 0; f < P; ++f) dot += dy[f] * v[f];
            d.grad_skip[g * H + h] += dot;
          }
          scalar_t d_up = 0, d_left = 0;
          if constexpr (kP > 0) {
            // P fixed: every row of P values is kV vectors, held in registers (GCC vector extensions),
            // and the sums over f stay vectors of lanes: <G, H_parent> reduced once per position, dq
            // and dk once per state row by sum_lanes, which folds the vector in halves. (An `omp simd`
            // reduction, which GCC reduces lane by lane in order, cost more than the multiply-adds.)
            using vec_t = typename Vector<scalar_t>::type;
            constexpr int64_t kLanes = Vector<scalar_t>::kLanes, kV = kP / kLanes;
            static_assert(kP % kLanes == 0, "the fixed head dimensions are multiples of a vector");
            vec_t dy_v[kV], v_v[kV], dv_v[kV];  // dV stays in registers over the block's state rows
            for (int64_t j = 0; j < kV; ++j) {
              dy_v[j] = load_vector(dy + j * kLanes);
              v_v[j] = load_vector(v + j * kLanes);
              dv_v[j] = !first_dv ? load_vector(dv + j * kLanes) : t.skip ? t.skip[h] * dy_v[j] : vec_t{};
            }
            vec_t part_up = {}, part_left = {};
            for (int64_t s = 0; s < sn; ++s) {
              scalar_t* gs = adjoint + c * BP + s * P;
              const scalar_t *bs = below + s * P, *rs = right + s * P, *hs = state + s * P;
              const scalar_t *us = up + s * P, *ls = left + s * P;
              const scalar_t qs = q[s], ks = k[s] * k_scale;
              vec_t acc_q = {}, acc_k = {};
              for (int64_t j = 0; j < kV; ++j) {
                const int64_t f = j * kLanes;
                const vec_t g_v = qs * dy_v[j] + w_down * load_vector(bs + f) + w_right * load_vector(rs + f);
                store_vector(gs + f, g_v);
                acc_q += load_vector(hs + f) * dy_v[j];
                acc_k += g_v * v_v[j];
                dv_v[j] += ks * g_v;
                part_up += g_v * load_vector(us + f);
                part_left += g_v * load_vector(ls + f);
              }
              const scalar_t sum_q = sum_lanes<scalar_t>(acc_q), sum_k = sum_lanes<scalar_t>(acc_k);
              dq[s] = (first_head ? scalar_t(0) : dq[s]) + sum_q;
              dk[s] = (first_head ? scalar_t(0) : dk[s]) + k_scale * sum_k;
              d_scale += k[s] * sum_k;
            }
            for (int64_t j = 0; j < kV; ++j) store_vector(dv + j * kLanes, dv_v[j]);
            d_up = sum_lanes<scalar_t>(part_up);
            d_left = sum_lanes<scalar_t>(part_left);
          } else {
            if (first_dv)
              for (int64_t f = 0; f < P; ++f) dv[f] = t.skip ? t.skip[h] * dy[f] : scalar_t(0);
            for (int64_t s = 0; s < sn; ++s) {
              scalar_t* __restrict__ gs = adjoint + c * BP + s * P;
              const scalar_t* __restrict__ bs = below + s * P;
              const scalar_t* __restrict__ rs = right + s * P;
              const scalar_t* __restrict__ hs = state + s * P;
              const scalar_t* __restrict__ us = up + s * P;
              const scalar_t* __restrict__ ls = left + s * P;
              const scalar_t qs = q[s], ks = k[s] * k_scale;
              scalar_t acc_q = 0, acc_k = 0, acc_up = 0, acc_left = 0;
#pragma omp simd reduction(+ : acc_q, acc_k, acc_up, acc_left)
              for (int64_t f = 0; f < P; ++f) {
                const scalar_t g_f = qs * dy[f] + w_down * bs[f] + w_right * rs[f];
                gs[f] = g_f;
                acc_q += hs[f] * dy[f];
                acc_k += g_f * v[f];
                dv[f] += ks * g_f;
                acc_up += g_f * us[f];
                acc_left += g_f * ls[f];
              }
              d_up += acc_up;  // zero without the parent
              d_left += acc_left;
              dq[s] = (first_head ? scalar_t(0) : dq[s]) + acc_q;
              dk[s] = (first_head ? scalar_t(0) : dk[s]) + k_scale * acc_k;
              d_scale += k[s] * acc_k;
            }
          }
          scalar_t *dw_up = d.grad_weight + (i * t.slots()) * H + h, *dw_left = dw_up + H;
          *dw_up = (s0 == 0 ? scalar_t(0) : *dw_up) + d_up;  // zero without the parent
          *dw_left = (s0 == 0 ? scalar_t(0) : *dw_left) + d_left;
          if (t.shared_heads) {
            scalar_t* dw_scale = dw_left + H;
            *dw_scale = (s0 == 0 ? scalar_t(0) : *dw_scale) + d_scale;
          }
        }
        std::swap(adjoint_below, adjoint);
      }
    }
  }
}

// The task loops, compiled three times (x86-64-v4: AVX-512; x86-64-v3: AVX2 and FMA; baseline x86-64)
// and picked at load time: the inner loops over P are the whole cost, and the 64-byte vectors are one
// register with AVX-512, two with AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHIMERA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHIMERA_VECTOR_CLONES
#endif
// Common head dimensions get loops of fixed length; others the generic ones.
#define CHIMERA_GRID_HEAD_DIMS(call) \
  switch (t.P) {                     \
    case 16: call(16); break;        \
    case 32: call(32); break;        \
    case 64: call(64); break;        \
    default: call(0);                \
  }
// A task is a (graph, head), or with shared heads a graph and all its heads (tasks_per_graph
// below); it runs every DAG of the call in turn, so that y and dV add up in one tensor without a
// race (the DAGs of an image touch the same nodes).
#define CHIMERA_GRID_TASK_HEADS                                                  \
  const int64_t heads = dags[0].heads, split = dags[0].shared_heads ? 1 : heads; \
  const int64_t g = task / split, h0 = task % split, h1 = split == 1 ? heads : h0 + 1;
#define CHIMERA_GRID_LOOPS(scalar_t)                                                                               \
  CHIMERA_VECTOR_CLONES void grid_forward_tasks(const std::vector<GridTask<scalar_t>>& dags, int64_t begin,        \
                                                int64_t end, scalar_t* y, const std::vector<scalar_t*>& checkpoint, \
                                                scalar_t* rows) {                                                  \
    using value_t = scalar_t;                                                                                      \
    for (int64_t task = begin; task < end; ++task) {                                                               \
      CHIMERA_GRID_TASK_HEADS                                                                                      \
      for (int64_t h = h0; h < h1; ++h)                                                                            \
        for (size_t dag = 0; dag < dags.size(); ++dag) {                                                           \
          const GridTask<scalar_t>& t = dags[dag];                                                                 \
          scalar_t* checkpoints = checkpoint[dag];                                                                 \
          CHIMERA_GRID_HEAD_DIMS(CHIMERA_GRID_FORWARD)                                                             \
        }                                                                                                          \
    }                                                                                                              \
  }                                                                                                                \
  CHIMERA_VECTOR_CLONES void grid_backward_tasks(const std::vector<GridTask<scalar_t>>& dags,                      \
                                                 const std::vector<GridGrads<scalar_t>>& grads, int64_t begin,      \
                                                 int64_t end, scalar_t* buffer) {                                   \
    using value_t = scalar_t;                                                                                      \
    for (int64_t task = begin; task < end; ++task) {                                                               \
      CHIMERA_GRID_TASK_HEADS                                                                                      \
      for (int64_t h = h0; h < h1; ++h)                                                                            \
        for (size_t dag = 0; dag < dags.size(); ++dag) {                                                           \
          const GridTask<scalar_t>& t = dags[dag];                                                                 \
          const GridGrads<scalar_t>& d = grads[dag];                                                               \
          CHIMERA_GRID_HEAD_DIMS(CHIMERA_GRID_BACKWARD)                                                            \
        }                                                                                                          \
    }                                                                                                              \
  }
#define CHIMERA_GRID_FORWARD(p) grid_forward_task<value_t, p>(t, g, h, y, checkpoints, rows)
#define CHIMERA_GRID_BACKWARD(p) grid_backward_task<value_t, p>(t, d, g, h, buffer)
CHIMERA_GRID_LOOPS(float)
CHIMERA_GRID_LOOPS(double)
#undef CHIMERA_GRID_LOOPS
#undef CHIMERA_GRID_FORWARD
#undef CHIMERA_GRID_BACKWARD
#undef CHIMERA_GRID_HEAD_DIMS

// Values of scratch one thread needs for any graph of the batch: two rows of a block of states and
// a zero block forward; a segment (at most the image's rows), two adjoint rows and a zero block backward.
inline int64_t scratch_values(const GridLayout& layout, int64_t S, int64_t P, int64_t element_size,
                              int64_t segment_rows, bool backward) {
  const int64_t* ptr = layout.graph_ptr.data_ptr<int64_t>();
  const int64_t* width = layout.row_width.data_ptr<int64_t>();
  int64_t most = 0;
  for (int64_t g = 0; g + 1 < layout.graph_ptr.numel(); ++g) {
    const int64_t size = ptr[g + 1] - ptr[g];
    if (size == 0) continue;
    const int64_t W = width[g], R = size / W, BP = state_block(W, S, P, element_size) * P;
    const int64_t rows = backward ? std::min(segment_rows, R) + 3 : 2;
    most = std::max(most, rows * W * BP + BP);
  }
  return most;
}

// Tasks per thread at least: small images (8 x 8 digits) would otherwise cost more in OpenMP
// fork/join than in work, and much more on a loaded machine, where a barrier waits for a
// descheduled thread. One chunk does at least about 2^18 state updates (a few hundred us).
inline int64_t task_grain(int64_t num_nodes, int64_t num_graphs, int64_t dags, int64_t S, int64_t P) {
  const int64_t per_task = std::max<int64_t>(1, num_nodes / std::max<int64_t>(1, num_graphs)) *
                           std::max<int64_t>(1, dags * S * P);
  return std::max<int64_t>(1, (int64_t{1} << 18) / per_task);
}

// The per-DAG tasks of a call: DAG d walks nodes[d] with weight[d] and reads query[:, groups[d]],
// key[:, groups[d]].
template <typename scalar_t>
std::vector<GridTask<scalar_t>> make_tasks(const GridLayout& layout, const at::Tensor& weight, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value, int64_t segment_rows,
                                           const scalar_t* skip = nullptr, int64_t grad_qk_row = 0) {
  const int64_t N = value.size(0), H = value.size(1), P = value.size(2), S = key.size(-1), D = layout.dags;
  const int64_t slots = layout.stacked ? 3 : 2;
  const int64_t grad_qk_stride = grad_qk_row > 0 ? grad_qk_row : layout.stacked ? query.size(1) * S : H * S;
  const int64_t qk_stride = layout.stacked ? query.stride(0) : H * S;  // stacked: rows may be strided (sets_in_place)
  std::vector<GridTask<scalar_t>> tasks;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t set = layout.stacked ? layout.groups[d] : 0;
    const bool first_of_set = std::find(layout.groups.begin(), layout.groups.begin() + d, set) ==
                              layout.groups.begin() + d;
    tasks.push_back({layout.graph_ptr.data_ptr<int64_t>(), layout.row_width.data_ptr<int64_t>(),
                     layout.nodes.data_ptr<int64_t>() + d * N, layout.checkpoint_ptr.data(),
                     weight.data_ptr<scalar_t>() + d * N * slots * H, query.data_ptr<scalar_t>() + set * S,
                     key.data_ptr<scalar_t>() + set * S, value.data_ptr<scalar_t>(), H, S, P, segment_rows, qk_stride,
                     value.stride(0), grad_qk_stride, skip, layout.stacked, d > 0, !layout.stacked || first_of_set});
  }
  return tasks;
}

// value as the kernels read it: rows of H * P values, contiguous within a row, any row stride.
at::Tensor rows_of_values(const at::Tensor& value) {
  const int64_t H = value.size(1), P = value.size(2);
  const bool row_major = value.stride(2) == 1 && (value.stride(1) == P || H == 1) && value.stride(0) >= H * P;
  return row_major ? value : value.contiguous();
}

// Stacked query and key ([N, sets, 1, S]) as the kernels read them: the sets of a node contiguous
// and one row stride for both, so that column blocks of the layer's projected features are read in
// place (no copies); otherwise contiguous copies.
std::pair<at::Tensor, at::Tensor> sets_of_rows(const at::Tensor& query, const at::Tensor& key, bool stacked) {
  const int64_t sets = query.size(1), S = query.size(-1);
  auto in_place = [&](const at::Tensor& t) {
    return t.stride(3) == 1 && (t.stride(1) == S || sets == 1) && t.stride(0) >= sets * S;
  };
  if (stacked && in_place(query) && in_place(key) && query.stride(0) == key.stride(0)) return {query, key};
  return {query.contiguous(), key.contiguous()};
}

// Tasks of a call: one per (graph, head), or per graph when the heads share query and key.
inline int64_t num_tasks(const GridLayout& layout, int64_t num_graphs, int64_t heads) {
  return layout.stacked ? num_graphs : num_graphs * heads;
}

// The forward over checked inputs: y [N, H, P] (contiguous) and the checkpoints. `skip` ([H], or
// undefined): y starts at skip[h] * v (grid_mixer's D skip).
std::vector<at::Tensor> run_grid_forward(const GridLayout& layout, const at::Tensor& weight, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& value, const at::Tensor& skip,
                                         int64_t segment_rows) {
  const int64_t heads = value.size(1), S = key.size(-1), P = value.size(2);
  const int64_t num_graphs = layout.graph_ptr.numel() - 1, D = layout.dags, count = layout.checkpoint_ptr.back();
  auto y = at::empty(value.sizes(), value.options().memory_format(at::MemoryFormat::Contiguous));
  // The checkpoints of DAG d are rows [d * count, (d + 1) * count).
  auto checkpoints = at::empty({D * count, heads, S * P}, value.options());
  if (y.numel() == 0 || S == 0 || D == 0) {  // S = 0: zero scores; y is the skip alone
    if (skip.defined()) return {y.copy_(value * skip.view({1, heads, 1})), checkpoints};
    return {y.zero_(), checkpoints};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "chimera_grid_attention_cpu", [&] {
    const auto tasks = make_tasks<scalar_t>(layout, weight, query, key, value, segment_rows,
                                            skip.defined() ? skip.data_ptr<scalar_t>() : nullptr);
    std::vector<scalar_t*> checkpoint;
    for (int64_t d = 0; d < D; ++d) checkpoint.push_back(checkpoints.data_ptr<scalar_t>() + d * count * heads * S * P);
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, num_tasks(layout, num_graphs, heads),
                     task_grain(value.size(0), num_graphs, D * (layout.stacked ? heads : 1), S, P),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> rows(scratch_values(layout, S, P, sizeof(scalar_t), segment_rows, false));
                       grid_forward_tasks(tasks, begin, end, yp, checkpoint, rows.data());
                     });
  });
  return {y, checkpoints};
}

// Where the backward writes: dQ and dK of set 0 (set s at s * S further on a row), rows grad_qk_row
// apart; dV rows grad_value_row apart; dweight; the [G, H] partial sums of the skip's gradient
// (undefined: no skip). Every entry of the read sets and of dV is written.
struct GridGradTargets {
  at::Tensor grad_weight, grad_query, grad_key, grad_value, grad_skip;
  int64_t grad_qk_row, grad_value_row;
};

void run_grid_backward(const GridLayout& layout, const at::Tensor& weight, const at::Tensor& query,
                       const at::Tensor& key, const at::Tensor& value, const at::Tensor& skip,
                       const at::Tensor& checkpoints, const at::Tensor& grad_y, int64_t segment_rows,
                       const GridGradTargets& out) {
  const int64_t heads = value.size(1), S = key.size(-1), P = value.size(2);
  const int64_t num_graphs = layout.graph_ptr.numel() - 1, D = layout.dags, count = layout.checkpoint_ptr.back();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "chimera_grid_attention_backward_cpu", [&] {
    const auto tasks = make_tasks<scalar_t>(layout, weight, query, key, value, segment_rows,
                                            skip.defined() ? skip.data_ptr<scalar_t>() : nullptr, out.grad_qk_row);
    std::vector<GridGrads<scalar_t>> grads;
    for (int64_t d = 0; d < D; ++d)
      grads.push_back({grad_y.data_ptr<scalar_t>(), checkpoints.data_ptr<scalar_t>() + d * count * heads * S * P,
                       out.grad_query.data_ptr<scalar_t>() + (layout.stacked ? layout.groups[d] : 0) * S,
                       out.grad_key.data_ptr<scalar_t>() + (layout.stacked ? layout.groups[d] : 0) * S,
                       out.grad_value.data_ptr<scalar_t>(),
                       out.grad_weight.data_ptr<scalar_t>() + d * value.size(0) * (layout.stacked ? 3 : 2) * heads,
                       out.grad_value_row, out.grad_skip.defined() ? out.grad_skip.data_ptr<scalar_t>() : nullptr});
    at::parallel_for(0, num_tasks(layout, num_graphs, heads),
                     task_grain(value.size(0), num_graphs, D * (layout.stacked ? heads : 1), S, P),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> buffer(scratch_values(layout, S, P, sizeof(scalar_t), segment_rows, true));
                       grid_backward_tasks(tasks, grads, begin, end, buffer.data());
                     });
  });
}

void check_backward_inputs(const GridLayout& layout, const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& checkpoints, const at::Tensor& grad_y, const char* op) {
  const int64_t heads = value.size(1), S = key.size(-1), P = value.size(2);
  const int64_t D = layout.dags, count = layout.checkpoint_ptr.back();
  check_features(grad_y, value, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == value.sizes(), op, ": grad_y must have the shape of value ", value.sizes(), ", got ",
              grad_y.sizes());
  check_features(checkpoints, value, op, "checkpoints");
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef({D * count, heads, S * P}), op, ": checkpoints must have shape [",
              D * count, ", ", heads, ", ", S * P, "] (the forward's, for these graphs and segment_rows), got ",
              checkpoints.sizes());
}

// Whether every set of query and key is read by some DAG (else the unread sets' gradients are zeros).
bool every_set_read(const GridLayout& layout, int64_t sets) {
  return !layout.stacked ||
         static_cast<int64_t>(std::set<int64_t>(layout.groups.begin(), layout.groups.end()).size()) == sets;
}

std::vector<at::Tensor> grid_attention_cpu(const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                           const at::Tensor& nodes, const at::Tensor& weight_in,
                                           const at::Tensor& query_in, const at::Tensor& key_in,
                                           const at::Tensor& value_in, int64_t segment_rows,
                                           int64_t num_checkpoints, at::OptionalIntArrayRef groups) {
  const char* op = "chimera::grid_attention";
  check_grid_features(query_in, key_in, value_in, op);
  const auto layout = check_grid_inputs(graph_ptr, row_width, nodes, weight_in, query_in, value_in, segment_rows,
                                        num_checkpoints, groups, op);
  const auto [query, key] = sets_of_rows(query_in, key_in, layout.stacked);
  return run_grid_forward(layout, weight_in.contiguous(), query, key, rows_of_values(value_in), at::Tensor(),
                          segment_rows);
}

std::vector<at::Tensor> grid_attention_backward_cpu(const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                                    const at::Tensor& nodes, const at::Tensor& weight_in,
                                                    const at::Tensor& query_in, const at::Tensor& key_in,
                                                    const at::Tensor& value_in, const at::Tensor& checkpoints_in,
                                                    const at::Tensor& grad_y_in, int64_t segment_rows,
                                                    int64_t num_checkpoints, at::OptionalIntArrayRef groups) {
  const char* op = "chimera::grid_attention_backward";
  check_grid_features(query_in, key_in, value_in, op);
  const auto layout = check_grid_inputs(graph_ptr, row_width, nodes, weight_in, query_in, value_in, segment_rows,
                                        num_checkpoints, groups, op);
  check_backward_inputs(layout, key_in, value_in, checkpoints_in, grad_y_in, op);
  const auto [query, key] = sets_of_rows(query_in, key_in, layout.stacked);
  const auto value = rows_of_values(value_in);
  const int64_t S = key.size(-1);
  // Every entry is written: graph_ptr covers all N nodes, each visited once per DAG and block of state
  // rows; a set of query and key that no DAG reads gets zeros.
  const bool all_read = every_set_read(layout, query.size(1));
  const auto dense = query.options().memory_format(at::MemoryFormat::Contiguous);
  GridGradTargets out{at::empty_like(weight_in, at::MemoryFormat::Contiguous),
                      all_read ? at::empty(query.sizes(), dense) : at::zeros(query.sizes(), dense),
                      all_read ? at::empty(key.sizes(), dense) : at::zeros(key.sizes(), dense),
                      at::empty(value.sizes(), value.options().memory_format(at::MemoryFormat::Contiguous)),
                      at::Tensor(), layout.stacked ? query.size(1) * S : value.size(1) * S,
                      value.size(1) * value.size(2)};
  if (value.numel() == 0 || S == 0 || layout.dags == 0)  // nothing to visit: gradients are zero
    return {out.grad_weight.zero_(), out.grad_query.zero_(), out.grad_key.zero_(), out.grad_value.zero_()};
  run_grid_backward(layout, weight_in.contiguous(), query, key, value, at::Tensor(), checkpoints_in.contiguous(),
                    grad_y_in.contiguous(), segment_rows, out);
  return {out.grad_weight, out.grad_query, out.grad_key, out.grad_value};
}

// chimera::grid_mixer: the stacked kernel on the layer's projected features [N, C] = [values (H * P) |
// keys (sets * S) | queries (sets * S)], read in place, plus Mamba's D skip: y = sum over the DAGs +
// skip[h] * v. Its backward writes one [N, C] gradient of the features (no per-part tensors for autograd
// to add and concatenate: 48 MB of fresh memory each on 64 images of 32 x 32) and the skip's gradient.
struct MixerParts {
  at::Tensor features, value, key, query;
};

MixerParts mixer_parts(const at::Tensor& features_in, const at::Tensor& table, const at::Tensor& skip,
                       int64_t value_width, int64_t state_dim, const char* op) {
  TORCH_CHECK(features_in.dim() == 2, op, ": features must have shape [N, C], got ", features_in.sizes());
  TORCH_CHECK(table.dim() == 4 && table.size(2) == 3 && table.size(3) >= 1, op,
              ": table must have shape [D, N, 3, H] with H >= 1, got ", table.sizes());
  const int64_t N = features_in.size(0), C = features_in.size(1), H = table.size(3);
  TORCH_CHECK(value_width >= 0 && value_width % H == 0 && value_width <= C, op, ": value_width must be a multiple of ",
              "the H = ", H, " heads in [0, C = ", C, "], got ", value_width);
  TORCH_CHECK(state_dim >= 1 && state_dim <= (C - value_width) / 2 && (C - value_width) % (2 * state_dim) == 0, op,
              ": features must have C = value_width + 2 * sets * state_dim columns (values, keys, queries) with ",
              "sets >= 1, got C = ", C, ", value_width = ", value_width, ", state_dim = ", state_dim);
  TORCH_CHECK(features_in.scalar_type() == at::kFloat || features_in.scalar_type() == at::kDouble, op,
              ": features must be float32 or float64 (grid_mixer runs lower precisions in float32), got ",
              features_in.scalar_type());
  TORCH_CHECK(skip.dim() == 1 && skip.size(0) == H && skip.scalar_type() == features_in.scalar_type(), op,
              ": skip must have shape [H] = [", H, "] and the dtype of features, got ", skip.sizes(), " and ",
              skip.scalar_type());
  check_device(skip, features_in, op, "skip");
  const int64_t sets = (C - value_width) / (2 * state_dim);
  const auto features = features_in.stride(1) == 1 ? features_in : features_in.contiguous();
  return {features, features.narrow(1, 0, value_width).view({N, H, value_width / H}),
          features.narrow(1, value_width, sets * state_dim).view({N, sets, 1, state_dim}),
          features.narrow(1, value_width + sets * state_dim, sets * state_dim).view({N, sets, 1, state_dim})};
}

// The sum over the rows of a [R, H] tensor, row after row: the same bits whatever the thread count
// (at::sum splits a long reduction over the threads).
at::Tensor sum_rows_in_order(const at::Tensor& partial_in) {
  const auto partial = partial_in.contiguous();
  const int64_t rows = partial.size(0), H = partial.size(1);
  auto total = at::zeros({H}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "chimera_sum_rows_in_order", [&] {
    const scalar_t* p = partial.data_ptr<scalar_t>();
    scalar_t* t = total.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < H; ++h) t[h] += p[r * H + h];
  });
  return total;
}

std::vector<at::Tensor> grid_mixer_cpu(const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                       const at::Tensor& nodes, const at::Tensor& table, const at::Tensor& features,
                                       const at::Tensor& skip, int64_t value_width, int64_t state_dim,
                                       at::IntArrayRef groups, int64_t segment_rows, int64_t num_checkpoints) {
  const char* op = "chimera::grid_mixer";
  const auto parts = mixer_parts(features, table, skip, value_width, state_dim, op);
  check_grid_features(parts.query, parts.key, parts.value, op);
  const auto layout = check_grid_inputs(graph_ptr, row_width, nodes, table, parts.query, parts.value, segment_rows,
                                        num_checkpoints, groups, op);
  const auto [query, key] = sets_of_rows(parts.query, parts.key, true);
  return run_grid_forward(layout, table.contiguous(), query, key, rows_of_values(parts.value), skip.contiguous(),
                          segment_rows);
}

std::vector<at::Tensor> grid_mixer_backward_cpu(const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                                const at::Tensor& nodes, const at::Tensor& table,
                                                const at::Tensor& features, const at::Tensor& skip_in,
                                                const at::Tensor& checkpoints, const at::Tensor& grad_y,
                                                int64_t value_width, int64_t state_dim, at::IntArrayRef groups,
                                                int64_t segment_rows, int64_t num_checkpoints) {
  const char* op = "chimera::grid_mixer_backward";
  const auto parts = mixer_parts(features, table, skip_in, value_width, state_dim, op);
  check_grid_features(parts.query, parts.key, parts.value, op);
  const auto layout = check_grid_inputs(graph_ptr, row_width, nodes, table, parts.query, parts.value, segment_rows,
                                        num_checkpoints, groups, op);
  check_backward_inputs(layout, parts.key, parts.value, checkpoints, grad_y, op);
  const auto [query, key] = sets_of_rows(parts.query, parts.key, true);
  const auto value = rows_of_values(parts.value), skip = skip_in.contiguous(), dy = grad_y.contiguous();
  const int64_t N = value.size(0), H = value.size(1), C = parts.features.size(1);
  const int64_t sets = query.size(1), num_graphs = graph_ptr.numel() - 1;
  // One [N, C] gradient of the features; columns of a key/query set that no DAG reads stay zero.
  auto grad_features = every_set_read(layout, sets) ? at::empty({N, C}, features.options())
                                                    : at::zeros({N, C}, features.options());
  const int64_t key_start = value_width, query_start = value_width + sets * state_dim;
  GridGradTargets out{at::empty_like(table, at::MemoryFormat::Contiguous), grad_features.narrow(1, query_start, 1),
                      grad_features.narrow(1, key_start, 1), grad_features, at::zeros({num_graphs, H}, skip.options()),
                      C, C};
  if (value.numel() == 0 || layout.dags == 0) {  // no state to visit: the skip's terms alone
    auto grad_value = grad_features.narrow(1, 0, value_width).view({N, H, value.size(2)});
    grad_value.copy_(dy * skip.view({1, H, 1}));
    grad_features.narrow(1, key_start, 2 * sets * state_dim).zero_();
    return {out.grad_weight.zero_(), grad_features, sum_rows_in_order((dy * value).sum(2))};
  }
  run_grid_backward(layout, table.contiguous(), query, key, value, skip, checkpoints.contiguous(), dy, segment_rows,
                    out);
  return {out.grad_weight, grad_features, sum_rows_in_order(out.grad_skip)};  // the images' partial sums
}

// chimera::grid_selectivity: the weight table of the stacked kernel from the selectivity, one pass
// (in PyTorch ops it was ten passes over [D, N, 2, H] tensors forward and as many backward, a
// broadcast over a trailing dimension of one among them, 35 ms of a 530 ms layer step on 64
// images of 32 x 32). For DAG d reading Delta set g = groups[d], node i with parents p_r (r = 0
// above, 1 before in the row; n = p_0 + p_1, counted 1 when 0):
//
//     table[d, i, r, h] = p_r T(delta[i, g, r, h]) / sqrt(n),      T(x) = exp(-x), or 2 exp(-x) - 1 signed,
//     table[d, i, 2, h] = scale (p_0 delta[i, g, 0, h] + p_1 delta[i, g, 1, h]) / sqrt(n).
void check_selectivity_inputs(const at::Tensor& delta, const at::Tensor& parents, at::IntArrayRef groups,
                              const char* op) {
  TORCH_CHECK(delta.dim() == 4 && delta.size(2) == 2, op, ": delta must have shape [N, sets, 2, H], got ",
              delta.sizes());
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble, op,
              ": delta must be float32 or float64 (decomposition_adjacency computes other dtypes in PyTorch ops), got ",
              delta.scalar_type());
  TORCH_CHECK(parents.dim() == 3 && parents.scalar_type() == at::kBool && parents.size(1) == delta.size(0) &&
                  parents.size(2) == 2,
              op, ": parents must be a bool tensor of shape [D, N, 2] = [D, ", delta.size(0), ", 2], got shape ",
              parents.sizes(), " and dtype ", parents.scalar_type());
  check_device(parents, delta, op, "parents");
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == parents.size(0), op, ": groups must name one Delta set per "
              "DAG (", parents.size(0), "), got ", groups.size());
  for (size_t d = 0; d < groups.size(); ++d)
    TORCH_CHECK(groups[d] >= 0 && groups[d] < delta.size(1), op, ": groups[", d, "] must be a Delta set in [0, ",
                delta.size(1), "), got ", groups[d]);
}

at::Tensor grid_selectivity_cpu(const at::Tensor& delta_in, const at::Tensor& parents_in, at::IntArrayRef groups,
                                double scale, bool is_signed) {
  const char* op = "chimera::grid_selectivity";
  check_selectivity_inputs(delta_in, parents_in, groups, op);
  const auto delta = delta_in.contiguous();
  const auto parents = parents_in.contiguous();
  const int64_t N = delta.size(0), sets = delta.size(1), H = delta.size(3), D = parents.size(0);
  auto table = at::empty({D, N, 3, H}, delta.options());
  const std::vector<int64_t> group(groups.begin(), groups.end());
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "chimera_grid_selectivity_cpu", [&] {
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const bool* pp = parents.data_ptr<bool>();
    scalar_t* tp = table.data_ptr<scalar_t>();
    const scalar_t key_scale = static_cast<scalar_t>(scale);
    at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t p_up = pp[(d * N + i) * 2], p_left = pp[(d * N + i) * 2 + 1];
          const scalar_t inv = scalar_t(1) / std::sqrt(std::max(p_up + p_left, scalar_t(1)));
          const scalar_t* up = dp + ((i * sets + group[d]) * 2) * H;
          const scalar_t* left = up + H;
          scalar_t* out = tp + (d * N + i) * 3 * H;
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t t_up = std::exp(-up[h]), t_left = std::exp(-left[h]);
            out[h] = (is_signed ? 2 * t_up - 1 : t_up) * (p_up * inv);
            out[H + h] = (is_signed ? 2 * t_left - 1 : t_left) * (p_left * inv);
            out[2 * H + h] = (up[h] * p_up + left[h] * p_left) * (inv * key_scale);
          }
        }
    });
  });
  return table;
}

// The gradient of delta: the sum over the DAGs reading each set (in the order of the DAGs).
at::Tensor grid_selectivity_backward_cpu(const at::Tensor& grad_in, const at::Tensor& delta_in,
                                         const at::Tensor& parents_in, at::IntArrayRef groups, double scale,
                                         bool is_signed) {
  const char* op = "chimera::grid_selectivity_backward";
  check_selectivity_inputs(delta_in, parents_in, groups, op);
  const int64_t N = delta_in.size(0), sets = delta_in.size(1), H = delta_in.size(3), D = parents_in.size(0);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({D, N, 3, H}) && grad_in.scalar_type() == delta_in.scalar_type(),
              op, ": grad_table must have shape [D, N, 3, H] = [", D, ", ", N, ", 3, ", H, "] and the dtype of delta, "
              "got ", grad_in.sizes(), " and ", grad_in.scalar_type());
  check_device(grad_in, delta_in, op, "grad_table");
  const auto delta = delta_in.contiguous(), parents = parents_in.contiguous(), grad = grad_in.contiguous();
  auto grad_delta = at::zeros(delta.sizes(), delta.options());
  const std::vector<int64_t> group(groups.begin(), groups.end());
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "chimera_grid_selectivity_backward_cpu", [&] {
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const bool* pp = parents.data_ptr<bool>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_delta.data_ptr<scalar_t>();
    const scalar_t key_scale = static_cast<scalar_t>(scale), slope = is_signed ? 2 : 1;
    at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t p_up = pp[(d * N + i) * 2], p_left = pp[(d * N + i) * 2 + 1];
          const scalar_t inv = scalar_t(1) / std::sqrt(std::max(p_up + p_left, scalar_t(1)));
          const int64_t row = ((i * sets + group[d]) * 2) * H;
          const scalar_t* g = gp + (d * N + i) * 3 * H;
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t g_scale = g[2 * H + h] * (inv * key_scale);
            out[row + h] += p_up * (g_scale - g[h] * (p_up * inv) * slope * std::exp(-dp[row + h]));
            out[row + H + h] += p_left * (g_scale - g[H + h] * (p_left * inv) * slope * std::exp(-dp[row + H + h]));
          }
        }
    });
  });
  return grad_delta;
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("grid_attention", &grid_attention_cpu);
  m.impl("grid_attention_backward", &grid_attention_backward_cpu);
  m.impl("grid_mixer", &grid_mixer_cpu);
  m.impl("grid_mixer_backward", &grid_mixer_backward_cpu);
  m.impl("grid_selectivity", &grid_selectivity_cpu);
  m.impl("grid_selectivity_backward", &grid_selectivity_backward_cpu);
}

}  // namespace chimera
