"""Builders of tiny random checkpoints in the real on-disk formats (HF and Meta), shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")


def meta_key(hf_key: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.attention.wq.weight``."""
    if hf_key in HF_TO_META:
        return HF_TO_META[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    return f"layers.{layer}.{LAYER_HF_TO_META[rest.removesuffix('.weight')]}.weight"


def write_meta_checkpoint(hf_model, out_dir: Path, n_shards: int = 2) -> None:
    """Writes ``hf_model`` in Meta's exact layout: ``consolidated.0N.pth`` model-parallel shards + ``params.json``.

    q/k rows go back to Meta's interleaved rotary layout; column-parallel weights are split along dim 0,
    row-parallel ones (and LLaMA-2's ParallelEmbedding) along dim 1, norms are replicated; like LLaMA-2
    checkpoints, every shard carries a ``rope.freqs`` buffer.
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
        if name in COLUMN_PARALLEL:
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

