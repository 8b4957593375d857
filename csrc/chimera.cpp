// Operator schemas for the `chimera` namespace. Device kernels live in cpu/ and cuda/;
// fake (meta) kernels and autograd formulas are registered from Python
// (torch_geometric_chimera/ops/_kernels.py).
#include <Python.h>
#include <torch/library.h>

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
}
