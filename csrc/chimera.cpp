// Operator schemas for the `chimera` namespace. Device kernels live in cpu/ and cuda/;
// fake (meta) kernels and autograd formulas are registered from Python
// (torch_geometric_chimera/ops/_kernels.py).
#include <Python.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "checks.h"

namespace chimera {

bool debug_checks_enabled() {
  const char* env = std::getenv("CHIMERA_DEBUG_CHECKS");
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  if (!Py_IsInitialized()) return false;
  // Kernels run with the GIL released (and autograd's device threads never held it): take it to
  // read the flag of torch_geometric.debug(), the switch the Python side uses for the same checks.
  const PyGILState_STATE gil = PyGILState_Ensure();
  bool enabled = false;
  if (PyObject* module = PyImport_ImportModule("torch_geometric")) {
    if (PyObject* result = PyObject_CallMethod(module, "is_debug_enabled", nullptr)) {
      enabled = PyObject_IsTrue(result) == 1;
      Py_DECREF(result);
    }
    Py_DECREF(module);
  }
  PyErr_Clear();  // no torch_geometric: no debug mode
  PyGILState_Release(gil);
  return enabled;
}

}  // namespace chimera

extern "C" {
// Importing torch_geometric_chimera._C runs the static TORCH_LIBRARY initializers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(chimera, m) {
  // out[i, h, :] = bias[i, h, :] + sum_{e in row i} weight[e, h] * x[col[e], h, :]   (CSR sparse-dense
  // product; the optional bias fuses the "X + A H" step of Neumann / fixed-point iterations)
  m.def("spmm(Tensor rowptr, Tensor col, Tensor weight, Tensor x, Tensor? bias=None) -> Tensor");
  // out[e, h] = <a[row(e), h, :], b[col[e], h, :]>                   (sampled dense-dense product)
  m.def("edge_dot(Tensor rowptr, Tensor col, Tensor a, Tensor b) -> Tensor");
  // Solve (I - A) h = x on a DAG: nodes order[level_ptr[l]:level_ptr[l+1]] form level l, every
  // edge into a node of level l comes from an earlier level; A is CSR by target (rowptr, col, weight).
  m.def("dag_solve(Tensor level_ptr, Tensor order, Tensor rowptr, Tensor col, Tensor weight, Tensor x) -> Tensor");
  // dag_solve with the state contraction fused in (CPU): y_i = Q_i^T H_i, H = (I - A)^{-1} (K_j V_j^T),
  // returns (y, H); the backward takes A^T (rowptr_t, col_t, weight_t) and returns (dQ, dK, dV, G).
  m.def("dag_attention(Tensor level_ptr, Tensor order, Tensor rowptr, Tensor col, Tensor weight, Tensor query, "
        "Tensor key, Tensor value) -> Tensor[]");
  m.def("dag_attention_backward(Tensor level_ptr, Tensor order, Tensor rowptr_t, Tensor col_t, Tensor weight_t, "
        "Tensor query, Tensor key, Tensor value, Tensor state, Tensor grad_y, Tensor? grad_state=None) -> Tensor[]");
  // Banded exact path (CPU). band_order: reverse Cuthill-McKee order of the nodes of every graph
  // (nodes[node_ptr[g]:node_ptr[g+1]], sorted) in a symmetric pattern, each graph's bandwidth and the
  // off-diagonal nonzeros of its LU factors (fill included).
  m.def("band_order(Tensor node_ptr, Tensor nodes, Tensor rowptr, Tensor col) -> Tensor[]");
  // band_factor: LU factors of I - A per graph and head in band storage (band_size rows, H columns).
  m.def("band_factor(Tensor node_ptr, Tensor order, Tensor bandwidth, Tensor rowptr, Tensor col, Tensor weight, "
        "SymInt band_size) -> Tensor");
  // band_solve: (I - A)^{-1} x, or (I - A)^{-T} x with transpose=True, from those factors.
  m.def("band_solve(Tensor node_ptr, Tensor order, Tensor bandwidth, Tensor factors, Tensor x, bool transpose=False) "
        "-> Tensor");
  // band_attention: y_i = Q_i^T H_i with H = (I - A)^{-1} X, X_j = K_j V_j^T, the state contraction fused in;
  // returns (y, H). band_attention_backward: (dQ, dK, dV, G) with G = (I - A)^{-T} (Q_i dY_i^T).
  m.def("band_attention(Tensor node_ptr, Tensor order, Tensor bandwidth, Tensor factors, Tensor query, Tensor key, "
        "Tensor value) -> Tensor[]");
  m.def("band_attention_backward(Tensor node_ptr, Tensor order, Tensor bandwidth, Tensor factors, Tensor query, "
        "Tensor key, Tensor value, Tensor state, Tensor grad_y, Tensor? grad_state=None) -> Tensor[]");
  // Resolvent attention on directed grid DAGs, walked row by row (CPU): graph g's nodes are visited in the
  // order nodes[graph_ptr[g]:graph_ptr[g+1]], row_width[g] per row; position p has the parents p - W
  // (weight[node, 0]) and p - 1 in its row (weight[node, 1]). Returns (y, checkpoints): the states of
  // every segment_rows-th row (num_checkpoints of them in all, which the caller counts so that
  // the output's shape is known without the data), from which the backward recomputes; it returns
  // (dweight, dQ, dK, dV). Stacked DAGs may share query and key sets (groups[d]: the set DAG d reads), and
  // the rows of value (and of stacked query and key) may be strided: column blocks of one feature tensor.
  m.def("grid_attention(Tensor graph_ptr, Tensor row_width, Tensor nodes, Tensor weight, Tensor query, Tensor key, "
        "Tensor value, int segment_rows, SymInt num_checkpoints, int[]? groups=None) -> Tensor[]");
  m.def("grid_attention_backward(Tensor graph_ptr, Tensor row_width, Tensor nodes, Tensor weight, Tensor query, "
        "Tensor key, Tensor value, Tensor checkpoints, Tensor grad_y, int segment_rows, SymInt num_checkpoints, "
        "int[]? groups=None) -> Tensor[]");
  // The stacked grid_attention on the layer's features [N, C] = [values (value_width = H * P) | keys (sets *
  // state_dim) | queries (sets * state_dim)], read in place, plus Mamba's D skip: y = sum over the DAGs of
  // table's walks + skip[h] * v. Returns (y [N, H, P], checkpoints); the backward returns (dtable, dfeatures
  // [N, C], dskip [H]): one gradient of the features, not one per part for autograd to concatenate.
  m.def("grid_mixer(Tensor graph_ptr, Tensor row_width, Tensor nodes, Tensor table, Tensor features, Tensor skip, "
        "int value_width, int state_dim, int[] groups, int segment_rows, SymInt num_checkpoints) -> Tensor[]");
  m.def("grid_mixer_backward(Tensor graph_ptr, Tensor row_width, Tensor nodes, Tensor table, Tensor features, "
        "Tensor skip, Tensor checkpoints, Tensor grad_y, int value_width, int state_dim, int[] groups, "
        "int segment_rows, SymInt num_checkpoints) -> Tensor[]");
  // The weight table of the stacked grid_attention from the selectivity delta [N, sets, 2, H] (softplus applied):
  // for DAG d (Delta set groups[d]) and node i with parents p_r (parents[d, i, r]; r = 0 above, 1 before in the
  // row; n of them, counted 1 when none), table[d, i, r] = p_r T(delta[i, groups[d], r]) / sqrt(n) with
  // T(x) = exp(-x) (2 exp(-x) - 1 when signed), table[d, i, 2] = scale sum_r p_r delta[i, groups[d], r] / sqrt(n).
  m.def("grid_selectivity(Tensor delta, Tensor parents, int[] groups, float scale, bool signed) -> Tensor");
  m.def("grid_selectivity_backward(Tensor grad_table, Tensor delta, Tensor parents, int[] groups, float scale, "
        "bool signed) -> Tensor");
  // The elementwise parts of the block around the mixer, fused (CPU; cpu/block_ops_cpu.cpp), on [N, C] rows:
  // local_conv_silu: silu(x * self_scale + neighbors * neighbor_scale + bias), per-channel scales;
  // gated_rms_norm: g = (y + skip * skip_scale) * silu(gate) (skip and skip_scale None: g = y * silu(gate)),
  // returns (g * rsqrt(mean(g^2) + eps) * weight, rsqrt); without the skip its gradients are empty tensors.
  // The backwards return the gradients of every tensor input, in order.
  m.def("local_conv_silu(Tensor x, Tensor neighbors, Tensor self_scale, Tensor neighbor_scale, Tensor bias) -> Tensor");
  m.def("local_conv_silu_backward(Tensor grad_out, Tensor x, Tensor neighbors, Tensor self_scale, "
        "Tensor neighbor_scale, Tensor bias) -> Tensor[]");
  m.def("gated_rms_norm(Tensor y, Tensor? skip, Tensor? skip_scale, Tensor gate, Tensor weight, float eps) -> Tensor[]");
  m.def("gated_rms_norm_backward(Tensor grad_out, Tensor y, Tensor? skip, Tensor? skip_scale, Tensor gate, "
        "Tensor weight, Tensor rstd) -> Tensor[]");
  // window_conv_silu: silu(bias + a depthwise kh x kw window of x), every image of a batch of [N, C] rows
  // (raster order, image after image: graph_ptr, row_width) zero padded at its border; the window of the
  // output pixel (y, x) starts at (y + row_offset, x + col_offset). Sequences are images of one row.
  m.def("window_conv_silu(Tensor x, Tensor graph_ptr, Tensor row_width, Tensor weight, Tensor bias, int row_offset, "
        "int col_offset) -> Tensor");
  m.def("window_conv_silu_backward(Tensor grad_out, Tensor x, Tensor graph_ptr, Tensor row_width, Tensor weight, "
        "Tensor bias, int row_offset, int col_offset) -> Tensor[]");
}
