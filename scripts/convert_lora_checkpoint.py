"""Merge a LoRA adapter into its base model and write a full dpo_llama checkpoint.

    python scripts/convert_lora_checkpoint.py --base checkpoints/llama-2-7b --lora checkpoints/dpo \\
        --output checkpoints/llama-2-7b-dpo

For every LoRA layer the merged weight is ``W' = W + s · B A`` (summed in float32, then cast to the output
dtype); for routed MoE experts with adapters (``lora_moe_routed_experts``), ``W'_e = W_e + s · B_e A_e`` per
expert. When the adapter was trained on a 4-bit base (``quant_lora_4bit`` / ``quant_4bit`` in its
lora_config.json), the trained model never saw ``W`` but its 4-bit round trip ``Ŵ``; the script re-quantizes
those weights with the same settings (from the dtype they had in training) and writes ``Ŵ + s · B A`` for LoRA
layers and ``Ŵ`` for the other 4-bit layers, so the merged model computes with the trained weights. The output
has the dtype the trained model computed in (``weight_dtype`` in lora_config.json, e.g. float32 for a CPU run on
a bf16 base: bf16 would round ``s · B A`` away again); ``--dtype keep`` keeps each base tensor's stored dtype.
Its outputs equal the trained model's up to float rounding, except where 4-bit layers computed in another dtype
than the weights (QLoRA's default ``--quant-4bit-compute-dtype bf16`` on an fp32 run): the merged model then
computes those layers in the weights' dtype, which differs by bf16 rounding (0.15 in logits of about 8 on a tiny
model). Norms trained with the adapter replace the base ones. Tokenizer files are copied from the base.

--lora takes an adapter directory (adapter.safetensors + lora_config.json) or a training run's ckpt_dir
holding step-XXXXXX/ checkpoints, of which the highest step with an adapter is used.

Tensors are streamed one at a time (memory: one tensor plus one output shard). The script refuses (exit
status 1, one line on stderr) an adapter that does not match the base: another model_type or params, other
base weights than the adapter was trained on (the trainers record their SHA-256; e.g. a DPO adapter merged into
the pretrained base instead of the SFT model it continued; ``--allow-other-base`` overrides), missing or
unexpected adapter tensors, wrong shapes, or no adapter at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from dpo_llama.configs import demo
from dpo_llama.models.checkpoint import (DTYPES, format_summary, iter_safetensors, model_classes, parse_dtype,
                                         read_params, save_checkpoint, weight_files)
from dpo_llama.models.convert_hf import tokenizer_files, warn_if_no_tokenizer
from dpo_llama.models.lora import (ADAPTER_FILE, LORA_CONFIG_FILE, LoRAConfig, LoRALinear, adapter_shapes,
                                   apply_lora, check_adapter, check_adapter_base, find_adapter, read_adapter,
                                   read_lora_config)
from dpo_llama.models.quant import quantize_4bit, stored_4bit
from dpo_llama.utils.cli import HelpFormatter, add_max_shard_gb, check_output_directory
from dpo_llama.utils.trainer import resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--base", default=str(demo.BASE_MODEL),
                        help="base dpo_llama checkpoint directory the adapter was trained on (default: demo base)")
    parser.add_argument("--lora", default=demo.SFT_CKPT,
                        help="adapter directory (lora_config.json + adapter.safetensors), or a training ckpt_dir "
                             f"with step-XXXXXX/ sub-directories, the highest step is used (default: {demo.SFT_CKPT})")
    parser.add_argument("--output", default=demo.SFT_MERGED,
                        help=f"output directory for the merged checkpoint (default: {demo.SFT_MERGED})")
    parser.add_argument("--dtype", default="trained", choices=["trained", "keep", *DTYPES],
                        help="dtype of the written weights: trained = the dtype the adapter's model computed in "
                             "(its lora_config.json weight_dtype; default), keep = each base tensor's stored dtype")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="merge even if --base's weights differ from those the adapter was trained on")
    parser.add_argument("--device", default="cpu",
                        help="device for the re-quantization and merge arithmetic, e.g. cuda (default: cpu)")
    add_max_shard_gb(parser)
    return parser.parse_args(argv)


def check_base(base_dir: Path, base: dict, source: Path):
    """Reads the base params and refuses a base other than the one the adapter was trained on."""
    args = read_params(base_dir)
    if base.get("model_type") != args.model_type:
        raise ValueError(f"{source}: adapter is for model_type {base.get('model_type')!r}, "
                         f"base {base_dir} is {args.model_type!r}")
    trained, current = base.get("params", {}), json.loads(json.dumps(args.to_dict()))
    differ = sorted(k for k in current.keys() | trained.keys() if trained.get(k) != current.get(k))
    if differ:
        raise ValueError(f"{source}: adapter was trained on a base with other params ({', '.join(differ)}) "
                         f"than {base_dir}")
    return args


def adapted_model(args, cfg: LoRAConfig) -> torch.nn.Module:
    """The base model on the meta device (no memory) with ``cfg``'s LoRA and 4-bit layers, to look up
    which tensor was adapted or quantized in training."""
    _, model_cls = model_classes(args.model_type)
    with torch.device("meta"):
        model = model_cls(args)
    return apply_lora(model, cfg)


def trained_weight(tensor: torch.Tensor, module: torch.nn.Module, name: str,
                   weight_dtype: torch.dtype) -> torch.Tensor:
    """The weight the trained model computed with: for a 4-bit stored tensor ``Ŵ``, quantized from
    ``weight_dtype`` and dequantized to the compute dtype, exactly as training did; else ``W`` itself."""
    quant = stored_4bit(module, name)
    if quant is None:
        return tensor
    if tensor.dim() == 3:  # stacked MoE experts: each expert's slice was quantized on its own
        return torch.stack([quantize_4bit(t.to(weight_dtype), quant).dequantize() for t in tensor])
    return quantize_4bit(tensor.to(weight_dtype), quant).dequantize()


def adapter_of(module: torch.nn.Module, path: str, name: str) -> tuple[str, float] | None:
    """``(key prefix, scaling)`` of the adapter trained on the base tensor ``path.name``, or None: a LoRA
    layer's ``weight``, or one projection of routed experts with adapters (``[E, r, in]`` / ``[E, out, r]``)."""
    if isinstance(module, LoRALinear) and name == "weight":
        return path, module.scaling
    experts_lora = getattr(module, "lora", None)
    if experts_lora is not None and name in experts_lora:
        return f"{path}.lora.{name}", experts_lora[name].scaling
    return None


def merged_tensors(base_dir: Path, model: torch.nn.Module, adapter: dict[str, torch.Tensor],
                   weight_dtype: torch.dtype, out_dtype: torch.dtype | None, device: torch.device,
                   counts: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams the base tensors with adapters merged and 4-bit round trips applied, counting each kind."""
    for key, tensor in iter_safetensors(weight_files(base_dir)):
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path)
        stored_dtype = tensor.dtype
        tensor = tensor.to(device)
        trained_adapter = adapter_of(module, path, name)
        if trained_adapter is not None:
            prefix, scaling = trained_adapter
            lora_a = adapter[f"{prefix}.lora_A"].to(device).float()
            lora_b = adapter[f"{prefix}.lora_B"].to(device).float()
            tensor = trained_weight(tensor, module, name, weight_dtype).float() + scaling * (lora_b @ lora_a)
            counts["merged"] += 1
        elif key in adapter:
            tensor = adapter[key]
            counts["trained"] += 1
        elif stored_4bit(module, name) is not None:
            tensor = trained_weight(tensor, module, name, weight_dtype)
            counts["4-bit"] += 1
        yield key, tensor.to(out_dtype or stored_dtype).cpu()


def merge(args: argparse.Namespace) -> tuple[dict, str, dict[str, int], LoRAConfig]:
    """Checks everything, then writes the merged checkpoint; returns its summary and what was merged."""
    base_dir, output = Path(args.base), Path(args.output)
    device = resolve_device(args.device)
    lora_dir, note = find_adapter(args.lora)
    cfg, base = read_lora_config(lora_dir)
    model_args = check_base(base_dir, base, lora_dir / LORA_CONFIG_FILE)
    if not args.allow_other_base:
        check_adapter_base(lora_dir, base_dir)
    check_output_directory(output, base=base_dir, lora=lora_dir)
    adapter = read_adapter(lora_dir)
    model = adapted_model(model_args, cfg)
    check_adapter(adapter, adapter_shapes(model), str(lora_dir / ADAPTER_FILE))
    weight_dtype = getattr(torch, base.get("weight_dtype", "float32"))
    counts = {"merged": 0, "trained": 0, "4-bit": 0}
    out_dtype = weight_dtype if args.dtype == "trained" else parse_dtype(args.dtype)
    tensors = merged_tensors(base_dir, model, adapter, weight_dtype, out_dtype, device, counts)
    summary = save_checkpoint(output, model_args, tensors, tokenizer_files(base_dir),
                              max_shard_bytes=args.max_shard_bytes)
    return summary, f"{lora_dir} ({note})", counts, cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary, adapter_note, counts, cfg = merge(args)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    quant = cfg.quant_config()
    print(f"merged adapter {adapter_note} into {args.base} -> {args.output}")
    print(f"LoRA r={cfg.lora_r}, scaling={cfg.scaling:g}: {counts['merged']} layers merged, "
          f"{counts['trained']} trained norms copied")
    if cfg.quant_lora_4bit or cfg.quant_4bit:
        print(f"4-bit base ({quant.quant_type}, blocksize {quant.blocksize}, double_quant {quant.double_quant}) "
              f"reproduced: {counts['4-bit']} frozen 4-bit layers dequantized")
    print(format_summary(summary))
    warn_if_no_tokenizer(args.base, args.output, "generating with it or building a dataset for it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
