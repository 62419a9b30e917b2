"""Micro-benchmark: the ceiling of the AMX 2 x 2-tile loop that the MoE kernel's products run.

The kernel's forward product (``gemm_nt`` in ``dpo_llama/csrc/moe_gemm_amx.h``) keeps 4 accumulator tiles
(2 row tiles x 2 column tiles of 16 x 16 fp32) and, per 32 values of k, loads 2 weight tiles and 2 activation
tiles and runs 4 TDPBF16PS. With 8 tile registers no blocking needs fewer tile loads per TDPBF16PS, so this
loop's rate bounds the kernel's products however fast the weights arrive. Measured on one thread, in the
kernel's instruction order, the cases in turn, each against the first line (same run):

* ``tdp only``: the 4 TDPBF16PS on tiles that stay loaded, i.e. the TMUL peak (the baseline),
* ``2 loads``: the 2 weight tiles reloaded every step, the activation tiles kept,
* ``4 loads, L1``: the kernel's loop, weights (16 KB) and activations (8 KB) rotating in L1,
* ``4 loads, L2``: the same with a weight panel of 128 KB and 1 MB of activations, as the kernel's products
  at qlen 2048 once the panel is in L2,
* ``4 loads, L2, + 6 DRAM lines``: the L2 case plus, every step, L2 prefetches (hint T2) of the next 6
  cache lines of a 256 MB buffer, as the kernel's products at qlen 2048 prefetch the next panel while
  computing on this one (128 KB over 6 passes of 64 steps: 5.3 lines per step),
* ``4 loads, L1, rows off by 16 B``: the L1 case with every tile row straddling two cache lines, which is
  what a buffer from plain ``malloc`` (16-byte aligned) gives; the kernel's buffers are 64-byte aligned.

GFLOP/s counts 4 x 16 x 16 x 32 multiply-adds (2 flops each) per step. Without AMX it says why and exits.

Usage: ``python benchmarks/bench_amx_tile_loop.py [--steps 2000000] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC_DIR = ROOT / "dpo_llama" / "csrc"
sys.path.insert(0, str(ROOT))

from torch.utils import cpp_extension

from dpo_llama.models.cpu_moe import available_isas

SOURCE = r"""
#include <chrono>
#include <vector>

#include "moe_gemm_amx.h"

using dpo_moe::amx::prefetch_lines;

// GFLOP/s of `steps` steps of the 2 x 2 tile loop. Weight tiles 6, 7 are reloaded every step from a
// ring of b_bytes if b_bytes > 0, activation tiles 4, 5 from a ring of a_bytes if a_bytes > 0
// (2 KB per step; sizes are powers of two). Both rings start `offset` bytes after a 64-byte boundary.
// Each step also prefetches the next `stream_lines` cache lines of a 256 MB buffer to L2, with the
// kernel's prefetch_lines.
DPO_TARGET_AMX double tile_loop(int64_t steps, int64_t a_bytes, int64_t b_bytes, int64_t offset,
                                int64_t stream_lines) {
  TORCH_CHECK(dpo_moe::request_amx_permission(), "the kernel refused AMX tile state");
  dpo_moe::amx::configure_tiles();
  std::vector<uint16_t> a((std::max<int64_t>(a_bytes, 2048) + 128) / 2, 0x3F80);
  std::vector<uint16_t> b((std::max<int64_t>(b_bytes, 2048) + 128) / 2, 0x3F80);
  const auto start_of = [offset](const std::vector<uint16_t>& v) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<const uint8_t*>(((p + 63) & ~uintptr_t(63)) + offset);
  };
  const uint8_t* pa = start_of(a);
  const uint8_t* pb = start_of(b);
  const int64_t a_mask = a_bytes / 2048 - 1, b_mask = b_bytes / 2048 - 1;
  constexpr int64_t kStreamBytes = int64_t(1) << 28;
  const int64_t stream_step = stream_lines * 64;
  std::vector<uint8_t> stream(stream_lines > 0 ? kStreamBytes + stream_step : 64, 1);
  int64_t streamed = 0;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, pa, 64);
  _tile_loadd(5, pa + 1024, 64);
  _tile_loadd(6, pb, 128);
  _tile_loadd(7, pb + 64, 128);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < steps; ++s) {
    if (b_bytes > 0) {
      const uint8_t* w = pb + (s & b_mask) * 2048;
      _tile_loadd(6, w, 128);
      _tile_loadd(7, w + 64, 128);
    }
    if (stream_lines > 0) {
      prefetch_lines(stream.data() + streamed, stream_step);
      streamed = (streamed + stream_step) % kStreamBytes;
    }
    if (a_bytes > 0) _tile_loadd(4, pa + (s & a_mask) * 2048, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (a_bytes > 0) _tile_loadd(5, pa + (s & a_mask) * 2048 + 1024, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);
  dpo_moe::amx::release_tiles();
  TORCH_CHECK(sink[0] > 0.0f, "tile loop produced no result");
  return double(steps) * 4 * 16 * 16 * 32 * 2 / seconds / 1e9;
}
"""

# name: (activation ring bytes, weight ring bytes (0 = not reloaded), offset from a 64-byte boundary,
# cache lines streamed from DRAM per step)
CASES = {
    "tdp only": (0, 0, 0, 0),
    "2 loads": (0, 16 * 1024, 0, 0),
    "4 loads, L1": (8 * 1024, 16 * 1024, 0, 0),
    "4 loads, L2": (1024 * 1024, 128 * 1024, 0, 0),
    "4 loads, L2, + 6 DRAM lines": (1024 * 1024, 128 * 1024, 0, 6),
    "4 loads, L1, rows off by 16 B": (8 * 1024, 16 * 1024, 16, 0),
}
FLOPS_PER_STEP = 4 * 16 * 16 * 32 * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2_000_000, help="loop steps per measurement")
    parser.add_argument("--repeats", type=int, default=15, help="measurements per case")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")
    if "amx" not in available_isas():
        print("skipped: this CPU (or its kernel) does not run AMX tile code")
        return
    ext = cpp_extension.load_inline("dpo_llama_amx_tile_loop", cpp_sources=[SOURCE], functions=["tile_loop"],
                                    extra_cflags=["-O3"], extra_include_paths=[str(CSRC_DIR)])
    rates = {name: [] for name in CASES}
    for _ in range(args.repeats):  # cases in turn, so that a change of the machine's state hits all alike
        for name, case in CASES.items():
            rates[name].append(ext.tile_loop(args.steps, *case))
    peak = statistics.median(rates["tdp only"])
    print("| loop (1 thread) | tile loads per 4 TDPBF16PS | GFLOP/s median | min | max | median vs tdp only "
          "| DRAM stream GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, values in rates.items():
        loads = sum(2 for size in CASES[name][:2] if size > 0)
        median = statistics.median(values)
        stream = median / FLOPS_PER_STEP * CASES[name][3] * 64  # GFLOP/s -> G steps/s -> GB/s
        print(f"| {name} | {loads} | {median:.0f} | {min(values):.0f} | {max(values):.0f} | {median / peak:.2f} "
              f"| {stream:.1f} |")

if __name__ == "__main__":
    main()
