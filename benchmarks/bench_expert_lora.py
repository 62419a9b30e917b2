"""Benchmark of LoRA on the routed experts (``lora_moe_routed_experts``) at DeepSeek-V2-Lite shapes.

One MoE layer as in ``bench_moe_kernel.py`` (E = 64 experts, top-6, H = 2048, I = 1408, bf16 weights,
bf16 activations, random routing with a fixed seed), run through ``dpo_llama.models.moe.RoutedExperts``,
the module the model trains, for one training step's forward + backward (gradients for the hidden states,
the routing weights and, with adapters, every ``lora_A`` / ``lora_B``):

* kernel: the ``"cpu_kernel"`` backend (best ISA here), no adapters,
* kernel+lora: the same with rank-``r`` adapters on every expert's gate, up and down projections (their
  products in PyTorch around the kernel: the gate/up delta goes in before the SiLU, h comes back out),
* torch+lora: the ``"torch"`` backend (bf16 weights, one expert at a time) with the same adapters,
* torch: the ``"torch"`` backend without adapters.

Every method makes one warm-up call and ``--repeats`` timed calls (median shown), the methods in turn, so
the ratios compare figures of the same run: "lora cost" is kernel+lora against kernel, "vs torch+lora" is
torch+lora's time over the row's.

Usage: ``python benchmarks/bench_expert_lora.py [--qlen 512 2048] [--rank 8 64] [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_moe_kernel import EXPERTS, HIDDEN, INTER, TOP_K, make_batch, make_weights, median_seconds  # noqa: E402

from dpo_llama.models.cpu_moe import selected_isa  # noqa: E402
from dpo_llama.models.moe import EXPERT_WEIGHTS, RoutedExperts  # noqa: E402

METHODS = ("kernel", "kernel+lora", "torch+lora", "torch")


def make_experts(weights: tuple[torch.Tensor, ...], backend: str, rank: int | None) -> RoutedExperts:
    """Frozen experts built on the meta device and filled with ``weights`` (packed on arrival for the kernel),
    with adapters of rank ``rank`` (B random, std 0.01) unless None."""
    with torch.device("meta"):
        experts = RoutedExperts(EXPERTS, HIDDEN, INTER, backend).requires_grad_(False)
    if rank is not None:
        experts.add_lora(rank, scaling=2.0)
    for name, tensor in zip(EXPERT_WEIGHTS, weights):
        experts.load_tensor(name, tensor)
    if rank is not None:
        with torch.no_grad():
            for adapters in experts.lora.values():
                adapters.lora_B.normal_(0, 0.01)
    return experts


def training_step(experts: RoutedExperts, batch: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One forward + backward through ``experts`` (fresh leaf inputs, adapter gradients cleared)."""
    x, ids, weights, grad = batch

    def step() -> None:
        experts.zero_grad(set_to_none=True)
        xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
        experts(xs, ids, ws).backward(grad)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qlen", type=int, nargs="+", default=[512, 2048], help="tokens per call")
    parser.add_argument("--rank", type=int, nargs="+", default=[8, 64], help="LoRA ranks r")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the kernel uses them too)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (median shown)")
    args = parser.parse_args()
    if min(args.qlen + args.rank) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--qlen, --rank, --repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    weights = make_weights()
    print(f"E={EXPERTS} k={TOP_K} H={HIDDEN} I={INTER}, bf16, {args.threads} threads, kernel ISA {selected_isa()}")
    for rank in args.rank:
        setups = {"kernel": ("cpu_kernel", None), "kernel+lora": ("cpu_kernel", rank),
                  "torch+lora": ("torch", rank), "torch": ("torch", None)}
        modules = {name: make_experts(weights, *setup) for name, setup in setups.items()}
        for qlen in args.qlen:
            batch = make_batch(qlen)
            times = median_seconds({name: training_step(m, batch) for name, m in modules.items()}, args.repeats)
            print(f"\nr = {rank}, qlen = {qlen}: forward + backward\n")
            print("| method | ms | tok/s | lora cost | vs torch+lora |\n|---|---|---|---|---|")
            for name in METHODS:
                seconds = times[name]
                cost = f"{seconds / times['kernel']:.2f}" if name.startswith("kernel") else ""
                print(f"| {name} | {seconds * 1e3:.1f} | {qlen / seconds:.0f} | {cost} | "
                      f"{times['torch+lora'] / seconds:.2f} |")


if __name__ == "__main__":
    main()
