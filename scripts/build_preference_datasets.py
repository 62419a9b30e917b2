"""Build a tokenized preference dataset with reference log-probs computed once (train/validation.safetensors,
meta.json).

    python scripts/build_preference_datasets.py --input data/hh-rlhf/train.jsonl.gz \\
        --ref-model checkpoints/llama-2-7b-sft --template llama2 --max-seq-len 1024 --output datasets/hh

Formats (auto-detected per file, or --format): hh (HH-RLHF chosen/rejected transcripts), trl (prompt/chosen/rejected
strings), trl_conversational (message lists; implicit prompt too), sharegpt_ranking (LLaMA-Factory conversations +
chosen/rejected), alpaca_ranking (instruction/input/chosen/rejected), shp (Stanford SHP; pairs kept when the score
ratio >= --shp-min-score-ratio), kto (unpaired: messages or ShareGPT conversations + label, or prompt/completion/label).

The reference model (--ref-model, plus --lora if the policy will continue training that adapter) scores every
chosen/rejected sequence once, with the quantization the policy will train with (--quant-4bit nf4 quantizes every
frozen linear layer except lm_head, matching training with --quant-4bit true --quant-lora-4bit true), in
length-sorted batches, saving finished chunks so an interrupted run resumes. meta.json records a fingerprint of the
reference weights, adapter, quantization, dtype, autocast, tokenizer and template; run_dpo_lora.py refuses a policy
that does not match it. On CUDA the reference runs under bf16 autocast, as the trainer does with its default
--mixed-precision true; pass --mixed-precision false for a policy trained without it. Truncation: the prompt is cut
first (keeping its end, and BOS), down to --max-prompt-len if needed, then the responses (keeping their start); pairs
with identical or empty responses afterwards are dropped.
With no arguments it builds the embedded demo's preference data against the demo's merged SFT model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from dpo_llama.configs import demo
from dpo_llama.models.checkpoint import checkpoint_fingerprint, load_model, parse_dtype, read_params
from dpo_llama.models.lora import (check_adapter_base, find_adapter, load_lora, quantize_frozen_layers,
                                   read_lora_config)
from dpo_llama.models.moe import EXPERT_BACKENDS
from dpo_llama.models.quant import Quant4bitConfig
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.cli import HelpFormatter, add_bool_flag, at_least, check_output_directory
from dpo_llama.utils.dataset_io import check_val_ratio, length_stats, split_train_val, write_dataset
from dpo_llama.utils.dpo import example_length
from dpo_llama.utils.finetune import prepare_model
from dpo_llama.utils.preference_data import (add_kl_pairs, all_sequences, compute_reference_logps,
                                             is_unpaired_dataset, model_fingerprint, store_reference,
                                             tokenize_records)
from dpo_llama.utils.preference_formats import PREFERENCE_FORMAT_KEYS, UnpairedExample, load_preference_records
from dpo_llama.utils.templates import TEMPLATE_NAMES, template_or_demo_default
from dpo_llama.utils.trainer import autocast_context, autocast_name, resolve_device

CACHE_DIR = ".reference_cache"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", default=[str(demo.PREFERENCE_DATA)], help="data file(s) (default: demo)")
    p.add_argument("--format", default="auto", choices=["auto", *PREFERENCE_FORMAT_KEYS], help="input format")
    p.add_argument("--ref-model", default=demo.SFT_MERGED, help="reference checkpoint (default: demo SFT model)")
    p.add_argument("--lora", default=None, help="adapter applied to the reference (the policy continues it)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip reference log-probs (only for the reference-free losses simpo and orpo)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the --ref-model's)")
    p.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                   help="chat template (required, except with the demo's tokenizer: llama2)")
    p.add_argument("--max-seq-len", type=at_least(2), default=512, help="prompt + longer response, in tokens")
    p.add_argument("--max-prompt-len", type=at_least(1), default=256, help="the prompt may be cut down to this length")
    p.add_argument("--score-all-assistant-turns", action="store_true",
                   help="score every assistant turn of the trajectories (M-DPO) instead of only the final one; "
                        "paired data for the sigmoid, robust and hinge losses only")
    p.add_argument("--shp-min-score-ratio", type=at_least(1.0, float), default=2.0,
                   help="SHP: keep pairs with score ratio (higher / lower score) >= this")
    p.add_argument("--max-samples", type=at_least(1), default=None, help="use at most this many records")
    p.add_argument("--val-ratio", type=float, default=0.05, help="fraction held out for validation")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    p.add_argument("--quant-4bit", default="none", choices=["none", "nf4", "fp4"],
                   help="quantize the reference's frozen linear layers as the policy will be (with --lora the "
                        "adapter's own settings apply, and a contradicting value is refused)")
    p.add_argument("--quant-4bit-blocksize", type=int, default=64, help="4-bit block size")
    add_bool_flag(p, "quant_4bit_double", "double quant", default=True)
    p.add_argument("--quant-4bit-compute-dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="4-bit compute")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="reference dtype (default: bf16 on CUDA, fp32 on CPU); train the policy in the same dtype")
    add_bool_flag(p, "mixed_precision", "bf16 autocast on CUDA (ignored on CPU); use the policy's --mixed-precision",
                  default=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the reference runs")
    p.add_argument("--experts-backend", default="torch", choices=EXPERT_BACKENDS,
                   help="MoE models: routed experts in PyTorch or the C++ CPU kernel, bf16 or int8 weights "
                        "(use the policy's choice)")
    p.add_argument("--batch-tokens", type=at_least(1), default=8192, help="padded tokens per reference batch")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="sequences per reference batch")
    p.add_argument("--output", default=demo.PREFERENCE_DATASET, help="output directory")
    return p.parse_args(argv)


def refuse_quant_4bit_against_the_adapter(args) -> None:
    """With --lora the adapter's own 4-bit settings apply: a --quant-4bit that contradicts them is refused before
    the tokenization, not ignored."""
    if not args.lora or args.quant_4bit == "none":
        return
    lora_dir = find_adapter(args.lora)[0]
    lora_cfg, _ = read_lora_config(lora_dir)
    if not (lora_cfg.quant_4bit and lora_cfg.quant_lora_4bit and lora_cfg.quant_4bit_type == args.quant_4bit):
        raise ValueError(f"--quant-4bit {args.quant_4bit}: {lora_dir} is applied with its own 4-bit settings "
                         f"(quant_4bit {lora_cfg.quant_4bit}, quant_lora_4bit {lora_cfg.quant_lora_4bit}, type "
                         f"{lora_cfg.quant_4bit_type}), which it contradicts; drop it")


def load_reference(args, device: torch.device, dtype_name: str, base_sha256: str):
    """The reference model, built exactly as the DPO policy will be at step 0."""
    lora_cfg, lora_dir = None, None
    if args.lora:
        lora_dir = find_adapter(args.lora)[0]
        check_adapter_base(lora_dir, args.ref_model, base_sha256)
        lora_cfg, _ = read_lora_config(lora_dir)

    def prepare(model):
        if args.quant_4bit != "none" and lora_cfg is None:
            quantize_frozen_layers(model, Quant4bitConfig(args.quant_4bit, args.quant_4bit_blocksize,
                                                          args.quant_4bit_double,
                                                          parse_dtype(args.quant_4bit_compute_dtype)))
        prepare_model(model.requires_grad_(False), args.experts_backend, lora_cfg)

    model = load_model(args.ref_model, device, parse_dtype(dtype_name), prepare=prepare)
    if lora_dir is not None:
        load_lora(model, lora_dir)
    return model


def tokenize_and_split(args, tokenizer):
    """Records -> tokenized examples -> (train, validation), KTO examples paired for the KL estimate."""
    records, report = load_preference_records(args.input, args.format, args.max_samples, args.shp_min_score_ratio)
    if args.score_all_assistant_turns and records and isinstance(records[0], UnpairedExample):
        raise ValueError("--score-all-assistant-turns is for paired data: KTO's KL estimate scores only the "
                         "final completions, so a scored history would enter its rewards alone")
    examples = tokenize_records(records, tokenizer, args.template, args.max_seq_len, args.max_prompt_len,
                                args.score_all_assistant_turns, report)
    if not examples:
        raise ValueError(f"no usable example left after tokenization:\n{report.summary()}")
    train, validation = split_train_val(examples, args.val_ratio, args.seed)
    if is_unpaired_dataset(examples):
        for split, other in ((train, validation), (validation, train)):
            add_kl_pairs(split, other[0] if other else None)
    return train, validation, report


def add_reference(args, train, validation, tokenizer) -> dict:
    """Computes and stores reference log-probs; returns the reference's fingerprint."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    base_sha256 = checkpoint_fingerprint(args.ref_model)  # once, for the adapter check and the fingerprint
    model = load_reference(args, device, dtype_name, base_sha256)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the reference model {args.ref_model} "
                         f"only {model.args.vocab_size}: use the model's own tokenizer")
    fingerprint = model_fingerprint(model, args.ref_model, args.lora and find_adapter(args.lora)[0], dtype_name,
                                    tokenizer, args.template, base_sha256, autocast_name(device, args.mixed_precision))
    sequences = all_sequences(train, args.max_seq_len) + all_sequences(validation, args.max_seq_len)
    longest = max(len(ids) for ids, _ in sequences)
    if longest > model.args.max_seq_len:
        raise ValueError(f"the longest sequence has {longest} tokens but the reference model {args.ref_model} takes "
                         f"at most {model.args.max_seq_len}: pass --max-seq-len {model.args.max_seq_len} or less")
    with autocast_context(device, args.mixed_precision):
        logps = compute_reference_logps(model, sequences, tokenizer.pad_id, device, Path(args.output) / CACHE_DIR,
                                        {"reference": fingerprint["digest"]}, args.batch_tokens, args.batch_size)
    store_reference(train, logps[:2 * len(train)])
    store_reference(validation, logps[2 * len(train):])
    return fingerprint


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    if args.max_prompt_len >= args.max_seq_len:
        print(f"warning: --max-prompt-len {args.max_prompt_len} >= --max-seq-len {args.max_seq_len}: a long prompt "
              f"may leave a response one token (pairs then identical, and dropped); set --max-prompt-len lower",
              file=sys.stderr)
    try:
        check_output_directory(args.output)  # checks, like the next ones, before the tokenization, not after it
        check_val_ratio(args.val_ratio)
        refuse_quant_4bit_against_the_adapter(args)
        if not args.no_reference:
            read_params(args.ref_model)  # a wrong --ref-model is named as such, before the tokenizer is looked for
        tokenizer = load_tokenizer(args.tokenizer or args.ref_model)
        args.template = template_or_demo_default(args.template, tokenizer)
        train, validation, report = tokenize_and_split(args, tokenizer)
        fingerprint = None if args.no_reference else add_reference(args, train, validation, tokenizer)
    except (FileNotFoundError, ImportError, ValueError) as err:  # ImportError: Parquet without pyarrow
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: the reference log-probs computed so far are kept in {Path(args.output) / CACHE_DIR}; "
              f"run the same command again to go on from them", file=sys.stderr)
        return 130
    examples = train + validation
    lengths = [example_length(e) for e in examples]
    meta = {
        "kind": "preference", "unpaired": is_unpaired_dataset(examples), "inputs": args.input, "format": args.format,
        "template": args.template, "tokenizer_fingerprint": tokenizer.fingerprint(), "max_seq_len": args.max_seq_len,
        "max_prompt_len": args.max_prompt_len, "score_all_assistant_turns": args.score_all_assistant_turns,
        "seed": args.seed, "val_ratio": args.val_ratio, "counts": {"train": len(train), "validation": len(validation)},
        "tokens": length_stats(lengths), "rows": report.to_dict(),
        "reference": None if fingerprint is None else {"ckpt_dir": str(args.ref_model), "lora": args.lora,
                                                       **fingerprint},
    }
    write_dataset(args.output, train, validation, meta)
    shutil.rmtree(Path(args.output) / CACHE_DIR, ignore_errors=True)
    print(report.summary())
    print(f"wrote {len(train)} train / {len(validation)} validation examples to {args.output} in "
          f"{time.time() - start:.1f}s (reference: {'none' if fingerprint is None else args.ref_model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
