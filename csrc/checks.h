#pragma once
#include <ATen/ATen.h>

namespace chimera {

// Shape, dtype and device checks shared by every backend. The Python wrappers check the same
// things with friendlier messages; these keep direct torch.ops.chimera calls memory safe.
inline void check_csr(const at::Tensor& rowptr, const at::Tensor& col, const char* op) {
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, op, ": rowptr must be 1-D with at least one entry, got shape ",
              rowptr.sizes());
  TORCH_CHECK(col.dim() == 1, op, ": col must be 1-D, got shape ", col.sizes());
  TORCH_CHECK(rowptr.scalar_type() == col.scalar_type() &&
                  (col.scalar_type() == at::kInt || col.scalar_type() == at::kLong),
              op, ": rowptr and col must share an int32 or int64 dtype, got ", rowptr.scalar_type(), " and ",
              col.scalar_type());
  TORCH_CHECK(rowptr.device() == col.device(), op, ": rowptr and col must be on one device");
}

inline void check_features(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have shape [N, H, F], got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

}  // namespace chimera
