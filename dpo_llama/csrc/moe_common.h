// Shared types for the CPU MoE expert kernel: packed-weight views, activation operands,
// the per-ISA kernel table, CPU feature detection and the task scheduler.
//
// Packed weight layout (one matrix W[N, K] in nn.Linear layout, out_features x in_features):
//   W is cut into panels of 32 output rows. Inside a panel the reduction dimension K is split
//   into groups of G consecutive elements (G = 2 for bf16, G = 4 for int8) and stored as
//       panel[k / G][n % 32][k % G]
//   so every "row" of a panel is 128 bytes = 2 cache lines = 16 output channels per 64 bytes.
//   * AMX: a B tile (16 rows x 64 bytes) is exactly 16 such rows, half a panel wide (stride 128).
//   * AVX-512: one 64-byte load gives 16 output channels x G values of K (VNNI order).
//   N and K are zero-padded to multiples of 64 so every kernel sees whole panels and tiles.
#pragma once

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#define DPO_INLINE inline __attribute__((always_inline))
#define DPO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DPO_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")))
#define DPO_TARGET_AVX512_BF16                                                     \
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni," \
                        "avx2,fma")))
#define DPO_TARGET_AMX                                                               \
  __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512dq," \
                        "avx512vl,avx512vnni,avx2,fma")))

namespace dpo_moe {

constexpr int64_t kPanel = 32;     // output rows per panel
constexpr int64_t kRowBytes = 128;  // bytes per panel row
constexpr int64_t kRowAlign = 16;   // every expert's row block is padded to a multiple of this

enum class Isa { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };
enum class WeightType { bf16, int8 };
// Formats of the left (activation) operand that kernels consume.
//   F32: fp32 rows. BF16: bf16 rows. U8: per-row quantized u8 = round(a / s) + 128 with scale s.
enum class ActFormat { f32, bf16, u8 };

// One expert's packed matrix W[n, k] (n, k already padded).
struct PackedView {
  const uint8_t* data;
  int64_t n;
  int64_t k;
  const float* scale;     // int8 only: per-output-channel scale s_w[n]
  const int32_t* colsum;  // int8 only: sum_k q[n][k], used to undo the +128 activation shift
  WeightType type;

  int64_t group() const { return type == WeightType::bf16 ? 2 : 4; }
  int64_t rows_per_panel() const { return k / group(); }
  const uint8_t* panel(int64_t p) const { return data + p * rows_per_panel() * kRowBytes; }
};

// Left operand A[rows, ld] of a product, rows padded (with zeros) to a multiple of kRowAlign.
struct Act {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  const uint8_t* u8 = nullptr;
  const float* scale = nullptr;  // u8 format: per-row scale
  int64_t rows = 0;              // valid rows
  int64_t ld = 0;                // elements per row
};

// c[m][j] = sum_k A[m][k] W[32 p0 + j][k] for panels p0 <= p < p1 (forward product "x W^T").
using GemmNt = void (*)(const Act& a, const PackedView& w, int64_t p0, int64_t p1, float* c,
                        int64_t ldc);
// c[m][j] = sum_n A[m][n] W[n][col0 + j] for 0 <= j < cols, cols a multiple of 32 (transposed
// product "g W").
using GemmNn = void (*)(const Act& a, const PackedView& w, int64_t col0, int64_t cols, float* c,
                        int64_t ldc);
// h[i] = silu(gate[i]) * up[i] for one row of the interleaved gate/up output.
using SiluMulRow = void (*)(const float* gu, float* h, int64_t inter);
// SwiGLU backward for one row; returns <v, h> (the routing-weight gradient) and writes h if h_out
// is not null.
using SwigluBackwardRow = float (*)(const float* gu, const float* v, float weight, float* d,
                                    int64_t inter, float* h_out);

// Writes an fp32 row (times optional per-column scales) as an operand row; see generic::store_row.
using StoreRow = void (*)(ActFormat format, const float* src, int64_t n, const float* col_scale,
                          int64_t ld, void* dst, float* row_scale);

struct Kernels {
  ActFormat nt_format;
  ActFormat nn_format;
  GemmNt nt;
  GemmNn nn;
  // The forward product on nn_format operands: the backward's products on transposed weight copies
  // (the same as nt wherever nt_format == nn_format).
  GemmNt nt_on_nn_format;
  SiluMulRow silu_mul;
  SwigluBackwardRow swiglu_backward;
  StoreRow store_row;
  void (*release)();  // called once per thread after a parallel loop of products (AMX), or null
};

// ---------------------------------------------------------------- CPU features

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;       // F + BW + DQ + VL + VNNI, with OS support for zmm state
  bool avx512_bf16 = false;  // avx512 plus AVX512_BF16 (vdpbf16ps)
  bool amx = false;          // AMX-TILE + BF16 + INT8 in CPUID and tile state enabled in XCR0
};

inline uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

inline CpuFeatures detect_cpu() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;
  const bool tile_state = (xcr0 & 0x60000) == 0x60000;
  f.avx2 = ymm_state && fma && ((b >> 5) & 1);
  const bool avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
             avx512vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && vnni;
  const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  f.amx = f.avx512 && tile_state && amx_bf16 && amx_tile && amx_int8;
  // Subleaf 1 exists if subleaf 0 reports a maximum subleaf >= 1 (in EAX).
  if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
    f.avx512_bf16 = f.avx512 && ((a >> 5) & 1);
  return f;
}

// Linux requires each process to ask for the AMX tile-data state before its first tile instruction.
inline bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// ---------------------------------------------------------------- scheduling

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs f(i) for 0 <= i < n on torch's intra-op threads (torch.get_num_threads()). Tasks are handed
// out dynamically; each output element is written by exactly one task, so results do not depend
// on the schedule.
// If given, on_exit() runs on every thread after its last task.
template <class F>
void run_tasks(int64_t n, const F& f, void (*on_exit)() = nullptr) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
    if (on_exit != nullptr) on_exit();
  });
}

// Calls f(std::integral_constant<int, R>) with R = min(rows, Max) for rows >= 1: the ISA kernels'
// row-block templates (registers hold R rows of accumulators) for a runtime row count.
template <int Max, class F>
DPO_INLINE void with_rows(int64_t rows, const F& f) {
  if constexpr (Max == 1) {
    f(std::integral_constant<int, 1>());
  } else if (rows >= Max) {
    f(std::integral_constant<int, Max>());
  } else {
    with_rows<Max - 1>(rows, f);
  }
}

}  // namespace dpo_moe
