// AVX-512 kernels (compiled with per-function target attributes, run only when CPUID says so).
//   bf16 weights: each 64-byte load holds 16 channels x (k, k+1) bf16 pairs. Two forward products:
//                 * fp32 FMA on fp32 activations, the pairs widened to two fp32 vectors with one
//                   shift and one mask (bf16 is the top half of fp32);
//                 * vdpbf16ps (AVX512_BF16) on bf16 activations, which takes the pairs as they are.
//                 moe_kernel.cpp times both once per process and runs the faster. On a Sapphire
//                 Rapids machine fp32 FMA was about 1.7x faster, although one vdpbf16ps does the
//                 work of two FMAs: there it has a much lower throughput.
//                 The transposed (backward) product is fp32 FMA on widened weights either way.
//   int8 weights: VNNI vpdpbusd (u8 activations x s8 weights -> int32) in the forward product,
//                 fp32 FMA on widened weights in the transposed (backward) product.
#pragma once

#include <immintrin.h>

#include "moe_common.h"

namespace dpo_moe {
namespace avx512 {

// Calls block(std::integral_constant<int, MR>, m0, p) for every panel p in [p0, p1) and every block
// of up to 12 rows starting at row m0: the loops of each forward product around its MR-row kernel.
template <class Block>
DPO_INLINE void for_row_blocks(int64_t rows, int64_t p0, int64_t p1, const Block& block) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m0 = 0; m0 < rows; m0 += 12)
      with_rows<12>(rows - m0, [&](auto mr) { block(mr, m0, p); });
}

// c[i][0..32) = acc[i][0] | acc[i][1] for MR rows: the fp32 accumulators of a panel's 32 channels.
template <int MR>
DPO_TARGET_AVX512 DPO_INLINE void store_panel_rows(const __m512 (&acc)[MR][2], float* c,
                                                   int64_t ldc) {
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

// c[i][0..32) = sum_k a[i][k] W[panel][k] for MR rows: 2*MR fp32 accumulators of 16 channels.
template <int MR>
DPO_TARGET_AVX512 inline void nt_bf16_rows(const float* a, int64_t lda, const uint16_t* panel,
                                           int64_t groups, float* c, int64_t ldc) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t r = 0; r < groups; ++r) {
    const __m512i v0 = _mm512_loadu_si512(panel + r * 64);
    const __m512i v1 = _mm512_loadu_si512(panel + r * 64 + 32);
    const __m512 even0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
    const __m512 odd0 = _mm512_castsi512_ps(_mm512_and_si512(v0, high));
    const __m512 even1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
    const __m512 odd1 = _mm512_castsi512_ps(_mm512_and_si512(v1, high));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 x0 = _mm512_set1_ps(a[i * lda + 2 * r]);
      const __m512 x1 = _mm512_set1_ps(a[i * lda + 2 * r + 1]);
      acc[i][0] = _mm512_fmadd_ps(even0, x0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(even1, x0, acc[i][1]);
      acc[i][0] = _mm512_fmadd_ps(odd0, x1, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(odd1, x1, acc[i][1]);
    }
  }
  store_panel_rows<MR>(acc, c, ldc);
}

DPO_TARGET_AVX512 inline void gemm_nt_bf16(const Act& a, const PackedView& w, int64_t p0,
                                           int64_t p1, float* c, int64_t ldc) {
  for_row_blocks(a.rows, p0, p1, [&](auto mr, int64_t m0, int64_t p) {
    nt_bf16_rows<decltype(mr)::value>(a.f32 + m0 * a.ld, a.ld,
                                      reinterpret_cast<const uint16_t*>(w.panel(p)),
                                      w.rows_per_panel(), c + m0 * ldc + (p - p0) * kPanel, ldc);
  });
}

// The same product for bf16 activations with vdpbf16ps: each 32-bit lane of a 64-byte panel load
// is the (k, k+1) pair of one channel, which the instruction multiplies by the row's (k, k+1) pair
// (broadcast to all lanes) and adds to the channel's fp32 accumulator. One instruction per 16
// channels and pair instead of two FMAs, and no widening of the weights.
template <int MR>
DPO_TARGET_AVX512_BF16 inline void nt_dpbf16_rows(const uint16_t* a, int64_t lda,
                                                  const uint16_t* panel, int64_t groups, float* c,
                                                  int64_t ldc) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t r = 0; r < groups; ++r) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + r * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + r * 64 + 32);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * r, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);
    }
  }
  store_panel_rows<MR>(acc, c, ldc);
}

DPO_TARGET_AVX512_BF16 inline void gemm_nt_dpbf16(const Act& a, const PackedView& w, int64_t p0,
                                                  int64_t p1, float* c, int64_t ldc) {
  for_row_blocks(a.rows, p0, p1, [&](auto mr, int64_t m0, int64_t p) {
    nt_dpbf16_rows<decltype(mr)::value>(a.bf16 + m0 * a.ld, a.ld,
                                        reinterpret_cast<const uint16_t*>(w.panel(p)),
                                        w.rows_per_panel(), c + m0 * ldc + (p - p0) * kPanel, ldc);
  });
}

// Same for int8: acc = sum_k u8[i][k] q[n][k] with vpdpbusd (4 products per 32-bit lane).
template <int MR>
DPO_TARGET_AVX512 inline void nt_int8_rows(const uint8_t* a, int64_t lda, const float* a_scale,
                                           const PackedView& w, int64_t p, float* c,
                                           int64_t ldc) {
  __m512i acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  const uint8_t* panel = w.panel(p);
  const int64_t groups = w.rows_per_panel();
  for (int64_t r = 0; r < groups; ++r) {
    const __m512i w0 = _mm512_loadu_si512(panel + r * kRowBytes);
    const __m512i w1 = _mm512_loadu_si512(panel + r * kRowBytes + 64);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t quad;
      std::memcpy(&quad, a + i * lda + 4 * r, 4);
      const __m512i x = _mm512_set1_epi32(quad);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], x, w0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], x, w1);
    }
  }
  for (int half = 0; half < 2; ++half) {
    const int64_t n = p * kPanel + half * 16;
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(w.colsum + n), 7);
    const __m512 w_scale = _mm512_loadu_ps(w.scale + n);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][half], shift));
      const __m512 scale = _mm512_mul_ps(w_scale, _mm512_set1_ps(a_scale[i]));
      _mm512_storeu_ps(c + i * ldc + half * 16, _mm512_mul_ps(v, scale));
    }
  }
}

DPO_TARGET_AVX512 inline void gemm_nt_int8(const Act& a, const PackedView& w, int64_t p0,
                                           int64_t p1, float* c, int64_t ldc) {
  for_row_blocks(a.rows, p0, p1, [&](auto mr, int64_t m0, int64_t p) {
    nt_int8_rows<decltype(mr)::value>(a.u8 + m0 * a.ld, a.ld, a.scale + m0, w, p,
                                      c + m0 * ldc + (p - p0) * kPanel, ldc);
  });
}

// Widen one 64-byte panel row (16 channels x G values of k) into G fp32 vectors.
DPO_TARGET_AVX512 inline void widen_bf16(__m512i v, __m512* out) {
  out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}

DPO_TARGET_AVX512 inline void widen_int8(__m512i v, __m512* out) {
  out[0] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
  out[1] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
  out[2] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
  out[3] = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
}

// Transposed product for MR rows and 8 output columns starting at group row row0:
// acc[i][j] holds 16 partial sums over n mod 16, reduced once after the sweep over all of N.
template <int MR, int G>
DPO_TARGET_AVX512 inline void nn_rows(const float* a, int64_t lda, const PackedView& w,
                                      int64_t row0, float* c, int64_t ldc) {
  constexpr int kCols = 8, kGroupRows = kCols / G;
  __m512 acc[MR][kCols];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t panels = w.n / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* base = w.panel(p) + row0 * kRowBytes;
    for (int half = 0; half < 2; ++half) {
      __m512 x[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) x[i] = _mm512_loadu_ps(a + i * lda + p * kPanel + half * 16);
#pragma GCC unroll 4
      for (int r = 0; r < kGroupRows; ++r) {
        __m512 wv[G];
        const __m512i v = _mm512_loadu_si512(base + r * kRowBytes + half * 64);
        if constexpr (G == 2) widen_bf16(v, wv); else widen_int8(v, wv);
#pragma GCC unroll 4
        for (int q = 0; q < G; ++q)
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i)
            acc[i][r * G + q] = _mm512_fmadd_ps(x[i], wv[q], acc[i][r * G + q]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kCols; ++j) c[i * ldc + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int G>
DPO_TARGET_AVX512 inline void gemm_nn(const Act& a, const PackedView& w, int64_t col0, float* c,
                                      int64_t ldc) {
  constexpr int64_t kRowsPerBlock = 3;
  for (int64_t j0 = 0; j0 < kPanel; j0 += 8)
    for (int64_t m0 = 0; m0 < a.rows; m0 += kRowsPerBlock) {
      const float* am = a.f32 + m0 * a.ld;
      float* cm = c + m0 * ldc + j0;
      const int64_t row0 = (col0 + j0) / G;
      with_rows<kRowsPerBlock>(a.rows - m0, [&](auto mr) {
        nn_rows<decltype(mr)::value, G>(am, a.ld, w, row0, cm, ldc);
      });
    }
}

}  // namespace avx512

DPO_TARGET_AVX512 inline void gemm_nt_bf16_avx512(const Act& a, const PackedView& w, int64_t p0,
                                                  int64_t p1, float* c, int64_t ldc) {
  avx512::gemm_nt_bf16(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AVX512_BF16 inline void gemm_nt_bf16_dpbf16_avx512(const Act& a, const PackedView& w,
                                                              int64_t p0, int64_t p1, float* c,
                                                              int64_t ldc) {
  avx512::gemm_nt_dpbf16(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nt_int8_avx512(const Act& a, const PackedView& w, int64_t p0,
                                                  int64_t p1, float* c, int64_t ldc) {
  avx512::gemm_nt_int8(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nn_bf16_avx512(const Act& a, const PackedView& w, int64_t col0,
                                                  int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx512::gemm_nn<2>(a, w, col0 + j, c + j, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nn_int8_avx512(const Act& a, const PackedView& w, int64_t col0,
                                                  int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx512::gemm_nn<4>(a, w, col0 + j, c + j, ldc);
}

}  // namespace dpo_moe
