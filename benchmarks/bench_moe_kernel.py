"""Benchmark of the CPU MoE expert kernel (``dpo_llama.models.cpu_moe``) at DeepSeek-V2-Lite shapes.

One MoE layer: E = 64 experts, top-k = 6, hidden H = 2048, expert intermediate I = 1408, bf16 weights
(about 1.1 GB), bf16 activations, random top-k routing with a fixed seed (uniform-ish expert load).

Compared, each at every ``--qlen`` and in the same run (the machine is shared and noisy, so every
figure is also given as a ratio against baselines measured in that run):

* ours-bf16 / ours-int8: ``cpu_moe`` with the best ISA this CPU runs (``selected_isa()``; on ``avx512``
  the header also names the bf16 forward kernel, ``avx512_bf16_kernel()``, with its selection timings),
* ours-bf16-T: ours-bf16 packed with ``transposed_copy=True`` (the backward runs forward products on
  transposed weight copies: twice the weight memory; the forward is the same code as ours-bf16),
* torch-loop: a plain PyTorch per-expert loop (gather rows, three matmuls, ``index_add_``), autograd
  for the backward,
* kt-bf16: kt-kernel's BF16 MoE (``AMXBF16_MOE`` forward; ``AMXBF16_SFT_MOE_SkipLoRA``, its
  frozen-expert SFT path, for forward + backward), only if ``kt-kernel`` is installed; nan otherwise.
  kt-kernel ships one build per instruction set and picks one for the CPU; this script loads the same
  one (named in the output): ``amx``, or without AMX an AVX-512 build, whose ``AMXBF16_*`` classes run
  AVX-512 BF16 code.
  Its SFT path packs a transposed copy of every weight for its backward besides the forward copy,
  so ours-bf16-T is the comparison at equal weight memory.

The "weights GB" column is the memory each method keeps for the layer's weights: the packed tensors'
bytes for ours, the growth of this process's resident memory while kt-kernel's objects load their
weights (forward object | SFT object), the unpacked bf16 weights' bytes for torch-loop.

FLOPs: forward = 6 qlen k H I (gate, up, down: 2 flops per multiply-add); forward + backward =
12 qlen k H I (the backward computes W_down^T dy and [dg | du] W_gate_up; no weight gradients).
The fp32 peak is measured with an AVX-512 FMA loop in the extension on every thread (or, without
AVX-512, a 2048^3 fp32 torch matmul as a proxy), the ``vdpbf16ps`` peak likewise (nan without
AVX512_BF16). Without AMX, no product of bf16 weights runs faster than the larger of the two, so
``fwd_vs_kt_ceiling`` (kt-kernel's forward time over the time of the forward's FLOPs at that peak)
bounds ``fwd_vs_kt`` on such a machine (nan on an AMX machine or without kt-kernel).

Ends with one machine-readable line for the largest qlen::

    RESULT fwd_vs_torch=<x> fwd_vs_kt=<x or nan> fwdbwd_vs_kt=<x or nan> fwd_peak_frac=<x> \\
        fwdbwd_equal_memory_vs_kt=<x or nan> fwd_dpbf16_peak_frac=<x or nan> fwd_vs_kt_ceiling=<x or nan>

(``fwdbwd_vs_kt`` is ours-bf16, one packed copy of the weights; ``fwdbwd_equal_memory_vs_kt`` is
ours-bf16-T, which keeps as many weight bytes as kt-kernel's SFT path.)

Usage: ``python benchmarks/bench_moe_kernel.py [--qlen 1 32 128 512 2048] [--threads 2]``
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_llama.models.cpu_moe import (
    PackedExperts,
    available_isas,
    avx512_bf16_kernel,
    cpu_moe,
    load_extension,
    selected_isa,
)

EXPERTS, TOP_K, HIDDEN, INTER = 64, 6, 2048, 1408
METHODS = ("ours-bf16", "ours-bf16-T", "ours-int8", "torch-loop", "kt-bf16")
PAUSE_S = 0.2  # idle time before each method's calls (see median_seconds)
SETTLE_S = 2.0  # idle time after the first calls at a new qlen (see measure)


def make_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 expert weights gate/up ``[E, I, H]``, down ``[E, H, I]`` (std 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) * 0.02).bfloat16()
    up = (torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.02).bfloat16()
    return gate, up, down


def make_batch(qlen: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``x`` (bf16), random distinct top-k expert ids, softmax routing weights, output grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(qlen, HIDDEN, generator=gen).bfloat16()
    ids = torch.rand(qlen, EXPERTS, generator=gen).argsort(dim=1)[:, :TOP_K].contiguous()
    weights = torch.rand(qlen, TOP_K, generator=gen).softmax(dim=1)
    grad = torch.randn(qlen, HIDDEN, generator=gen).bfloat16()
    return x, ids, weights, grad


def torch_loop(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch MoE: per expert, gather its rows, SwiGLU, scatter-add the weighted output."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=EXPERTS).tolist()
    token = order // TOP_K
    slot_weight = weights.flatten()[order].to(x.dtype)
    y = torch.zeros_like(x)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = token[start : start + count]
        xe = x[rows]
        h = F.silu(xe @ gate[e].T) * (xe @ up[e].T)
        y.index_add_(0, rows, (h @ down[e].T) * slot_weight[start : start + count, None])
        start += count
    return y


def run_kt_task(cpu_infer: object, task: object) -> None:
    """Runs one kt-kernel task on its thread pool and waits for it."""
    cpu_infer.submit(task)
    cpu_infer.sync()


class KtKernel:
    """kt-kernel's BF16 MoE (forward) and frozen-expert SFT MoE (forward + backward) on the same weights.

    The package's Python side needs extra dependencies, so the compiled extension is loaded directly.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, max_len: int, threads: int):
        ext = _load_kt_extension()
        self.variant = ext.variant
        self.cpu_infer = ext.CPUInfer(threads)
        self.weights = (gate.contiguous(), up.contiguous(), down.contiguous())
        self.identity_map = torch.arange(EXPERTS, dtype=torch.int64)
        config = ext.moe.MOEConfig(EXPERTS, TOP_K, HIDDEN, INTER, 0)
        config.max_len = max_len
        config.gate_proj, config.up_proj, config.down_proj = (w.data_ptr() for w in self.weights)
        config.pool = self.cpu_infer.backend_
        before = resident_gb()
        self.moe = ext.moe.AMXBF16_MOE(config)
        run_kt_task(self.cpu_infer, self.moe.load_weights_task(self.identity_map.data_ptr()))
        self.forward_gb = resident_gb() - before
        before = resident_gb()
        self.sft = KtSFT(ext, self.cpu_infer, self.weights, max_len)
        self.sft_gb = resident_gb() - before

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        qlen = torch.tensor([x.shape[0]], dtype=torch.int32)
        weights32 = weights.float().contiguous()
        task = self.moe.forward_task(qlen.data_ptr(), TOP_K, ids.data_ptr(), weights32.data_ptr(), x.data_ptr(),
                                     y.data_ptr(), False)
        run_kt_task(self.cpu_infer, task)
        return y

    def forward_backward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> tuple:
        return self.sft.forward_backward(x, ids, weights, grad)


class KtSFT:
    """kt-kernel's AMX BF16 SFT MoE on the same weights, loaded: ``AMXBF16_SFT_MOE_SkipLoRA`` (frozen experts)
    without ``lora``, else ``AMXBF16_SFT_MOE`` with the bf16 adapters ``lora`` (``{gate,up,down}_lora_{a,b}`` in
    that order, ``[E, r, in]`` / ``[E, out, r]``, scaling ``lora_alpha / r``; kept and updated by the caller).
    """

    def __init__(self, ext: object, cpu_infer: object, weights: tuple[torch.Tensor, ...], max_len: int,
                 lora: dict[str, torch.Tensor] | None = None, lora_alpha: float = 1.0):
        self.cpu_infer, self.weights, self.lora = cpu_infer, weights, lora
        self.identity_map = torch.arange(EXPERTS, dtype=torch.int64)
        config = ext.moe.MOESFTConfig()
        config.expert_num, config.num_experts_per_tok, config.hidden_size = EXPERTS, TOP_K, HIDDEN
        config.intermediate_size = INTER
        config.lora_rank = 0 if lora is None else lora["gate_lora_a"].shape[1]
        config.lora_alpha, config.lora_dropout = lora_alpha, 0.0
        config.max_cache_depth, config.max_len, config.layer_idx = 1, max_len, 0
        config.gate_proj, config.up_proj, config.down_proj = (w.data_ptr() for w in weights)
        config.physical_to_logical_map = self.identity_map.data_ptr()
        config.pool = cpu_infer.backend_
        for name, tensor in (lora or {}).items():
            setattr(config, name, tensor.data_ptr())
        self.moe = ext.moe.AMXBF16_SFT_MOE_SkipLoRA(config) if lora is None else ext.moe.AMXBF16_SFT_MOE(config)
        self.lora_grads = {name: torch.zeros_like(tensor) for name, tensor in (lora or {}).items()}
        run_kt_task(self.cpu_infer, self.moe.load_weights_task())

    def forward_backward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> tuple:
        """One training step: ``y``, ``dL/dx``, ``dL/dw`` (the adapters' gradients land in ``lora_grads``).
        With adapters it first re-reads them, as kt-kernel's trainer does after every optimizer step."""
        if self.lora is not None:
            self.moe.update_lora_weights(*(tensor.data_ptr() for tensor in self.lora.values()))
        for tensor in self.lora_grads.values():
            tensor.zero_()
        lora_grads = [tensor.data_ptr() for tensor in self.lora_grads.values()] or [0] * 6
        y, grad_x = torch.empty_like(x), torch.empty_like(x)
        grad_w = torch.zeros(weights.shape, dtype=torch.float32)
        qlen = torch.tensor([x.shape[0]], dtype=torch.int64)
        weights32 = weights.float().contiguous()
        run_kt_task(self.cpu_infer, self.moe.forward_sft_task(qlen.data_ptr(), TOP_K, ids.data_ptr(),
                                                              weights32.data_ptr(), x.data_ptr(), y.data_ptr(), True))
        run_kt_task(self.cpu_infer, self.moe.backward_task(grad.data_ptr(), grad_x.data_ptr(), *lora_grads,
                                                           grad_w.data_ptr(), 0, 0, 0))
        return y, grad_x, grad_w


def resident_gb() -> float:
    """This process's resident memory in GB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def packed_gb(packed: PackedExperts) -> float:
    """Bytes of all tensors of a packed layer, in GB."""
    return sum(value.nbytes for value in vars(packed).values() if isinstance(value, torch.Tensor)) / 1e9


def _load_kt_extension() -> object:
    """The build of kt-kernel's extension that kt-kernel itself picks for this CPU (raises ImportError if absent).

    kt-kernel ships one build per instruction set (``amx``, ``avx512_bf16``, ...); its ``_cpu_detect`` module
    (standard library only) names the one for this CPU, or the one ``KT_KERNEL_CPU_VARIANT`` forces. The
    ``AMXBF16_*`` classes of the non-AMX builds run AVX-512 BF16 code (their log says ``backend=AVX512-BF16``).
    """
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or spec.origin is None:
        raise ImportError("kt-kernel is not installed")
    package = os.path.dirname(spec.origin)
    variant = _load_module("kt_cpu_detect", os.path.join(package, "_cpu_detect.py")).detect_cpu_features()
    if variant == "avx2":
        raise ImportError("kt-kernel's BF16 MoE needs AVX-512 (its variant here: avx2)")
    library = glob.glob(os.path.join(package, f"_kt_kernel_ext_{variant}.*.so"))
    if not library:
        raise ImportError(f"kt-kernel has no {variant} build")
    module = _load_module("kt_kernel_ext", library[0])
    module.variant = variant
    return module


def _load_module(name: str, path: str) -> object:
    """Imports the module file (Python or extension) at ``path`` under ``name``."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of ``repeats`` consecutive calls of each function, after one warm-up call.

    Each function's calls start ``PAUSE_S`` after the previous function's last call: kt-kernel's worker
    threads keep spinning on every core for about 50 ms after each of its calls, and the calls that
    followed them ran up to a third slower (measured for our forward at qlen 512 and 2048).
    """
    medians = {}
    for name, fn in fns.items():
        time.sleep(PAUSE_S)
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    return medians


def fma_peak_gflops() -> tuple[float, str]:
    """Measured fp32 FMA peak of this machine on ``torch.get_num_threads()`` threads."""
    if "avx512" in available_isas():
        return max(load_extension().peak_gflops("fma", 30_000_000) for _ in range(3)), "AVX-512 FMA loop"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = min(median_seconds({"matmul": lambda: a @ b}, 3)["matmul"] for _ in range(2))
    return 2 * 2048**3 / seconds / 1e9, "fp32 torch matmul 2048^3 (proxy)"


def dpbf16_peak_gflops() -> float:
    """Measured ``vdpbf16ps`` peak on ``torch.get_num_threads()`` threads; nan without AVX512_BF16."""
    try:
        return max(load_extension().peak_gflops("dpbf16", 30_000_000) for _ in range(3))
    except RuntimeError:
        return math.nan


def avx512_bf16_summary() -> str:
    """The avx512 bf16 forward kernel in use and the selection micro-benchmark's timings (empty without AVX-512)."""
    if "avx512" not in available_isas():
        return ""
    timings = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in
                        sorted(load_extension().avx512_bf16_timings().items()))
    return f" avx512_bf16={avx512_bf16_kernel()} (micro-benchmark: {timings})"


def ours_fwd_bwd(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                 packed: PackedExperts) -> Callable[[], object]:
    def run() -> None:
        xg = x.detach().requires_grad_()
        wg = weights.detach().requires_grad_()
        cpu_moe(xg, ids, wg, packed).backward(grad)

    return run


def torch_fwd_bwd(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                  *experts: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        xg = x.detach().requires_grad_()
        wg = weights.detach().requires_grad_()
        torch_loop(xg, ids, wg, *experts).backward(grad)

    return run


def measure(qlen: int, setups: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """``{method: (forward seconds, forward+backward seconds)}`` (nan where unavailable)."""
    x, ids, weights, grad = make_batch(qlen)
    gate, up, down = setups["weights"]
    fwd = {
        "ours-bf16": lambda: cpu_moe(x, ids, weights, setups["bf16"]),
        "ours-bf16-T": lambda: cpu_moe(x, ids, weights, setups["bf16-T"]),
        "ours-int8": lambda: cpu_moe(x, ids, weights, setups["int8"]),
        "torch-loop": lambda: torch_loop(x, ids, weights, gate, up, down),
    }
    if setups["kt"] is not None:
        fwd["kt-bf16"] = lambda: setups["kt"].forward(x, ids, weights)
    fwd_bwd = {
        "ours-bf16": ours_fwd_bwd(x, ids, weights, grad, setups["bf16"]),
        "ours-bf16-T": ours_fwd_bwd(x, ids, weights, grad, setups["bf16-T"]),
        "ours-int8": ours_fwd_bwd(x, ids, weights, grad, setups["int8"]),
        "torch-loop": torch_fwd_bwd(x, ids, weights, grad, gate, up, down),
    }
    if setups["kt"] is not None:
        fwd_bwd["kt-bf16"] = lambda: setups["kt"].forward_backward(x, ids, weights, grad)
    # One untimed call of everything first: a new qlen's first calls map new buffers, and for a while
    # after them the first method timed ran up to 15 % slower (probably Linux's khugepaged collapsing
    # those buffers into huge pages in the background).
    with torch.no_grad():
        for fn in fwd.values():
            fn()
    for fn in fwd_bwd.values():
        fn()
    time.sleep(SETTLE_S)
    with torch.no_grad():
        fwd_times = median_seconds(fwd, repeats)
    totals = median_seconds(fwd_bwd, repeats)
    return {name: (fwd_times.get(name, math.nan), totals.get(name, math.nan)) for name in METHODS}


def weight_memory(setups: dict) -> dict[str, str]:
    """The "weights GB" column: ``{method: text}``."""
    memory = {"ours-bf16": packed_gb(setups["bf16"]), "ours-bf16-T": packed_gb(setups["bf16-T"]),
              "ours-int8": packed_gb(setups["int8"]),
              "torch-loop": sum(w.numel() * w.element_size() for w in setups["weights"]) / 1e9}
    column = {name: f"{gb:.2f}" for name, gb in memory.items()}
    kt = setups["kt"]
    column["kt-bf16"] = "nan" if kt is None else f"{kt.forward_gb:.2f} \\| {kt.sft_gb:.2f}"
    return column


def print_table(qlen: int, results: dict[str, tuple[float, float]], memory: dict[str, str]) -> None:
    fwd_flops, total_flops = 6 * qlen * TOP_K * HIDDEN * INTER, 12 * qlen * TOP_K * HIDDEN * INTER
    torch_fwd, kt_fwd = results["torch-loop"][0], results["kt-bf16"][0]
    kt_total = results["kt-bf16"][1]
    print(f"\nqlen={qlen}")
    print("| method | weights GB | fwd ms | fwd GFLOP/s | fwd tok/s | fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd tok/s "
          "| fwd vs torch | fwd vs kt | fwd+bwd vs kt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in METHODS:
        fwd, total = results[name]
        print(
            f"| {name} | {memory[name]} | {fwd * 1e3:.1f} | {fwd_flops / fwd / 1e9:.0f} | {qlen / fwd:.0f} | "
            f"{total * 1e3:.1f} | {total_flops / total / 1e9:.0f} | {qlen / total:.0f} | {torch_fwd / fwd:.2f} | "
            f"{kt_fwd / fwd:.2f} | {kt_total / total:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qlen", type=int, nargs="+", default=[1, 32, 128, 512, 2048], help="tokens per call")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and kt-kernel threads)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = parser.parse_args()
    args.qlen = sorted(args.qlen)  # the RESULT line reports the largest
    torch.set_num_threads(args.threads)
    load_extension()
    print(f"threads={args.threads} isa={selected_isa()}{avx512_bf16_summary()} available={available_isas()} "
          f"E={EXPERTS} k={TOP_K} H={HIDDEN} I={INTER}")
    weights = make_weights()
    setups = {
        "weights": weights,
        "bf16": PackedExperts.from_weights(*weights, "bf16"),
        "bf16-T": PackedExperts.from_weights(*weights, "bf16", transposed_copy=True),
        "int8": PackedExperts.from_weights(*weights, "int8"),
    }
    try:
        setups["kt"] = KtKernel(*weights, max_len=max(args.qlen), threads=args.threads)
        print(f"kt-kernel: its {setups['kt'].variant} build")
    except (ImportError, AttributeError, OSError) as error:
        print(f"kt-kernel: not measured ({error})")
        setups["kt"] = None
    peak, peak_source = fma_peak_gflops()
    print(f"fp32 FMA peak: {peak:.0f} GFLOP/s ({peak_source}, {args.threads} threads)")
    dpbf16_peak = dpbf16_peak_gflops()
    print(f"vdpbf16ps peak: {dpbf16_peak:.0f} GFLOP/s (AVX512_BF16 loop, {args.threads} threads)")
    memory = weight_memory(setups)
    last = {}
    for qlen in args.qlen:
        last = measure(qlen, setups, args.repeats)
        print_table(qlen, last, memory)
    print_result(args.qlen[-1], last, peak, dpbf16_peak)


def print_result(qlen: int, results: dict[str, tuple[float, float]], fma_peak: float, dpbf16_peak: float) -> None:
    """The RESULT line of the module docstring for the largest qlen's ``results``."""
    ours_fwd, ours_total = results["ours-bf16"]
    kt_fwd, kt_total = results["kt-bf16"]
    fwd_gflops = 6 * qlen * TOP_K * HIDDEN * INTER / 1e9
    best_peak = fma_peak if math.isnan(dpbf16_peak) else max(fma_peak, dpbf16_peak)
    ceiling = math.nan if selected_isa() == "amx" else kt_fwd * best_peak / fwd_gflops
    print(
        f"\nRESULT fwd_vs_torch={results['torch-loop'][0] / ours_fwd:.2f} fwd_vs_kt={kt_fwd / ours_fwd:.2f} "
        f"fwdbwd_vs_kt={kt_total / ours_total:.2f} fwd_peak_frac={fwd_gflops / ours_fwd / fma_peak:.2f} "
        f"fwdbwd_equal_memory_vs_kt={kt_total / results['ours-bf16-T'][1]:.2f} "
        f"fwd_dpbf16_peak_frac={fwd_gflops / ours_fwd / dpbf16_peak:.2f} fwd_vs_kt_ceiling={ceiling:.2f}"
    )


if __name__ == "__main__":
    main()
