"""Convert a dpo_llama checkpoint (e.g. a merged SFT or DPO model) into a Hugging Face model directory.

    python scripts/convert_to_hf_checkpoint.py --input ckpt/dpo --output hf/llama-2-7b-dpo

The output (``config.json``, ``model.safetensors`` or shards with ``model.safetensors.index.json``, and the
tokenizer files) loads with ``LlamaForCausalLM`` / ``DeepseekV2ForCausalLM.from_pretrained`` (DeepSeek-MoE:
deepseek-moe-16b's own layout, for its remote code) and serves with vLLM. The inverse of convert_hf_checkpoint.py:
a HF -> dpo_llama -> HF round trip gives back the same tensors. A chat template is not
written; take the original model's ``tokenizer_config.json`` or ``chat_template.jinja`` for one.
"""

from __future__ import annotations

import argparse
import sys

from dpo_llama.configs import demo
from dpo_llama.models.checkpoint import DTYPES, format_summary, parse_dtype
from dpo_llama.models.convert_hf import warn_if_no_tokenizer
from dpo_llama.models.export_hf import export_model
from dpo_llama.utils.cli import HelpFormatter, add_max_shard_gb, check_output_directory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", default=demo.DPO_MERGED, help="dpo_llama checkpoint directory (LLaMA or DeepSeek)")
    parser.add_argument("--output", required=True, help="output directory for the Hugging Face model")
    parser.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="cast weights")
    add_max_shard_gb(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_directory(args.output, input=args.input)
        summary = export_model(args.input, args.output, parse_dtype(args.dtype), args.max_shard_bytes)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.input} -> {args.output} (a Hugging Face model directory)")
    print(format_summary(summary))
    warn_if_no_tokenizer(args.input, args.output, "loading it with AutoTokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
