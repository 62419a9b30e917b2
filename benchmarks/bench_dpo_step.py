"""Benchmark of one DPO training step on the CPU: dpo_llama against TRL's ``DPOTrainer`` on the same model.

A random LLaMA (``--layers`` layers of width ``--hidden``, GQA with 4 KV heads, vocabulary 32000) is saved with
``transformers``' ``save_pretrained`` and converted to a dpo_llama checkpoint. Both trainers then run the same
step: ``--pairs`` preference pairs of a ``--prompt-len``-token prompt and two ``--completion-len``-token
completions, the sigmoid DPO loss against reference log-probs computed before training (TRL:
``precompute_ref_log_probs=True``), its backward, and an AdamW step on LoRA adapters of rank ``--rank`` on
q/k/v/o and gate/up/down (TRL through ``peft``), fp32 weights, no activation checkpointing. The prompts and
completions are the same token ids for both (a word-level tokenizer maps each word ``w<i>`` to id i).

Each variant runs in its own process (its peak resident memory is its own): two warm-up steps, then
``--repeats`` timed steps (median). ``+thp`` variants run with ``THP_MEM_ALLOC_ENABLE=1``, which lets PyTorch's
CPU allocator back large tensors with transparent huge pages (fewer page faults on a step's large
temporaries). "vs trl" is TRL's step time (without huge pages) over the row's, measured in the same run. The
last line is machine-readable: ``RESULT ours_vs_trl=<x> ours_vs_trl_thp=<x> ours_thp_vs_trl=<x>
peak_rss_ratio=<ours / trl>``.

Needs ``transformers``, ``peft`` and ``trl`` (``pip install -r requirements-dev.txt``).

Usage: ``python benchmarks/bench_dpo_step.py [--layers 6] [--hidden 768] [--pairs 2] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 32000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"trl": ("trl", False), "trl+thp": ("trl", True), "ours": ("ours", False), "ours+thp": ("ours", True)}


def write_models(root: Path, args: argparse.Namespace) -> None:
    """HF model + word-level tokenizer in root/hf, the converted dpo_llama checkpoint in root/ours."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dpo_llama.models.checkpoint import save_checkpoint
    from dpo_llama.models.convert_hf import hf_args_and_tensors, read_hf_config

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
        max_position_embeddings=4096, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"</s>": VOCAB - 1}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_special_tokens(["</s>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token="</s>").save_pretrained(
        root / "hf")
    hf = read_hf_config(root / "hf")
    model_args, tensors = hf_args_and_tensors(root / "hf", hf, None)
    save_checkpoint(root / "ours", model_args, tensors, [])


def make_pairs(args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Random token ids: a prompt and two completions (the last token of each completion is EOS)."""
    gen = np.random.default_rng(1)

    def ids(n: int) -> list[int]:
        return gen.integers(1, VOCAB - 1, n).tolist()

    return [{"prompt": ids(args.prompt_len), "chosen": ids(args.completion_len - 1) + [VOCAB - 1],
             "rejected": ids(args.completion_len - 1) + [VOCAB - 1]} for _ in range(args.pairs)]


def step_times_ours(root: Path, args: argparse.Namespace, pairs: list[dict]) -> list[float]:
    """dpo_llama's training step (run_dpo_lora.py's loss, backward and optimizer step), timed per step."""
    from dpo_llama.configs.dpo_lora import DPOLoRAConfig
    from dpo_llama.utils.dpo import collate_pairs, paired_loss
    from dpo_llama.utils.finetune import load_policy
    from dpo_llama.utils.trainer import build_optimizer

    cfg = DPOLoRAConfig(pretrain_ckpt_dir=str(root / "ours"), train_data_dir=str(root), lora_r=args.rank,
                        device="cpu", dtype="fp32", beta=0.1)
    model = load_policy(cfg, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    examples = []
    for pair in pairs:
        example = {"ref_chosen_logps": np.float32(-1.0), "ref_rejected_logps": np.float32(-2.0)}
        for name in ("prompt", "chosen", "rejected"):
            example[name] = np.asarray(pair[name], dtype=np.int32)
            example[f"{name}_mask"] = np.full(len(pair[name]), name != "prompt")
        examples.append(example)
    batch = collate_pairs(examples, pad_id=VOCAB - 1)  # outside the timing, as TRL's batches are collated
    times = []
    for _ in range(2 + args.repeats):
        start = time.perf_counter()
        loss, _ = paired_loss(model, batch, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def step_times_trl(root: Path, args: argparse.Namespace, pairs: list[dict]) -> list[float]:
    """TRL's DPOTrainer on the HF model with a peft LoRA, timed per optimizer step by a callback."""
    import datasets
    import peft
    import transformers
    import trl

    def text(ids: list[int]) -> str:
        return " ".join("</s>" if i == VOCAB - 1 else f"w{i}" for i in ids)

    rows = [{"prompt": text(p["prompt"]), "chosen": " " + text(p["chosen"]), "rejected": " " + text(p["rejected"])}
            for p in pairs]
    times, starts = [], []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            starts.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - starts[-1])

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS)
    config = trl.DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.pairs,
                           max_steps=2 + args.repeats, learning_rate=1e-4, beta=0.1, precompute_ref_log_probs=True,
                           logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                           max_length=None, dataloader_num_workers=0, gradient_checkpointing=False,
                           lr_scheduler_type="constant", seed=0)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=transformers.AutoTokenizer.from_pretrained(root / "hf"),
                             peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    return times


def worker(args: argparse.Namespace) -> None:
    """One variant in this process; prints its step times and peak resident memory as JSON."""
    torch.set_num_threads(args.threads)
    root = Path(args.worker_dir)
    pairs = make_pairs(args)
    run = step_times_trl if args.worker == "trl" else step_times_ours
    times = run(root, args, pairs)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("WORKER " + json.dumps({"seconds": statistics.median(times[2:]), "peak_rss_gb": peak_gb}))


def run_variant(name: str, root: Path, argv: list[str]) -> dict:
    """Runs one variant in a child process and returns its measurements."""
    kind, thp = VARIANTS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", kind, "--worker-dir", str(root)], env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WORKER ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"variant {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("WORKER "))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="transformer layers (default: 6)")
    parser.add_argument("--hidden", type=int, default=768, help="model width, a multiple of 256 (default: 768)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default: 2)")
    parser.add_argument("--prompt-len", type=int, default=192, help="prompt tokens (default: 192)")
    parser.add_argument("--completion-len", type=int, default=192, help="tokens per completion (default: 192)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median; default: 5)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.layers, args.pairs, args.prompt_len, args.completion_len - 1, args.rank, args.repeats) < 1:
        parser.error("--layers, --pairs, --prompt-len, --rank and --repeats must be positive, --completion-len >= 2")
    if args.hidden % 256:
        parser.error("--hidden must be a multiple of 256 (64-wide heads, 4 KV heads)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    tokens = 2 * args.pairs * (args.prompt_len + args.completion_len)
    print(f"LLaMA {args.layers} layers x {args.hidden}, vocabulary {VOCAB}, {args.pairs} pairs x "
          f"({args.prompt_len} + {args.completion_len}) tokens, LoRA r {args.rank}, fp32, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        write_models(Path(tmp), args)
        results = {name: run_variant(name, Path(tmp), sys.argv[1:]) for name in args.variants}
    base = results.get("trl")
    print("\n| variant | step ms | tok/s | vs trl | peak RSS GB |\n|---|---|---|---|---|")
    for name, r in results.items():
        ratio = base["seconds"] / r["seconds"] if base else float("nan")
        print(f"| {name} | {r['seconds'] * 1e3:.0f} | {tokens / r['seconds']:.0f} | {ratio:.2f} | "
              f"{r['peak_rss_gb']:.2f} |")
    nan = {"seconds": float("nan"), "peak_rss_gb": float("nan")}
    trl, trl_thp, ours, ours_thp = (results.get(name, nan) for name in VARIANTS)
    print(f"RESULT ours_vs_trl={trl['seconds'] / ours['seconds']:.3f} "
          f"ours_vs_trl_thp={trl_thp['seconds'] / ours['seconds']:.3f} "
          f"ours_thp_vs_trl={trl['seconds'] / ours_thp['seconds']:.3f} "
          f"peak_rss_ratio={ours['peak_rss_gb'] / trl['peak_rss_gb']:.3f}")


if __name__ == "__main__":
    main()
