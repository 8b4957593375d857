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

namespace chimera {

// acc[f] += w * x[f]: the inner loop of every sparse kernel. GCC builds an AVX2+FMA clone and a
// baseline clone and picks one at load time, so the extension stays portable across x86-64 CPUs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHIMERA_TARGET_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define CHIMERA_TARGET_CLONES
#endif

CHIMERA_TARGET_CLONES inline void axpy(float* __restrict__ acc, const float* __restrict__ x, float w, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * x[f];
}

CHIMERA_TARGET_CLONES inline void axpy(double* __restrict__ acc, const double* __restrict__ x, double w, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * x[f];
}

// Reduced-precision inputs accumulate in float.
template <typename acc_t, typename scalar_t>
inline void axpy(acc_t* __restrict__ acc, const scalar_t* __restrict__ x, acc_t w, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * static_cast<acc_t>(x[f]);
}

}  // namespace chimera
