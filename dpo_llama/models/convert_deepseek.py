"""Hugging Face DeepSeek checkpoints (``model_type`` "deepseek" or "deepseek_v2") -> our format.

Key mapping (besides dropping the ``model.`` prefix):

* routed experts are stacked per layer: ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` (the original
  checkpoints, and what ``save_pretrained`` writes) or the fused ``model.layers.L.mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` (gate rows first) + ``mlp.experts.down_proj`` ``[E, H, I]`` (recent ``transformers`` with
  ``save_original_format=False``) -> ``layers.L.mlp.experts.{gate_proj [E, I, H], up_proj [E, I, H],
  down_proj [E, H, I]}``;
* DeepSeek-MoE ("deepseek") stores q/k rows in the rotate-half layout: ``unpermute_rotary`` as for LLaMA.
  DeepSeek-V2's rope dims are already interleaved and are kept as they are.

Memory: tensors are streamed; a layer's experts are read together (from whichever shards hold them) into
one preallocated stack, so at most one layer's experts are in memory besides the writer's current shard.

Config layouts: ``rope_theta`` + ``rope_scaling`` (``"type": "yarn"``) as in the original checkpoints, and the
``rope_parameters`` block of recent ``transformers`` releases.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from dpo_llama.models.checkpoint import open_safetensors
from dpo_llama.models.convert_hf import hf_weight_files, rope_settings, unpermute_qk
from dpo_llama.models.deepseek import DeepseekArgs

EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.")  # any routed-expert tensor of layer L


def check_supported(config: dict[str, Any]) -> None:
    """Refuses configs with features our model lacks (naming the field)."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported by the DeepSeek model")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={config['hidden_act']!r} is not supported (DeepSeek uses silu)")
    if not config.get("n_routed_experts"):
        raise ValueError("config.json: n_routed_experts is missing or 0; only MoE DeepSeek models are supported")
    heads = config["num_attention_heads"]
    if config["model_type"] == "deepseek" and config.get("num_key_value_heads", heads) != heads:
        raise ValueError("config.json: num_key_value_heads must equal num_attention_heads for model_type 'deepseek'")


def deepseek_args_from_hf(config: dict[str, Any]) -> DeepseekArgs:
    """Maps a HF ``DeepseekConfig`` / ``DeepseekV2Config`` dict to our ``DeepseekArgs``."""
    check_supported(config)
    model_type = config["model_type"]
    theta, scaling = rope_settings(config)
    if scaling is not None and (model_type == "deepseek" or scaling["rope_type"] != "yarn"):
        raise ValueError(f"config.json: rope scaling {scaling['rope_type']!r} is not supported for {model_type} "
                         f"(only 'yarn', for deepseek_v2)")
    args = dict(
        model_type=model_type, dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], moe_hidden_dim=config["moe_intermediate_size"],
        n_routed_experts=config["n_routed_experts"], n_shared_experts=config.get("n_shared_experts") or 0,
        num_experts_per_tok=config["num_experts_per_tok"],
        first_k_dense_replace=config.get("first_k_dense_replace", 0), moe_layer_freq=config.get("moe_layer_freq", 1),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        topk_method=config.get("topk_method") or "greedy", n_group=config.get("n_group"),
        topk_group=config.get("topk_group"), scoring_func=config.get("scoring_func", "softmax"),
        aux_loss_alpha=float(config.get("aux_loss_alpha", 0.001)), seq_aux=bool(config.get("seq_aux", True)),
        norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    if model_type == "deepseek_v2":
        args.update(q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
                    qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
                    v_head_dim=config["v_head_dim"])
    return DeepseekArgs(**args)


def tensor_locations(files: list[Path]) -> dict[str, Path]:
    """Key -> safetensors file, read from the file headers only."""
    locations = {}
    for path in files:
        with open_safetensors(path) as f:
            locations.update(dict.fromkeys(f.keys(), path))
    return locations


def stacked_experts(layer: int, args: DeepseekArgs, read, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our three stacked expert tensors of one layer, from per-expert or fused HF keys.

    Args:
        layer: Layer index.
        args: Model args (expert count and shapes).
        read: ``read(hf_key) -> tensor``.
        keys: Every HF key of the checkpoint.
    """
    prefix, ours = f"model.layers.{layer}.mlp.experts.", f"layers.{layer}.mlp.experts."
    found = {key for key in keys if key.startswith(prefix)}
    names = ("gate_proj", "up_proj", "down_proj")
    if found == {prefix + "gate_up_proj", prefix + "down_proj"}:
        gate_up = read(prefix + "gate_up_proj")
        if gate_up.shape != (args.n_routed_experts, 2 * args.moe_hidden_dim, args.dim):
            raise ValueError(f"shape mismatch for {prefix}gate_up_proj: {tuple(gate_up.shape)}")
        gate, up = gate_up.chunk(2, dim=1)
        yield ours + "gate_proj", gate.contiguous()
        yield ours + "up_proj", up.contiguous()
        yield ours + "down_proj", read(prefix + "down_proj")
        return
    expected = {f"{prefix}{expert}.{name}.weight" for expert in range(args.n_routed_experts) for name in names}
    if found != expected:
        odd = sorted(found ^ expected)[:3]
        raise ValueError(f"layer {layer}: expected {args.n_routed_experts} experts' gate/up/down_proj (or fused "
                         f"gate_up_proj + down_proj); missing or unexpected: {odd}")
    for name in names:
        stack = None
        for expert in range(args.n_routed_experts):
            key = f"{prefix}{expert}.{name}.weight"
            tensor = read(key)
            if stack is None:
                stack = tensor.new_empty(args.n_routed_experts, *tensor.shape)
            if tensor.shape != stack.shape[1:]:
                raise ValueError(f"shape mismatch for {key}: {tuple(tensor.shape)}, expected {tuple(stack.shape[1:])}")
            stack[expert] = tensor
        yield ours + name, stack


def converted(key: str, tensor: torch.Tensor, args: DeepseekArgs) -> torch.Tensor:
    """Undoes the rotate-half row permutation of DeepSeek-MoE's q/k projections; other tensors pass through."""
    return unpermute_qk(key, tensor, args) if args.model_type == "deepseek" else tensor


def deepseek_tensors_from_hf(hf_dir: str | Path, args: DeepseekArgs,
                             dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams our ``(key, tensor)`` pairs from a HF DeepSeek checkpoint.

    Non-expert tensors come one at a time in file order; when the first expert tensor of a layer is met,
    all of that layer's experts are read and stacked.
    """
    locations = tensor_locations(hf_weight_files(hf_dir))
    keys = set(locations)
    with ExitStack() as open_files:
        handles = {path: open_files.enter_context(open_safetensors(path))
                   for path in dict.fromkeys(locations.values())}

        def read(key: str) -> torch.Tensor:
            return handles[locations[key]].get_tensor(key)

        done_layers = set()
        for hf_key in locations:
            if hf_key.endswith("rotary_emb.inv_freq") or (hf_key == "lm_head.weight" and args.tie_word_embeddings):
                continue
            match = EXPERT_KEY.match(hf_key)
            if match is None:
                key = hf_key.removeprefix("model.")
                pairs = [(key, converted(key, read(hf_key), args))]
            elif int(match.group(1)) in done_layers:
                continue
            else:
                done_layers.add(int(match.group(1)))
                pairs = stacked_experts(int(match.group(1)), args, read, keys)
            for key, tensor in pairs:
                yield key, tensor.to(dtype) if dtype is not None else tensor
