"""Model shapes of the real LLaMA-family checkpoints, plus tiny sizes for tests.

``get_preset(name)`` returns a fresh args dataclass; chat / instruct variants share their base model's shape.
The numbers are those of the published ``params.json`` / ``config.json`` files.
"""

from __future__ import annotations

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
CHAT_ALIASES = {
    "llama-2-7b-chat": "llama-2-7b", "llama-2-13b-chat": "llama-2-13b", "llama-2-70b-chat": "llama-2-70b",
    "llama-3-8b-instruct": "llama-3-8b", "llama-3-70b-instruct": "llama-3-70b",
    "llama-3.1-8b-instruct": "llama-3.1-8b", "llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.2-1b-instruct": "llama-3.2-1b", "llama-3.2-3b-instruct": "llama-3.2-3b",
    "tinyllama-1.1b-chat": "tinyllama-1.1b",
}


def preset_names() -> list[str]:
    """Every preset name, chat aliases included."""
    return sorted([*LLAMA_PRESETS, *CHAT_ALIASES])


def get_preset(name: str, **overrides) -> ModelArgs:
    """Returns the args of a named preset, with optional field overrides (e.g. ``vocab_size``)."""
    key = CHAT_ALIASES.get(name, name)
    if key not in LLAMA_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return ModelArgs(**{**LLAMA_PRESETS[key], **overrides})
