"""Benchmark of LoRA on the routed experts (``lora_moe_routed_experts``) at DeepSeek-V2-Lite shapes.

One MoE layer as in ``bench_moe_kernel.py`` (E = 64 experts, top-6, H = 2048, I = 1408, bf16 weights,
bf16 activations, random routing with a fixed seed), run through ``dpo_llama.models.moe.RoutedExperts``,
the module the model trains, for one training step's forward + backward (gradients for the hidden states,
the routing weights and, with adapters, every ``lora_A`` / ``lora_B``):

* kernel: the ``"cpu_kernel"`` backend (best ISA here), no adapters,
* kernel+lora: the same with rank-``r`` adapters on every expert's gate, up and down projections (their
  products in PyTorch around the kernel: the gate/up delta goes in before the SiLU, h comes back out),
* torch+lora: the ``"torch"`` backend (bf16 weights, one expert at a time) with the same adapters,
* torch: the ``"torch"`` backend without adapters,
* kt+lora / kt: kt-kernel 0.7.2's SFT MoE (``AMXBF16_SFT_MOE`` with bf16 copies of the same adapters, the
  adapters' gradients in bf16; ``AMXBF16_SFT_MOE_SkipLoRA`` without), only if ``kt-kernel`` is installed. Its
  step includes ``update_lora_weights``, which its trainer calls after every optimizer step. Before the timings
  of each rank, its outputs and gradients are compared with kernel+lora's (relative differences printed).

Every method makes one warm-up call and ``--repeats`` timed calls (median shown), the methods in turn, so
the ratios compare figures of the same run: "lora cost" is X+lora against X, "vs torch+lora" and
"vs kt+lora" are the named method's time over the row's.

Usage: ``python benchmarks/bench_expert_lora.py [--qlen 512 2048] [--rank 8 64] [--threads 2]``
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_moe_kernel import (  # noqa: E402
    EXPERTS,
    HIDDEN,
    INTER,
    TOP_K,
    KtSFT,
    _load_kt_extension,
    make_batch,
    make_weights,
    median_seconds,
)

from dpo_llama.models.cpu_moe import selected_isa  # noqa: E402
from dpo_llama.models.moe import EXPERT_WEIGHTS, RoutedExperts  # noqa: E402

METHODS = ("kernel", "kernel+lora", "torch+lora", "torch", "kt+lora", "kt")
SCALING = 2.0  # the adapters' s (kt-kernel: lora_alpha = s r)


def make_experts(weights: tuple[torch.Tensor, ...], backend: str, rank: int | None) -> RoutedExperts:
    """Frozen experts built on the meta device and filled with ``weights`` (packed on arrival for the kernel),
    with adapters of rank ``rank`` (B random, std 0.01) unless None."""
    with torch.device("meta"):
        experts = RoutedExperts(EXPERTS, HIDDEN, INTER, backend).requires_grad_(False)
    if rank is not None:
        experts.add_lora(rank, scaling=SCALING)
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


def kt_adapters(experts: RoutedExperts, grads: bool = False) -> dict[str, torch.Tensor]:
    """bf16 copies of ``experts``' adapters (or their gradients, as they are), named and ordered as kt-kernel
    takes them."""
    tensors = {}
    for proj in ("gate", "up", "down"):
        adapter = experts.lora[f"{proj}_proj"]
        for name, tensor in (("a", adapter.lora_A), ("b", adapter.lora_B)):
            tensors[f"{proj}_lora_{name}"] = tensor.grad if grads else tensor.detach().bfloat16()
    return tensors


def kt_agreement(kt: KtSFT, experts: RoutedExperts, batch: tuple[torch.Tensor, ...]) -> str:
    """Relative differences (Frobenius) between kt-kernel's step and ``experts``' step on ``batch``: output,
    input gradient, routing-weight gradient and the largest over the adapters' gradients."""
    x, ids, weights, grad = batch
    experts.zero_grad(set_to_none=True)
    xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = experts(xs, ids, ws)
    y.backward(grad)
    ours = {"y": y, "dL/dx": xs.grad, "dL/dw": ws.grad, **kt_adapters(experts, grads=True)}
    theirs = dict(zip(("y", "dL/dx", "dL/dw"), kt.forward_backward(*batch)), **kt.lora_grads)
    diffs = {k: ((theirs[k].float() - ours[k].float()).norm() / ours[k].float().norm()).item() for k in ours}
    worst = max(kt.lora_grads, key=diffs.get)
    return ", ".join(f"{k} {diffs[k]:.4f}" for k in ("y", "dL/dx", "dL/dw")) + \
        f", adapter gradients <= {diffs[worst]:.4f} ({worst})"


def kt_setups(weights: tuple[torch.Tensor, ...], threads: int, max_len: int) -> tuple[object, KtSFT] | None:
    """kt-kernel's extension and thread pool and its frozen SFT MoE, or None (reason printed) without it."""
    try:
        ext = _load_kt_extension()
    except ImportError as error:
        print(f"kt-kernel: not measured ({error})")
        return None
    cpu_infer = ext.CPUInfer(threads)
    return (ext, cpu_infer), KtSFT(ext, cpu_infer, weights, max_len)


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
    weights = tuple(w.contiguous() for w in make_weights())
    print(f"E={EXPERTS} k={TOP_K} H={HIDDEN} I={INTER}, bf16, {args.threads} threads, kernel ISA {selected_isa()}")
    kt = kt_setups(weights, args.threads, max(args.qlen))
    for rank in args.rank:
        setups = {"kernel": ("cpu_kernel", None), "kernel+lora": ("cpu_kernel", rank),
                  "torch+lora": ("torch", rank), "torch": ("torch", None)}
        modules = {name: make_experts(weights, *setup) for name, setup in setups.items()}
        steps = {name: lambda batch, m=m: training_step(m, batch) for name, m in modules.items()}
        if kt is not None:
            (ext, cpu_infer), kt_frozen = kt
            kt_lora = KtSFT(ext, cpu_infer, weights, max(args.qlen), kt_adapters(modules["kernel+lora"]),
                            lora_alpha=SCALING * rank)
            print(f"\nr = {rank}: kt+lora against kernel+lora, relative differences at qlen {args.qlen[0]}: "
                  f"{kt_agreement(kt_lora, modules['kernel+lora'], make_batch(args.qlen[0]))}")
            for name, sft in (("kt+lora", kt_lora), ("kt", kt_frozen)):
                steps[name] = lambda batch, sft=sft: lambda: sft.forward_backward(*batch)
        for qlen in args.qlen:
            batch = make_batch(qlen)
            times = median_seconds({name: step(batch) for name, step in steps.items()}, args.repeats)
            print(f"\nr = {rank}, qlen = {qlen}: forward + backward\n")
            print("| method | ms | tok/s | lora cost | vs torch+lora | vs kt+lora |\n|---|---|---|---|---|---|")
            for name in METHODS:
                seconds = times.get(name, math.nan)
                base = name.removesuffix("+lora")
                cost = f"{seconds / times[base]:.2f}" if name.endswith("+lora") and base in times else ""
                print(f"| {name} | {seconds * 1e3:.1f} | {qlen / seconds:.0f} | {cost} | "
                      f"{times['torch+lora'] / seconds:.2f} | {times.get('kt+lora', math.nan) / seconds:.2f} |")


if __name__ == "__main__":
    main()
