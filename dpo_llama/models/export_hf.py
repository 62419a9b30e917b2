"""Our checkpoints -> Hugging Face model directories (``config.json`` + safetensors): the inverse of
:mod:`dpo_llama.models.convert_hf` and :mod:`dpo_llama.models.convert_deepseek`, so that a merged SFT or DPO model
serves with ``transformers`` or vLLM. LLaMA becomes ``LlamaForCausalLM``; DeepSeek-V2 ``DeepseekV2ForCausalLM``;
DeepSeek-MoE (``deepseek``) the layout of deepseek-moe-16b's own files (its modeling code is remote code on the Hub).

* keys get the ``model.`` prefix back (``lm_head.weight`` has none, and is left out with tied embeddings, as
  ``save_pretrained`` does);
* the rows of ``q_proj`` and ``k_proj`` of every head are permuted to HF's "rotate half" order
  (:func:`permute_rotary`, the inverse of ``convert_hf.unpermute_rotary``), so a HF -> ours -> HF round trip
  gives back the same tensors bit for bit;
* DeepSeek's stacked routed experts ``layers.L.mlp.experts.{gate,up,down}_proj`` ``[E, ...]`` are written one
  tensor per expert, ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, as the original checkpoints and
  ``save_pretrained`` store them; DeepSeek-MoE's q/k rows get the rotate-half permutation as LLaMA's do;
* ``config.json`` holds the model's shape and routing, ``rope_theta`` and the ``rope_scaling`` (LLaMA-3.1's, or
  DeepSeek-V2's YaRN with both the ``type`` key of the original files and ``rope_type``), and the token ids of
  the tokenizer copied beside it;
* a bare sentencepiece ``tokenizer.model`` (LLaMA-2 from Meta's files, the demo) gets the ``tokenizer_config.json``
  that makes ``AutoTokenizer`` encode as Meta's code does (BOS first, ``legacy`` spaces; text that starts with a
  space is the one difference found).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece
import torch

from dpo_llama.models.checkpoint import (DEFAULT_SHARD_BYTES, iter_safetensors, read_params, weight_files,
                                         write_model_dir)
from dpo_llama.models.convert_hf import tokenizer_files
from dpo_llama.models.deepseek import DeepseekArgs
from dpo_llama.models.llama import ModelArgs
from dpo_llama.models.tokenizer import load_tokenizer

STACKED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)")


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows of a q/k projection ``[n_heads * d, in]`` -> HF's: within each head rows
    ``(0, 2, 4, ..., 1, 3, 5, ...)``, i.e. ``meta.view(h, d/2, 2, in).transpose(1, 2)``."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config(args: ModelArgs, dtype: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """The ``LlamaConfig`` of ``args`` as ``config.json`` holds it, with the weights' dtype (``"bfloat16"``, ...)
    and ``token_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id`` where the tokenizer has them)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, **token_ids,
    }


def deepseek_hf_config(args: DeepseekArgs, dtype: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """The ``DeepseekV2Config`` (``deepseek_v2``) or deepseek-moe's ``DeepseekConfig`` (``deepseek``) of ``args`` as
    ``config.json`` holds it, with the weights' dtype and the tokenizer's ``token_ids``.

    Raises:
        ValueError: a ``deepseek`` model whose ``head_dim`` is not ``dim / n_heads`` (its config cannot say so).
    """
    v2 = args.model_type == "deepseek_v2"
    if not v2 and args.head_dim not in (None, args.dim // args.n_heads):
        raise ValueError(f"head_dim={args.head_dim} differs from dim / n_heads, which a deepseek config.json cannot hold")
    scaling = None if args.rope_scaling is None else {"type": args.rope_scaling["rope_type"], **args.rope_scaling}
    config = {
        "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekForCausalLM"], "model_type": args.model_type,
        "hidden_act": "silu", "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "moe_intermediate_size": args.moe_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "n_routed_experts": args.n_routed_experts, "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.num_experts_per_tok, "first_k_dense_replace": args.first_k_dense_replace,
        "moe_layer_freq": args.moe_layer_freq, "norm_topk_prob": args.norm_topk_prob,
        "routed_scaling_factor": args.routed_scaling_factor, "topk_method": args.topk_method,
        "n_group": args.n_group, "topk_group": args.topk_group, "scoring_func": args.scoring_func,
        "aux_loss_alpha": args.aux_loss_alpha, "seq_aux": args.seq_aux, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta,
        "rope_scaling": scaling, "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False,
        "torch_dtype": dtype, **token_ids,
    }
    if v2:
        config.update(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
                      qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                      v_head_dim=args.v_head_dim)
    return config


def transformers_differences(args: ModelArgs | DeepseekArgs) -> list[str]:
    """The settings of a DeepSeek-V2 model that transformers' ``DeepseekV2ForCausalLM`` does not follow (see
    :mod:`dpo_llama.models.deepseek`): an export with any of them computes other logits there. No published
    checkpoint has one."""
    if args.model_type != "deepseek_v2":
        return []
    found = []
    if args.norm_topk_prob and args.num_experts_per_tok > 1:
        found.append("norm_topk_prob=true (it never renormalises the chosen experts' scores)")
    if args.moe_layer_freq != 1:
        found.append(f"moe_layer_freq={args.moe_layer_freq} (it makes every layer from first_k_dense_replace on a "
                     f"MoE layer)")
    scaling = args.rope_scaling or {}
    mscale, mscale_all_dim = scaling.get("mscale", 1.0), scaling.get("mscale_all_dim", 0.0)
    if scaling.get("factor", 1.0) > 1 and not (mscale and mscale_all_dim) and (mscale, mscale_all_dim) != (1, 0):
        found.append(f"YaRN's mscale={mscale}, mscale_all_dim={mscale_all_dim} (it scales cos and sin by "
                     f"0.1 ln(factor) + 1 unless both are set)")
    return found


def hf_tensors(ckpt_dir: str | os.PathLike, args: ModelArgs | DeepseekArgs,
               dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams HF ``(key, tensor)`` pairs from our checkpoint, one tensor (or one stack of experts) in memory at a
    time."""
    permuted = args.model_type in ("llama", "deepseek")
    for key, tensor in iter_safetensors(weight_files(ckpt_dir)):
        experts = STACKED_EXPERTS.fullmatch(key)
        if experts is not None:
            layer, name = experts.groups()
            for index, weight in enumerate(tensor):
                yield f"model.layers.{layer}.mlp.experts.{index}.{name}.weight", weight.to(dtype or weight.dtype,
                                                                                          copy=True)
            continue
        if permuted and key.endswith("self_attn.q_proj.weight"):
            tensor = permute_rotary(tensor, args.n_heads)
        elif permuted and key.endswith("self_attn.k_proj.weight"):
            tensor = permute_rotary(tensor, args.n_kv_heads or args.n_heads)
        yield (key if key == "lm_head.weight" else f"model.{key}"), tensor.to(dtype) if dtype else tensor


def token_ids(ckpt_dir: str | os.PathLike) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the checkpoint's tokenizer (none without one).

    No ``pad_token_id`` where the pad is EOS (our fallback for tokenizers without a pad, such as LLaMA's):
    transformers makes it the input embedding's ``padding_idx``, whose row then gets no gradient, and EOS's must.
    """
    if not tokenizer_files(ckpt_dir):
        return {}
    tokenizer = load_tokenizer(ckpt_dir)
    pad_id = None if tokenizer.pad_id == tokenizer.eos_id else tokenizer.pad_id
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad_id}
    return {name: value for name, value in ids.items() if value is not None and value >= 0}


def sentencepiece_tokenizer_config(model_file: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` for a bare LLaMA-2 style ``tokenizer.model``."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                      ("unk_token", sp.unk_id())) if i >= 0}
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
            **pieces}


def export_model(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Writes ``out_dir`` as a HF model directory (:func:`~dpo_llama.models.checkpoint.write_model_dir`): the
    weights sharded as ``save_pretrained`` names them, the tokenizer files, then ``config.json`` (an interrupted
    export reads as none), and for a bare sentencepiece ``tokenizer.model`` its ``tokenizer_config.json``.

    Returns:
        ``num_params``, ``bytes``, ``dtypes`` and ``files`` written.

    Raises:
        ValueError: a DeepSeek-MoE checkpoint whose ``head_dim`` its config cannot hold.

    Warns:
        UserWarning: for each :func:`transformers_differences` of the model.
    """
    args = read_params(ckpt_dir)
    ids = token_ids(ckpt_dir)
    to_config = hf_config if args.model_type == "llama" else deepseek_hf_config
    to_config(args, "float32", ids)  # refuses what config.json cannot hold before any file is written
    for difference in transformers_differences(args):
        warnings.warn(f"{out_dir}: transformers' DeepseekV2ForCausalLM ignores {difference}; its logits will differ "
                      f"from this model's", stacklevel=2)

    def config(dtypes: set[str]) -> str:
        widest = max(dtypes, key=lambda name: torch.finfo(getattr(torch, name)).bits, default="float32")
        return json.dumps(to_config(args, widest, ids), indent=2)

    out_dir = Path(out_dir)
    summary = write_model_dir(out_dir, hf_tensors(ckpt_dir, args, dtype), tokenizer_files(ckpt_dir), "config.json",
                              config, max_shard_bytes)
    if [Path(f).name for f in summary["files"] if Path(f).name.startswith("tokenizer")] == ["tokenizer.model"]:
        tokenizer_config = json.dumps(sentencepiece_tokenizer_config(out_dir / "tokenizer.model"), indent=2)
        (out_dir / "tokenizer_config.json").write_text(tokenizer_config, encoding="utf-8")
        summary["files"].append(str(out_dir / "tokenizer_config.json"))
    return summary
