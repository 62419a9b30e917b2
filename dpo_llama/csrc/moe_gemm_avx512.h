// AVX-512 kernels (compiled with per-function target attributes, run only when CPUID says so).
//   bf16 weights: each 64-byte load holds 16 channels x (k, k+1) bf16 pairs. Two forward products:
//                 * fp32 FMA on fp32 activations, the pairs widened to two fp32 vectors with one
//                   shift and one mask (bf16 is the top half of fp32);
//                 * vdpbf16ps (AVX512_BF16) on bf16 activations, which takes the pairs as they are.
//                 moe_kernel.cpp times both once per process and runs the faster. On a Sapphire
//                 Rapids machine fp32 FMA was about 1.7x faster, although one vdpbf16ps does the
//                 work of two FMAs: there it has a much lower throughput. On an AMD Zen 5,
//                 vdpbf16ps was 2x faster (the same throughput as an FMA).
//                 The transposed (backward) product follows the forward's choice: fp32 FMA on
//                 widened weights, or vdpbf16ps on bf16 operands and rewritten strips
//                 (gemm_nn_dpbf16).
//   int8 weights: VNNI vpdpbusd (u8 activations x s8 weights -> int32) in the forward product;
//                 in the transposed (backward) product fp32 FMA on widened weights, or where
//                 the bf16 forward runs vdpbf16ps, vdpbf16ps on strips widened to bf16 and
//                 rewritten (gemm_nn_int8_dpbf16).
#pragma once

#include <immintrin.h>

#include <vector>

#include "moe_common.h"

namespace dpo_moe {
namespace avx512 {

// Prefetches [p, p + bytes) to L2 (hint T2; moe_gemm_amx.h says why L2).
DPO_TARGET_AVX512 DPO_INLINE void prefetch_lines(const uint8_t* p, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + line), _MM_HINT_T2);
}

// Prefetches one step of a panel (16 panel rows).
DPO_TARGET_AVX512 DPO_INLINE void prefetch_step(const uint8_t* p) {
  prefetch_lines(p, 16 * kRowBytes);
}

// 64-byte aligned per-thread scratch memory, kept between tasks: a fresh allocation of a few
// hundred KB per task would be mmap-ed and page-faulted every time.
DPO_INLINE uint8_t* thread_scratch(int which, int64_t bytes) {
  thread_local std::vector<uint8_t> buffers[2];
  std::vector<uint8_t>& buffer = buffers[which];
  if (int64_t(buffer.size()) < bytes + 64) buffer.resize(bytes + 64);
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) &
                                    ~uintptr_t(63));
}

// In-register transpose of an 8x8 matrix of 64-bit elements: x[i][q] -> x[q][i]. Stage b
// (b = 1, 2, 4) swaps the off-diagonal b x b blocks, i.e. bit b of the row index with bit b of
// the column index, with two two-source permutes per pair of rows.
struct Transpose8x8 {
  __m512i lo[3], hi[3];

  DPO_TARGET_AVX512 Transpose8x8() {
    lo[0] = _mm512_setr_epi64(0, 8, 2, 10, 4, 12, 6, 14);
    hi[0] = _mm512_setr_epi64(1, 9, 3, 11, 5, 13, 7, 15);
    lo[1] = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    hi[1] = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    lo[2] = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    hi[2] = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  }

  DPO_TARGET_AVX512 void operator()(__m512i* x) const {
#pragma GCC unroll 3
    for (int stage = 0; stage < 3; ++stage) {
      const int b = 1 << stage;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (i & b) continue;
        const __m512i xi = _mm512_permutex2var_epi64(x[i], lo[stage], x[i + b]);
        x[i + b] = _mm512_permutex2var_epi64(x[i], hi[stage], x[i + b]);
        x[i] = xi;
      }
    }
  }
};

// Rewrites the columns [2 row0, 2 row0 + 32 groups) of every bf16 panel with bf16 pairs along n,
// 2 KB per panel p and group g at out + (g * panels + p) * 2 KB: the 64 bytes that hold
// (W[n][k], W[n+1][k]) for n = 32 p + 2 j and k = 2 row0 + 32 g + 16 t + 0..15 go to
// t * t_stride + j * j_stride in it. AMX weight tiles are (t_stride, j_stride) = (1024, 64) (tile
// t, row j); (64, 128) gives 128-byte rows of 32 values of k, a forward panel of W^T (AVX-512).
// A source row holds per 8 bytes (W[n][k], W[n][k+1], W[n+1][k], W[n+1][k+1]); swapping the
// middle words gives the target's 8 bytes for (k, k+1), and an 8x8 transpose of those 8-byte
// units moves them to their rows. Panels are read whole (contiguous) for the prefetchers.
DPO_TARGET_AVX512 inline void transpose_strip_bf16(const PackedView& w, int64_t row0,
                                                   int64_t groups, uint8_t* out,
                                                   int64_t t_stride, int64_t j_stride) {
  const __m512i swap_middle = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
  const Transpose8x8 transpose;
  const int64_t panels = w.n / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* src = w.panel(p) + row0 * kRowBytes;
    for (int64_t g = 0; g < groups; ++g) {
      if (p + 1 < panels) prefetch_step(w.panel(p + 1) + (row0 + 16 * g) * kRowBytes);
      for (int t = 0; t < 2; ++t)
        for (int half = 0; half < 2; ++half) {
          __m512i x[8];
          for (int i = 0; i < 8; ++i)
            x[i] = _mm512_shuffle_epi8(
                _mm512_loadu_si512(src + (16 * g + 8 * t + i) * kRowBytes + half * 64),
                swap_middle);
          transpose(x);
          uint8_t* dst = out + (g * panels + p) * 2048 + t * t_stride + half * 8 * j_stride;
          for (int j = 0; j < 8; ++j) _mm512_store_si512(dst + j * j_stride, x[j]);
        }
    }
  }
}

// int8 -> bf16 (exact for |q| <= 127: the low 16 bits of the fp32 value are zero) of 16 bytes.
DPO_TARGET_AVX512 inline __m256i int8_to_bf16(__m128i bytes) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16));
}

// Rewrites the columns [4 row0, 4 row0 + cols) of every int8 panel as bf16 panels with pairs along
// k (cols / 2 pair rows of 128 bytes each), i.e. the bf16 packed layout of the same columns.
DPO_TARGET_AVX512 inline void widen_strip_int8(const PackedView& w, int64_t row0, int64_t cols,
                                               uint8_t* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t panels = w.n / kPanel, quad_rows = cols / 4;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* src = w.panel(p) + row0 * kRowBytes;
    for (int64_t r = 0; r < quad_rows; ++r) {
      if (p + 1 < panels && r % 8 == 0) prefetch_step(w.panel(p + 1) + (row0 + r) * kRowBytes);
      for (int half = 0; half < 2; ++half) {
        const uint8_t* bytes = src + r * kRowBytes + half * 64;
        // lo/hi: 8 channels each x 4 values of k as bf16, i.e. 64-bit units (k0 k1 | k2 k3).
        const __m512i lo = _mm512_inserti64x4(
            _mm512_castsi256_si512(int8_to_bf16(_mm_loadu_si128((const __m128i*)bytes))),
            int8_to_bf16(_mm_loadu_si128((const __m128i*)(bytes + 16))), 1);
        const __m512i hi = _mm512_inserti64x4(
            _mm512_castsi256_si512(int8_to_bf16(_mm_loadu_si128((const __m128i*)(bytes + 32)))),
            int8_to_bf16(_mm_loadu_si128((const __m128i*)(bytes + 48))), 1);
        uint8_t* dst = out + (p * quad_rows * 2 + 2 * r) * kRowBytes + half * 64;
        _mm512_store_si512(dst, _mm512_permutex2var_epi32(lo, even, hi));
        _mm512_store_si512(dst + kRowBytes, _mm512_permutex2var_epi32(lo, odd, hi));
      }
    }
  }
}

// Spreads a prefetch (to L2) over the steps (pair or quad rows) of the products before the data is
// read: step() prefetches one unit of 128 bytes every `stride` steps, from unit `unit` on. The
// units are runs of 2^chunk_log2 units `chunk_bytes` apart (a strip of the panels), or contiguous
// (one panel). Default-constructed, it prefetches nothing.
struct PanelPrefetch {
  const uint8_t* next = nullptr;
  int64_t unit = 0;
  int64_t stride = 1;
  int64_t chunk_log2 = 62;
  int64_t chunk_bytes = 0;
  int64_t countdown = 0;

  DPO_TARGET_AVX512 DPO_INLINE void step() {
    if (next == nullptr || --countdown > 0) return;
    const int64_t chunk = unit >> chunk_log2, in_chunk = unit - (chunk << chunk_log2);
    const uint8_t* p = next + chunk * chunk_bytes + in_chunk * kRowBytes;
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T2);
    _mm_prefetch(reinterpret_cast<const char*>(p + 64), _MM_HINT_T2);
    ++unit;
    countdown = stride;
  }
};

// `units` units prefetched by nb blocks of `steps` steps each, block b taking its slice.
DPO_INLINE PanelPrefetch spread(const uint8_t* next, int64_t units, int64_t steps, int64_t b,
                                int64_t nb) {
  const int64_t slice = ceil_div(units, nb);
  return {next, b * slice, std::max<int64_t>(1, steps / slice)};
}

// The prefetch of panel p + 1 by block b of the nb row blocks on panel p: without it, the first
// block on a panel waits for it to stream in from DRAM (measured on an AMD Zen 5, the bf16 forward
// at 512 tokens, 4 blocks per panel, 1.12x faster with it; unchanged at 2048). None with a single
// block, whose panel streams in as it is read, which the hardware prefetchers follow.
DPO_INLINE PanelPrefetch spread_over_blocks(const PackedView& w, int64_t p, int64_t b,
                                            int64_t nb) {
  if (nb < 2 || p + 1 >= w.n / kPanel) return {};
  return spread(w.panel(p + 1), w.rows_per_panel(), w.rows_per_panel(), b, nb);
}

// The prefetch of the 32-column strip of w from pair row row0 on (2 KB of every panel, the rows that
// transpose_strip_bf16 reads next) by block b of the nb row blocks of a product on the strip before.
DPO_INLINE PanelPrefetch spread_over_strip(const PackedView& w, int64_t row0, int64_t b,
                                           int64_t nb) {
  const int64_t units = w.n / kPanel * 16;  // 16 units of 128 bytes per panel
  PanelPrefetch ahead = spread(w.panel(0) + row0 * kRowBytes, units, units, b, nb);
  ahead.chunk_log2 = 4;
  ahead.chunk_bytes = w.rows_per_panel() * kRowBytes;
  return ahead;
}

// Calls block(std::integral_constant<int, MR>, m0, p, ahead) for every panel p in [p0, p1) of w and
// every block of up to 12 rows starting at row m0, `ahead` being that block's share of the prefetch
// of panel p + 1 (spread_over_blocks): the loops of each forward product around its MR-row kernel.
template <class Block>
DPO_INLINE void for_row_blocks(int64_t rows, const PackedView& w, int64_t p0, int64_t p1,
                               const Block& block) {
  const int64_t blocks = ceil_div(rows, 12);
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t b = 0; b < blocks; ++b)
      with_rows<12>(rows - 12 * b, [&](auto mr) {
        block(mr, 12 * b, p, spread_over_blocks(w, p, b, blocks));
      });
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
                                           int64_t groups, float* c, int64_t ldc,
                                           PanelPrefetch ahead) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t r = 0; r < groups; ++r) {
    ahead.step();
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
  for_row_blocks(a.rows, w, p0, p1, [&](auto mr, int64_t m0, int64_t p, PanelPrefetch ahead) {
    nt_bf16_rows<decltype(mr)::value>(a.f32 + m0 * a.ld, a.ld,
                                      reinterpret_cast<const uint16_t*>(w.panel(p)),
                                      w.rows_per_panel(), c + m0 * ldc + (p - p0) * kPanel, ldc,
                                      ahead);
  });
}

// The same product for bf16 activations with vdpbf16ps: each 32-bit lane of a 64-byte panel load
// is the (k, k+1) pair of one channel, which the instruction multiplies by the row's (k, k+1) pair
// (broadcast to all lanes) and adds to the channel's fp32 accumulator. One instruction per 16
// channels and pair instead of two FMAs, and no widening of the weights.
template <int MR>
DPO_TARGET_AVX512_BF16 inline void nt_dpbf16_rows(const uint16_t* a, int64_t lda,
                                                  const uint16_t* panel, int64_t groups, float* c,
                                                  int64_t ldc, PanelPrefetch ahead) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t r = 0; r < groups; ++r) {
    ahead.step();
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
  for_row_blocks(a.rows, w, p0, p1, [&](auto mr, int64_t m0, int64_t p, PanelPrefetch ahead) {
    nt_dpbf16_rows<decltype(mr)::value>(a.bf16 + m0 * a.ld, a.ld,
                                        reinterpret_cast<const uint16_t*>(w.panel(p)),
                                        w.rows_per_panel(), c + m0 * ldc + (p - p0) * kPanel, ldc,
                                        ahead);
  });
}

// int32 sums (stored in place in c) -> s_a s_w (acc - 128 colsum) for `rows` rows x 32 columns
// of panel p (the u8 activations are a + 128).
DPO_TARGET_AVX512 inline void dequantize_rows(float* c, int64_t ldc, int64_t rows,
                                              const float* a_scale, const PackedView& w,
                                              int64_t p) {
  for (int half = 0; half < 2; ++half) {
    const int64_t n = p * kPanel + half * 16;
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(w.colsum + n), 7);
    const __m512 w_scale = _mm512_loadu_ps(w.scale + n);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = c + i * ldc + half * 16;
      const __m512i acc = _mm512_loadu_si512(row);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, shift));
      _mm512_storeu_ps(row, _mm512_mul_ps(v, _mm512_mul_ps(w_scale, _mm512_set1_ps(a_scale[i]))));
    }
  }
}

// Same for int8: acc = sum_k u8[i][k] q[n][k] with vpdpbusd (4 products per 32-bit lane).
template <int MR>
DPO_TARGET_AVX512 inline void nt_int8_rows(const uint8_t* a, int64_t lda, const float* a_scale,
                                           const PackedView& w, int64_t p, float* c,
                                           int64_t ldc, PanelPrefetch ahead) {
  __m512i acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  const uint8_t* panel = w.panel(p);
  const int64_t groups = w.rows_per_panel();
  for (int64_t r = 0; r < groups; ++r) {
    ahead.step();
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
  // The int32 sums go to c as they are and are dequantized there: with the dequantization on the
  // accumulators, GCC kept them all on the stack through the product (measured on an AMD Zen 5,
  // the int8 forward at 2048 tokens took 323 ms that way, 151 ms now; bf16 weights 237 ms).
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_si512(c + i * ldc, acc[i][0]);
    _mm512_storeu_si512(c + i * ldc + 16, acc[i][1]);
  }
  dequantize_rows(c, ldc, MR, a_scale, w, p);
}

DPO_TARGET_AVX512 inline void gemm_nt_int8(const Act& a, const PackedView& w, int64_t p0,
                                           int64_t p1, float* c, int64_t ldc) {
  for_row_blocks(a.rows, w, p0, p1, [&](auto mr, int64_t m0, int64_t p, PanelPrefetch ahead) {
    nt_int8_rows<decltype(mr)::value>(a.u8 + m0 * a.ld, a.ld, a.scale + m0, w, p,
                                      c + m0 * ldc + (p - p0) * kPanel, ldc, ahead);
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

// 16 activations as fp32: loaded as they are, or bf16 widened (shifted into the top half).
DPO_TARGET_AVX512 DPO_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
DPO_TARGET_AVX512 DPO_INLINE __m512 load16(const uint16_t* p) {
  const __m256i bf16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// A sweep of nn_rows reads kGroupRows rows (512 bytes for bf16) of every panel, 64 to 88 panels
// 90 to 128 KB apart at DeepSeek-V2-Lite's sizes: too short a run per panel for the hardware
// prefetchers, so each step prefetches (to L2) the panel this many ahead, and past the last panel
// the next sweep's rows of the first ones. On an AMD Zen 4, forward + backward with one weight
// copy at 8 / 32 / 128 tokens (about 1 / 3 / 12 rows per expert) got 1.18 / 1.13 / 1.10x faster
// (two rounds of alternating builds), and was unchanged at 512. Only the first block of rows
// prefetches: the later blocks sweep the same rows, which the first left in L2.
constexpr int64_t kNnPrefetchPanels = 16;

// Prefetches the pair rows [row0, row0 + rows) of the panel kNnPrefetchPanels after p, or past the
// last panel the next `rows` rows of the first panels.
DPO_TARGET_AVX512 DPO_INLINE void prefetch_nn_ahead(const PackedView& w, int64_t p, int64_t row0,
                                                    int64_t rows) {
  const int64_t panels = w.n / kPanel, ahead = p + kNnPrefetchPanels;
  if (ahead < panels)
    prefetch_lines(w.panel(ahead) + row0 * kRowBytes, rows * kRowBytes);
  else if (row0 + 2 * rows <= w.rows_per_panel())
    prefetch_lines(w.panel(ahead - panels) + (row0 + rows) * kRowBytes, rows * kRowBytes);
}

// Transposed product for MR rows (fp32 or bf16) and 8 output columns starting at group row row0:
// acc[i][j] holds 16 partial sums over n mod 16, reduced once after the sweep over all of N.
// `prefetch`: prefetch the panels ahead (kNnPrefetchPanels).
template <int MR, int G, class T>
DPO_TARGET_AVX512 inline void nn_rows(const T* a, int64_t lda, const PackedView& w,
                                      int64_t row0, float* c, int64_t ldc, bool prefetch) {
  constexpr int kCols = 8, kGroupRows = kCols / G;
  __m512 acc[MR][kCols];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kCols; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t panels = w.n / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* base = w.panel(p) + row0 * kRowBytes;
    if (prefetch) prefetch_nn_ahead(w, p, row0, kGroupRows);
    for (int half = 0; half < 2; ++half) {
      __m512 x[MR];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) x[i] = load16(a + i * lda + p * kPanel + half * 16);
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

// The transposed product for the 32 columns from col0 on, `rows` being a.f32 or a.bf16.
template <int G, class T>
DPO_TARGET_AVX512 inline void gemm_nn(const Act& a, const T* rows, const PackedView& w,
                                      int64_t col0, float* c, int64_t ldc) {
  constexpr int64_t kRowsPerBlock = 3;
  for (int64_t j0 = 0; j0 < kPanel; j0 += 8)
    for (int64_t m0 = 0; m0 < a.rows; m0 += kRowsPerBlock) {
      const T* am = rows + m0 * a.ld;
      float* cm = c + m0 * ldc + j0;
      const int64_t row0 = (col0 + j0) / G;
      with_rows<kRowsPerBlock>(a.rows - m0, [&](auto mr) {
        nn_rows<decltype(mr)::value, G>(am, a.ld, w, row0, cm, ldc, m0 == 0);
      });
    }
}

// Transposed product on bf16 activations with vdpbf16ps: c[m][j] = sum_n A[m][n] W[n][col0 + j].
// vdpbf16ps needs pairs along its reduction n, the packed panels hold pairs along k, so each
// 32-column strip is first rewritten with pairs along n (transpose_strip_bf16, the AMX kernel's
// rewrite, as 128-byte rows): that is a forward panel of W^T with N / 2 pair rows, which
// nt_dpbf16_rows multiplies at the forward's speed. The strip (N x 64 bytes, 128 to 180 KB at
// DeepSeek-V2-Lite's sizes) stays in L2 while every block of 12 rows reads it, and the blocks
// prefetch the next strip's source rows, as the AMX kernel does (on an AMD Zen 5, forward +
// backward 1.2x faster at 256 tokens, 1.11x at 512, 1.03x at 2048 with it). Experts with fewer
// rows than kDpbf16RewriteMinRows take the FMA product on the panels as they are instead (their
// bf16 rows widened as they load), where the rewrite would cost more than it saves: measured on an
// AMD Zen 5 (A/B, forward + backward at DeepSeek-V2-Lite's shapes, against the fp32 FMA backward),
// rewriting for every expert was 29 % slower at 8 tokens (1 row per expert) and 8 % at 32 (3 rows),
// with this threshold 0 to 6 % faster there and 4 % at 128 tokens (12 rows), then 1.2x at 256,
// 1.4x at 512 and 1.7x at 2048.
constexpr int64_t kDpbf16RewriteMinRows = 12;

// c[m][j] = sum_n A[m][n] W[n][j] for 32 columns j, A in bf16 rows, W^T given as the N / 2 pair
// rows (128 bytes each) that transpose_strip_bf16 writes with strides (64, kRowBytes).
DPO_TARGET_AVX512_BF16 inline void product_with_pair_rows(const Act& a, const uint8_t* pair_rows,
                                                          int64_t n, float* c, int64_t ldc,
                                                          const PackedView* next = nullptr,
                                                          int64_t next_row0 = 0) {
  const int64_t blocks = ceil_div(a.rows, 12);
  for (int64_t b = 0; b < blocks; ++b)
    with_rows<12>(a.rows - 12 * b, [&](auto mr) {
      const PanelPrefetch ahead = next == nullptr ? PanelPrefetch{}
                                                  : spread_over_strip(*next, next_row0, b, blocks);
      nt_dpbf16_rows<decltype(mr)::value>(a.bf16 + 12 * b * a.ld, a.ld,
                                          reinterpret_cast<const uint16_t*>(pair_rows), n / 2,
                                          c + 12 * b * ldc, ldc, ahead);
    });
}

// The FMA product for an expert with fewer than kDpbf16RewriteMinRows rows (true), else nothing
// (false).
template <int G>
DPO_TARGET_AVX512 inline bool fma_for_few_rows(const Act& a, const PackedView& w, int64_t col0,
                                               int64_t cols, float* c, int64_t ldc) {
  if (a.rows >= kDpbf16RewriteMinRows) return false;
  for (int64_t j = 0; j < cols; j += kPanel) gemm_nn<G>(a, a.bf16, w, col0 + j, c + j, ldc);
  return true;
}

DPO_TARGET_AVX512_BF16 inline void gemm_nn_dpbf16(const Act& a, const PackedView& w,
                                                  int64_t col0, int64_t cols, float* c,
                                                  int64_t ldc) {
  if (fma_for_few_rows<2>(a, w, col0, cols, c, ldc)) return;
  uint8_t* strip = thread_scratch(0, w.n / kPanel * 2048);
  for (int64_t j = 0; j < cols; j += kPanel) {
    transpose_strip_bf16(w, (col0 + j) / 2, 1, strip, 64, kRowBytes);
    const bool more = j + kPanel < cols;
    product_with_pair_rows(a, strip, w.n, c + j, ldc, more ? &w : nullptr, (col0 + j) / 2 + 16);
  }
}

// The same for int8 weights, whose operand rows arrive multiplied by the channel scales s_w[n]:
// up to 128 columns at a time are widened to bf16 (exact) and rewritten as above, as the AMX
// kernel does; experts with few rows take the FMA product on the int8 panels as they are.
DPO_TARGET_AVX512_BF16 inline void gemm_nn_int8_dpbf16(const Act& a, const PackedView& w,
                                                       int64_t col0, int64_t cols, float* c,
                                                       int64_t ldc) {
  if (fma_for_few_rows<4>(a, w, col0, cols, c, ldc)) return;
  constexpr int64_t kCols = 128;
  const int64_t panels = w.n / kPanel;
  for (int64_t j0 = 0; j0 < cols; j0 += kCols) {
    const int64_t width = std::min(kCols, cols - j0), groups = width / kPanel;
    uint8_t* widened = thread_scratch(0, panels * width * kPanel * 2);
    uint8_t* pair_rows = thread_scratch(1, groups * panels * 2048);
    widen_strip_int8(w, (col0 + j0) / 4, width, widened);
    const PackedView bf16_strip{widened, w.n, width, nullptr, nullptr, WeightType::bf16};
    transpose_strip_bf16(bf16_strip, 0, groups, pair_rows, 64, kRowBytes);
    for (int64_t g = 0; g < groups; ++g)
      product_with_pair_rows(a, pair_rows + g * panels * 2048, w.n, c + j0 + g * kPanel, ldc);
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
DPO_TARGET_AVX512_BF16 inline void gemm_nn_bf16_dpbf16_avx512(const Act& a, const PackedView& w,
                                                              int64_t col0, int64_t cols,
                                                              float* c, int64_t ldc) {
  avx512::gemm_nn_dpbf16(a, w, col0, cols, c, ldc);
}
DPO_TARGET_AVX512_BF16 inline void gemm_nn_int8_dpbf16_avx512(const Act& a, const PackedView& w,
                                                              int64_t col0, int64_t cols,
                                                              float* c, int64_t ldc) {
  avx512::gemm_nn_int8_dpbf16(a, w, col0, cols, c, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nt_int8_avx512(const Act& a, const PackedView& w, int64_t p0,
                                                  int64_t p1, float* c, int64_t ldc) {
  avx512::gemm_nt_int8(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nn_bf16_avx512(const Act& a, const PackedView& w, int64_t col0,
                                                  int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx512::gemm_nn<2>(a, a.f32, w, col0 + j, c + j, ldc);
}
DPO_TARGET_AVX512 inline void gemm_nn_int8_avx512(const Act& a, const PackedView& w, int64_t col0,
                                                  int64_t cols, float* c, int64_t ldc) {
  for (int64_t j = 0; j < cols; j += kPanel) avx512::gemm_nn<4>(a, a.f32, w, col0 + j, c + j, ldc);
}

}  // namespace dpo_moe
