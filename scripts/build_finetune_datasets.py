"""Build a tokenized SFT dataset (train/validation.safetensors, meta.json) from local chat/instruction files.

    python scripts/build_finetune_datasets.py --input data/alpaca_data.json data/ultrachat.jsonl \\
        --tokenizer checkpoints/llama-2-7b-chat/tokenizer.model --template llama2 --output datasets/sft

Formats (auto-detected per file from its first recognisable row, or forced with --format): alpaca
(instruction/input/output), sharegpt (conversations: [{from, value}]), messages (OpenAI/TRL [{role, content}]),
hh (HH-RLHF chosen transcripts), dolly (instruction/context/response). Files: .json, .jsonl, .jsonl.gz/.json.gz,
.parquet.
Every assistant turn is a training target (except OpenAI messages turns with "weight": 0, kept as context);
everything else is masked. Rows that declare tools (tools / functions) and KTO rows (label) are skipped.
Conversations longer than --max-seq-len keep their first --max-seq-len tokens; those left with no assistant token
are dropped and counted.
With no arguments it builds the embedded demo's SFT data.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm.auto import tqdm

from dpo_llama.configs import demo
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.cli import HelpFormatter, at_least, check_output_directory
from dpo_llama.utils.dataset_io import check_val_ratio, length_stats, split_train_val, write_dataset
from dpo_llama.utils.sft import tokenize_conversations
from dpo_llama.utils.sft_formats import SFT_FORMATS, load_sft_records
from dpo_llama.utils.templates import TEMPLATE_NAMES, template_or_demo_default


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", nargs="+", default=[str(demo.SFT_DATA)], help="data file(s) (default: demo data)")
    parser.add_argument("--format", default="auto", choices=["auto", *SFT_FORMATS], help="input format (default: auto)")
    parser.add_argument("--tokenizer", default=str(demo.TOKENIZER),
                        help="tokenizer.model, tokenizer.json or a checkpoint directory (default: demo tokenizer)")
    parser.add_argument("--template", default=None, choices=TEMPLATE_NAMES,
                        help="chat template (required, except with the demo's tokenizer: llama2)")
    parser.add_argument("--max-seq-len", type=at_least(2), default=512, help="longest example in tokens (default: 512)")
    parser.add_argument("--max-samples", type=at_least(1), default=None, help="use at most this many records")
    parser.add_argument("--val-ratio", type=float, default=0.05, help="fraction held out for validation")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    parser.add_argument("--output", default=demo.SFT_DATASET, help=f"output directory (default: {demo.SFT_DATASET})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        check_output_directory(args.output)  # checks, like the next ones, before the tokenization, not after it
        check_val_ratio(args.val_ratio)
        tokenizer = load_tokenizer(args.tokenizer)
        args.template = template_or_demo_default(args.template, tokenizer)
        records, report = load_sft_records(args.input, args.format, args.max_samples)
        with tqdm(total=len(records), desc="tokenizing", unit="conv", disable=None) as progress:
            examples = tokenize_conversations(records, tokenizer, args.template, args.max_seq_len, report, progress)
        if not examples:
            raise ValueError(f"no usable example left after tokenization:\n{report.summary()}")
    except (FileNotFoundError, ImportError, ValueError) as err:  # ImportError: Parquet without pyarrow
        print(f"error: {err}", file=sys.stderr)
        return 1
    train, validation = split_train_val(examples, args.val_ratio, args.seed)
    meta = {
        "kind": "sft", "inputs": args.input, "format": args.format, "template": args.template,
        "tokenizer": str(args.tokenizer), "tokenizer_fingerprint": tokenizer.fingerprint(),
        "max_seq_len": args.max_seq_len, "seed": args.seed, "val_ratio": args.val_ratio,
        "counts": {"train": len(train), "validation": len(validation)},
        "tokens": length_stats([len(e["tokens"]) for e in examples]),
        "target_tokens": length_stats([int(e["mask"].sum()) for e in examples]),
        "rows": report.to_dict(),
    }
    write_dataset(args.output, train, validation, meta)
    print(report.summary())
    print(f"wrote {len(train)} train / {len(validation)} validation examples to {args.output} "
          f"(tokens per example: {meta['tokens']}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
