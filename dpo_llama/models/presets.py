"""Model shapes of the real LLaMA-family and DeepSeek MoE checkpoints, plus tiny sizes for tests.

``get_preset(name)`` returns a fresh args dataclass (``ModelArgs`` or ``DeepseekArgs``); chat / instruct variants
share their base model's shape. The numbers are those of the published ``params.json`` / ``config.json`` files.
"""

from __future__ import annotations

from dpo_llama.models.deepseek import DeepseekArgs
from dpo_llama.models.llama import ModelArgs

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
LLAMA32_SCALING = {**LLAMA31_SCALING, "factor": 32.0}

_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, rope_scaling=LLAMA31_SCALING, max_seq_len=131072)

LLAMA_PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "llama-2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama-2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "llama-3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
    "llama-3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "llama-3.1-8b": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
    "llama-3.1-70b": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "llama-3.2-1b": dict(_LLAMA31, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         rope_scaling=LLAMA32_SCALING, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA31, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                         rope_scaling=LLAMA32_SCALING, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(_LLAMA2, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           max_seq_len=2048),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=256),
    "tiny-tied": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                      max_seq_len=256, tie_word_embeddings=True),
}
DEEPSEEK_V2_YARN = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_DEEPSEEK_MOE = dict(vocab_size=102400, dim=2048, n_heads=16, hidden_dim=10944, moe_hidden_dim=1408,
                     n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                     norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True, norm_eps=1e-6, rope_theta=10000.0)
_TINY_MOE = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=160, moe_hidden_dim=32, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, max_seq_len=256)

DEEPSEEK_PRESETS: dict[str, dict] = {
    "deepseek-moe-16b": dict(_DEEPSEEK_MOE, model_type="deepseek", n_layers=28, max_seq_len=4096),
    "deepseek-v2-lite": dict(_DEEPSEEK_MOE, model_type="deepseek_v2", n_layers=27, topk_method="greedy", n_group=1,
                             topk_group=1, routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_scaling=DEEPSEEK_V2_YARN,
                             max_seq_len=163840),
    "tiny-deepseek": dict(_TINY_MOE, model_type="deepseek"),
    "tiny-deepseek-v2": dict(_TINY_MOE, model_type="deepseek_v2", kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16,
                             rope_scaling=dict(DEEPSEEK_V2_YARN, factor=4, original_max_position_embeddings=64)),
}
CHAT_ALIASES = {
    "llama-2-7b-chat": "llama-2-7b", "llama-2-13b-chat": "llama-2-13b", "llama-2-70b-chat": "llama-2-70b",
    "llama-3-8b-instruct": "llama-3-8b", "llama-3-70b-instruct": "llama-3-70b",
    "llama-3.1-8b-instruct": "llama-3.1-8b", "llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.2-1b-instruct": "llama-3.2-1b", "llama-3.2-3b-instruct": "llama-3.2-3b",
    "tinyllama-1.1b-chat": "tinyllama-1.1b",
    "deepseek-moe-16b-chat": "deepseek-moe-16b", "deepseek-v2-lite-chat": "deepseek-v2-lite",
}


def preset_names() -> list[str]:
    """Every preset name, chat aliases included."""
    return sorted([*LLAMA_PRESETS, *DEEPSEEK_PRESETS, *CHAT_ALIASES])


def get_preset(name: str, **overrides) -> ModelArgs | DeepseekArgs:
    """Returns the args of a named preset, with optional field overrides (e.g. ``vocab_size``)."""
    key = CHAT_ALIASES.get(name, name)
    if key in DEEPSEEK_PRESETS:
        return DeepseekArgs(**{**DEEPSEEK_PRESETS[key], **overrides})
    if key not in LLAMA_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return ModelArgs(**{**LLAMA_PRESETS[key], **overrides})
