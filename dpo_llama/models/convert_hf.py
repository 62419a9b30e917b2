"""Hugging Face checkpoints (``config.json`` + safetensors) -> our format.

Two things differ from HF's layout:

* key names lose the ``model.`` prefix (``model.layers.0.self_attn.q_proj.weight`` ->
  ``layers.0.self_attn.q_proj.weight``);
* HF's conversion script permutes the rows of ``q_proj`` and ``k_proj`` of every head so that rotary
  embeddings can be applied with "rotate half" (pairs ``(i, i + d/2)``); our model uses Meta's interleaved
  pairs ``(2i, 2i + 1)``, so we apply the inverse permutation (``unpermute_rotary``).

Config layouts: the Hub's ``rope_theta`` + ``rope_scaling`` (``rope_type`` or legacy ``type``) and the
``rope_parameters`` block that recent ``transformers`` releases write are both accepted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpo_llama.models.checkpoint import TOKENIZER_FILES, errors_name, iter_safetensors, read_json_object
from dpo_llama.models.llama import ModelArgs

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """Reads ``config.json`` of a HF model directory; a key the converters need but it lacks is a ``ValueError``
    naming the file and the key."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
    return read_json_object(path)


def hf_weight_files(hf_dir: str | Path) -> list[Path]:
    """``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
    hf_dir = Path(hf_dir)
    if (hf_dir / HF_INDEX).is_file():
        weight_map = read_json_object(hf_dir / HF_INDEX)["weight_map"]
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = [hf_dir / HF_WEIGHTS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing weight files: {missing} (only safetensors checkpoints are supported)")
    return files


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Returns ``(rope_theta, rope_scaling)`` from either config layout.

    ``rope_scaling`` is normalised to a dict with a ``"rope_type"`` key, or ``None`` for plain RoPE.
    """
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def llama_args_from_hf(config: dict[str, Any]) -> ModelArgs:
    """Maps a HF ``LlamaConfig`` dict to our ``ModelArgs``, refusing features our model lacks."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported by the LLaMA model")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (LLaMA uses silu)")
    theta, scaling = rope_settings(config)
    if scaling is not None and scaling["rope_type"] != "llama3":
        raise ValueError(f"rope scaling {scaling['rope_type']!r} is not supported for llama (only 'llama3')")
    heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverts HF's rotary row permutation of a q/k projection ``[n_heads * d, in]``.

    Within each head HF stores rows ``(0, 2, 4, ..., 1, 3, 5, ...)`` of Meta's layout, i.e.
    ``hf = meta.view(h, d/2, 2, in).transpose(1, 2)``; the inverse is ``hf.view(h, 2, d/2, in).transpose(1, 2)``.
    """
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def unpermute_qk(key: str, tensor: torch.Tensor, args: Any) -> torch.Tensor:
    """``unpermute_rotary`` for a ``self_attn.q_proj`` / ``k_proj`` weight (any other tensor passes through), once
    its rows are checked to be ``heads * args.head_dim``: a config whose heads disagree with the weights is a
    ``ValueError`` naming the weight, not a failed reshape."""
    if key.endswith("self_attn.q_proj.weight"):
        heads = args.n_heads
    elif key.endswith("self_attn.k_proj.weight"):
        heads = args.n_kv_heads
    else:
        return tensor
    if tensor.shape[0] != heads * args.head_dim:
        raise ValueError(f"shape mismatch for {key}: {tuple(tensor.shape)}, expected {heads * args.head_dim} rows "
                         f"({heads} heads of head_dim {args.head_dim})")
    return unpermute_rotary(tensor, heads)


def llama_tensors_from_hf(hf_dir: str | Path, args: ModelArgs,
                          dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams our ``(key, tensor)`` pairs from a HF LLaMA checkpoint, one tensor in memory at a time."""
    for hf_key, tensor in iter_safetensors(hf_weight_files(hf_dir)):
        if hf_key.endswith("rotary_emb.inv_freq"):
            continue
        if hf_key == "lm_head.weight" and args.tie_word_embeddings:
            continue
        key = hf_key.removeprefix("model.")
        tensor = unpermute_qk(key, tensor, args)
        yield key, tensor.to(dtype) if dtype is not None else tensor


def tokenizer_files(src_dir: str | Path) -> list[Path]:
    """The tokenizer files present in a model directory."""
    return [Path(src_dir) / name for name in TOKENIZER_FILES if (Path(src_dir) / name).is_file()]


def warn_if_no_tokenizer(src_dir: str | Path, out_dir: str | Path, needed_for: str) -> None:
    """Warns on stderr when ``src_dir`` holds no tokenizer files: the model written from it to ``out_dir`` (which
    copies them) has none either, and needs them ``needed_for``."""
    if not tokenizer_files(src_dir):
        print(f"warning: {src_dir} holds no tokenizer (tokenizer.json / tokenizer.model): copy the model's tokenizer "
              f"files into {out_dir} before {needed_for}", file=sys.stderr)


def hf_args_and_tensors(hf_dir: str | Path, config: dict[str, Any],
                        dtype: torch.dtype | None = None) -> tuple[Any, Iterator[tuple[str, torch.Tensor]]]:
    """Dispatches on ``config["model_type"]``: returns our args and a stream of converted tensors (a lazy one: an
    error in the config, which names ``config.json``, is raised here, one in the weights while streaming)."""
    model_type = config.get("model_type")
    with errors_name(Path(hf_dir) / "config.json"):
        if model_type == "llama":
            args = llama_args_from_hf(config)
            return args, llama_tensors_from_hf(hf_dir, args, dtype)
        if model_type in ("deepseek", "deepseek_v2"):
            from dpo_llama.models.convert_deepseek import deepseek_args_from_hf, deepseek_tensors_from_hf
            args = deepseek_args_from_hf(config)
            return args, deepseek_tensors_from_hf(hf_dir, args, dtype)
        raise ValueError(f"unsupported model_type {model_type!r} (supported: 'llama', 'deepseek', 'deepseek_v2')")
