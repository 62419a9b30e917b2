"""Builders of tiny random checkpoints in the real on-disk formats (HF LLaMA and DeepSeek, Meta), for the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpo_llama.models.convert_hf import unpermute_rotary

TINY_HF_LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def make_hf_llama(out_dir: Path, max_shard_size: str | None = None, **overrides):
    """Saves a random-weight ``LlamaForCausalLM`` with ``save_pretrained``; returns the HF model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_HF_LLAMA, **overrides})
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model


HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")


def meta_key(hf_key: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.attention.wq.weight``."""
    if hf_key in HF_TO_META:
        return HF_TO_META[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    return f"layers.{layer}.{LAYER_HF_TO_META[rest.removesuffix('.weight')]}.weight"


def write_meta_checkpoint(hf_model, out_dir: Path, n_shards: int = 2, embedding_split_dim: int = 1) -> None:
    """Writes ``hf_model`` in Meta's exact layout: ``consolidated.0N.pth`` model-parallel shards + ``params.json``.

    q/k rows go back to Meta's interleaved rotary layout; column-parallel weights are split along dim 0,
    row-parallel ones along dim 1, the embedding along dim 1 (LLaMA-2's ParallelEmbedding) or 0 (LLaMA-3's
    VocabParallelEmbedding), norms are replicated; like LLaMA-2 checkpoints, every shard carries a
    ``rope.freqs`` buffer.
    """
    cfg = hf_model.config
    shards = [{} for _ in range(n_shards)]
    for hf_key, tensor in hf_model.state_dict().items():
        key = meta_key(hf_key)
        if key.endswith("attention.wq.weight"):
            tensor = unpermute_rotary(tensor, cfg.num_attention_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = unpermute_rotary(tensor, cfg.num_key_value_heads)
        name = key.removesuffix(".weight").rsplit(".", 1)[-1]
        if name == "tok_embeddings":
            pieces = tensor.chunk(n_shards, dim=embedding_split_dim)
        elif name in COLUMN_PARALLEL:
            pieces = tensor.chunk(n_shards, dim=0)
        elif name in ROW_PARALLEL:
            pieces = tensor.chunk(n_shards, dim=1)
        else:
            pieces = [tensor] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        shard["rope.freqs"] = freqs
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")
    params = {"dim": cfg.hidden_size, "multiple_of": 32, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "n_layers": cfg.num_hidden_layers, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": -1}
    (out_dir / "params.json").write_text(json.dumps(params))


# ----------------------------------------------------------------------------- DeepSeek

TINY_HF_V2 = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=2,
                  num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128, norm_topk_prob=False)


def randomize_(model: torch.nn.Module) -> None:
    """O(1) logits instead of HF's tiny 0.02-std init: norms ``1 + 0.2 N(0,1)``, weights ``N(0, 1/fan_in)``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))


def make_hf_deepseek_v2(out_dir, save_original_format: bool = True, **overrides):
    """Saves a random-weight ``DeepseekV2ForCausalLM`` with ``save_pretrained``; returns it (eval mode)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**TINY_HF_V2, **overrides})).eval()
    randomize_(model)
    model.save_pretrained(out_dir, save_original_format=save_original_format)
    return model


def deepseek_moe_config(**overrides) -> dict:
    """deepseek-moe-16b-base's config.json with tiny sizes (same keys and layout)."""
    config = {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModel": "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 80,
        "max_position_embeddings": 64, "model_type": "deepseek", "moe_intermediate_size": 16, "moe_layer_freq": 1,
        "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
        "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 4, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
        "vocab_size": 120,
    }
    return {**config, **overrides}


def random_deepseek_state(cfg) -> dict[str, torch.Tensor]:
    """HF-layout weights (real key names, rotate-half q/k) for a ``deepseek`` config."""
    h, inter, moe_inter = cfg["hidden_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"]

    def w(rows, cols):
        return torch.randn(rows, cols) / math.sqrt(cols)

    def norm(size):
        return 1 + 0.2 * torch.randn(size)

    def mlp(prefix, width):
        return {f"{prefix}gate_proj.weight": w(width, h), f"{prefix}up_proj.weight": w(width, h),
                f"{prefix}down_proj.weight": w(h, width)}

    sd = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h), "model.norm.weight": norm(h),
          "lm_head.weight": w(cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h)})
        sd.update({f"{p}self_attn.{n}_proj.weight": w(h, h) for n in "qkvo"})
        if layer < cfg["first_k_dense_replace"]:
            sd.update(mlp(p + "mlp.", inter))
            continue
        sd[p + "mlp.gate.weight"] = torch.randn(cfg["n_routed_experts"], h)
        for expert in range(cfg["n_routed_experts"]):
            sd.update(mlp(f"{p}mlp.experts.{expert}.", moe_inter))
        sd.update(mlp(p + "mlp.shared_experts.", cfg["n_shared_experts"] * moe_inter))
    return sd


def write_hf_deepseek(out_dir, cfg, sd) -> None:
    """config.json + two safetensors shards and their index; the cut falls inside layer 1's experts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = sorted(sd)
    cut = keys.index("model.layers.1.mlp.experts.3.down_proj.weight")
    shards = {"model-00001-of-00002.safetensors": keys[:cut], "model-00002-of-00002.safetensors": keys[cut:]}
    for name, shard_keys in shards.items():
        save_file({k: sd[k].bfloat16() for k in shard_keys}, str(out_dir / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
