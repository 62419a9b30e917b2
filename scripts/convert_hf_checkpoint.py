"""Convert a Hugging Face checkpoint (config.json + safetensors) into a dpo_llama checkpoint.

    python scripts/convert_hf_checkpoint.py --input ~/hf/Llama-3.1-8B-Instruct --output ckpt/llama-3.1-8b-instruct

Supports ``model_type`` "llama" (LLaMA-2/3/3.1/3.2, TinyLlama) and the DeepSeek MoE families ("deepseek",
"deepseek_v2"). Tensors are streamed one at a time; the output is split into shards of at most ``--max-shard-gb``
GiB (default 4), with ``model.safetensors.index.json`` when there is more than one.
"""

from __future__ import annotations

import argparse
import sys

from dpo_llama.models.checkpoint import DTYPES, format_summary, parse_dtype, save_checkpoint
from dpo_llama.models.convert_hf import hf_args_and_tensors, read_hf_config, tokenizer_files, warn_if_no_tokenizer
from dpo_llama.utils.cli import HelpFormatter, add_max_shard_gb, check_output_directory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, help="HF model directory (config.json + model*.safetensors)")
    parser.add_argument("--output", required=True, help="output directory for the dpo_llama checkpoint")
    parser.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="cast weights (default: keep)")
    add_max_shard_gb(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_directory(args.output, input=args.input)
        config = read_hf_config(args.input)
        model_args, tensors = hf_args_and_tensors(args.input, config, parse_dtype(args.dtype))
        summary = save_checkpoint(args.output, model_args, tensors, tokenizer_files(args.input),
                                  max_shard_bytes=args.max_shard_bytes)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"converted {config.get('model_type')} checkpoint {args.input} -> {args.output}")
    warn_if_no_tokenizer(args.input, args.output, "building datasets or training")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
