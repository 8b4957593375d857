#pragma once
// Per-(node, head) pieces of the fused state contraction shared by chimera::band_attention and
// chimera::dag_attention. Row nh = node * heads + head; q, k are [*, S], v, y, dy are [*, P] and
// the state rows h, g are [*, S * P] (s major).
#include <ATen/ATen.h>

#include "../checks.h"

namespace chimera {

// query, key [N, H, S] and value [N, H, P] on one device with one dtype.
inline void check_attention_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   const char* op) {
  check_features(query, query, op, "query");
  check_features(key, query, op, "key");
  check_features(value, query, op, "value");
  TORCH_CHECK(key.sizes() == query.sizes() && value.size(0) == query.size(0) && value.size(1) == query.size(1), op,
              ": expected query, key [N, H, S] and value [N, H, P]");
}

// h = k v^T  (the right-hand side X_i = K_i V_i^T)
template <typename scalar_t>
inline void outer_state(int64_t nh, const scalar_t* k, const scalar_t* v, scalar_t* h, int64_t S, int64_t P) {
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = 0; p < P; ++p) h[nh * S * P + s * P + p] = k[nh * S + s] * v[nh * P + p];
}

// y = h^T q
template <typename scalar_t>
inline void read_out(int64_t nh, const scalar_t* q, const scalar_t* h, scalar_t* y, int64_t S, int64_t P) {
  scalar_t* yi = y + nh * P;
  for (int64_t p = 0; p < P; ++p) yi[p] = scalar_t(0);
  for (int64_t s = 0; s < S; ++s) axpy(yi, h + nh * S * P + s * P, q[nh * S + s], P);
}

// dq = h dy, and the adjoint right-hand side g = q dy^T (+ extra, a gradient given to h itself)
template <typename scalar_t>
inline void adjoint_rhs(int64_t nh, const scalar_t* q, const scalar_t* h, const scalar_t* dy, const scalar_t* extra,
                        scalar_t* dq, scalar_t* g, int64_t S, int64_t P) {
  const scalar_t* dyi = dy + nh * P;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* hs = h + nh * S * P + s * P;
    scalar_t acc = 0;
    for (int64_t p = 0; p < P; ++p) acc += hs[p] * dyi[p];
    dq[nh * S + s] = acc;
    scalar_t* gs = g + nh * S * P + s * P;
    for (int64_t p = 0; p < P; ++p) gs[p] = q[nh * S + s] * dyi[p];
    if (extra != nullptr) axpy(gs, extra + nh * S * P + s * P, scalar_t(1), P);
  }
}

// dk = g v, dv += g^T k  (dv must start at zero)
template <typename scalar_t>
inline void key_value_grads(int64_t nh, const scalar_t* g, const scalar_t* k, const scalar_t* v, scalar_t* dk,
                            scalar_t* dv, int64_t S, int64_t P) {
  const scalar_t* vi = v + nh * P;
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* gs = g + nh * S * P + s * P;
    scalar_t acc = 0;
    for (int64_t p = 0; p < P; ++p) acc += gs[p] * vi[p];
    dk[nh * S + s] = acc;
    axpy(dv + nh * P, gs, k[nh * S + s], P);
  }
}

}  // namespace chimera
