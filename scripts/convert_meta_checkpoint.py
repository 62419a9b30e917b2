"""Convert Meta's original LLaMA checkpoint (consolidated.NN.pth + params.json) into a dpo_llama checkpoint.

    python scripts/convert_meta_checkpoint.py --input ~/meta/llama-2-7b-chat --output checkpoints/llama-2-7b-chat

Model-parallel shards are merged one weight at a time from memory-mapped files, so a 7B converts in well
under 24 GiB of RAM. The tokenizer (``tokenizer.model``) is copied when it is a sentencepiece model; LLaMA-3's
tiktoken ``tokenizer.model`` is not readable by dpo_llama: pass the HF ``tokenizer.json`` with ``--tokenizer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sentencepiece as spm

from dpo_llama.models.checkpoint import DTYPES, format_summary, parse_dtype, save_checkpoint
from dpo_llama.models.convert_meta import load_meta, meta_tensors
from dpo_llama.utils.cli import HelpFormatter, add_max_shard_gb, at_least, check_output_directory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, help="Meta checkpoint directory (consolidated.*.pth + params.json)")
    parser.add_argument("--output", required=True, help="output directory for the dpo_llama checkpoint")
    parser.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="cast weights (default: keep)")
    parser.add_argument("--max-seq-len", type=at_least(1), default=None,
                        help="context length (default: 4096 LLaMA-2, 8192 LLaMA-3, 131072 LLaMA-3.1+)")
    parser.add_argument("--tokenizer", nargs="+", default=None,
                        help="tokenizer file(s) to copy (default: tokenizer.model from --input if present)")
    add_max_shard_gb(parser)
    return parser.parse_args(argv)


def default_tokenizer(meta_dir: str) -> list[Path]:
    """``tokenizer.model`` of the Meta directory when sentencepiece can read it (LLaMA-2), else nothing."""
    path = Path(meta_dir) / "tokenizer.model"
    if not path.is_file():
        return []
    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        print(f"warning: {path} is not a sentencepiece model (LLaMA-3 uses tiktoken); not copied. "
              "Pass the HF tokenizer.json with --tokenizer.", file=sys.stderr)
        return []
    return [path]


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = args.tokenizer if args.tokenizer is not None else default_tokenizer(args.input)
    try:
        check_output_directory(args.output, input=args.input)
        model_args, shards = load_meta(args.input, args.max_seq_len)
        summary = save_checkpoint(args.output, model_args, meta_tensors(model_args, shards, parse_dtype(args.dtype)),
                                  tokenizer, max_shard_bytes=args.max_shard_bytes)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"converted Meta checkpoint {args.input} ({len(shards)} shard(s)) -> {args.output}")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
