// Portable kernels written as plain loops over the packed layout. They are force-inlined into
// thin wrappers compiled with the build's generic flags ("portable"); the epilogues and the int8
// forward product also with target("avx2,fma") ("avx2", where the compiler vectorises the
// fixed-width inner loops) and the epilogues with the AVX-512 target.
#pragma once

#include <cfloat>
#include <cmath>

#include "moe_common.h"

namespace dpo_moe {
namespace generic {

DPO_INLINE float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) = 2^k * p(r) with x = k ln2 + r, |r| <= ln2 / 2; p is the degree-6 Taylor polynomial
// (relative error < 2e-7). x is clamped to [-87, 89]: from 88.38 on, k = 128 makes 2^k the
// infinity bit pattern, so exp is +inf there (float's exp overflows at 88.72) and silu(g) of a very
// negative g is -0, not g / e^88. Branch-free so that it vectorises.
DPO_INLINE float fast_exp(float x) {
  x = std::min(89.0f, std::max(-87.0f, x));
  const float t = x * 1.44269504f;
  const int k = int(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float r = x - float(k) * 0.693145752f - float(k) * 1.42860677e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = uint32_t(k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// Gate/up outputs of one row are interleaved per 32-column panel: [gate 0..31 | up 0..31 | ...].
DPO_INLINE void silu_mul_row(const float* gu, float* h, int64_t inter) {
  for (int64_t p = 0; p < inter / kPanel; ++p) {
    const float* g = gu + p * 2 * kPanel;
    const float* u = g + kPanel;
    for (int j = 0; j < kPanel; ++j) h[p * kPanel + j] = g[j] / (1.0f + fast_exp(-g[j])) * u[j];
  }
}

// With h = silu(g) u, s = sigmoid(g) and dh = weight * v (v = dL/d(expert output) pulled back
// through the down projection):
//   dg = dh * u * s * (1 + g (1 - s)),  du = dh * g * s,  returns <v, h> = dL/dweight; writes h
// to h_out if it is not null, bitwise as silu_mul_row computes it.
DPO_INLINE float swiglu_backward_row(const float* gu, const float* v, float weight, float* d,
                                     int64_t inter, float* h_out) {
  float lanes[kPanel] = {};
  for (int64_t p = 0; p < inter / kPanel; ++p) {
    const float* g = gu + p * 2 * kPanel;
    const float* u = g + kPanel;
    const float* vp = v + p * kPanel;
    float* dg = d + p * 2 * kPanel;
    float* du = dg + kPanel;
    for (int j = 0; j < kPanel; ++j) {
      const float one_plus_exp = 1.0f + fast_exp(-g[j]);
      const float s = 1.0f / one_plus_exp;
      const float dh = weight * vp[j];
      lanes[j] += vp[j] * g[j] * s * u[j];
      if (h_out != nullptr) h_out[p * kPanel + j] = g[j] / one_plus_exp * u[j];  // as silu_mul_row
      dg[j] = dh * u[j] * s * (1.0f + g[j] * (1.0f - s));
      du[j] = dh * g[j] * s;
    }
  }
  float dot = 0.0f;
  for (int j = 0; j < kPanel; ++j) dot += lanes[j];
  return dot;
}

// Round-to-nearest-even fp32 -> bf16 (NaN stays NaN); branch-free so that it vectorises.
DPO_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(nan ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// max |src[i] * col_scale[i]| (col_scale null: 1) over i < n, in 16 running maxima: the compiler
// does not vectorise a single running maximum (it may not reorder the comparisons), and the maximum
// does not depend on their order. NaN when a value is NaN or infinite (std::max would skip a NaN):
// each lane also sums v * 0, which stays 0 for finite v and becomes NaN otherwise.
DPO_INLINE float max_abs(const float* src, int64_t n, const float* col_scale) {
  float lanes[16] = {}, poison[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      const float v = col_scale ? src[i + j] * col_scale[i + j] : src[i + j];
      lanes[j] = std::max(lanes[j], std::fabs(v));
      poison[j] += v * 0.0f;
    }
  for (; i < n; ++i) {
    const float v = col_scale ? src[i] * col_scale[i] : src[i];
    lanes[0] = std::max(lanes[0], std::fabs(v));
    poison[0] += v * 0.0f;
  }
  float amax = 0.0f;
  for (int j = 0; j < 16; ++j) amax = std::max(amax, lanes[j]) + poison[j];
  return amax;
}

// Writes src[0..n) * col_scale (if given) as one operand row of `ld` elements in `format`,
// zero-filled past n; src == nullptr writes a zero row. u8 rows are quantized symmetrically:
// u8 = round(x / s) + 128 with s = max|x| / 127 written to *row_scale (NaN for a row holding a NaN or inf).
DPO_INLINE void store_row(ActFormat format, const float* src, int64_t n, const float* col_scale,
                          int64_t ld, void* dst, float* row_scale) {
  if (src == nullptr) n = 0;
  if (format == ActFormat::f32) {
    float* out = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = col_scale ? src[i] * col_scale[i] : src[i];
    for (int64_t i = n; i < ld; ++i) out[i] = 0.0f;
  } else if (format == ActFormat::bf16) {
    uint16_t* out = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(col_scale ? src[i] * col_scale[i] : src[i]);
    for (int64_t i = n; i < ld; ++i) out[i] = 0;
  } else {
    const float amax = max_abs(src, n, col_scale);
    uint8_t* out = static_cast<uint8_t*>(dst);
    if (!std::isfinite(amax)) {  // a NaN or inf in the row: its products come out NaN, as with bf16 weights
      std::fill(out, out + ld, uint8_t(128));
      *row_scale = amax;
      return;
    }
    // Below FLT_MIN * 127 the scale 127 / amax overflows to inf (and inf * 0 to NaN): such a row is 0.
    const float inv = amax > FLT_MIN * 127.0f ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float x = (col_scale ? src[i] * col_scale[i] : src[i]) * inv;
      out[i] = uint8_t(int(x + (x >= 0.0f ? 0.5f : -0.5f)) + 128);
    }
    for (int64_t i = n; i < ld; ++i) out[i] = 128;
    *row_scale = amax / 127.0f;
  }
}

// Forward product, bf16 weights, fp32 activations. Rows are processed 4 at a time (activation
// buffers are padded to 16 rows, so the extra rows are zeros and are not stored).
DPO_INLINE void gemm_nt_bf16(const Act& a, const PackedView& w, int64_t p0, int64_t p1, float* c,
                             int64_t ldc) {
  constexpr int kRows = 4;
  const int64_t groups = w.rows_per_panel();
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = reinterpret_cast<const uint16_t*>(w.panel(p));
    for (int64_t m0 = 0; m0 < a.rows; m0 += kRows) {
      float acc[kRows][kPanel] = {};
      for (int64_t r = 0; r < groups; ++r) {
        const uint16_t* row = panel + r * 2 * kPanel;
        float even[kPanel], odd[kPanel];
        for (int j = 0; j < kPanel; ++j) {
          even[j] = bf16_to_f32(row[2 * j]);
          odd[j] = bf16_to_f32(row[2 * j + 1]);
        }
        for (int i = 0; i < kRows; ++i) {
          const float x0 = a.f32[(m0 + i) * a.ld + 2 * r];
          const float x1 = a.f32[(m0 + i) * a.ld + 2 * r + 1];
          for (int j = 0; j < kPanel; ++j) acc[i][j] += even[j] * x0 + odd[j] * x1;
        }
      }
      for (int i = 0; i < kRows && m0 + i < a.rows; ++i)
        std::memcpy(c + (m0 + i) * ldc + (p - p0) * kPanel, acc[i], sizeof(acc[i]));
    }
  }
}

// Forward product, int8 weights, u8 activations: c = s_a s_w (sum_k u8 * q - 128 colsum).
DPO_INLINE void gemm_nt_int8(const Act& a, const PackedView& w, int64_t p0, int64_t p1, float* c,
                             int64_t ldc) {
  constexpr int kRows = 4;
  const int64_t groups = w.rows_per_panel();
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = reinterpret_cast<const int8_t*>(w.panel(p));
    for (int64_t m0 = 0; m0 < a.rows; m0 += kRows) {
      int32_t acc[kRows][kPanel] = {};
      for (int64_t r = 0; r < groups; ++r) {
        const int8_t* row = panel + r * 4 * kPanel;
        for (int i = 0; i < kRows; ++i) {
          const uint8_t* x = a.u8 + (m0 + i) * a.ld + 4 * r;
          for (int j = 0; j < kPanel; ++j)
            acc[i][j] += int32_t(x[0]) * row[4 * j] + int32_t(x[1]) * row[4 * j + 1] +
                         int32_t(x[2]) * row[4 * j + 2] + int32_t(x[3]) * row[4 * j + 3];
        }
      }
      for (int i = 0; i < kRows && m0 + i < a.rows; ++i) {
        float* out = c + (m0 + i) * ldc + (p - p0) * kPanel;
        for (int j = 0; j < kPanel; ++j) {
          const int64_t n = p * kPanel + j;
          out[j] = float(acc[i][j] - 128 * w.colsum[n]) * a.scale[m0 + i] * w.scale[n];
        }
      }
    }
  }
}

// Transposed product c[m][j] = sum_n A[m][n] W[n][col0 + j]. Each of the 32 outputs keeps 16
// partial sums (one per n mod 16) that are added up once at the end. For int8 weights the
// activations arrive already multiplied by s_w[n], so W is the raw integer matrix.
template <class Widen>
DPO_INLINE void gemm_nn_lanes(const Act& a, const PackedView& w, int64_t col0, float* c,
                              int64_t ldc, Widen widen) {
  const int64_t g = w.group();
  const int64_t row0 = col0 / g, rows = kPanel / g;
  const int64_t panels = w.n / kPanel;
  for (int64_t m = 0; m < a.rows; ++m) {
    float acc[kPanel][16] = {};
    const float* am = a.f32 + m * a.ld;
    for (int64_t p = 0; p < panels; ++p) {
      const uint8_t* panel = w.panel(p);
      for (int half = 0; half < 2; ++half) {
        const float* x = am + p * kPanel + half * 16;
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* src = panel + (row0 + r) * kRowBytes + half * 64;
          for (int64_t q = 0; q < g; ++q)
            for (int l = 0; l < 16; ++l) acc[r * g + q][l] += x[l] * widen(src, l, q);
        }
      }
    }
    for (int j = 0; j < kPanel; ++j) {
      float s = 0.0f;
      for (int l = 0; l < 16; ++l) s += acc[j][l];
      c[m * ldc + j] = s;
    }
  }
}

DPO_INLINE void gemm_nn_bf16(const Act& a, const PackedView& w, int64_t col0, float* c,
                             int64_t ldc) {
  gemm_nn_lanes(a, w, col0, c, ldc, [](const uint8_t* src, int l, int64_t q) {
    return bf16_to_f32(reinterpret_cast<const uint16_t*>(src)[2 * l + q]);
  });
}

DPO_INLINE void gemm_nn_int8(const Act& a, const PackedView& w, int64_t col0, float* c,
                             int64_t ldc) {
  gemm_nn_lanes(a, w, col0, c, ldc, [](const uint8_t* src, int l, int64_t q) {
    return float(reinterpret_cast<const int8_t*>(src)[4 * l + q]);
  });
}

}  // namespace generic

// The generic products compiled with the build's flags (AVX2 has its own, moe_gemm_avx2.h).
#define DPO_GENERIC_GEMMS(SUFFIX, TARGET)                                                     \
  TARGET inline void gemm_nt_bf16_##SUFFIX(const Act& a, const PackedView& w, int64_t p0,    \
                                           int64_t p1, float* c, int64_t ldc) {              \
    generic::gemm_nt_bf16(a, w, p0, p1, c, ldc);                                              \
  }                                                                                           \
  TARGET inline void gemm_nt_int8_##SUFFIX(const Act& a, const PackedView& w, int64_t p0,    \
                                           int64_t p1, float* c, int64_t ldc) {              \
    generic::gemm_nt_int8(a, w, p0, p1, c, ldc);                                              \
  }                                                                                           \
  TARGET inline void gemm_nn_bf16_##SUFFIX(const Act& a, const PackedView& w, int64_t col0,  \
                                           int64_t cols, float* c, int64_t ldc) {             \
    for (int64_t j = 0; j < cols; j += kPanel)                                                \
      generic::gemm_nn_bf16(a, w, col0 + j, c + j, ldc);                                      \
  }                                                                                           \
  TARGET inline void gemm_nn_int8_##SUFFIX(const Act& a, const PackedView& w, int64_t col0,  \
                                           int64_t cols, float* c, int64_t ldc) {             \
    for (int64_t j = 0; j < cols; j += kPanel)                                                \
      generic::gemm_nn_int8(a, w, col0 + j, c + j, ldc);                                      \
  }

#define DPO_GENERIC_EPILOGUES(SUFFIX, TARGET)                                                 \
  TARGET inline void silu_mul_##SUFFIX(const float* gu, float* h, int64_t inter) {            \
    generic::silu_mul_row(gu, h, inter);                                                      \
  }                                                                                           \
  TARGET inline float swiglu_backward_##SUFFIX(const float* gu, const float* v, float weight, \
                                               float* d, int64_t inter, float* h_out) {       \
    return generic::swiglu_backward_row(gu, v, weight, d, inter, h_out);                      \
  }                                                                                           \
  TARGET inline void store_row_##SUFFIX(ActFormat format, const float* src, int64_t n,        \
                                        const float* col_scale, int64_t ld, void* dst,        \
                                        float* row_scale) {                                   \
    generic::store_row(format, src, n, col_scale, ld, dst, row_scale);                        \
  }

#define DPO_NO_TARGET
DPO_GENERIC_GEMMS(portable, DPO_NO_TARGET)
DPO_GENERIC_EPILOGUES(portable, DPO_NO_TARGET)
DPO_GENERIC_EPILOGUES(avx2, DPO_TARGET_AVX2)
DPO_GENERIC_EPILOGUES(avx512, DPO_TARGET_AVX512)
#undef DPO_NO_TARGET

}  // namespace dpo_moe
