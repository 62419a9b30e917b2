// AVX2 products written with intrinsics, for the products where the generic loops compiled for
// AVX2 (moe_gemm_generic.h) do badly.
//   Transposed (backward) product: the generic loop keeps 512 partial sums per activation row,
//   which do not fit the 16 vector registers, and ran at about a tenth of this kernel's speed.
//   Same scheme as avx512::nn_rows with 8-lane vectors: each 32-byte load of a panel row holds 8
//   channels x G values of k (bf16 pairs, or int8 quadruples), widened to G fp32 vectors and
//   multiplied with the activations of those 8 channels; every output keeps 8 partial sums (one
//   per channel mod 8), reduced once at the end.
//   bf16 forward product, for experts with 16 rows or more: a quarter of a panel (8 channels) at a
//   time for 8 rows, the activations broadcast from memory, so that the FMAs are not limited by
//   widening the weights (the generic loop reached about half the FMA peak).
//   int8 forward product: the same quarter-panel scheme with integer sums. AVX2 has no u8 x s8
//   dot product into 32-bit sums (VNNI), and vpmaddubsw's 16-bit pair sums can saturate with u8
//   activations (2 x 255 x 127 > 32767). So the activations are used signed, s = u8 - 128 (the
//   top bit of each byte flipped, |s| <= 127), and vpmaddubsw multiplies |q| by s carrying q's
//   sign (vpsignb): a pair sum is at most 2 x 127 x 127 = 32258, so every sum is exact, and
//   sum_k s q needs no -128 colsum correction. vpmaddwd by ones adds the pairs into 32-bit lanes.
//   The generic loop (32-bit multiplies) was 3 to 6 times slower.
#pragma once

#include <immintrin.h>

#include "moe_common.h"
#include "moe_gemm_generic.h"

namespace dpo_moe {
namespace avx2 {

// Widen 32 bytes of a panel row (8 channels x G values of k) into G fp32 vectors.
template <int G>
DPO_TARGET_AVX2 DPO_INLINE void widen(__m256i v, __m256* out) {
  if constexpr (G == 2) {  // bf16 is the top half of fp32
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
  } else {  // int8: sign-extend each byte
    out[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
    out[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
    out[2] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
    out[3] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
  }
}

DPO_TARGET_AVX2 DPO_INLINE float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// c[i][j] = sum_n a[i][n] W[n][k] for MR <= 2 rows and the 4 columns k = G row0 + j: 4 MR
// accumulators, MR activation vectors and G widened weight vectors fit the 16 registers.
template <int MR, int G>
DPO_TARGET_AVX2 inline void nn_rows(const float* a, int64_t lda, const PackedView& w, int64_t row0,
                                    float* c, int64_t ldc) {
  constexpr int kCols = 4, kGroupRows = kCols / G;
  __m256 acc[MR][kCols];
#pragma GCC unroll 2
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t panels = w.n / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* base = w.panel(p) + row0 * kRowBytes;
#pragma GCC unroll 4
    for (int quarter = 0; quarter < 4; ++quarter) {
      __m256 x[MR];
#pragma GCC unroll 2
      for (int i = 0; i < MR; ++i) x[i] = _mm256_loadu_ps(a + i * lda + p * kPanel + quarter * 8);
#pragma GCC unroll 2
      for (int r = 0; r < kGroupRows; ++r) {
        __m256 wv[G];
        widen<G>(_mm256_loadu_si256(
                     reinterpret_cast<const __m256i*>(base + r * kRowBytes + quarter * 32)),
                 wv);
#pragma GCC unroll 4
        for (int q = 0; q < G; ++q)
#pragma GCC unroll 2
          for (int i = 0; i < MR; ++i)
            acc[i][r * G + q] = _mm256_fmadd_ps(x[i], wv[q], acc[i][r * G + q]);
      }
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) c[i * ldc + j] = reduce_add(acc[i][j]);
}

// Forward product for MR <= 8 rows and one quarter of a panel (8 channels) over all of k:
// c[i][j] = sum_k a[i][k] W[8 quarter + j][k]. MR accumulators, the widened (k, k+1) weights and
// one broadcast fit the 16 registers; the activations are broadcast straight from memory.
template <int MR>
DPO_TARGET_AVX2 inline void nt_bf16_rows(const float* a, int64_t lda, const uint8_t* panel,
                                         int64_t groups, int quarter, float* c, int64_t ldc) {
  __m256 acc[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < groups; ++r) {
    __m256 wv[2];
    const uint8_t* row = panel + r * kRowBytes + quarter * 32;
    widen<2>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)), wv);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm256_fmadd_ps(wv[0], _mm256_broadcast_ss(a + i * lda + 2 * r), acc[i]);
      acc[i] = _mm256_fmadd_ps(wv[1], _mm256_broadcast_ss(a + i * lda + 2 * r + 1), acc[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) _mm256_storeu_ps(c + i * ldc, acc[i]);
}

// Below this many rows the generic loop (4 rows x all 32 channels per weight row) is as fast or
// faster: the quarter scheme reads each panel once per quarter and block of 8 rows (measured at
// qlen 128, about 12 rows per expert: 6 % slower with 8 here, equal with 16).
constexpr int64_t kQuarterMinRows = 16;

// Calls block(std::integral_constant<int, MR>, m0, p, quarter) for every panel p0 <= p < p1, block
// of up to 8 rows starting at row m0 and quarter of the panel: the loops of the quarter-panel
// forward products around their MR-row kernels.
template <class Block>
DPO_INLINE void for_quarter_blocks(int64_t rows, int64_t p0, int64_t p1, const Block& block) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m0 = 0; m0 < rows; m0 += 8)
      for (int quarter = 0; quarter < 4; ++quarter)
        with_rows<8>(rows - m0, [&](auto mr) { block(mr, m0, p, quarter); });
}

DPO_TARGET_AVX2 inline void gemm_nt_bf16(const Act& a, const PackedView& w, int64_t p0, int64_t p1,
                                         float* c, int64_t ldc) {
  for_quarter_blocks(a.rows, p0, p1, [&](auto mr, int64_t m0, int64_t p, int quarter) {
    nt_bf16_rows<decltype(mr)::value>(a.f32 + m0 * a.ld, a.ld, w.panel(p), w.rows_per_panel(),
                                      quarter, c + m0 * ldc + (p - p0) * kPanel + quarter * 8, ldc);
  });
}

// Transposed product for the 32 columns [col0, col0 + 32) (see gemm_nn_bf16_avx2).
template <int G>
DPO_TARGET_AVX2 inline void gemm_nn(const Act& a, const PackedView& w, int64_t col0, float* c,
                                    int64_t ldc) {
  for (int64_t j0 = 0; j0 < kPanel; j0 += 4)
    for (int64_t m0 = 0; m0 < a.rows; m0 += 2)
      with_rows<2>(a.rows - m0, [&](auto mr) {
        nn_rows<decltype(mr)::value, G>(a.f32 + m0 * a.ld, a.ld, w, (col0 + j0) / G,
                                        c + m0 * ldc + j0, ldc);
      });
}

// Forward product, int8 weights, for MR <= 8 rows and one quarter of a panel (8 channels):
// c[i][j] = s_a[i] s_w[n] sum_k (u8[i][k] - 128) q[n][k], n = 32 p + 8 quarter + j (the same
// integer sum as the generic loop's sum_k u8 q - 128 colsum, so the same result bit for bit).
template <int MR>
DPO_TARGET_AVX2 inline void nt_int8_rows(const uint8_t* a, int64_t lda, const float* a_scale,
                                         const PackedView& w, int64_t p, int quarter, float* c,
                                         int64_t ldc) {
  __m256i acc[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  const uint8_t* panel = w.panel(p) + quarter * 32;
  const int64_t groups = w.rows_per_panel();
  for (int64_t r = 0; r < groups; ++r) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + r * kRowBytes));
    const __m256i q_abs = _mm256_sign_epi8(q, q);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float* quad = reinterpret_cast<const float*>(a + i * lda + 4 * r);
      const __m256i s = _mm256_xor_si256(_mm256_castps_si256(_mm256_broadcast_ss(quad)), flip);
      const __m256i pairs = _mm256_maddubs_epi16(q_abs, _mm256_sign_epi8(s, q));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
    }
  }
  const __m256 w_scale = _mm256_loadu_ps(w.scale + p * kPanel + quarter * 8);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i]),
                                                              _mm256_set1_ps(a_scale[i])),
                                                w_scale));
}

DPO_TARGET_AVX2 inline void gemm_nt_int8(const Act& a, const PackedView& w, int64_t p0, int64_t p1,
                                         float* c, int64_t ldc) {
  for_quarter_blocks(a.rows, p0, p1, [&](auto mr, int64_t m0, int64_t p, int quarter) {
    nt_int8_rows<decltype(mr)::value>(a.u8 + m0 * a.ld, a.ld, a.scale + m0, w, p, quarter,
                                      c + m0 * ldc + (p - p0) * kPanel + quarter * 8, ldc);
  });
}

}  // namespace avx2

DPO_TARGET_AVX2 inline void gemm_nt_bf16_avx2(const Act& a, const PackedView& w, int64_t p0,
                                              int64_t p1, float* c, int64_t ldc) {
  if (a.rows < avx2::kQuarterMinRows)
    generic::gemm_nt_bf16(a, w, p0, p1, c, ldc);
  else
    avx2::gemm_nt_bf16(a, w, p0, p1, c, ldc);
}

DPO_TARGET_AVX2 inline void gemm_nt_int8_avx2(const Act& a, const PackedView& w, int64_t p0,
                                              int64_t p1, float* c, int64_t ldc) {
  avx2::gemm_nt_int8(a, w, p0, p1, c, ldc);
}

// c[m][j] = sum_n A[m][n] W[n][col0 + j] for j < cols (a multiple of 32), A in fp32 rows; for
// int8 weights the activations arrive already multiplied by the channel scales s_w[n].
DPO_TARGET_AVX2 inline void gemm_nn_bf16_avx2(const Act& a, const PackedView& w, int64_t col0,
                                              int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx2::gemm_nn<2>(a, w, col0 + j, c + j, ldc);
}
DPO_TARGET_AVX2 inline void gemm_nn_int8_avx2(const Act& a, const PackedView& w, int64_t col0,
                                              int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx2::gemm_nn<4>(a, w, col0 + j, c + j, ldc);
}

}  // namespace dpo_moe
