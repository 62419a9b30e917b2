"""Activations kept for the backward, with dpo_llama's hand-written backwards against plain autograd.

Counts the bytes of the distinct tensors (parameters excluded) that autograd keeps for the backward during one
forward (``torch.autograd.graph.saved_tensors_hooks``), and times forward + backward (median of ``--repeats``
calls, the two variants alternating), for:

* ``llama layer``: a LLaMA-2-7B-shaped layer (dim 4096, MLP 11008, 32 heads), bf16, default LoRA (query and
  value, r 64), 512 tokens; a 2-layer model, figures per layer. Plain autograd: RMSNorm, SwiGLU and the LoRA
  update written as the plain operations of ``RMSNormFunction``, ``SwiGLU`` and ``LoRAUpdate``.
* ``routed experts``: one DeepSeek-V2-Lite MoE layer's routed experts (E 64, top-6, 2048 x 1408, bf16), PyTorch
  backend, 2048 tokens. Plain autograd: the gathered ``[pairs, H]`` rows split per expert, ``F.silu(g) * u``,
  the concatenated outputs times their routing weights ``index_add``-ed per token.
* ``routed experts, LoRA r 8``: the same with rank-8 adapters on every expert's three projections; plain
  autograd also for the adapters' update (``ExpertAdapters.delta``).
* ``MLA attention``: SDPA over DeepSeek's MLA head sizes (q and k 192, v 128, 16 heads), bf16, 2048 tokens.
  Plain: SDPA on them as they are (its math fallback); ours: ``llama.causal_attention`` (v padded for flash).

"vs plain" = plain / ours, for both columns. About 40 s on 2 cores.

Usage: ``python benchmarks/bench_activation_memory.py [--repeats 7] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_moe_kernel import EXPERTS, HIDDEN, INTER, make_batch, make_weights  # noqa: E402

from dpo_llama.models import llama, moe  # noqa: E402
from dpo_llama.models.llama import ModelArgs, RMSNorm, Transformer, causal_attention  # noqa: E402
from dpo_llama.models.lora import LoRAConfig, LoRALinear, apply_lora, mark_only_lora_trainable  # noqa: E402


def saved_megabytes(run: Callable[[], torch.Tensor], params: set[int]) -> float:
    """MB of the distinct non-parameter storages autograd keeps while ``run()`` builds its graph."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values()) / 1e6


def plain_rmsnorm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def plain_lora_update(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    return self.scaling * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)


def plain_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def plain_expert_delta(self: moe.ExpertAdapters, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, dropout: bool = True) -> torch.Tensor:
    return F.linear(self.scaling * F.linear((self.dropout(x) if dropout else x).float(), lora_a), lora_b)


def plain_torch_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        experts: moe.RoutedExperts) -> torch.Tensor:
    pairs = moe.PairGroups(topk_ids, experts.n_experts)
    blocks, adapters = x[pairs.token_of].split(pairs.counts), experts.active_adapters()
    outputs = [experts.expert_forward(rows, e, adapters) for e, rows in enumerate(blocks) if rows.shape[0]]
    weighted = torch.cat(outputs).float() * pairs.sorted_weights(topk_weights)[:, None]
    return torch.zeros(x.shape).index_add(0, pairs.token_of, weighted).to(x.dtype)


@contextmanager
def plain_autograd():
    """The plain-autograd variants patched in for the duration."""
    saved = (RMSNorm.forward, LoRALinear.adapter_forward, moe.ExpertAdapters.delta, llama.swiglu, moe.swiglu,
             moe.torch_experts)
    RMSNorm.forward, LoRALinear.adapter_forward = plain_rmsnorm, plain_lora_update
    moe.ExpertAdapters.delta = plain_expert_delta
    llama.swiglu = moe.swiglu = plain_swiglu
    moe.torch_experts = plain_torch_experts
    try:
        yield
    finally:
        (RMSNorm.forward, LoRALinear.adapter_forward, moe.ExpertAdapters.delta, llama.swiglu, moe.swiglu,
         moe.torch_experts) = saved


Case = tuple[Callable[[bool], torch.Tensor], set[int], int]  # run(plain) -> loss, parameter storages, layers


def patched(plain: bool):
    """``plain_autograd()`` if ``plain`` else no change."""
    return plain_autograd() if plain else nullcontext()


def llama_case() -> Case:
    torch.manual_seed(0)
    args = ModelArgs(dim=4096, n_layers=2, n_heads=32, vocab_size=1000, hidden_dim=11008, max_seq_len=512)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    cfg = LoRAConfig()
    apply_lora(model, cfg)
    mark_only_lora_trainable(model, cfg)
    tokens = torch.randint(0, 1000, (1, 512))

    def run(plain: bool) -> torch.Tensor:
        with patched(plain):
            return model(tokens).float().logsumexp(-1).mean()

    return run, {p.untyped_storage().data_ptr() for p in model.parameters()}, 2


def experts_case(rank: int | None = None) -> Case:
    with torch.device("meta"):
        experts = moe.RoutedExperts(EXPERTS, HIDDEN, INTER, "torch").requires_grad_(False)
    if rank is not None:
        experts.add_lora(rank, scaling=2.0)
    for name, tensor in zip(moe.EXPERT_WEIGHTS, make_weights()):
        experts.load_tensor(name, tensor.contiguous())
    if rank is not None:
        with torch.no_grad():
            for adapters in experts.lora.values():
                adapters.lora_B.normal_(0, 0.01)
    x, ids, weights, _ = make_batch(2048)
    x, weights = x.requires_grad_(), weights.requires_grad_()

    def run(plain: bool) -> torch.Tensor:
        with patched(plain):
            return experts(x, ids, weights).float().square().mean()

    return run, {p.untyped_storage().data_ptr() for p in experts.parameters()}, 1


def attention_case() -> Case:
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, 2048, 192, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(1, 16, 2048, 128, generator=gen).bfloat16().requires_grad_()

    def run(plain: bool) -> torch.Tensor:
        if plain:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
        else:
            out = causal_attention(q, k, v, 0, scale=0.1)
        return out.float().square().mean()

    return run, set(), 1


def measure(case: Case, repeats: int) -> dict[bool, tuple[float, float]]:
    """Per variant (plain: True / False): (MB kept for the backward, median seconds of forward + backward)."""
    run, params, layers = case
    run(False).backward()  # warm-up
    megabytes = {plain: saved_megabytes(lambda: run(plain), params) / layers for plain in (True, False)}
    times = {True: [], False: []}
    for _ in range(repeats):
        for plain in (True, False):
            start = time.perf_counter()
            run(plain).backward()
            times[plain].append((time.perf_counter() - start) / layers)
    return {plain: (megabytes[plain], statistics.median(times[plain])) for plain in (True, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed forward + backward calls per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    torch.set_num_threads(args.threads)
    print("| case | plain MB kept | ours MB kept | vs plain | plain fwd+bwd ms | ours fwd+bwd ms | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, make in (("llama layer", llama_case), ("routed experts", experts_case),
                       ("routed experts, LoRA r 8", lambda: experts_case(8)), ("MLA attention", attention_case)):
        results = measure(make(), args.repeats)
        (plain_mb, plain_s), (ours_mb, ours_s) = results[True], results[False]
        print(f"| {name} | {plain_mb:.1f} | {ours_mb:.1f} | {plain_mb / ours_mb:.2f} | "
              f"{plain_s * 1e3:.0f} | {ours_s * 1e3:.0f} | {plain_s / ours_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
