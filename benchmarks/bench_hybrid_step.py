"""Benchmark of one DPO training step of a DeepSeek-V2-Lite slice: routed experts on the GPU against in CPU RAM.

The model has DeepSeek-V2-Lite's shapes (MLA attention, 64 routed experts of 2048 x 1408 with top-6 routing,
2 shared experts, vocabulary 102400) cut to ``--layers`` layers, the first dense and the rest MoE. Its random
bf16 weights are saved once as a checkpoint and loaded the way ``run_dpo_lora.py`` loads a policy
(``load_policy``: LoRA r ``--rank`` on the trainers' default targets, every attention projection and the dense
MLP's gate / up / down; bf16). Each variant then runs the
training step of ``run_dpo_lora.py``: the sigmoid DPO loss (plus the load-balancing loss) of ``--pairs`` pairs of
``--seq-len``-token sequences under bf16 autocast, its backward, and an AdamW step. Variants:

* ``torch``: every weight on ``--device``, experts in PyTorch (the all-GPU baseline on CUDA; grouped GEMMs over
  all experts on a GPU of compute capability 9.0+, one expert at a time elsewhere),
* ``cpu_kernel``: the routed experts packed in CPU RAM and run by the C++ kernel (hybrid GPU + CPU on CUDA:
  hidden states cross to the host and back through pinned buffers),
* ``cpu_kernel+copies``: the same with transposed copies of the packed experts (a faster backward).

Each variant is loaded in turn, makes two warm-up steps and ``--repeats`` timed steps (median). "vs torch" is
the torch variant's step time over the row's. On CUDA the table also gives the GPU memory the loaded model
holds and the peak during the steps. The last line is machine-readable:
``RESULT hybrid_vs_gpu=<torch time / cpu_kernel time> gpu_gb_saved=<model GB on GPU, torch - cpu_kernel>``.

Usage: ``python benchmarks/bench_hybrid_step.py [--device cuda] [--layers 4] [--pairs 2] [--seq-len 512]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_llama.configs.dpo_lora import DPOLoRAConfig  # noqa: E402
from dpo_llama.models import cpu_moe  # noqa: E402
from dpo_llama.models.checkpoint import save_model  # noqa: E402
from dpo_llama.models.deepseek import DeepseekTransformer  # noqa: E402
from dpo_llama.models.presets import get_preset  # noqa: E402
from dpo_llama.utils.dpo import paired_loss  # noqa: E402
from dpo_llama.utils.finetune import load_policy  # noqa: E402
from dpo_llama.utils.trainer import build_optimizer  # noqa: E402

VARIANTS = {"torch": ("torch", False), "cpu_kernel": ("cpu_kernel", False), "cpu_kernel+copies": ("cpu_kernel", True)}


def write_checkpoint(out_dir: Path, layers: int) -> None:
    """Random bf16 DeepSeek-V2-Lite weights cut to ``layers`` layers."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = DeepseekTransformer(get_preset("deepseek-v2-lite", n_layers=layers, max_seq_len=4096))
    finally:
        torch.set_default_dtype(default)
    save_model(model, out_dir)


def make_batch(pairs: int, seq_len: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; the second half of every sequence is scored; zero reference log-probs."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(2 * pairs, seq_len, dtype=torch.bool)
    mask[:, seq_len // 2:] = True
    batch = {"tokens": torch.randint(vocab, (2 * pairs, seq_len), generator=gen), "mask": mask,
             "ref_chosen": torch.zeros(pairs), "ref_rejected": torch.zeros(pairs)}
    return {key: value.to(device) for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: DPOLoRAConfig, batch: dict[str, torch.Tensor], device: torch.device, repeats: int) -> dict:
    """Median step seconds, and on CUDA the GB the loaded model holds and the peak GB during the steps."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_policy(cfg, device)
    model_gb = torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    optimizer = build_optimizer(cfg, model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    times = []
    for step in range(2 + repeats):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss, _ = paired_loss(model, batch, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return {"seconds": statistics.median(times), "model_gb": model_gb, "peak_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"],
                        help="where everything but the kernel's experts runs (default: cuda when available)")
    parser.add_argument("--layers", type=int, default=4, help="layers (the first dense, the rest MoE)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2x sequences)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=64,
                        help="LoRA rank (the trainers' default targets: attention and dense MLP)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (the kernel's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    args = parser.parse_args()
    if min(args.layers - 1, args.pairs, args.seq_len - 1, args.rank, args.threads, args.repeats) < 1:
        parser.error("--layers and --seq-len must be >= 2; --pairs, --rank, --threads and --repeats positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(f"DeepSeek-V2-Lite cut to {args.layers} layers, {args.pairs} pairs x {args.seq_len} tokens, "
          f"LoRA r {args.rank}; device {device} ({gpu}); {args.threads} CPU threads, kernel ISA "
          f"{cpu_moe.selected_isa() if cpu_moe.kernel_available() else 'unavailable'}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), args.layers)
        batch = make_batch(args.pairs, args.seq_len, get_preset("deepseek-v2-lite").vocab_size, device)
        for name in args.variants:
            backend, copies = VARIANTS[name]
            cfg = DPOLoRAConfig(pretrain_ckpt_dir=tmp, train_data_dir=tmp, lora_r=args.rank, device=args.device,
                                experts_backend=backend, experts_transposed_copy=copies)
            results[name] = measure(cfg, batch, device, args.repeats)
    tokens = 2 * args.pairs * args.seq_len
    print("\n| variant | step ms | tok/s | vs torch | model on GPU GB | peak GPU GB |\n|---|---|---|---|---|---|")
    base = results.get("torch")
    for name, r in results.items():
        ratio = base["seconds"] / r["seconds"] if base else float("nan")
        print(f"| {name} | {r['seconds'] * 1e3:.0f} | {tokens / r['seconds']:.0f} | {ratio:.2f} | "
              f"{r['model_gb']:.2f} | {r['peak_gb']:.2f} |")
    hybrid = results.get("cpu_kernel")
    if base and hybrid:
        print(f"RESULT hybrid_vs_gpu={base['seconds'] / hybrid['seconds']:.3f} "
              f"gpu_gb_saved={base['model_gb'] - hybrid['model_gb']:.2f}")


if __name__ == "__main__":
    main()
