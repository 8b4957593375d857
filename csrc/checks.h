#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>
#include <tuple>
#include <vector>

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

inline void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

inline void check_features(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have shape [N, H, F], got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

// Values of the index arguments. Every raw op checks, before it dereferences anything, the values
// of the index tensors it reads through: a pointer array must start at 0, never decrease and end at
// the length of what it indexes; an order must be a permutation. On CPU these run on every call
// (one pass over R + 1 or N entries, next to kernels that pass over E * H * F). On CUDA they need a
// host-device synchronization, so they run there only in debug mode (see debug_checks_enabled).

// ptr[0] == 0, ptr[k] <= ptr[k + 1], ptr[-1] == end: `name` indexes `end_name` (of length `end`).
template <typename index_t>
inline void check_ptr_values(const index_t* ptr, int64_t size, int64_t end, const char* op, const char* name,
                             const char* end_name) {
  TORCH_CHECK(size >= 1, op, ": ", name, " must have at least one entry (it starts at 0)");
  TORCH_CHECK(ptr[0] == 0, op, ": ", name, "[0] must be 0, got ", static_cast<int64_t>(ptr[0]));
  for (int64_t k = 0; k + 1 < size; ++k) {
    TORCH_CHECK(ptr[k] <= ptr[k + 1], op, ": ", name, " must be non-decreasing, got ", name, "[", k, "] = ",
                static_cast<int64_t>(ptr[k]), " > ", name, "[", k + 1, "] = ", static_cast<int64_t>(ptr[k + 1]));
  }
  TORCH_CHECK(ptr[size - 1] == end, op, ": ", name, "[-1] must equal ", end_name, " = ", end, ", got ",
              static_cast<int64_t>(ptr[size - 1]));
}

// A CPU pointer tensor of either index dtype (1-D, checked by the caller).
inline void check_ptr(const at::Tensor& ptr, int64_t end, const char* op, const char* name, const char* end_name) {
  const auto p = ptr.contiguous();
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "chimera_check_ptr",
                          [&] { check_ptr_values(p.data_ptr<index_t>(), p.numel(), end, op, name, end_name); });
}

// The CSR pointer of (rowptr, col) on CPU: it indexes col (and the weights stored with it).
inline void check_rowptr(const at::Tensor& rowptr, const at::Tensor& col, const char* op,
                         const char* name = "rowptr", const char* end_name = "len(col)") {
  check_ptr(rowptr, col.size(0), op, name, end_name);
}

// order[k] in [0, n) and every node once. Returns position[node] = k.
inline std::vector<int64_t> check_permutation(const int64_t* order, int64_t n, const char* op, const char* name) {
  std::vector<int64_t> position(n, -1);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = order[k];
    TORCH_CHECK(i >= 0 && i < n, op, ": ", name, " must be a permutation of 0..N-1 (N = ", n, "), got ", name, "[",
                k, "] = ", i);
    TORCH_CHECK(position[i] < 0, op, ": ", name, " must be a permutation of 0..N-1 (N = ", n, "), but ", i,
                " appears twice (", name, "[", position[i], "] and ", name, "[", k, "])");
    position[i] = k;
  }
  return position;
}

// The same value checks with device ops, for CUDA host code: each condition is a 0-d bool tensor
// computed where the data lives, and run() reads all of them with one copy to the host (one
// synchronization), then raises for the first that fails, naming its argument.
class DeviceChecks {
 public:
  explicit DeviceChecks(const char* op) : op_(op) {}

  void require(const at::Tensor& ok, std::string message) {
    conditions_.push_back(ok.reshape({}));
    messages_.push_back(std::move(message));
  }

  // ptr[0] == 0, non-decreasing, ptr[-1] == end (ptr has at least one entry: a shape check).
  void ptr(const at::Tensor& p, int64_t end, const char* name, const char* end_name) {
    const std::string n(name);
    require(p[0] == 0, n + "[0] must be 0");
    if (p.numel() > 1) require((p.diff() >= 0).all(), n + " must be non-decreasing");
    require(p[-1] == end, n + "[-1] must equal " + end_name + " = " + std::to_string(end));
  }

  // Every entry in [0, n).
  void range(const at::Tensor& index, int64_t n, const char* name) {
    if (index.numel() == 0) return;
    require(at::logical_and(index >= 0, index < n).all(),
            std::string(name) + " must lie in [0, " + std::to_string(n) + ")");
  }

  // A permutation of 0..n-1 (entries in range, each once).
  void permutation(const at::Tensor& order, int64_t n, const char* name) {
    if (n == 0) return;
    const auto sorted = std::get<0>(order.sort());
    require(sorted.eq(at::arange(n, order.options())).all(),
            std::string(name) + " must be a permutation of 0..N-1 (N = " + std::to_string(n) + ")");
  }

  void run() {
    if (conditions_.empty()) return;
    const auto ok = at::stack(conditions_).to(at::kCPU);  // the one synchronization
    const bool* flags = ok.data_ptr<bool>();
    for (size_t k = 0; k < messages_.size(); ++k) TORCH_CHECK(flags[k], op_, ": ", messages_[k]);
    conditions_.clear();
    messages_.clear();
  }

 private:
  const char* op_;
  std::vector<at::Tensor> conditions_;
  std::vector<std::string> messages_;
};

// Whether CUDA host code should run the value checks that cost a host-device synchronization:
// under torch_geometric.debug() (read through the Python C API, defined in chimera.cpp), or with
// CHIMERA_DEBUG_CHECKS=1 in the environment.
bool debug_checks_enabled();

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
