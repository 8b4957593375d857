// The elementwise parts of the Chimera block, fused (CPU). Around the resolvent mixer, a Mamba-2
// block runs a short convolution with SiLU and a gated RMSNorm; in PyTorch ops each is 5 to 10
// passes over [N, inner] tensors forward and as many backward, which on images (65536 nodes x 128
// channels, 32 MB a tensor) cost more than the mixer itself. Here every row is read once forward
// and once backward, with the per-channel parameter gradients reduced in fixed row chunks (the
// result does not depend on the thread count).
//
//   local_conv_silu:  out = silu(x * a + n * b + c)                                    (per channel a, b, c)
//   gated_rms_norm:   g = (y + skip * d) * silu(gate),  out = g * rsqrt(mean_row(g^2) + eps) * w
//   window_conv_silu: out = silu(bias + sum over a kh x kw window of weight * x), a depthwise convolution
//                     over every image (or sequence: one row) of a batch, zero padded at its border
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace chimera {
namespace {

// Rows per chunk of the parameter-gradient reduction: chunks are fixed, so the sums are too.
constexpr int64_t kRowsPerChunk = 256;

// Inlined into the vector clones below, where they vectorize (GCC does not inline a default-target
// function into a clone by itself).
#define CHIMERA_BLOCK_INLINE inline __attribute__((always_inline))

// Where exp_approx clamps its argument. The bounds are read at run time on purpose: with constant
// bounds GCC folds the clamped branches to constants and then cannot turn the branches into vector
// selects, and the loops stay scalar.
struct ExpRange {
  // Below lo the result stays a normal float (and 1 + exp(x) rounds to 1 anyway); at hi the
  // exponent n reaches 128 and the result is +inf, as exp overflows (so silu(-inf) is NaN, as in
  // PyTorch, and not -inf times a tiny number).
  float lo = -87.0f, hi = 89.0f;
};

// exp for float in a form GCC vectorizes (std::exp is a library call per element): 2^n e^r with
// |r| <= ln2 / 2 and a degree-7 Taylor polynomial (truncation below 2^-27, under float's half ulp),
// n rounded by the 1.5 * 2^23 shift. NaN stays NaN; from x = 88.38 on the result is +inf (exp
// overflows at 88.72).
CHIMERA_BLOCK_INLINE float exp_approx(float x, const ExpRange& range) {
  x = x < range.lo ? range.lo : x;
  x = x > range.hi ? range.hi : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // x - n ln2 in two steps (ln2 = hi + lo, hi with few mantissa bits), exact enough for |n| <= 128.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
CHIMERA_BLOCK_INLINE double exp_approx(double x, const ExpRange&) { return std::exp(x); }

template <typename scalar_t>
CHIMERA_BLOCK_INLINE scalar_t sigmoid(scalar_t x, const ExpRange& range) {
  return scalar_t(1) / (scalar_t(1) + exp_approx(-x, range));
}

// A 2-D [N, C] input, rows possibly strided (a column slice of a wider projection is read in place).
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t stride;
  const scalar_t* row(int64_t i) const { return data + i * stride; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0)};
}

// ---------------------------------------------------------------------------------------------
// Row kernels. Compiled for x86-64-v3 (AVX2, FMA) and baseline x86-64, picked at load time. Nothing
// in them may throw (GCC terminates on an exception leaving a target_clones function).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHIMERA_BLOCK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CHIMERA_BLOCK_CLONES
#endif

template <typename scalar_t>
struct ConvArgs {
  Rows<scalar_t> x, neighbors;
  const scalar_t *self_scale, *neighbor_scale, *bias;
  int64_t channels;
  ExpRange range;
};

template <typename scalar_t>
CHIMERA_BLOCK_INLINE void local_conv_silu_rows(const ConvArgs<scalar_t>& a, int64_t begin, int64_t end, scalar_t* out) {
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  const scalar_t *__restrict__ wa = a.self_scale, *__restrict__ wb = a.neighbor_scale, *__restrict__ wc = a.bias;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t *x = a.x.row(i), *n = a.neighbors.row(i);
    scalar_t* __restrict__ o = out + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t pre = x[c] * wa[c] + n[c] * wb[c] + wc[c];
      o[c] = pre * sigmoid(pre, range);
    }
  }
}

// Gradients of rows [begin, end) into dx, dn and the chunk's partial sums (3 x C: da, db, dc).
template <typename scalar_t>
CHIMERA_BLOCK_INLINE void local_conv_silu_backward_rows(const ConvArgs<scalar_t>& a, const Rows<scalar_t>& grad, int64_t begin,
                                          int64_t end, scalar_t* dx, scalar_t* dn, scalar_t* partial) {
  // Locals, not a.field: the stores below could otherwise alias the struct and force reloads.
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  const scalar_t *__restrict__ wa = a.self_scale, *__restrict__ wb = a.neighbor_scale, *__restrict__ wc = a.bias;
  scalar_t *__restrict__ da = partial, *__restrict__ db = partial + C, *__restrict__ dc = partial + 2 * C;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t *x = a.x.row(i), *n = a.neighbors.row(i), *go = grad.row(i);
    scalar_t *__restrict__ dxi = dx + i * C, *__restrict__ dni = dn + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t pre = x[c] * wa[c] + n[c] * wb[c] + wc[c];
      const scalar_t s = sigmoid(pre, range);
      const scalar_t dpre = go[c] * s * (scalar_t(1) + pre * (scalar_t(1) - s));
      dxi[c] = dpre * wa[c];
      dni[c] = dpre * wb[c];
      da[c] += dpre * x[c];
      db[c] += dpre * n[c];
      dc[c] += dpre;
    }
  }
}

template <typename scalar_t>
struct NormArgs {
  Rows<scalar_t> y, skip, gate;
  const scalar_t *skip_scale, *weight;  // skip and skip_scale unread without the skip term
  int64_t channels;
  double eps;
  ExpRange range;
  bool has_skip;
};

// kSkip: g = (y + skip * d) * silu(gate); without, g = y * silu(gate) (a mixer that added the skip itself).
template <bool kSkip, typename scalar_t>
CHIMERA_BLOCK_INLINE void gated_rms_norm_rows(const NormArgs<scalar_t>& a, int64_t begin, int64_t end, scalar_t* out,
                                scalar_t* rstd) {
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  const scalar_t eps = scalar_t(a.eps);
  const scalar_t *__restrict__ d = a.skip_scale, *__restrict__ w = a.weight;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t *y = a.y.row(i), *skip = kSkip ? a.skip.row(i) : nullptr, *gate = a.gate.row(i);
    scalar_t* __restrict__ o = out + i * C;
    scalar_t sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t c = 0; c < C; ++c) {  // g, kept in the output row until it is scaled
      const scalar_t g = (kSkip ? y[c] + skip[c] * d[c] : y[c]) * gate[c] * sigmoid(gate[c], range);
      o[c] = g;
      sum_sq += g * g;
    }
    const scalar_t r = scalar_t(1) / std::sqrt(sum_sq / scalar_t(C) + eps);
    for (int64_t c = 0; c < C; ++c) o[c] *= r * w[c];
    rstd[i] = r;
  }
}

// Gradients of rows [begin, end); partial: the chunk's sums (2 x C: d skip_scale, d weight);
// scratch: 2 x C values (g and sigmoid(gate) of the row: the exp is computed once per element).
template <bool kSkip, typename scalar_t>
CHIMERA_BLOCK_INLINE void gated_rms_norm_backward_rows(const NormArgs<scalar_t>& a, const Rows<scalar_t>& grad,
                                         const scalar_t* rstd, int64_t begin, int64_t end, scalar_t* dy,
                                         scalar_t* dskip, scalar_t* dgate, scalar_t* partial, scalar_t* scratch) {
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  const scalar_t *__restrict__ d = a.skip_scale, *__restrict__ w = a.weight;
  scalar_t *__restrict__ dd = partial, *__restrict__ dw = partial + C;
  scalar_t *__restrict__ g = scratch, *__restrict__ sig = scratch + C;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t *y = a.y.row(i), *skip = kSkip ? a.skip.row(i) : nullptr, *gate = a.gate.row(i),
                   *go = grad.row(i);
    const scalar_t r = rstd[i];
    scalar_t dot = 0;  // sum_c dout_c w_c g_c
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) {
      sig[c] = sigmoid(gate[c], range);
      g[c] = (kSkip ? y[c] + skip[c] * d[c] : y[c]) * gate[c] * sig[c];
      dot += go[c] * w[c] * g[c];
    }
    const scalar_t coef = r * r * r * dot / scalar_t(C);
    scalar_t *__restrict__ dyi = dy + i * C, *__restrict__ dski = dskip + i * C, *__restrict__ dgi = dgate + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t dg = r * w[c] * go[c] - coef * g[c];
      dw[c] += go[c] * g[c] * r;
      const scalar_t s = kSkip ? y[c] + skip[c] * d[c] : y[c];
      const scalar_t ds = dg * gate[c] * sig[c];
      dgi[c] = dg * s * sig[c] * (scalar_t(1) + gate[c] * (scalar_t(1) - sig[c]));
      dyi[c] = ds;
      if constexpr (kSkip) {
        dski[c] = ds * d[c];
        dd[c] += ds * skip[c];
      }
    }
  }
}


// A depthwise convolution over a batch of images laid out as [N, C] rows in raster order, image
// after image, with a kh x kw window starting at (row_offset, col_offset) from the output pixel.
// Work is split into segments of one image row (at most kSegment positions), so a batch of one long
// sequence still spreads over the threads.
struct WindowSegment {
  int64_t base, rows, width, y, x_begin, x_end;  // image's first node, its size; the output row and columns
};

template <typename scalar_t>
struct WindowArgs {
  Rows<scalar_t> x;
  const scalar_t* weight;  // [kh * kw, C]: the op's [C, kh, kw] weight transposed once
  const scalar_t* bias;    // [C]
  int64_t channels, kh, kw, row_offset, col_offset;
  ExpRange range;
};

// pre[(x - x_begin) * C + c] = bias + window sum, for the segment's positions.
template <typename scalar_t>
CHIMERA_BLOCK_INLINE void window_preactivation(const WindowArgs<scalar_t>& a, const WindowSegment& s, scalar_t* pre) {
  const int64_t C = a.channels;
  const scalar_t* __restrict__ bias = a.bias;
  for (int64_t x = s.x_begin; x < s.x_end; ++x) {
    scalar_t* __restrict__ p = pre + (x - s.x_begin) * C;
    for (int64_t c = 0; c < C; ++c) p[c] = bias[c];
  }
  for (int64_t i = 0; i < a.kh; ++i) {
    const int64_t yy = s.y + a.row_offset + i;
    if (yy < 0 || yy >= s.rows) continue;
    for (int64_t j = 0; j < a.kw; ++j) {
      const scalar_t* __restrict__ w = a.weight + (i * a.kw + j) * C;
      const int64_t first = std::max(s.x_begin, -(a.col_offset + j)), last = std::min(s.x_end, s.width - a.col_offset - j);
      for (int64_t x = first; x < last; ++x) {
        const scalar_t* __restrict__ src = a.x.row(s.base + yy * s.width + x + a.col_offset + j);
        scalar_t* __restrict__ p = pre + (x - s.x_begin) * C;
        for (int64_t c = 0; c < C; ++c) p[c] += w[c] * src[c];
      }
    }
  }
}

template <typename scalar_t>
CHIMERA_BLOCK_INLINE void window_conv_silu_segment(const WindowArgs<scalar_t>& a, const WindowSegment& s, scalar_t* out) {
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  scalar_t* __restrict__ o = out + (s.base + s.y * s.width + s.x_begin) * C;
  window_preactivation(a, s, o);
  const int64_t count = (s.x_end - s.x_begin) * C;
  for (int64_t k = 0; k < count; ++k) o[k] = o[k] * sigmoid(o[k], range);
}

// The backward in one pass per chunk: a chunk owns rows [y_begin, y_end) x columns [x_begin, x_end)
// of an image; it computes the pre-activation gradient of every position its dx reads (its rows and
// columns plus the window's reach, recomputed by the neighbouring chunk too) into a local buffer that
// stays in cache, adds the owned positions' terms to its partial weight and bias sums, then writes dx
// of the owned positions. (Two passes through an [N, C] buffer of pre-activation gradients cost a
// 48 MB allocation and its page faults on 64 images of 32 x 32 at C = 192.)
struct WindowChunk {
  int64_t base, rows, width, y_begin, y_end, x_begin, x_end;
};

// Rows [y0, y1) and columns [x0, x1) of a chunk's region: its own positions (their gradients give the
// weight and bias sums) and those whose gradient its dx reads: dx at row y reads the output rows
// y - row_offset - i of the taps i in [0, kh), likewise for columns.
struct WindowRegion {
  int64_t y0, y1, x0, x1;
};

inline WindowRegion window_region(const WindowChunk& k, int64_t kh, int64_t kw, int64_t row_offset,
                                  int64_t col_offset) {
  return {std::max<int64_t>(0, std::min(k.y_begin, k.y_begin - row_offset - kh + 1)),
          std::min(k.rows, std::max(k.y_end, k.y_end - row_offset)),
          std::max<int64_t>(0, std::min(k.x_begin, k.x_begin - col_offset - kw + 1)),
          std::min(k.width, std::max(k.x_end, k.x_end - col_offset))};
}

template <typename scalar_t>
CHIMERA_BLOCK_INLINE void window_conv_silu_backward_chunk_task(const WindowArgs<scalar_t>& a,
                                                               const Rows<scalar_t>& grad, const WindowChunk& k,
                                                               scalar_t* dx, scalar_t* partial, scalar_t* gpre) {
  const int64_t C = a.channels;
  const ExpRange range = a.range;
  const WindowRegion r = window_region(k, a.kh, a.kw, a.row_offset, a.col_offset);
  const int64_t region_width = r.x1 - r.x0;
  auto local = [&](int64_t y, int64_t x) { return gpre + ((y - r.y0) * region_width + (x - r.x0)) * C; };
  // Pre-activation gradients of the region; bias sums over the owned positions.
  scalar_t* __restrict__ dbias = partial + a.kh * a.kw * C;
  for (int64_t y = r.y0; y < r.y1; ++y) {
    window_preactivation(a, WindowSegment{k.base, k.rows, k.width, y, r.x0, r.x1}, local(y, r.x0));
    const bool owned_row = y >= k.y_begin && y < k.y_end;
    for (int64_t x = r.x0; x < r.x1; ++x) {
      const scalar_t* __restrict__ go = grad.row(k.base + y * k.width + x);
      scalar_t* __restrict__ g = local(y, x);
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t p = g[c], sg = sigmoid(p, range);
        g[c] = go[c] * sg * (scalar_t(1) + p * (scalar_t(1) - sg));
      }
      if (owned_row && x >= k.x_begin && x < k.x_end)
        for (int64_t c = 0; c < C; ++c) dbias[c] += g[c];
    }
  }
  // Weight sums: every owned output position times the input under each tap.
  for (int64_t y = k.y_begin; y < k.y_end; ++y)
    for (int64_t i = 0; i < a.kh; ++i) {
      const int64_t yy = y + a.row_offset + i;
      if (yy < 0 || yy >= k.rows) continue;
      for (int64_t j = 0; j < a.kw; ++j) {
        scalar_t* __restrict__ dw = partial + (i * a.kw + j) * C;
        const int64_t first = std::max(k.x_begin, -(a.col_offset + j));
        const int64_t last = std::min(k.x_end, k.width - a.col_offset - j);
        for (int64_t x = first; x < last; ++x) {
          const scalar_t* __restrict__ src = a.x.row(k.base + yy * k.width + x + a.col_offset + j);
          const scalar_t* __restrict__ g = local(y, x);
          for (int64_t c = 0; c < C; ++c) dw[c] += g[c] * src[c];
        }
      }
    }
  // dx of the owned positions: the window transposed over the region's gradients.
  for (int64_t y = k.y_begin; y < k.y_end; ++y) {
    scalar_t* __restrict__ out = dx + (k.base + y * k.width + k.x_begin) * C;
    for (int64_t e = 0; e < (k.x_end - k.x_begin) * C; ++e) out[e] = scalar_t(0);
    for (int64_t i = 0; i < a.kh; ++i) {
      const int64_t yo = y - a.row_offset - i;  // the output row that read this row through tap i
      if (yo < 0 || yo >= k.rows) continue;
      for (int64_t j = 0; j < a.kw; ++j) {
        const scalar_t* __restrict__ w = a.weight + (i * a.kw + j) * C;
        const int64_t first = std::max(k.x_begin, a.col_offset + j);
        const int64_t last = std::min(k.x_end, k.width + a.col_offset + j);
        for (int64_t x = first; x < last; ++x) {
          const scalar_t* __restrict__ g = local(yo, x - a.col_offset - j);
          scalar_t* __restrict__ d = out + (x - k.x_begin) * C;
          for (int64_t c = 0; c < C; ++c) d[c] += w[c] * g[c];
        }
      }
    }
  }
}

#define CHIMERA_BLOCK_LOOPS(scalar_t)                                                                              \
  CHIMERA_BLOCK_CLONES void local_conv_silu_chunk(const ConvArgs<scalar_t>& a, int64_t begin, int64_t end,         \
                                                  scalar_t* out) {                                                 \
    local_conv_silu_rows(a, begin, end, out);                                                                      \
  }                                                                                                                \
  CHIMERA_BLOCK_CLONES void local_conv_silu_backward_chunk(const ConvArgs<scalar_t>& a, const Rows<scalar_t>& grad, \
                                                           int64_t begin, int64_t end, scalar_t* dx, scalar_t* dn,  \
                                                           scalar_t* partial) {                                     \
    local_conv_silu_backward_rows(a, grad, begin, end, dx, dn, partial);                                           \
  }                                                                                                                \
  CHIMERA_BLOCK_CLONES void gated_rms_norm_chunk(const NormArgs<scalar_t>& a, int64_t begin, int64_t end,          \
                                                 scalar_t* out, scalar_t* rstd) {                                  \
    if (a.has_skip)                                                                                                \
      gated_rms_norm_rows<true>(a, begin, end, out, rstd);                                                         \
    else                                                                                                           \
      gated_rms_norm_rows<false>(a, begin, end, out, rstd);                                                        \
  }                                                                                                                \
  CHIMERA_BLOCK_CLONES void gated_rms_norm_backward_chunk(const NormArgs<scalar_t>& a, const Rows<scalar_t>& grad,  \
                                                          const scalar_t* rstd, int64_t begin, int64_t end,         \
                                                          scalar_t* dy, scalar_t* dskip, scalar_t* dgate,           \
                                                          scalar_t* partial, scalar_t* scratch) {                   \
    if (a.has_skip)                                                                                                \
      gated_rms_norm_backward_rows<true>(a, grad, rstd, begin, end, dy, dskip, dgate, partial, scratch);           \
    else                                                                                                           \
      gated_rms_norm_backward_rows<false>(a, grad, rstd, begin, end, dy, dskip, dgate, partial, scratch);          \
  }                                                                                                                \
  CHIMERA_BLOCK_CLONES void window_conv_silu_chunk(const WindowArgs<scalar_t>& a, const WindowSegment* segments,   \
                                                   int64_t first, int64_t last, scalar_t* out) {                    \
    for (int64_t k = first; k < last; ++k) window_conv_silu_segment(a, segments[k], out);                         \
  }                                                                                                                \
  CHIMERA_BLOCK_CLONES void window_conv_silu_backward_chunks(const WindowArgs<scalar_t>& a,                     \
                                                             const Rows<scalar_t>& grad, const WindowChunk* chunks,  \
                                                             int64_t first, int64_t last, scalar_t* dx,             \
                                                             scalar_t* partials, int64_t partial_size,              \
                                                             scalar_t* scratch) {                                   \
    for (int64_t k = first; k < last; ++k)                                                                         \
      window_conv_silu_backward_chunk_task(a, grad, chunks[k], dx, partials + k * partial_size, scratch);          \
  }
CHIMERA_BLOCK_LOOPS(float)
CHIMERA_BLOCK_LOOPS(double)
#undef CHIMERA_BLOCK_LOOPS

// ---------------------------------------------------------------------------------------------
// Checks and dispatch.

// A [N, C] row input: read in place when its channels are contiguous, else copied.
at::Tensor row_input(const at::Tensor& t, const at::Tensor& like, int64_t channels, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == channels, op, ": ", name,
              " must have shape [N, C] = [", like.size(0), ", ", channels, "], got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  if (t.size(0) > 0 && (t.stride(1) != 1 || t.stride(0) < channels)) return t.contiguous();
  return t;
}

at::Tensor channel_input(const at::Tensor& t, const at::Tensor& like, int64_t channels, const char* op,
                         const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [C] = [", channels, "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  return t.contiguous();
}

void check_lead(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must have shape [N, C], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 (other dtypes take the PyTorch reference), got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

int64_t num_chunks(int64_t rows) { return (rows + kRowsPerChunk - 1) / kRowsPerChunk; }

// Sums the [chunks, k, C] partials in chunk order into k separate tensors of shape [C] (separate
// storage: an op's outputs may not alias each other).
template <typename scalar_t>
std::vector<at::Tensor> reduce_partials(const std::vector<scalar_t>& partials, int64_t chunks, int64_t k,
                                        int64_t channels, const at::TensorOptions& options) {
  std::vector<at::Tensor> sums;
  for (int64_t j = 0; j < k; ++j) {
    auto total = at::zeros({channels}, options);
    scalar_t* tp = total.data_ptr<scalar_t>();
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < channels; ++c) tp[c] += partials[(chunk * k + j) * channels + c];
    sums.push_back(total);
  }
  return sums;
}

at::Tensor local_conv_silu_cpu(const at::Tensor& x_in, const at::Tensor& neighbors_in, const at::Tensor& self_scale_in,
                               const at::Tensor& neighbor_scale_in, const at::Tensor& bias_in) {
  const char* op = "chimera::local_conv_silu";
  check_lead(x_in, op, "x");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto x = row_input(x_in, x_in, C, op, "x"), neighbors = row_input(neighbors_in, x_in, C, op, "neighbors");
  const auto a = channel_input(self_scale_in, x_in, C, op, "self_scale");
  const auto b = channel_input(neighbor_scale_in, x_in, C, op, "neighbor_scale");
  const auto c = channel_input(bias_in, x_in, C, op, "bias");
  auto out = at::empty({N, C}, x_in.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chimera_local_conv_silu_cpu", [&] {
    const ConvArgs<scalar_t> args{rows_of<scalar_t>(x), rows_of<scalar_t>(neighbors), a.data_ptr<scalar_t>(),
                                  b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), C, ExpRange{}};
    scalar_t* op_out = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C),
                     [&](int64_t begin, int64_t end) { local_conv_silu_chunk(args, begin, end, op_out); });
  });
  return out;
}

std::vector<at::Tensor> local_conv_silu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                     const at::Tensor& neighbors_in, const at::Tensor& self_scale_in,
                                                     const at::Tensor& neighbor_scale_in, const at::Tensor& bias_in) {
  const char* op = "chimera::local_conv_silu_backward";
  check_lead(x_in, op, "x");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto grad = row_input(grad_in, x_in, C, op, "grad_out");
  const auto x = row_input(x_in, x_in, C, op, "x"), neighbors = row_input(neighbors_in, x_in, C, op, "neighbors");
  const auto a = channel_input(self_scale_in, x_in, C, op, "self_scale");
  const auto b = channel_input(neighbor_scale_in, x_in, C, op, "neighbor_scale");
  const auto c = channel_input(bias_in, x_in, C, op, "bias");
  auto dx = at::empty({N, C}, x_in.options()), dn = at::empty({N, C}, x_in.options());
  std::vector<at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chimera_local_conv_silu_backward_cpu", [&] {
    const ConvArgs<scalar_t> args{rows_of<scalar_t>(x), rows_of<scalar_t>(neighbors), a.data_ptr<scalar_t>(),
                                  b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), C, ExpRange{}};
    const Rows<scalar_t> grad_rows = rows_of<scalar_t>(grad);
    const int64_t chunks = num_chunks(N);
    std::vector<scalar_t> partials(chunks * 3 * C, scalar_t(0));
    scalar_t *dxp = dx.data_ptr<scalar_t>(), *dnp = dn.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t begin = chunk * kRowsPerChunk, end = std::min(N, begin + kRowsPerChunk);
        local_conv_silu_backward_chunk(args, grad_rows, begin, end, dxp, dnp, partials.data() + chunk * 3 * C);
      }
    });
    sums = reduce_partials(partials, chunks, 3, C, a.options());
  });
  return {dx, dn, sums[0], sums[1], sums[2]};
}

// The skip term's inputs, both or neither: (skip rows, skip_scale), or two undefined tensors.
std::pair<at::Tensor, at::Tensor> skip_inputs(const std::optional<at::Tensor>& skip_in,
                                              const std::optional<at::Tensor>& skip_scale_in, const at::Tensor& y,
                                              int64_t channels, const char* op) {
  const bool has_skip = skip_in.has_value() && skip_in->defined();
  const bool has_scale = skip_scale_in.has_value() && skip_scale_in->defined();
  TORCH_CHECK(has_skip == has_scale, op, ": skip and skip_scale must be given together (or both None for no skip "
              "term), got ", has_skip ? "skip" : "skip_scale", " alone");
  if (!has_skip) return {at::Tensor(), at::Tensor()};
  return {row_input(*skip_in, y, channels, op, "skip"), channel_input(*skip_scale_in, y, channels, op, "skip_scale")};
}

std::vector<at::Tensor> gated_rms_norm_cpu(const at::Tensor& y_in, const std::optional<at::Tensor>& skip_in,
                                           const std::optional<at::Tensor>& skip_scale_in, const at::Tensor& gate_in,
                                           const at::Tensor& weight_in, double eps) {
  const char* op = "chimera::gated_rms_norm";
  check_lead(y_in, op, "y");
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const int64_t N = y_in.size(0), C = y_in.size(1);
  TORCH_CHECK(C > 0, op, ": y must have at least one channel (the mean over channels), got shape ", y_in.sizes());
  const auto y = row_input(y_in, y_in, C, op, "y");
  const auto [skip, d] = skip_inputs(skip_in, skip_scale_in, y_in, C, op);
  const auto gate = row_input(gate_in, y_in, C, op, "gate");
  const auto w = channel_input(weight_in, y_in, C, op, "weight");
  auto out = at::empty({N, C}, y_in.options()), rstd = at::empty({N}, y_in.options());
  if (N == 0) return {out, rstd};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "chimera_gated_rms_norm_cpu", [&] {
    const bool has_skip = skip.defined();
    const NormArgs<scalar_t> args{rows_of<scalar_t>(y), has_skip ? rows_of<scalar_t>(skip) : Rows<scalar_t>{nullptr, 0},
                                  rows_of<scalar_t>(gate), has_skip ? d.data_ptr<scalar_t>() : nullptr,
                                  w.data_ptr<scalar_t>(), C, eps, ExpRange{}, has_skip};
    scalar_t *op_out = out.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C),
                     [&](int64_t begin, int64_t end) { gated_rms_norm_chunk(args, begin, end, op_out, rp); });
  });
  return {out, rstd};
}

std::vector<at::Tensor> gated_rms_norm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                    const std::optional<at::Tensor>& skip_in,
                                                    const std::optional<at::Tensor>& skip_scale_in,
                                                    const at::Tensor& gate_in, const at::Tensor& weight_in,
                                                    const at::Tensor& rstd_in) {
  const char* op = "chimera::gated_rms_norm_backward";
  check_lead(y_in, op, "y");
  const int64_t N = y_in.size(0), C = y_in.size(1);
  const auto grad = row_input(grad_in, y_in, C, op, "grad_out");
  const auto y = row_input(y_in, y_in, C, op, "y");
  const auto [skip, d] = skip_inputs(skip_in, skip_scale_in, y_in, C, op);
  const auto gate = row_input(gate_in, y_in, C, op, "gate");
  const auto w = channel_input(weight_in, y_in, C, op, "weight");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == N && rstd_in.scalar_type() == y_in.scalar_type() &&
                  rstd_in.device() == y_in.device(),
              op, ": rstd must be the forward's [N] = [", N, "] tensor of y's dtype and device, got ", rstd_in.sizes());
  const auto rstd = rstd_in.contiguous();
  // Without the skip term its gradients are empty tensors ([0] and [0]).
  const bool has_skip = skip.defined();
  auto dy = at::empty({N, C}, y_in.options()), dskip = at::empty({has_skip ? N : 0, C}, y_in.options());
  auto dgate = at::empty({N, C}, y_in.options());
  std::vector<at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "chimera_gated_rms_norm_backward_cpu", [&] {
    const NormArgs<scalar_t> args{rows_of<scalar_t>(y), has_skip ? rows_of<scalar_t>(skip) : Rows<scalar_t>{nullptr, 0},
                                  rows_of<scalar_t>(gate), has_skip ? d.data_ptr<scalar_t>() : nullptr,
                                  w.data_ptr<scalar_t>(), C, 0.0, ExpRange{}, has_skip};
    const Rows<scalar_t> grad_rows = rows_of<scalar_t>(grad);
    const int64_t chunks = num_chunks(N);
    std::vector<scalar_t> partials(chunks * 2 * C, scalar_t(0));
    scalar_t *dyp = dy.data_ptr<scalar_t>(), *dsp = has_skip ? dskip.data_ptr<scalar_t>() : nullptr;
    scalar_t* dgp = dgate.data_ptr<scalar_t>();
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> scratch(2 * C);
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t begin = chunk * kRowsPerChunk, end = std::min(N, begin + kRowsPerChunk);
        gated_rms_norm_backward_chunk(args, grad_rows, rp, begin, end, dyp, dsp, dgp, partials.data() + chunk * 2 * C,
                                      scratch.data());
      }
    });
    sums = reduce_partials(partials, chunks, 2, C, w.options());
  });
  if (!has_skip) sums[0] = at::empty({0}, y_in.options());
  return {dy, dskip, sums[0], dgate, sums[1]};
}


// The segments of a batch of images (graph_ptr [G + 1], row_width [G]), checked: every image's node
// count a multiple of its width, rows split into at most kSegment positions.
constexpr int64_t kSegment = 256;

std::vector<WindowSegment> window_segments(const at::Tensor& graph_ptr_in, const at::Tensor& row_width_in,
                                           int64_t num_nodes, const char* op) {
  TORCH_CHECK(graph_ptr_in.dim() == 1 && graph_ptr_in.size(0) >= 1 && graph_ptr_in.scalar_type() == at::kLong &&
                  graph_ptr_in.device().is_cpu(),
              op, ": graph_ptr must be a CPU int64 tensor of shape [G + 1], got ", graph_ptr_in.sizes(), " ",
              graph_ptr_in.scalar_type());
  const int64_t G = graph_ptr_in.size(0) - 1;
  TORCH_CHECK(row_width_in.dim() == 1 && row_width_in.size(0) == G && row_width_in.scalar_type() == at::kLong &&
                  row_width_in.device().is_cpu(),
              op, ": row_width must be a CPU int64 tensor of shape [G] = [", G, "], got ", row_width_in.sizes(), " ",
              row_width_in.scalar_type());
  const auto graph_ptr = graph_ptr_in.contiguous(), row_width = row_width_in.contiguous();
  const int64_t *ptr = graph_ptr.data_ptr<int64_t>(), *width = row_width.data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0, op, ": graph_ptr[0] must be 0, got ", ptr[0]);
  TORCH_CHECK(ptr[G] == num_nodes, op, ": graph_ptr[-1] must equal the number of nodes N = ", num_nodes, ", got ",
              ptr[G]);
  std::vector<WindowSegment> segments;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t size = ptr[g + 1] - ptr[g];
    TORCH_CHECK(size >= 0, op, ": graph_ptr must be non-decreasing, but graph_ptr[", g + 1, "] < graph_ptr[", g, "]");
    if (size == 0) continue;
    TORCH_CHECK(width[g] >= 1 && size % width[g] == 0, op, ": row_width[", g, "] = ", width[g],
                " must be positive and divide the image's ", size, " nodes");
    const int64_t rows = size / width[g];
    for (int64_t y = 0; y < rows; ++y)
      for (int64_t x = 0; x < width[g]; x += kSegment)
        segments.push_back({ptr[g], rows, width[g], y, x, std::min(width[g], x + kSegment)});
  }
  return segments;
}

// The chunks of the backward: bands of rows of an image, each row cut into segments of at most
// kSegment positions as the forward's are; a band has as many rows as keep its region (the rows plus
// the window's reach, kh - 1 more) near kChunkBytes, at most kChunkRows (bands of an image run on
// different threads). One-row images (sequences) are their segments. Fixed by the shapes alone, so
// the partial sums are too.
constexpr int64_t kChunkBytes = 512 * 1024, kChunkRows = 16;

std::vector<WindowChunk> window_chunks(const std::vector<WindowSegment>& segments, int64_t channels, int64_t kh,
                                       int64_t element_size) {
  std::vector<WindowChunk> chunks;
  for (const WindowSegment& s : segments) {
    if (s.y != 0 || s.x_begin != 0) continue;  // an image's first segment stands for the image
    const int64_t segment = std::min(s.width, kSegment);
    const int64_t fit = kChunkBytes / std::max<int64_t>(1, segment * channels * element_size) - (kh - 1);
    const int64_t band = std::max<int64_t>(1, std::min<int64_t>(kChunkRows, fit));
    for (int64_t y = 0; y < s.rows; y += band)
      for (int64_t x = 0; x < s.width; x += kSegment)
        chunks.push_back({s.base, s.rows, s.width, y, std::min(s.rows, y + band), x, std::min(s.width, x + kSegment)});
  }
  return chunks;
}

// The most values a chunk's region holds (the scratch of one thread).
int64_t window_region_values(const std::vector<WindowChunk>& chunks, int64_t channels, int64_t kh, int64_t kw,
                             int64_t row_offset, int64_t col_offset) {
  int64_t most = 0;
  for (const auto& k : chunks) {
    const WindowRegion r = window_region(k, kh, kw, row_offset, col_offset);
    most = std::max(most, std::max<int64_t>(0, r.y1 - r.y0) * std::max<int64_t>(0, r.x1 - r.x0) * channels);
  }
  return most;
}

// The weight [C, kh, kw] as [kh * kw, C], so the kernels read a tap's channels contiguously.
at::Tensor window_weight(const at::Tensor& weight, const at::Tensor& x, int64_t channels, const char* op) {
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == channels && weight.size(1) >= 1 && weight.size(2) >= 1, op,
              ": weight must have shape [C, kh, kw] with C = ", channels, " and a non-empty window, got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
              weight.scalar_type(), ", ", weight.device());
  return weight.reshape({channels, -1}).t().contiguous();
}

at::Tensor window_conv_silu_cpu(const at::Tensor& x_in, const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                const at::Tensor& weight_in, const at::Tensor& bias_in, int64_t row_offset,
                                int64_t col_offset) {
  const char* op = "chimera::window_conv_silu";
  check_lead(x_in, op, "x");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto x = row_input(x_in, x_in, C, op, "x");
  const auto weight = window_weight(weight_in, x_in, C, op);
  const auto bias = channel_input(bias_in, x_in, C, op, "bias");
  const auto segments = window_segments(graph_ptr, row_width, N, op);
  auto out = at::empty({N, C}, x_in.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chimera_window_conv_silu_cpu", [&] {
    const WindowArgs<scalar_t> args{rows_of<scalar_t>(x), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), C,
                                    weight_in.size(1), weight_in.size(2), row_offset, col_offset, ExpRange{}};
    scalar_t* op_out = out.data_ptr<scalar_t>();
    const WindowSegment* segs = segments.data();
    at::parallel_for(0, static_cast<int64_t>(segments.size()), std::max<int64_t>(1, 16384 / (C * kSegment)),
                     [&](int64_t first, int64_t last) { window_conv_silu_chunk(args, segs, first, last, op_out); });
  });
  return out;
}

std::vector<at::Tensor> window_conv_silu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                      const at::Tensor& graph_ptr, const at::Tensor& row_width,
                                                      const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                      int64_t row_offset, int64_t col_offset) {
  const char* op = "chimera::window_conv_silu_backward";
  check_lead(x_in, op, "x");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto grad = row_input(grad_in, x_in, C, op, "grad_out");
  const auto x = row_input(x_in, x_in, C, op, "x");
  const auto weight = window_weight(weight_in, x_in, C, op);
  const auto bias = channel_input(bias_in, x_in, C, op, "bias");
  const auto segments = window_segments(graph_ptr, row_width, N, op);
  const int64_t kh = weight_in.size(1), kw = weight_in.size(2), taps = kh * kw;
  auto dx = at::empty({N, C}, x_in.options());
  const auto chunks = window_chunks(segments, C, kh, x_in.element_size());
  const int64_t scratch_values = window_region_values(chunks, C, kh, kw, row_offset, col_offset);
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chimera_window_conv_silu_backward_cpu", [&] {
    const WindowArgs<scalar_t> args{rows_of<scalar_t>(x), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), C,
                                    kh, kw, row_offset, col_offset, ExpRange{}};
    const Rows<scalar_t> grad_rows = rows_of<scalar_t>(grad);
    const int64_t count = static_cast<int64_t>(chunks.size()), partial_size = (taps + 1) * C;
    // One partial per chunk, summed in chunk order: the result does not depend on the threads.
    std::vector<scalar_t> partials(count * partial_size, scalar_t(0));
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const WindowChunk* chunk_list = chunks.data();
    at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> scratch(scratch_values);
      window_conv_silu_backward_chunks(args, grad_rows, chunk_list, first, last, dxp, partials.data(), partial_size,
                                       scratch.data());
    });
    auto sums = reduce_partials(partials, count, taps + 1, C, bias.options());
    // [kh * kw] taps of [C] -> the op's [C, kh, kw]
    dweight = at::stack(std::vector<at::Tensor>(sums.begin(), sums.begin() + taps), 1).reshape({C, kh, kw});
    dbias = sums[taps];
  });
  if (N == 0) dx.zero_();
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(chimera, CPU, m) {
  m.impl("local_conv_silu", &local_conv_silu_cpu);
  m.impl("local_conv_silu_backward", &local_conv_silu_backward_cpu);
  m.impl("gated_rms_norm", &gated_rms_norm_cpu);
  m.impl("gated_rms_norm_backward", &gated_rms_norm_backward_cpu);
  m.impl("window_conv_silu", &window_conv_silu_cpu);
  m.impl("window_conv_silu_backward", &window_conv_silu_backward_cpu);
}

}  // namespace chimera
