// AMX kernels (Intel Advanced Matrix Extensions, Sapphire Rapids and later).
// Kernels configure the tiles at their start and leave them configured: releasing the tile state
// after every task and configuring it again costs more than a small task itself, so the driver
// calls release_tiles() once per thread after each parallel loop.
// Tile registers: 0-3 accumulators (2 row tiles x 2 column tiles of 16x16 fp32/int32),
// 4-5 activation tiles (16 rows x 64 bytes), 6-7 weight tiles (16 rows x 64 bytes).
//   Forward product: the weight tiles are read straight from the packed panels (row stride 128).
//   Transposed product: AMX cannot transpose, so a task rewrites each 32-column strip of W (read
//   panel by panel, once per task) into VNNI pairs along n in a per-thread scratch buffer before
//   its product (bf16: strip by strip; int8: all of the task's strips at once); this keeps a
//   single packed copy of the weights in memory. bf16 experts with few rows instead read the
//   panels as they are, as the left operand, against activations split with zeros
//   (gemm_nn_bf16_split).
#pragma once

#include <immintrin.h>

#include <vector>

#include "moe_common.h"
#include "moe_gemm_avx512.h"

namespace dpo_moe {
namespace amx {

using avx512::dequantize_rows;
using avx512::prefetch_lines;
using avx512::prefetch_step;
using avx512::thread_scratch;
using avx512::transpose_strip_bf16;
using avx512::widen_strip_int8;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

DPO_TARGET_AMX inline void configure_tiles() {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // Inline asm, not _tile_loadconfig: GCC 12's intrinsic declares a read of only the first 8 bytes
  // of cfg, so the compiler may drop or delay the stores of colsb and rows (seen here: with more
  // code inlined around this call, the colsb stores vanished and LDTILECFG faulted, SIGSEGV).
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// Tile loads do not train the hardware prefetchers well, so the products prefetch the weights.
// The prefetches go to L2 only (hint T2), where the tile loads of the other row tiles find the
// panel anyway: measured on a Sapphire-Rapids-class VM, L2 prefetches 32 KB ahead streamed the
// weights about a fifth faster than L1 prefetches (hint T0) 16 KB ahead, which compete with the
// tile loads for the core's few L1 miss buffers.
// The forward product prefetches in one of two ways (see gemm_nt):
//  * ahead: the first pass over a panel (the first pair of row tiles) prefetches kPrefetchAhead
//    bytes ahead of its tile loads. Products with few row tiles wait for DRAM either way, and
//    this streams fastest.
//  * spread: with kSpreadPasses passes (pairs of row tiles) or more, every pass over panel p
//    prefetches its share of panel p + 1 (the next panel of the expert), a slice per step, so that
//    reading the next panel from DRAM overlaps the products on this one (measured: the qlen 2048
//    forward 10 % faster, qlen 512 unchanged). Only the first panel of a call is read ahead.
// int8 weights run the same loop (their panels have the same 2 KB steps): with these prefetches the
// int8 forward became 5 % faster at qlen 512 and 10 % at 2048.
constexpr int64_t kPrefetchAhead = 16 * 16 * kRowBytes;
constexpr int64_t kSpreadPasses = 3;

DPO_TARGET_AMX inline void release_tiles() { _tile_release(); }

// GCC's _tile_loadd takes the address as a plain register operand, without declaring a read of
// memory, so the compiler may sink or drop vector stores that only tile loads read. Called between
// such stores and the tile loads that read them.
inline void stores_visible_to_tile_loads() { asm volatile("" : : : "memory"); }

// Tile C += tile A x tile B: TDPBUSD (u8 x s8 -> int32) for int8 weights, else TDPBF16PS. A macro:
// the intrinsics paste their tile numbers into the instruction, so they must be literals.
#define DPO_TILE_DOT(INT8, C, A, B) \
  do {                              \
    if constexpr (INT8)             \
      _tile_dpbusd(C, A, B);        \
    else                            \
      _tile_dpbf16ps(C, A, B);      \
  } while (0)

// Forward product, one loop for both weight types: a step is 64 bytes of k per activation row
// (32 bf16 values, or 64 u8 values against int8 weights, dequantized after each row tile pair)
// and 16 panel rows of weights. Activation rows are padded to 16.
template <bool kInt8>
DPO_TARGET_AMX inline void gemm_nt(const Act& a, const PackedView& w, int64_t p0, int64_t p1,
                                   float* c, int64_t ldc) {
  configure_tiles();
  const uint8_t* rows = kInt8 ? a.u8 : reinterpret_cast<const uint8_t*>(a.bf16);
  const int64_t lda = a.ld * (kInt8 ? 1 : 2), ldc_bytes = ldc * 4;
  const int64_t row_tiles = ceil_div(a.rows, 16), steps = w.rows_per_panel() / 16;
  const int64_t panel_bytes = steps * 16 * kRowBytes, passes = (row_tiles + 1) / 2;
  const int64_t spread = round_up(ceil_div(panel_bytes, passes * steps), 64);
  const bool spreading = passes >= kSpreadPasses;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.panel(p);
    const uint8_t* next = spreading && p + 1 < w.n / kPanel ? w.panel(p + 1) : nullptr;
    float* cp = c + (p - p0) * kPanel;
    for (int64_t mt = 0; mt < row_tiles; mt += 2) {
      const bool two = mt + 1 < row_tiles;
      const uint8_t* a0 = rows + mt * 16 * lda;
      const uint8_t* a1 = a0 + 16 * lda;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        const uint8_t* b = panel + s * 16 * kRowBytes;
        if (mt == 0 && (p == p0 || !spreading)) prefetch_step(b + kPrefetchAhead);
        if (next != nullptr) {
          const int64_t off = ((mt / 2) * steps + s) * spread;
          if (off < panel_bytes) prefetch_lines(next + off, std::min(spread, panel_bytes - off));
        }
        _tile_loadd(6, b, kRowBytes);
        _tile_loadd(7, b + 64, kRowBytes);
        _tile_loadd(4, a0 + s * 64, lda);
        DPO_TILE_DOT(kInt8, 0, 4, 6);
        DPO_TILE_DOT(kInt8, 1, 4, 7);
        if (two) {
          _tile_loadd(5, a1 + s * 64, lda);
          DPO_TILE_DOT(kInt8, 2, 5, 6);
          DPO_TILE_DOT(kInt8, 3, 5, 7);
        }
      }
      float* c0 = cp + mt * 16 * ldc;
      _tile_stored(0, c0, ldc_bytes);
      _tile_stored(1, c0 + 16, ldc_bytes);
      if constexpr (kInt8) dequantize_rows(c0, ldc, 16, a.scale + mt * 16, w, p);
      if (two) {
        _tile_stored(2, c0 + 16 * ldc, ldc_bytes);
        _tile_stored(3, c0 + 16 * ldc + 16, ldc_bytes);
        if constexpr (kInt8) dequantize_rows(c0 + 16 * ldc, ldc, 16, a.scale + mt * 16 + 16, w, p);
      }
    }
  }
}
#undef DPO_TILE_DOT

// c[m][j] = sum_n A[m][n] B[n][j] for 32 columns j, A in bf16 rows, B given as the tiles written
// by transpose_strip_bf16 (two 1 KB tiles per 32 values of n). If `next` is not null, the first
// pass prefetches, per panel p, the 2 KB at next + p * panel_bytes (the weights that the next
// transpose_strip_bf16 call reads).
DPO_TARGET_AMX inline void product_with_tiles(const Act& a, const uint8_t* tiles, int64_t panels,
                                              float* c, int64_t ldc, const uint8_t* next,
                                              int64_t panel_bytes) {
  const int64_t row_tiles = ceil_div(a.rows, 16);
  const int64_t lda = a.ld * 2, ldc_bytes = ldc * 4;
  stores_visible_to_tile_loads();
  for (int64_t mt = 0; mt < row_tiles; mt += 2) {
    const bool two = mt + 1 < row_tiles;
    const uint16_t* a0 = a.bf16 + mt * 16 * a.ld;
    const uint16_t* a1 = a0 + 16 * a.ld;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t p = 0; p < panels; ++p) {
      if (mt == 0 && next != nullptr) prefetch_step(next + p * panel_bytes);
      _tile_loadd(6, tiles + p * 2048, 64);
      _tile_loadd(7, tiles + p * 2048 + 1024, 64);
      _tile_loadd(4, a0 + p * kPanel, lda);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, a1 + p * kPanel, lda);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* c0 = c + mt * 16 * ldc;
    _tile_stored(0, c0, ldc_bytes);
    _tile_stored(1, c0 + 16, ldc_bytes);
    if (two) {
      _tile_stored(2, c0 + 16 * ldc, ldc_bytes);
      _tile_stored(3, c0 + 16 * ldc + 16, ldc_bytes);
    }
  }
}

// Transposed product for bf16 weights: c[m][j] = sum_n A[m][n] W[n][col0 + j], A in bf16.
// One 32-column group at a time: transpose its strip, then the product, which prefetches the next
// group's strip so that reading it from DRAM overlaps the product.
DPO_TARGET_AMX inline void gemm_nn_bf16(const Act& a, const PackedView& w, int64_t col0,
                                        int64_t cols, float* c, int64_t ldc) {
  const int64_t panels = w.n / kPanel, groups = cols / kPanel;
  const int64_t panel_bytes = w.rows_per_panel() * kRowBytes;
  uint8_t* tiles = thread_scratch(0, panels * 2048);
  configure_tiles();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t row0 = col0 / 2 + 16 * g;
    transpose_strip_bf16(w, row0, 1, tiles, 1024, 64);
    const uint8_t* next = g + 1 < groups ? w.panel(0) + (row0 + 16) * kRowBytes : nullptr;
    product_with_tiles(a, tiles, panels, c + g * kPanel, ldc, next, panel_bytes);
  }
}

// Transposed product for experts with few rows (kSplitMaxRows or fewer), without rewriting the
// weights: a weight panel read as it is makes an A tile (16 pair rows r x 16 values of n, each
// entry the bf16 pair (W[n][2r], W[n][2r+1])), and the activations are "split" into B tiles whose
// columns 2m and 2m + 1 hold the pairs (a, 0) and (0, a), a = A[m][n] for 8 rows m; so TDPBF16PS
// gives C[r][2m + q] = sum_n W[n][2r + q] A[m][n] = c[m][2r + q]. Half of every product is a
// multiplication by zero, which costs less than the rewrite while the tile unit has little to do:
// measured (A/B against the rewrite, forward + backward): 1.24x at qlen 32 (3 rows per expert),
// 1.16x at 128 (12 rows), 1.05x at 256 (24 rows); with up to 64 rows, 17 % slower at 512 (48 rows).
constexpr int64_t kSplitMaxRows = 32;
static_assert(kSplitMaxRows <= 4 * 8, "split_strip accumulates at most 4 token blocks of 8 rows");
constexpr int64_t kSplitPrefetchPanels = 8;

// Writes the split B tiles of the activations: tile (tb, nb) row i holds, for the 8 rows m of
// token block tb and n = 16 nb + i, the bf16 quad (a, 0, 0, a) with a = A[8 tb + m][n].
DPO_TARGET_AMX inline void split_activations(const Act& a, int64_t n, uint16_t* tiles) {
  const int64_t token_blocks = ceil_div(a.rows, 8), nbs = n / 16;
  // 16-bit lane 4m + j of a quad reads row m % 4 of a register pair (two rows per register):
  // index 16 (m % 4) + i; the masks keep lanes 4m and 4m + 3, of rows 0-3 and of rows 4-7.
  const __m512i base = _mm512_setr_epi64(0, 0x0010001000100010, 0x0020002000200020,
                                         0x0030003000300030, 0, 0x0010001000100010,
                                         0x0020002000200020, 0x0030003000300030);
  const __mmask32 rows_0_3 = 0x00009999u, rows_4_7 = 0x99990000u;
  for (int64_t tb = 0; tb < token_blocks; ++tb) {
    const uint16_t* rows = a.bf16 + tb * 8 * a.ld;
    for (int64_t nb = 0; nb < nbs; ++nb) {
      __m512i pair[4];
      for (int j = 0; j < 4; ++j)
        pair[j] = _mm512_inserti64x4(
            _mm512_castsi256_si512(
                _mm256_loadu_si256((const __m256i*)(rows + 2 * j * a.ld + 16 * nb))),
            _mm256_loadu_si256((const __m256i*)(rows + (2 * j + 1) * a.ld + 16 * nb)), 1);
      uint16_t* tile = tiles + (tb * nbs + nb) * 512;
      __m512i index = base;
      for (int i = 0; i < 16; ++i) {
        _mm512_store_si512(
            tile + i * 32,
            _mm512_or_si512(_mm512_maskz_permutex2var_epi16(rows_0_3, pair[0], index, pair[1]),
                            _mm512_maskz_permutex2var_epi16(rows_4_7, pair[2], index, pair[3])));
        index = _mm512_add_epi16(index, _mm512_set1_epi16(1));
      }
    }
  }
}

// One step of 16 values of n for TB token blocks: C tile t += weight tile x split tile t (tiles
// 0-3 accumulate, 4 holds the weights, 6 and 7 take turns with the token blocks).
template <int TB>
DPO_TARGET_AMX DPO_INLINE void split_step(const uint8_t* weights, const uint16_t* split,
                                          int64_t block_stride) {
  _tile_loadd(4, weights, kRowBytes);
  _tile_loadd(6, split, 64);
  _tile_dpbf16ps(0, 4, 6);
  if constexpr (TB > 1) {
    _tile_loadd(7, split + block_stride, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if constexpr (TB > 2) {
    _tile_loadd(6, split + 2 * block_stride, 64);
    _tile_dpbf16ps(2, 4, 6);
  }
  if constexpr (TB > 3) {
    _tile_loadd(7, split + 3 * block_stride, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
}

// c[m][2r + q] = tile[r][2m + q] for 8 rows m and 16 pair rows r (two 8 x 8 transposes of
// 8-byte units, by gathers).
DPO_TARGET_AMX inline void store_split_tile(const float* tile, float* c, int64_t ldc) {
  const __m512i pair_rows = _mm512_setr_epi64(0, 8, 16, 24, 32, 40, 48, 56);
  const double* units = reinterpret_cast<const double*>(tile);
  for (int m = 0; m < 8; ++m) {
    _mm512_storeu_pd(c + m * ldc, _mm512_i64gather_pd(pair_rows, units + m, 8));
    _mm512_storeu_pd(c + m * ldc + 16, _mm512_i64gather_pd(pair_rows, units + 64 + m, 8));
  }
}

// The product for one 32-column strip and TB token blocks; the weights are prefetched
// kSplitPrefetchPanels panels ahead, running on into the next strip (`next`, or null).
template <int TB>
DPO_TARGET_AMX inline void split_strip(const uint8_t* strip, const uint8_t* next, int64_t panels,
                                       int64_t panel_bytes, const uint16_t* split, float* out) {
  const int64_t nbs = 2 * panels, block_stride = nbs * 512;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t ahead = p + kSplitPrefetchPanels;
    if (ahead < panels)
      prefetch_lines(strip + ahead * panel_bytes, 16 * kRowBytes);
    else if (next != nullptr)
      prefetch_lines(next + (ahead - panels) * panel_bytes, 16 * kRowBytes);
    const uint8_t* weights = strip + p * panel_bytes;
    split_step<TB>(weights, split + 2 * p * 512, block_stride);
    split_step<TB>(weights + 64, split + (2 * p + 1) * 512, block_stride);
  }
  _tile_stored(0, out, 64);
  _tile_stored(1, out + 256, 64);
  _tile_stored(2, out + 512, 64);
  _tile_stored(3, out + 768, 64);
}

DPO_TARGET_AMX inline void gemm_nn_bf16_split(const Act& a, const PackedView& w, int64_t col0,
                                              int64_t cols, float* c, int64_t ldc) {
  const int64_t panels = w.n / kPanel, token_blocks = ceil_div(a.rows, 8);
  const int64_t panel_bytes = w.rows_per_panel() * kRowBytes, strips = cols / kPanel;
  uint16_t* split = reinterpret_cast<uint16_t*>(thread_scratch(1, token_blocks * panels * 2048));
  float* out = reinterpret_cast<float*>(thread_scratch(0, 4 * 1024));
  split_activations(a, w.n, split);
  configure_tiles();
  stores_visible_to_tile_loads();
  const uint8_t* first = w.panel(0) + col0 / 2 * kRowBytes;
  for (int64_t p = 0; p < std::min(panels, kSplitPrefetchPanels); ++p)
    prefetch_lines(first + p * panel_bytes, 16 * kRowBytes);
  for (int64_t s = 0; s < strips; ++s) {
    const uint8_t* strip = first + s * 16 * kRowBytes;
    const uint8_t* next = s + 1 < strips ? strip + 16 * kRowBytes : nullptr;
    with_rows<4>(token_blocks, [&](auto tb) {
      split_strip<decltype(tb)::value>(strip, next, panels, panel_bytes, split, out);
    });
    for (int64_t tb = 0; tb < token_blocks; ++tb)
      store_split_tile(out + tb * 256, c + 8 * tb * ldc + s * kPanel, ldc);
  }
}

// Transposed product for int8 weights. The activations arrive already multiplied by the channel
// scales s_w[n], so the integer weights are used as they are (exactly representable in bf16).
DPO_TARGET_AMX inline void gemm_nn_int8(const Act& a, const PackedView& w, int64_t col0,
                                        int64_t cols, float* c, int64_t ldc) {
  const int64_t panels = w.n / kPanel, groups = cols / kPanel;
  uint8_t* strip = thread_scratch(0, panels * cols * kPanel * 2);
  uint8_t* tiles = thread_scratch(1, groups * panels * 2048);
  widen_strip_int8(w, col0 / 4, cols, strip);
  const PackedView bf16_strip{strip, w.n, cols, nullptr, nullptr, WeightType::bf16};
  transpose_strip_bf16(bf16_strip, 0, groups, tiles, 1024, 64);
  configure_tiles();
  for (int64_t g = 0; g < groups; ++g)
    product_with_tiles(a, tiles + g * panels * 2048, panels, c + g * kPanel, ldc, nullptr, 0);
}

// Runs one bf16 and one int8 tile product on known data; used by the forked AMX probe.
DPO_TARGET_AMX inline bool self_test() {
  if (!request_amx_permission()) return false;
  configure_tiles();
  alignas(64) uint16_t ones_bf16[16 * 32];
  alignas(64) uint8_t ones_u8[16 * 64];
  alignas(64) float out_f32[16 * 16];
  alignas(64) int32_t out_i32[16 * 16];
  std::fill(ones_bf16, ones_bf16 + 16 * 32, uint16_t(0x3F80));  // 1.0 in bf16
  std::fill(ones_u8, ones_u8 + 16 * 64, uint8_t(1));
  stores_visible_to_tile_loads();
  _tile_zero(0);
  _tile_loadd(4, ones_bf16, 64);
  _tile_loadd(6, ones_bf16, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_stored(0, out_f32, 64);
  _tile_zero(1);
  _tile_loadd(5, ones_u8, 64);
  _tile_loadd(7, ones_u8, 64);
  _tile_dpbusd(1, 5, 7);
  _tile_stored(1, out_i32, 64);
  _tile_release();
  return out_f32[0] == 32.0f && out_f32[255] == 32.0f && out_i32[0] == 64 && out_i32[255] == 64;
}

}  // namespace amx

// Runs amx::self_test in a forked child, so that a CPU or kernel that advertises AMX but faults
// on tile instructions (SIGILL) cannot take the calling process down.
inline bool amx_runs() {
  if (!detect_cpu().amx) return false;
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) _exit(amx::self_test() ? 0 : 1);
  int status = 0;
  pid_t waited;
  do waited = waitpid(pid, &status, 0);
  while (waited < 0 && errno == EINTR);  // a signal handled meanwhile is no verdict on AMX
  return waited == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

DPO_TARGET_AMX inline void release_tiles_amx() { amx::release_tiles(); }
DPO_TARGET_AMX inline void gemm_nt_bf16_amx(const Act& a, const PackedView& w, int64_t p0,
                                            int64_t p1, float* c, int64_t ldc) {
  amx::gemm_nt<false>(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AMX inline void gemm_nt_int8_amx(const Act& a, const PackedView& w, int64_t p0,
                                            int64_t p1, float* c, int64_t ldc) {
  amx::gemm_nt<true>(a, w, p0, p1, c, ldc);
}
DPO_TARGET_AMX inline void gemm_nn_bf16_amx(const Act& a, const PackedView& w, int64_t col0,
                                            int64_t cols, float* c, int64_t ldc) {
  if (a.rows <= amx::kSplitMaxRows)
    amx::gemm_nn_bf16_split(a, w, col0, cols, c, ldc);
  else
    amx::gemm_nn_bf16(a, w, col0, cols, c, ldc);
}
DPO_TARGET_AMX inline void gemm_nn_int8_amx(const Act& a, const PackedView& w, int64_t col0,
                                            int64_t cols, float* c, int64_t ldc) {
  // 128 columns at a time: the widened and rewritten strips (0.7 MB each at H = 2048) stay in L2
  // (512 at once: 1.07x to 1.3x slower).
  constexpr int64_t kCols = 128;
  for (int64_t j = 0; j < cols; j += kCols)
    amx::gemm_nn_int8(a, w, col0 + j, std::min(kCols, cols - j), c + j, ldc);
}

}  // namespace dpo_moe
