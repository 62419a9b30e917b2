// CPU kernel for one Mixture-of-Experts layer with SwiGLU experts and top-k routing:
//   y[t] = sum_j w[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = topk_ids[t,j]
// plus its backward for frozen experts (gradients for x and for the routing weights w).
//
// Forward:
//   1. counting sort of the (token, slot) pairs by expert; each expert gets a block of rows padded
//      to a multiple of 16 (AMX tile height),
//   2. gather the token rows into that order, converted to the format the kernels consume,
//   3. tasks (expert, 8 gate/up panel pairs = 256 columns of I): fused gate + up product, epilogue
//      h = silu(g) * u after each pair; an optional per-pair delta [dg_in | du_in] is added to g
//      and u before the SiLU (the caller's LoRA on gate/up), and h is optionally returned (fp32;
//      these hook tensors hold the pairs sorted by expert, see Routing),
//   4. tasks (expert, 16 panels = 512 columns of H): down product into o (one row per pair),
//   5. y[t] = sum_j w[t,j] o[row(t,j)] in fp32, slots in order (deterministic, no atomics).
// Backward (v = W_down^T dy, dL/dw = <dy, o> = <v, h>):
//   1. gather dy rows per pair; tasks (expert, 128 columns of I): v = dy W_down (transposed product),
//   2. per pair: dL/dw = <v, h> (int8: h quantized as the down product read it), dh = w v (+ grad_h,
//      the caller's gradient of the returned h),
//      dg = dh u silu'(g), du = dh silu(g); [dg | du] is optionally returned (the delta's gradient),
//   3. tasks (expert, 128 columns of H): dx_pair = [dg | du] W_gate_up (transposed product),
//   4. dx[t] = sum_j dx_pair[row(t,j)].
// The transposed products of steps 1 and 3 run on the forward packing (see the ISA headers), or, if
// the caller packed them, on transposed copies of the weights as forward products (faster, twice
// the weight memory).
// The forward saves the gate/up outputs (2 I values per pair, delta included) for step 2 of the
// backward: in bf16 where the backward's operands are bf16 anyway (AMX), else in fp32.

#include <torch/extension.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include <sys/mman.h>

#include "moe_common.h"
#include "moe_gemm_amx.h"
#include "moe_gemm_avx2.h"
#include "moe_gemm_avx512.h"
#include "moe_gemm_generic.h"

namespace dpo_moe {
namespace {

// ---------------------------------------------------------------- ISA selection

Isa parse_isa(const std::string& name) {
  if (name == "amx") return Isa::amx;
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "portable") return Isa::portable;
  TORCH_CHECK(false, "unknown MoE kernel ISA '", name, "' (expected amx|avx512|avx2|portable)");
}

bool isa_supported(Isa isa) {
  const CpuFeatures f = detect_cpu();
  switch (isa) {
    case Isa::amx: return f.amx;
    case Isa::avx512: return f.avx512;
    case Isa::avx2: return f.avx2;
    default: return true;
  }
}

// ---------------------------------------------------------------- AVX-512 bf16 forward kernel

// The avx512 path has two forward products for bf16 weights: fp32 FMA on weights widened on the
// fly (fp32 activations) and vdpbf16ps (activations rounded to bf16, needs AVX512_BF16). Which one
// is faster depends on the CPU, so the first use measures both.
enum class Bf16Nt { fma, dpbf16 };

constexpr const char* kBf16NtEnv = "DPO_LLAMA_MOE_AVX512_BF16";

const char* bf16_nt_name(Bf16Nt kernel) { return kernel == Bf16Nt::fma ? "fma" : "dpbf16"; }

// Best of 5 timings, in seconds, of each kernel on one thread for a synthetic product: 64 rows x
// 2048 inputs x 8 panels (256 outputs), a few ms in all. The 1 MB of weights stays in L2 cache, so
// this compares the arithmetic, which decides at large batches (small ones are bound by DRAM
// bandwidth either way). The kernels alternate, so that clock changes affect both alike.
// Returns {"fma": s} without AVX512_BF16, {"fma": s, "dpbf16": s} with it.
std::map<std::string, double> time_bf16_nt_kernels() {
  constexpr int64_t kRows = 64, kInputs = 2048, kPanels = 8, kRepeats = 5;
  // Row strides of an odd number of cache lines, like the kernel's buffers (see row_stride).
  constexpr int64_t kLdF32 = kInputs + 16, kLdBf16 = kInputs + 32;
  const CpuFeatures features = detect_cpu();
  TORCH_CHECK(features.avx512, "timing the AVX-512 bf16 kernels needs AVX-512");
  std::vector<uint16_t> weights(kPanels * kPanel * kInputs), a_bf16(kRows * kLdBf16, 0);
  std::vector<float> a_f32(kRows * kLdF32, 0.0f), c(kRows * kPanels * kPanel);
  // Small multiples of 1/64, exact in bf16, so that both kernels see the same values.
  const auto value = [](int64_t i) { return float(i % 13 - 6) / 64.0f; };
  for (int64_t i = 0; i < int64_t(weights.size()); ++i) weights[i] = generic::f32_to_bf16(value(i));
  for (int64_t m = 0; m < kRows; ++m)
    for (int64_t k = 0; k < kInputs; ++k) {
      a_f32[m * kLdF32 + k] = value(m * 7 + k);
      a_bf16[m * kLdBf16 + k] = generic::f32_to_bf16(value(m * 7 + k));
    }
  const PackedView w{reinterpret_cast<const uint8_t*>(weights.data()), kPanels * kPanel, kInputs,
                     nullptr, nullptr, WeightType::bf16};
  Act a32, a16;
  a32.f32 = a_f32.data();
  a16.bf16 = a_bf16.data();
  a32.rows = a16.rows = kRows;
  a32.ld = kLdF32;
  a16.ld = kLdBf16;
  const auto seconds = [&](GemmNt nt, const Act& a) {
    const auto start = std::chrono::steady_clock::now();
    nt(a, w, 0, kPanels, c.data(), kPanels * kPanel);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::map<std::string, double> best{{"fma", INFINITY}};
  if (features.avx512_bf16) best["dpbf16"] = INFINITY;
  for (int64_t rep = 0; rep < kRepeats; ++rep) {
    best["fma"] = std::min(best["fma"], seconds(gemm_nt_bf16_avx512, a32));
    if (features.avx512_bf16)
      best["dpbf16"] = std::min(best["dpbf16"], seconds(gemm_nt_bf16_dpbf16_avx512, a16));
  }
  return best;
}

// The timings above, measured on first use and kept for the life of the process.
const std::map<std::string, double>& bf16_nt_timings() {
  static const std::map<std::string, double> timings = time_bf16_nt_kernels();
  return timings;
}

// "fma" or "dpbf16" (`what` names where the name came from in the error of any other).
Bf16Nt parse_bf16_nt(const std::string& name, const std::string& what) {
  if (name == "fma") return Bf16Nt::fma;
  TORCH_CHECK_VALUE(name == "dpbf16", what, "='", name,
                    "': expected fma or dpbf16 (or unset: the faster one on this CPU)");
  TORCH_CHECK(detect_cpu().avx512_bf16, what, "=dpbf16, but this CPU has no AVX512_BF16 (vdpbf16ps)");
  return Bf16Nt::dpbf16;
}

// The avx512 bf16 forward kernel: $DPO_LLAMA_MOE_AVX512_BF16 (fma|dpbf16) if set, read at every
// call, else the faster one in bf16_nt_timings(). fma wherever AVX512_BF16 is missing.
Bf16Nt avx512_bf16_nt() {
  const char* forced = std::getenv(kBf16NtEnv);
  if (forced != nullptr && *forced != '\0') return parse_bf16_nt(forced, kBf16NtEnv);
  if (!detect_cpu().avx512_bf16) return Bf16Nt::fma;
  const auto& timings = bf16_nt_timings();
  return timings.at("dpbf16") < timings.at("fma") ? Bf16Nt::dpbf16 : Bf16Nt::fma;
}

// ---------------------------------------------------------------- kernel tables

// The kernels of `isa` for weights of `type`; `nt` picks the avx512 products (ignored elsewhere).
Kernels kernels_for(Isa isa, WeightType type, Bf16Nt nt) {
  const bool bf16 = type == WeightType::bf16;
  // Transposed weight copies exist for bf16 only, so the int8 tables have no nt_on_nn_format.
  switch (isa) {
    case Isa::amx:
      if (bf16)
        return {ActFormat::bf16, ActFormat::bf16, gemm_nt_bf16_amx, gemm_nn_bf16_amx,
                gemm_nt_bf16_amx, silu_mul_avx512, swiglu_backward_avx512, store_row_avx512,
                release_tiles_amx};
      return {ActFormat::u8, ActFormat::bf16, gemm_nt_int8_amx, gemm_nn_int8_amx, nullptr,
              silu_mul_avx512, swiglu_backward_avx512, store_row_avx512, release_tiles_amx};
    case Isa::avx512:
      // With vdpbf16ps the backward's operands are bf16 too, as on AMX, for either weight type.
      if (nt == Bf16Nt::dpbf16) {
        if (bf16)
          return {ActFormat::bf16, ActFormat::bf16, gemm_nt_bf16_dpbf16_avx512,
                  gemm_nn_bf16_dpbf16_avx512, gemm_nt_bf16_dpbf16_avx512, silu_mul_avx512,
                  swiglu_backward_avx512, store_row_avx512, nullptr};
        return {ActFormat::u8, ActFormat::bf16, gemm_nt_int8_avx512, gemm_nn_int8_dpbf16_avx512,
                nullptr, silu_mul_avx512, swiglu_backward_avx512, store_row_avx512, nullptr};
      }
      if (bf16)
        return {ActFormat::f32, ActFormat::f32, gemm_nt_bf16_avx512, gemm_nn_bf16_avx512,
                gemm_nt_bf16_avx512, silu_mul_avx512, swiglu_backward_avx512, store_row_avx512,
                nullptr};
      return {ActFormat::u8, ActFormat::f32, gemm_nt_int8_avx512, gemm_nn_int8_avx512, nullptr,
              silu_mul_avx512, swiglu_backward_avx512, store_row_avx512, nullptr};
    case Isa::avx2:
      if (bf16)
        return {ActFormat::f32, ActFormat::f32, gemm_nt_bf16_avx2, gemm_nn_bf16_avx2,
                gemm_nt_bf16_avx2, silu_mul_avx2, swiglu_backward_avx2, store_row_avx2, nullptr};
      return {ActFormat::u8, ActFormat::f32, gemm_nt_int8_avx2, gemm_nn_int8_avx2, nullptr,
              silu_mul_avx2, swiglu_backward_avx2, store_row_avx2, nullptr};
    default:
      if (bf16)
        return {ActFormat::f32, ActFormat::f32, gemm_nt_bf16_portable, gemm_nn_bf16_portable,
                gemm_nt_bf16_portable, silu_mul_portable, swiglu_backward_portable,
                store_row_portable, nullptr};
      return {ActFormat::u8, ActFormat::f32, gemm_nt_int8_portable, gemm_nn_int8_portable,
              nullptr, silu_mul_portable, swiglu_backward_portable, store_row_portable, nullptr};
  }
}

// ---------------------------------------------------------------- packed weights

// The packed weights of all experts for one projection: data [E, N/32, K/G, 32, G] plus, for int8,
// per-channel scales [E, N] and integer column sums [E, N].
struct PackedExperts {
  at::Tensor data, scale, colsum;
  WeightType type;
  int64_t n, k;

  PackedExperts(const at::Tensor& d, const at::Tensor& s, const at::Tensor& c)
      : data(d), scale(s), colsum(c) {
    TORCH_CHECK(d.dim() == 5 && d.is_contiguous() && d.size(3) == kPanel,
                "packed weights must be a contiguous 5-D tensor [E, N/32, K/G, 32, G]");
    TORCH_CHECK(d.scalar_type() == at::kBFloat16 || d.scalar_type() == at::kChar,
                "packed weights must be bfloat16 or int8");
    type = d.scalar_type() == at::kBFloat16 ? WeightType::bf16 : WeightType::int8;
    n = d.size(1) * kPanel;
    k = d.size(2) * d.size(4);
    TORCH_CHECK(d.size(4) == (type == WeightType::bf16 ? 2 : 4), "packed weights have the wrong group size");
    if (type == WeightType::int8)
      TORCH_CHECK(s.numel() == d.size(0) * n && c.numel() == d.size(0) * n && s.is_contiguous() &&
                      c.is_contiguous() && s.scalar_type() == at::kFloat && c.scalar_type() == at::kInt,
                  "int8 weights need contiguous per-channel scale (float32) and colsum (int32) tensors");
  }

  PackedView expert(int64_t e) const {
    const int64_t bytes = n * k * (type == WeightType::bf16 ? 2 : 1);
    const bool q = type == WeightType::int8;
    return {static_cast<const uint8_t*>(data.data_ptr()) + e * bytes, n, k,
            q ? scale.data_ptr<float>() + e * n : nullptr,
            q ? colsum.data_ptr<int32_t>() + e * n : nullptr, type};
  }
};

// ---------------------------------------------------------------- routing

// Rows of all per-pair buffers: expert e owns rows [row_begin[e], row_begin[e] + count[e]),
// followed by zero padding up to a multiple of kRowAlign. The hook tensors of the LoRA path have
// no padding: expert e owns their rows [sorted_begin[e], sorted_begin[e] + count[e]), the pairs in
// the order of a stable sort by expert id (as the caller groups them).
struct Routing {
  int64_t tokens = 0, top_k = 0;
  std::vector<int64_t> count, row_begin, sorted_begin, row_of_pair, pair_of_row;
  std::vector<int64_t> active;  // experts with at least one pair
  int64_t rows = 0;

  // The hook-tensor row of routed row `row` of expert e.
  int64_t sorted_row(int64_t row, int64_t e) const { return sorted_begin[e] + row - row_begin[e]; }
};

Routing route(const at::Tensor& ids, int64_t experts) {
  Routing r;
  r.tokens = ids.size(0);
  r.top_k = ids.size(1);
  const int64_t pairs = r.tokens * r.top_k;
  const int64_t* id = ids.data_ptr<int64_t>();
  r.count.assign(experts, 0);
  for (int64_t i = 0; i < pairs; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < experts, "topk_ids value ", id[i], " out of range [0, ",
                experts, ")");
    ++r.count[id[i]];
  }
  r.row_begin.assign(experts, 0);
  r.sorted_begin.assign(experts, 0);
  for (int64_t e = 0; e < experts; ++e) {
    r.row_begin[e] = r.rows;
    if (e > 0) r.sorted_begin[e] = r.sorted_begin[e - 1] + r.count[e - 1];
    r.rows += round_up(r.count[e], kRowAlign);
    if (r.count[e] > 0) r.active.push_back(e);
  }
  r.row_of_pair.resize(pairs);
  r.pair_of_row.assign(r.rows, -1);
  std::vector<int64_t> cursor = r.row_begin;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t row = cursor[id[i]]++;
    r.row_of_pair[i] = row;
    r.pair_of_row[row] = i;
  }
  return r;
}

// ---------------------------------------------------------------- memory

// Every call allocates buffers of many megabytes: the per-pair operands and products (a few hundred
// MB at 2048 tokens for DeepSeek-V2-Lite shapes), the saved gate/up products (140 MB there), y and
// grad_x. Fresh memory costs a page fault per 4 KB page plus the kernel zeroing it, about as much as
// the products themselves, so every buffer of 2 MB or more comes from a cache instead (like
// PyTorch's CUDA caching allocator): a freed tensor's block goes back to the cache and is handed out
// again, and the cache keeps its blocks for the life of the process. Blocks are 2 MB aligned and
// backed by transparent huge pages.
// Sizes are rounded up to a size class (below), and a request takes the smallest free block of its
// class up to twice its class, or maps a new one. So calls of varying token counts (length-grouped
// batches) share blocks across classes. Requests that keep growing (token counts rising batch after
// batch) would pile up free blocks too small to serve them: when a request must map a new block and
// the cache would then hold more than twice the most bytes ever in use at once (one call's buffers
// plus the gate/up products saved by the forwards awaiting their backward), the free blocks smaller
// than the request are unmapped first, smallest first. Calls that repeat their sizes never map, so
// never unmap either.
class BlockCache {
 public:
  // The process-wide cache. Never destroyed: tensors may be freed after static destructors ran.
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache;
    return *cache;
  }

  at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    const int64_t bytes = numel * int64_t(c10::elementSize(dtype));
    const auto options = at::TensorOptions().dtype(dtype);
    if (bytes < kHugePage) return at::empty(shape, options);
    int64_t block_bytes = 0;
    uint8_t* block = take(bytes, &block_bytes);
    return at::from_blob(
        block, shape, [this, block, block_bytes](void*) { give_back(block, block_bytes); },
        options);
  }

 private:
  static constexpr int64_t kHugePage = int64_t(1) << 21;

  // Size classes: whole 2 MB pages, rounded up to a multiple of step = 2^j where 16 step > pages
  // >= 8 step (exact below 16 pages, at most 1/8 more above), so that the varying row counts of
  // calls with about the same number of tokens share blocks.
  static int64_t size_class(int64_t bytes) {
    const int64_t pages = ceil_div(bytes, kHugePage);
    int64_t step = 1;
    while (16 * step <= pages) step *= 2;
    return round_up(pages, step) * kHugePage;
  }

  // The smallest free block of at least the request's class and at most twice it, else a new one,
  // after unmapping the smallest free blocks too small to serve it while the cache would map more
  // than twice the most bytes ever in use at once.
  uint8_t* take(int64_t bytes, int64_t* block_bytes) {
    const int64_t wanted = size_class(bytes);
    std::lock_guard<std::mutex> guard(mutex_);
    const auto fit = free_.lower_bound(wanted);
    uint8_t* block;
    if (fit == free_.end() || fit->first > 2 * wanted) {
      peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_ + wanted);
      while (!free_.empty() && free_.begin()->first < wanted &&
             free_bytes_ + live_bytes_ + wanted > 2 * peak_live_bytes_) {
        const auto smallest = free_.begin();
        munmap(smallest->second, size_t(smallest->first));
        free_bytes_ -= smallest->first;
        free_.erase(smallest);
      }
      *block_bytes = wanted;
      block = map_block(wanted);
    } else {
      *block_bytes = fit->first;
      block = fit->second;
      free_bytes_ -= fit->first;
      free_.erase(fit);
    }
    live_bytes_ += *block_bytes;
    peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
    return block;
  }

  void give_back(uint8_t* block, int64_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    free_.emplace(bytes, block);
    free_bytes_ += bytes;
    live_bytes_ -= bytes;
  }

  // Maps `bytes` (a multiple of 2 MB) at a 2 MB boundary: maps 2 MB more, then unmaps the
  // unaligned head and the tail.
  static uint8_t* map_block(int64_t bytes) {
    const size_t length = size_t(bytes + kHugePage);
    void* mapped = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(mapped != MAP_FAILED, "could not allocate ", bytes, " bytes for the MoE kernel");
    uint8_t* base = static_cast<uint8_t*>(mapped);
    uint8_t* block = reinterpret_cast<uint8_t*>(
        round_up(int64_t(reinterpret_cast<uintptr_t>(base)), kHugePage));
    if (block > base) munmap(base, size_t(block - base));
    if (block + bytes < base + length) munmap(block + bytes, size_t(base + length - block - bytes));
    madvise(block, size_t(bytes), MADV_HUGEPAGE);
    return block;
  }

  std::mutex mutex_;
  std::multimap<int64_t, uint8_t*> free_;  // block size in bytes -> block
  int64_t free_bytes_ = 0, live_bytes_ = 0, peak_live_bytes_ = 0;
};

at::Tensor empty_cached(at::IntArrayRef shape, at::ScalarType dtype) {
  return BlockCache::instance().empty(shape, dtype);
}

// ---------------------------------------------------------------- activation buffers

// Elements per row of a per-row buffer of `cols` columns: rows span an odd number of cache lines.
// The padded widths (2048 bf16 = 4 KB, 2048 fp32 = 8 KB) would put all 16 rows of an AMX tile in
// the same L1 cache set, so that the rows of consecutive tile loads and stores evict each other;
// with an odd number of lines per row, 16 consecutive rows fall into 16 different sets (measured:
// about a quarter faster products at 192 rows per expert).
int64_t row_stride(int64_t cols, int64_t element_size) {
  constexpr int64_t kLine = 64;
  const int64_t lines = round_up(cols * element_size, kLine) / kLine;
  return (lines | 1) * kLine / element_size;
}

// One operand for all routed rows, stored in the format a kernel consumes (row stride ld >= cols,
// see row_stride; the columns beyond cols are zero).
struct ActBuffer {
  ActFormat format;
  int64_t ld;
  at::Tensor values, scale;

  ActBuffer(ActFormat f, int64_t rows, int64_t cols)
      : format(f), ld(row_stride(cols, f == ActFormat::f32 ? 4 : f == ActFormat::bf16 ? 2 : 1)) {
    const auto dtype = f == ActFormat::f32 ? at::kFloat : f == ActFormat::bf16 ? at::kBFloat16
                                                                               : at::kByte;
    values = empty_cached({rows, ld}, dtype);
    if (f == ActFormat::u8) scale = at::empty({rows}, at::TensorOptions().dtype(at::kFloat));
  }

  void* row(int64_t r) const {
    return static_cast<uint8_t*>(values.data_ptr()) + r * ld * values.element_size();
  }
  float* row_scale(int64_t r) const {
    return format == ActFormat::u8 ? scale.data_ptr<float>() + r : nullptr;
  }

  Act view(int64_t row0, int64_t rows) const {
    Act a;
    a.rows = rows;
    a.ld = ld;
    if (format == ActFormat::f32) a.f32 = static_cast<const float*>(row(row0));
    if (format == ActFormat::bf16) a.bf16 = static_cast<const uint16_t*>(row(row0));
    if (format == ActFormat::u8) {
      a.u8 = static_cast<const uint8_t*>(row(row0));
      a.scale = row_scale(row0);
    }
    return a;
  }
};

// Runs body(row) for every row of the per-pair buffers, in tasks of 16 rows.
template <class Body>
void for_rows(const Routing& r, const Body& body) {
  constexpr int64_t kChunk = 16;
  run_tasks(ceil_div(r.rows, kChunk), [&](int64_t task) {
    for (int64_t row = task * kChunk; row < std::min(r.rows, (task + 1) * kChunk); ++row) body(row);
  });
}

// Fills `buf` with one row per routed row: row_source(row, &n, &col_scale) returns the fp32 source
// of n elements (nullptr for padding rows), optionally times per-column scales.
template <class Source>
void fill_rows(const Kernels& kern, ActBuffer& buf, const Routing& r, const Source& row_source) {
  for_rows(r, [&](int64_t row) {
    int64_t n = 0;
    const float* col_scale = nullptr;
    const float* src = row_source(row, &n, &col_scale);
    kern.store_row(buf.format, src, n, col_scale, buf.ld, buf.row(row), buf.row_scale(row));
  });
}

// Fills `buf` with the token rows of all routed rows, src[token(row)] (zero rows for padding),
// from src = x or grad_y ([T, n], float32 or bfloat16), times the per-column scales col_scale(row)
// if `scaled`. Unscaled bf16 rows are copied as they are into a bf16 buffer; all others are
// converted from fp32 (bf16 to fp32 is exact, so both give the same operand).
template <class ColScale>
void gather_tokens(const Kernels& kern, ActBuffer& buf, const Routing& r, const at::Tensor& src,
                   bool scaled, const ColScale& col_scale) {
  const int64_t n = src.size(1);
  if (src.scalar_type() == at::kBFloat16 && buf.format == ActFormat::bf16 && !scaled) {
    const uint16_t* rows = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
    for_rows(r, [&](int64_t row) {
      uint16_t* dst = static_cast<uint16_t*>(buf.row(row));
      const int64_t pair = r.pair_of_row[row];
      const int64_t copied = pair < 0 ? 0 : n;
      if (copied > 0) std::memcpy(dst, rows + (pair / r.top_k) * n, n * 2);
      std::fill(dst + copied, dst + buf.ld, uint16_t(0));
    });
    return;
  }
  const at::Tensor f32 = src.to(at::kFloat);
  const float* rows = f32.data_ptr<float>();
  fill_rows(kern, buf, r, [&](int64_t row, int64_t* count, const float** scale) -> const float* {
    const int64_t pair = r.pair_of_row[row];
    if (pair < 0) return nullptr;
    *count = n;
    if (scaled) *scale = col_scale(row);
    return rows + (pair / r.top_k) * n;
  });
}

// dst[0..n) = src[0..n) widened from bf16 to fp32; returns dst.
const float* widen_bf16(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = generic::bf16_to_f32(src[i]);
  return dst;
}

// Output columns per transposed-product task: wide enough that each task reads contiguous runs of
// every weight panel (a 32-column strip would touch only 2 KB per panel), and that AMX's split
// product (experts with few rows) prepares its activations for many columns at once: 512 columns
// made it about 1.06x faster than 128 at qlen 32 and 128; the rewriting products took the same
// time with either (AMX int8 rewrites 128 columns at a time).
constexpr int64_t kNnCols = 512;

// Panels per forward-product task. An expert's panels are contiguous in memory, so a task reads one
// run of 16 panels (2 MB of bf16 gate/up weights) that the prefetches follow from panel to panel;
// one panel per task would hand consecutive panels to different threads, and the first panel of a
// task is read before its products start (measured at qlen 2048: 16 panels about 3 % faster than 8).
constexpr int64_t kNtPanels = 16;

// Runs body(e, block) for every active expert e and block in [0, blocks).
template <class Body>
void for_expert_blocks(const Kernels& kern, const Routing& r, int64_t blocks, const Body& body) {
  run_tasks(
      int64_t(r.active.size()) * blocks,
      [&](int64_t task) { body(r.active[task / blocks], task % blocks); }, kern.release);
}

// out[rows of e] = a W_e^T for every active expert e (forward product, w.n columns, row stride ldc).
// Task (e, b): panels [b kNtPanels, (b + 1) kNtPanels) of W_e.
// `nt` is kern.nt or, on nn_format operands, kern.nt_on_nn_format.
void product_nt(const Kernels& kern, GemmNt nt, const Routing& r, const ActBuffer& a,
                const PackedExperts& w, float* out, int64_t ldc) {
  const int64_t panels = w.n / kPanel;
  for_expert_blocks(kern, r, ceil_div(panels, kNtPanels), [&](int64_t e, int64_t b) {
    const int64_t row0 = r.row_begin[e], p0 = b * kNtPanels;
    nt(a.view(row0, r.count[e]), w.expert(e), p0, std::min(panels, p0 + kNtPanels),
            out + row0 * ldc + p0 * kPanel, ldc);
  });
}

// out[rows of e] = a W_e for every active expert e (transposed product, w.k columns, row stride
// ldc).
// With the optional transposed copy w_t (W^T packed like a forward weight) this is the forward
// product on w_t; otherwise task (e, b) rewrites columns [b kNnCols, (b + 1) kNnCols) of W_e.
void product_nn(const Kernels& kern, const Routing& r, const ActBuffer& a, const PackedExperts& w,
                const std::optional<PackedExperts>& w_t, float* out, int64_t ldc) {
  if (w_t) return product_nt(kern, kern.nt_on_nn_format, r, a, *w_t, out, ldc);
  for_expert_blocks(kern, r, ceil_div(w.k, kNnCols), [&](int64_t e, int64_t b) {
    const int64_t row0 = r.row_begin[e], col0 = b * kNnCols;
    kern.nn(a.view(row0, r.count[e]), w.expert(e), col0, std::min(kNnCols, w.k - col0),
            out + row0 * ldc + col0, ldc);
  });
}

// out[t] = sum_j coef(t, j) * rows[row(t, j)][0..n), summed in slot order.
template <class Coef>
void combine(const Routing& r, const float* rows, int64_t ld, int64_t n, float* out,
             const Coef& coef) {
  run_tasks(r.tokens, [&](int64_t t) {
    float* dst = out + t * n;
    std::fill(dst, dst + n, 0.0f);
    for (int64_t j = 0; j < r.top_k; ++j) {
      const float c = coef(t, j);
      const float* src = rows + r.row_of_pair[t * r.top_k + j] * ld;
      for (int64_t i = 0; i < n; ++i) dst[i] += c * src[i];
    }
  });
}

// ---------------------------------------------------------------- forward / backward

void check_inputs(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous float32 or bfloat16 [T, H] tensor");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  ids.size(0) == x.size(0),
              "topk_ids must be a contiguous int64 [T, k] tensor");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.sizes() == ids.sizes(),
              "topk_weights must be a contiguous float32 tensor shaped like topk_ids");
}

// The kernels an ISA name asks for: amx | avx512 | avx2 | portable, the avx512 one with its products
// as "avx512:fma" or "avx512:dpbf16" (cpu_moe names them so at the forward and hands its backward the
// same name, whatever $DPO_LLAMA_MOE_AVX512_BF16 says by then); a bare "avx512" takes
// avx512_bf16_nt() now.
Kernels prepare(const std::string& isa_name, const PackedExperts& gate_up,
                const PackedExperts& down) {
  const size_t colon = isa_name.find(':');
  const Isa isa = parse_isa(isa_name.substr(0, colon));
  TORCH_CHECK_VALUE(colon == std::string::npos || isa == Isa::avx512, "MoE kernel ISA '", isa_name,
                    "': only avx512 names its products");
  TORCH_CHECK(isa_supported(isa), "MoE kernel ISA '", isa_name, "' is not supported by this CPU");
  if (isa == Isa::amx)
    TORCH_CHECK(request_amx_permission(), "Linux refused the AMX tile state: ", std::strerror(errno));
  TORCH_CHECK(gate_up.type == down.type && gate_up.k == down.n && down.k == gate_up.n / 2 &&
                  gate_up.data.size(0) == down.data.size(0),
              "packed gate/up and down weights do not match");
  const Bf16Nt nt = colon != std::string::npos ? parse_bf16_nt(isa_name.substr(colon + 1), isa_name)
                    : isa == Isa::avx512          ? avx512_bf16_nt()
                                                  : Bf16Nt::fma;
  return kernels_for(isa, gate_up.type, nt);
}

// The optional transposed copy of `w` (an empty tensor when absent): W^T packed like a forward
// weight, so that the backward's products a W run as forward products (kern.nt_on_nn_format).
// bf16 only.
std::optional<PackedExperts> transposed_copy(const at::Tensor& packed_t, const PackedExperts& w) {
  if (packed_t.numel() == 0) return std::nullopt;
  const at::Tensor none;
  PackedExperts w_t(packed_t, none, none);
  TORCH_CHECK(w.type == WeightType::bf16 && w_t.type == WeightType::bf16,
              "transposed weight copies are supported for bf16 weights only");
  TORCH_CHECK(w_t.data.size(0) == w.data.size(0) && w_t.n == w.k && w_t.k == w.n,
              "a transposed weight copy does not match its weights");
  return w_t;
}

// How the forward keeps the gate/up products for the backward: rows of 2 I values on row stride
// ld, in the precision of the backward's operands: bf16 where those are bf16 (AMX), which halves
// the largest write of the forward; else fp32.
struct SavedGateUp {
  bool bf16;
  int64_t ld;
  at::ScalarType dtype;
};

SavedGateUp saved_gate_up(const Kernels& kern, int64_t inter) {
  const bool bf16 = kern.nn_format == ActFormat::bf16;
  return {bf16, row_stride(2 * inter, bf16 ? 2 : 4), bf16 ? at::kBFloat16 : at::kFloat};
}

// The optional per-pair tensor of a hook: nullptr if empty, else its data, checked to be a
// contiguous float32 [pairs, cols] tensor (rows in expert-sorted order, see Routing).
const float* pair_rows_or_null(const at::Tensor& t, int64_t pairs, int64_t cols, const char* name) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == pairs && t.size(1) == cols, name, " must be [", pairs,
              ", ", cols, "] (pairs sorted by expert, padded intermediate columns), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 tensor, got ", t.scalar_type());
  return t.data_ptr<float>();
}

// Adds the caller's delta to rows [0, rows) of one expert's gate/up product c for panel pair p
// (interleaved [gate 32 | up 32], row stride ldc): g += dg_in, u += du_in, where row m of the
// expert's delta rows is [dg_in (inter) | du_in (inter)].
void add_gate_up_delta(float* c, int64_t ldc, int64_t rows, int64_t p, const float* delta,
                       int64_t inter) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* dg = delta + m * 2 * inter + p * kPanel;
    const float* du = dg + inter;
    float* g = c + m * ldc;
    float* u = g + kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      g[j] += dg[j];
      u[j] += du[j];
    }
  }
}

// Gate/up task epilogue for rows [0, rows) of one expert and panel p: h = silu(g) * u written to
// the down product's operand (fp32 side buffer for u8, which needs whole rows to quantize) and,
// if h_out (the expert's rows of the returned h) is given, to columns [32 p, 32 p + 32) of its
// row m (row stride inter).
void store_hidden(const Kernels& kern, const float* gu, int64_t ld_gu, int64_t rows, int64_t p,
                  ActBuffer& ha, float* h_f32, int64_t inter, int64_t row0, float* h_out) {
  float h[kPanel];
  for (int64_t m = 0; m < rows; ++m) {
    kern.silu_mul(gu + m * ld_gu, h, kPanel);
    if (h_out != nullptr) std::memcpy(h_out + m * inter + p * kPanel, h, sizeof(h));
    if (ha.format == ActFormat::u8) {
      std::memcpy(h_f32 + (row0 + m) * inter + p * kPanel, h, sizeof(h));
    } else {
      void* dst = static_cast<uint8_t*>(ha.row(row0 + m)) + p * kPanel * ha.values.element_size();
      kern.store_row(ha.format, h, kPanel, nullptr, kPanel, dst, nullptr);
    }
  }
}

std::vector<at::Tensor> moe_forward(const at::Tensor& x, const at::Tensor& ids,
                                    const at::Tensor& weights, const at::Tensor& w13,
                                    const at::Tensor& s13, const at::Tensor& c13,
                                    const at::Tensor& w2, const at::Tensor& s2,
                                    const at::Tensor& c2, const std::string& isa_name,
                                    bool save_for_backward, const at::Tensor& gu_delta,
                                    bool return_hidden) {
  check_inputs(x, ids, weights);
  const PackedExperts gate_up(w13, s13, c13), down(w2, s2, c2);
  const Kernels kern = prepare(isa_name, gate_up, down);
  const int64_t hidden = x.size(1), inter = gate_up.n / 2, hidden_pad = down.n;
  TORCH_CHECK(hidden <= hidden_pad, "x has more columns than the packed weights");
  const Routing r = route(ids, w13.size(0));
  const int64_t pair_count = r.tokens * r.top_k;
  const float* delta = pair_rows_or_null(gu_delta, pair_count, 2 * inter, "gu_delta");
  at::Tensor h_out = return_hidden ? empty_cached({pair_count, inter}, at::kFloat) : at::Tensor();
  float* h_out_ptr = return_hidden ? h_out.data_ptr<float>() : nullptr;

  ActBuffer xa(kern.nt_format, r.rows, hidden_pad);
  gather_tokens(kern, xa, r, x, false, [](int64_t) -> const float* { return nullptr; });

  // Gate/up products, kept for the backward if it needs them (see SavedGateUp), returned as a
  // [rows, 2 I] view.
  const SavedGateUp saved = saved_gate_up(kern, inter);
  at::Tensor gu = save_for_backward ? empty_cached({r.rows, saved.ld}, saved.dtype) : at::Tensor();
  const bool gu_in_place = save_for_backward && !saved.bf16;
  float* gu_f32 = gu_in_place ? gu.data_ptr<float>() : nullptr;
  uint16_t* gu_b16 = save_for_backward && saved.bf16
                         ? reinterpret_cast<uint16_t*>(gu.data_ptr<at::BFloat16>())
                         : nullptr;
  ActBuffer ha(kern.nt_format, r.rows, inter);
  at::Tensor h_f32 = kern.nt_format == ActFormat::u8 ? empty_cached({r.rows, inter}, at::kFloat)
                                                     : at::Tensor();
  float* h_f32_ptr = h_f32.defined() ? h_f32.data_ptr<float>() : nullptr;
  // Task (e, b): gate/up panel pairs [b kNtPanels / 2, (b + 1) kNtPanels / 2) of expert e, i.e.
  // columns p of h for each pair p, with the delta (if given) and the SiLU epilogue right after
  // each pair's product. The products go straight to fp32 gu, else to a local buffer (then to bf16
  // gu if saved), so the saved products include the delta.
  const int64_t pairs = inter / kPanel, pairs_per_task = kNtPanels / 2;
  for_expert_blocks(kern, r, ceil_div(pairs, pairs_per_task), [&](int64_t e, int64_t b) {
    const int64_t row0 = r.row_begin[e], rows = r.count[e], sorted0 = r.sorted_begin[e];
    const float* delta_e = delta != nullptr ? delta + sorted0 * 2 * inter : nullptr;
    float* h_out_e = h_out_ptr != nullptr ? h_out_ptr + sorted0 * inter : nullptr;
    std::vector<float> local(gu_in_place ? 0 : round_up(rows, kRowAlign) * 2 * kPanel);
    for (int64_t p = b * pairs_per_task; p < std::min(pairs, (b + 1) * pairs_per_task); ++p) {
      float* c = gu_in_place ? gu_f32 + row0 * saved.ld + p * 2 * kPanel : local.data();
      const int64_t ldc = gu_in_place ? saved.ld : 2 * kPanel;
      kern.nt(xa.view(row0, rows), gate_up.expert(e), 2 * p, 2 * p + 2, c, ldc);
      if (delta_e != nullptr) add_gate_up_delta(c, ldc, rows, p, delta_e, inter);
      store_hidden(kern, c, ldc, rows, p, ha, h_f32_ptr, inter, row0, h_out_e);
      if (gu_b16 != nullptr)
        for (int64_t m = 0; m < rows; ++m)
          kern.store_row(ActFormat::bf16, c + m * ldc, 2 * kPanel, nullptr, 2 * kPanel,
                         gu_b16 + (row0 + m) * saved.ld + p * 2 * kPanel, nullptr);
    }
  });
  if (ha.format == ActFormat::u8)
    fill_rows(kern, ha, r, [&](int64_t row, int64_t* n, const float**) -> const float* {
      *n = inter;
      return r.pair_of_row[row] < 0 ? nullptr : h_f32_ptr + row * inter;
    });
  else
    for_rows(r, [&](int64_t row) {  // padding rows must be zero for the AMX row tiles
      if (r.pair_of_row[row] < 0) kern.store_row(ha.format, nullptr, 0, nullptr, ha.ld, ha.row(row), nullptr);
    });

  const int64_t ld_o = row_stride(hidden_pad, 4);
  at::Tensor o = empty_cached({r.rows, ld_o}, at::kFloat);
  float* o_ptr = o.data_ptr<float>();
  product_nt(kern, kern.nt, r, ha, down, o_ptr, ld_o);

  at::Tensor y = empty_cached({r.tokens, hidden}, at::kFloat);
  const float* w = weights.data_ptr<float>();
  combine(r, o_ptr, ld_o, hidden, y.data_ptr<float>(),
          [&](int64_t t, int64_t j) { return w[t * r.top_k + j]; });
  return {y, save_for_backward ? gu.narrow(1, 0, 2 * inter) : gu, h_out};
}

// d += the SwiGLU backward of dh = grad_h for one row (the backward is linear in dh), through
// `scratch` (2 inter values).
void add_hidden_grad(const Kernels& kern, const float* g_u, const float* grad_h, int64_t inter,
                     float* d, float* scratch) {
  kern.swiglu_backward(g_u, grad_h, 1.0f, scratch, inter, nullptr);
  for (int64_t i = 0; i < 2 * inter; ++i) d[i] += scratch[i];
}

// One row of [dg | du], interleaved per panel in d ([dg 32 | du 32 | ...]), written to out as
// [dg (inter) | du (inter)].
void deinterleave_gate_up(const float* d, int64_t inter, float* out) {
  for (int64_t p = 0; p < inter / kPanel; ++p) {
    std::memcpy(out + p * kPanel, d + p * 2 * kPanel, kPanel * sizeof(float));
    std::memcpy(out + inter + p * kPanel, d + p * 2 * kPanel + kPanel, kPanel * sizeof(float));
  }
}

// dL/dw of one pair for int8 weights: <v, h> with h as the down product read it. The forward
// quantized h to u8 with a per-row scale s, and the output is linear in w with that quantized h as
// coefficient, so this is the exact derivative of the computed output (<v, h> with the unquantized
// h, what swiglu_backward returns, is off by about 2 %). h (from swiglu_backward, computed as the
// forward's epilogue computes it) is quantized by the forward's store_row into `row` (inter bytes).
float routing_weight_grad_u8(const Kernels& kern, const float* h, const float* v, int64_t inter,
                             uint8_t* row) {
  float scale = 0.0f, lanes[kPanel] = {}, dot = 0.0f;
  kern.store_row(ActFormat::u8, h, inter, nullptr, inter, row, &scale);
  for (int64_t p = 0; p < inter; p += kPanel)  // kPanel sums, so that the loop vectorises
    for (int j = 0; j < kPanel; ++j) lanes[j] += v[p + j] * float(int(row[p + j]) - 128);
  for (int j = 0; j < kPanel; ++j) dot += lanes[j];
  return dot * scale;
}

std::vector<at::Tensor> moe_backward(const at::Tensor& grad_y, const at::Tensor& ids,
                                     const at::Tensor& weights, const at::Tensor& gu,
                                     const at::Tensor& w13, const at::Tensor& s13,
                                     const at::Tensor& c13, const at::Tensor& w2,
                                     const at::Tensor& s2, const at::Tensor& c2,
                                     const at::Tensor& w13_t, const at::Tensor& w2_t,
                                     const std::string& isa_name, const at::Tensor& grad_h,
                                     bool return_grad_gate_up) {
  check_inputs(grad_y, ids, weights);
  const PackedExperts gate_up(w13, s13, c13), down(w2, s2, c2);
  const Kernels kern = prepare(isa_name, gate_up, down);
  const std::optional<PackedExperts> gate_up_t = transposed_copy(w13_t, gate_up);
  const std::optional<PackedExperts> down_t = transposed_copy(w2_t, down);
  const bool int8 = gate_up.type == WeightType::int8;
  const int64_t hidden = grad_y.size(1), inter = gate_up.n / 2, hidden_pad = down.n;
  TORCH_CHECK(hidden <= hidden_pad, "grad_y has more columns than the packed weights");
  const Routing r = route(ids, w13.size(0));
  const SavedGateUp saved = saved_gate_up(kern, inter);
  // Any row stride: the forward returns a view of rows padded to saved.ld, and a saved-tensor hook
  // (e.g. torch.autograd.graph.save_on_cpu) may hand back a compact copy.
  TORCH_CHECK(gu.dim() == 2 && gu.size(0) == r.rows && gu.size(1) == 2 * inter &&
                  gu.stride(1) == 1 && gu.stride(0) >= 2 * inter && gu.scalar_type() == saved.dtype,
              "saved gate/up activations do not match the routing");
  const int64_t ld_gu = gu.stride(0);
  const int64_t pair_count = r.tokens * r.top_k;
  const float* grad_h_ptr = pair_rows_or_null(grad_h, pair_count, inter, "grad_h");
  at::Tensor dgu = return_grad_gate_up ? empty_cached({pair_count, 2 * inter}, at::kFloat)
                                       : at::Tensor();
  float* dgu_ptr = return_grad_gate_up ? dgu.data_ptr<float>() : nullptr;

  // v = dy W_down. For int8 the per-channel scale of W_down (channel = n) multiplies dy.
  const int64_t* id = ids.data_ptr<int64_t>();
  ActBuffer dya(kern.nn_format, r.rows, hidden_pad);
  gather_tokens(kern, dya, r, grad_y, int8, [&](int64_t row) {
    return down.expert(id[r.pair_of_row[row]]).scale;
  });
  at::Tensor v = empty_cached({r.rows, inter}, at::kFloat);
  float* v_ptr = v.data_ptr<float>();
  product_nn(kern, r, dya, down, down_t, v_ptr, inter);

  // Per row: routing-weight gradient and [dg | du] (interleaved per panel like gu; from dh = w v
  // plus grad_h if given), written as the operand of the next product (times the int8 channel
  // scales of W_gate_up) and, if asked for, unscaled to dgu.
  at::Tensor grad_w = at::empty({r.tokens, r.top_k}, at::TensorOptions().dtype(at::kFloat));
  const float* w = weights.data_ptr<float>();
  float* gw_ptr = grad_w.data_ptr<float>();
  const float* gu_f32 = saved.bf16 ? nullptr : gu.data_ptr<float>();
  const uint16_t* gu_b16 =
      saved.bf16 ? reinterpret_cast<const uint16_t*>(gu.data_ptr<at::BFloat16>()) : nullptr;
  ActBuffer da(kern.nn_format, r.rows, 2 * inter);
  constexpr int64_t kChunk = 16;
  run_tasks(ceil_div(r.rows, kChunk), [&](int64_t task) {
    std::vector<float> d(2 * inter), d_h(grad_h_ptr != nullptr ? 2 * inter : 0);
    std::vector<float> gu_row(saved.bf16 ? 2 * inter : 0);
    std::vector<float> h(int8 ? inter : 0);
    std::vector<uint8_t> h_row(int8 ? inter : 0);
    for (int64_t row = task * kChunk; row < std::min(r.rows, (task + 1) * kChunk); ++row) {
      const int64_t pair = r.pair_of_row[row];
      if (pair < 0) {
        kern.store_row(da.format, nullptr, 0, nullptr, da.ld, da.row(row), da.row_scale(row));
        continue;
      }
      const float* g_u = saved.bf16
                             ? widen_bf16(gu_b16 + row * ld_gu, 2 * inter, gu_row.data())
                             : gu_f32 + row * ld_gu;
      const float* v_row = v_ptr + row * inter;
      const float v_dot_h = kern.swiglu_backward(g_u, v_row, w[pair], d.data(), inter,
                                                 int8 ? h.data() : nullptr);
      gw_ptr[pair] = int8 ? routing_weight_grad_u8(kern, h.data(), v_row, inter, h_row.data()) : v_dot_h;
      const int64_t sorted = r.sorted_row(row, id[pair]);
      if (grad_h_ptr != nullptr)
        add_hidden_grad(kern, g_u, grad_h_ptr + sorted * inter, inter, d.data(), d_h.data());
      if (dgu_ptr != nullptr) deinterleave_gate_up(d.data(), inter, dgu_ptr + sorted * 2 * inter);
      const float* col_scale = int8 ? gate_up.expert(id[pair]).scale : nullptr;
      kern.store_row(da.format, d.data(), 2 * inter, col_scale, da.ld, da.row(row),
                     da.row_scale(row));
    }
  });

  const int64_t ld_dxp = row_stride(hidden_pad, 4);
  at::Tensor dxp = empty_cached({r.rows, ld_dxp}, at::kFloat);
  float* dxp_ptr = dxp.data_ptr<float>();
  product_nn(kern, r, da, gate_up, gate_up_t, dxp_ptr, ld_dxp);

  at::Tensor grad_x = empty_cached({r.tokens, hidden}, at::kFloat);
  combine(r, dxp_ptr, ld_dxp, hidden, grad_x.data_ptr<float>(),
          [](int64_t, int64_t) { return 1.0f; });
  return {grad_x, grad_w, dgu};
}

// ISAs this CPU runs, best first. AMX is listed only if a forked child really ran tile code and this
// process holds the tile-state permission (Linux refuses it to a process with a thread whose signal
// stack is too small for the tile state; the single-threaded child would not see that).
std::vector<std::string> available_isas() {
  const CpuFeatures f = detect_cpu();
  std::vector<std::string> isas;
  if (f.amx && amx_runs() && request_amx_permission()) isas.push_back("amx");
  if (f.avx512) isas.push_back("avx512");
  if (f.avx2) isas.push_back("avx2");
  isas.push_back("portable");
  return isas;
}

// Peak rates of one thread: a loop of 12 independent chains of one instruction, AVX-512 FMA
// (2 flops per fp32 lane) or vdpbf16ps (4 flops per lane: two bf16 products added to fp32).
DPO_TARGET_AVX512 double fma_peak_one_thread(int64_t iterations) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sink = 0.0f;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  TORCH_CHECK(std::isfinite(sink), "FMA peak loop overflowed");
  return double(iterations) * 12 * 16 * 2 / seconds / 1e9;
}

DPO_TARGET_AVX512_BF16 double dpbf16_peak_one_thread(int64_t iterations) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i));
  // bf16 1.0 and 2^-24: every step adds 2 * 2^-24 per lane, far from overflow.
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sink = 0.0f;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  TORCH_CHECK(std::isfinite(sink), "vdpbf16ps peak loop overflowed");
  return double(iterations) * 12 * 16 * 4 / seconds / 1e9;
}

// Aggregate peak over torch.get_num_threads() threads (each runs one of the loops above):
// `instruction` is "fma" or "dpbf16".
double peak_gflops(const std::string& instruction, int64_t iterations) {
  const CpuFeatures f = detect_cpu();
  TORCH_CHECK_VALUE(instruction == "fma" || instruction == "dpbf16",
                    "peak_gflops: unknown instruction '", instruction, "' (expected fma or dpbf16)");
  const bool dpbf16 = instruction == "dpbf16";
  TORCH_CHECK(dpbf16 ? f.avx512_bf16 : f.avx512, "the ", instruction, " peak probe needs ",
              dpbf16 ? "AVX512_BF16" : "AVX-512");
  const int64_t threads = at::get_num_threads();
  std::vector<double> rates(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      rates[i] = dpbf16 ? dpbf16_peak_one_thread(iterations) : fma_peak_one_thread(iterations);
  });
  double total = 0.0;
  for (double rate : rates) total += rate;
  return total;
}

}  // namespace
}  // namespace dpo_moe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU Mixture-of-Experts expert kernel (bf16 / int8 weights; AMX, AVX-512, AVX2, C++)";
  // The GIL is released while the kernel runs: other Python threads (data loading, say) go on.
  m.def("moe_forward", &dpo_moe::moe_forward, py::call_guard<py::gil_scoped_release>(),
        "MoE forward (x, topk_ids, topk_weights, 6 packed tensors, isa, save_for_backward, gu_delta, "
        "return_hidden); gu_delta: empty or float32 [T k, 2 I'] (pairs sorted by expert) added to "
        "[gate | up] before the SiLU; returns (y, saved gate/up outputs or None, h = silu(g) u as "
        "float32 [T k, I'] in the same order, or None)");
  m.def("moe_backward", &dpo_moe::moe_backward, py::call_guard<py::gil_scoped_release>(),
        "MoE backward (grad_y, topk_ids, topk_weights, saved gate/up, 6 packed tensors, 2 transposed "
        "copies, isa, grad_h, return_grad_gate_up); grad_h: empty or float32 [T k, I'] (pairs "
        "sorted by expert) added to dL/dh; returns (grad_x, grad_weights, [dg | du] as float32 "
        "[T k, 2 I'] in the same order, or None)");
  m.def("available_isas", &dpo_moe::available_isas, "ISAs this CPU runs, best first");
  m.def("avx512_bf16_kernel",
        [] { return std::string(dpo_moe::bf16_nt_name(dpo_moe::avx512_bf16_nt())); },
        "the avx512 forward kernel for bf16 weights now: fma or dpbf16");
  m.def("avx512_bf16_timings", &dpo_moe::bf16_nt_timings,
        "seconds of each avx512 bf16 forward kernel on the selection micro-benchmark");
  m.def("peak_gflops", &dpo_moe::peak_gflops,
        "measured peak GFLOP/s of an instruction loop on torch.get_num_threads() threads: "
        "\"fma\" (AVX-512 fp32 FMA) or \"dpbf16\" (vdpbf16ps)");
  m.def("empty_cached",
        [](const std::vector<int64_t>& shape, at::ScalarType dtype) {
          return dpo_moe::empty_cached(shape, dtype);
        },
        "uninitialized tensor from the kernel's cache of huge-page blocks (2 MB or more; smaller ones come "
        "from torch.empty); its block returns to the cache when the tensor is freed");
}
