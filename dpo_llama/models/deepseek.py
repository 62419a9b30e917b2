"""The DeepSeek mixture-of-experts transformers in one readable file.

Two families share everything but the attention:

* ``model_type="deepseek"`` — DeepSeek-MoE 16B (Dai et al. 2024, "DeepSeekMoE"): standard multi-head attention
  with rotary positions (LLaMA's ``Attention``);
* ``model_type="deepseek_v2"`` — DeepSeek-V2(-Lite) (DeepSeek-AI 2024, "DeepSeek-V2"): Multi-head Latent
  Attention (``MLAttention``) with YaRN rotary scaling.

Architecture:

    h_0 = Embed(tokens)
    h_l' = h_{l-1} + Attention(RMSNorm(h_{l-1}))
    h_l  = h_l'    + FFN_l(RMSNorm(h_l'))
    logits = W_out RMSNorm(h_L)

where ``FFN_l`` is a dense SwiGLU for the first ``first_k_dense_replace`` layers and otherwise a MoE block
(``DeepseekMoE``): ``y = sum_j w_j Expert_{e_j}(x) + Shared(x)`` with fine-grained routed experts chosen by a
softmax router (``dpo_llama.models.moe``) and always-on shared experts.

Rotary embeddings use interleaved pairs ``(2i, 2i+1)`` (``llama.apply_rope``). DeepSeek-MoE's HF checkpoints
store q/k rows in the rotate-half layout, which the converter undoes exactly as for LLaMA; DeepSeek-V2's
rope dims are already interleaved (its reference code de-interleaves them before rotate-half), so its
weights are used as they are.

Training: in train mode with ``aux_loss_alpha > 0`` every MoE layer computes DeepSeek's load-balancing loss;
``model.aux_loss()`` returns their sum for the latest forward pass, for the trainer to add to its loss.

Reference implementations. The math follows DeepSeek's ``modeling_deepseek.py`` (Hub remote code). Hugging
Face ``transformers`` 5.23 (``models/deepseek_v2``) agrees on every published DeepSeek-V2 config, and the tests
check logits against it; it differs on settings no published checkpoint uses: it ignores ``norm_topk_prob``
(always ``w = s * routed_scaling_factor``) and ``moe_layer_freq``; its YaRN cos/sin factor is
``mscale(s) = 0.1 ln s + 1`` unless both ``mscale`` and ``mscale_all_dim`` are set (DeepSeek's code, used here,
always takes ``mscale(s, mscale) / mscale(s, mscale_all_dim)``); and it computes no balancing loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpo_llama.models.llama import (Attention, DecoderLM, FeedForward, KVCache, RMSNorm, apply_rope, attention_heads,
                                    causal_attention, check_positive, rope_frequencies, rope_tables)
from dpo_llama.models.moe import (EXPERT_BACKENDS, KERNEL_WEIGHT_DTYPES, TOPK_METHODS, RoutedExperts, batch_aux_loss,
                                  load_cpu_kernel, routing_weights, select_experts, sequence_aux_loss)

MODEL_TYPES = ("deepseek", "deepseek_v2")
YARN_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim"}
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


@dataclass
class DeepseekArgs:
    """Hyper-parameters of a DeepSeek MoE model; round-trips through ``params.json``.

    Attributes:
        model_type: ``"deepseek"`` (multi-head attention) or ``"deepseek_v2"`` (latent attention).
        dim: Width of the residual stream.
        n_layers: Number of transformer blocks.
        n_heads: Number of attention heads.
        n_kv_heads: Key/value heads of the multi-head attention (``deepseek`` only; ``None`` = ``n_heads``).
        head_dim: Per-head width of the multi-head attention (``deepseek`` only; ``None`` = ``dim // n_heads``).
        vocab_size: Vocabulary size.
        hidden_dim: Inner width of the dense SwiGLU layers.
        moe_hidden_dim: Inner width of one expert; the shared experts together are ``n_shared_experts`` times wider.
        n_routed_experts: Routed experts per MoE layer (``E``).
        n_shared_experts: Always-on experts per MoE layer (0 for none).
        num_experts_per_tok: Routed experts per token (``k``).
        first_k_dense_replace: The first layers that keep a dense SwiGLU.
        moe_layer_freq: After those, every ``moe_layer_freq``-th layer (by index) is a MoE layer.
        norm_topk_prob: Renormalise the chosen experts' scores to sum to 1.
        routed_scaling_factor: Multiplies the (un-normalised) routing weights.
        topk_method: ``"greedy"`` or ``"group_limited_greedy"``.
        n_group: Expert groups for ``group_limited_greedy``.
        topk_group: Groups a token may use with ``group_limited_greedy``.
        scoring_func: Router scoring; only ``"softmax"``.
        aux_loss_alpha: Weight of the load-balancing loss (0 disables it).
        seq_aux: Sequence-level (True) or batch-level (False) balancing loss.
        q_lora_rank: Rank of the query compression (``None`` = a plain ``q_proj``) (``deepseek_v2``).
        kv_lora_rank: Width of the compressed key/value latent (``deepseek_v2``).
        qk_nope_head_dim: Per-head query/key dims without rotary positions (``deepseek_v2``).
        qk_rope_head_dim: Per-head query/key dims with rotary positions, the key part shared by all heads
            (``deepseek_v2``).
        v_head_dim: Per-head value width (``deepseek_v2``).
        norm_eps: RMSNorm epsilon.
        rope_theta: Rotary base frequency.
        rope_scaling: ``None`` or YaRN (``deepseek_v2``): ``{"rope_type": "yarn", "factor",
            "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}``.
        max_seq_len: Longest sequence the rotary tables and KV cache are built for.
        tie_word_embeddings: Share the embedding matrix with the output head.
        experts_backend: How routed experts are computed: ``"torch"``, ``"cpu_kernel"`` or ``"cpu_kernel_int8"``
            (a run-time choice; see ``DeepseekTransformer.set_experts_backend``).
    """

    model_type: str = "deepseek_v2"
    dim: int = 2048
    n_layers: int = 27
    n_heads: int = 16
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 102400
    hidden_dim: int = 10944
    moe_hidden_dim: int = 1408
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    experts_backend: str = "torch"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        check_positive(self, ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "moe_hidden_dim",
                              "n_routed_experts", "max_seq_len"))
        if self.model_type == "deepseek":
            self.n_kv_heads, self.head_dim = attention_heads(self.dim, self.n_heads, self.n_kv_heads, self.head_dim)
            if self.rope_scaling is not None:
                raise ValueError("rope_scaling is only supported for deepseek_v2 (YaRN)")
        else:
            check_positive(self, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary embeddings turn "
                                 "pairs of dimensions)")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "yarn":
            raise ValueError(f"rope_scaling must be YaRN ({{'rope_type': 'yarn', ...}}), got {self.rope_scaling}")
        if self.rope_scaling is not None and set(self.rope_scaling) - YARN_KEYS:
            raise ValueError(f"unsupported YaRN keys {sorted(set(self.rope_scaling) - YARN_KEYS)}")
        if self.scoring_func != "softmax":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.topk_method == "group_limited_greedy" and not (
                self.n_group and self.topk_group and self.n_routed_experts % self.n_group == 0
                and self.topk_group <= self.n_group):
            raise ValueError(f"group_limited_greedy needs n_group dividing n_routed_experts={self.n_routed_experts} "
                             f"and 0 < topk_group <= n_group (got n_group={self.n_group}, "
                             f"topk_group={self.topk_group})")
        if not isinstance(self.num_experts_per_tok, int) or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts")
        if self.experts_backend not in EXPERT_BACKENDS:
            raise ValueError(f"experts_backend must be one of {EXPERT_BACKENDS}, got {self.experts_backend!r}")

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block ``layer_id`` has a MoE feed-forward (DeepSeek's rule)."""
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (the content of ``params.json``), without the run-time
        ``experts_backend``: the same weights must give the same checkpoint, and its fingerprint, whichever
        backend computed them."""
        params = asdict(self)
        del params["experts_backend"]
        return params

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "DeepseekArgs":
        """Builds args from ``params.json`` content, refusing unknown keys. An ``experts_backend`` (in files written
        before :meth:`to_dict` left it out) is dropped: the backend is chosen at run time, by
        ``set_experts_backend``, which also freezes the experts the kernel needs frozen and falls back to PyTorch
        where it cannot build."""
        unknown = sorted(set(params) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys in params.json for {cls.__name__}: {unknown}")
        return cls(**{key: value for key, value in params.items() if key != "experts_backend"})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN rotary frequencies (Peng et al. 2023, "YaRN"), as DeepSeek-V2's reference implementation.

    With ``f_i = theta^(-2i/d)``, scale ``s = factor`` and pre-training length ``L``: the dimension that turns
    ``r`` times over ``L`` positions is ``d(r) = d ln(L / (2 pi r)) / (2 ln theta)``; with
    ``lo = floor(d(beta_fast))`` and ``hi = ceil(d(beta_slow))`` (clamped to ``[0, d-1]``) and the ramp
    ``g_i = clamp((i - lo) / (hi - lo), 0, 1)``:

        f'_i = (f_i / s) g_i + f_i (1 - g_i)       # fast dims keep f, slow dims are interpolated

    Returns:
        ``(inv_freq [d/2], attention_factor)`` with ``attention_factor = mscale(s, mscale) / mscale(s,
        mscale_all_dim)``, which multiplies cos and sin (defaults as the reference: ``mscale=1``,
        ``mscale_all_dim=0``).
    """
    factor = scaling["factor"]
    old_len = scaling.get("original_max_position_embeddings", 4096)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.get("beta_fast", 32))), 0)
    high = min(math.ceil(correction_dim(scaling.get("beta_slow", 1))), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = rope_frequencies(dim, theta, None)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = (yarn_mscale(factor, scaling.get("mscale", 1))
                        / yarn_mscale(factor, scaling.get("mscale_all_dim", 0)))
    return inv_freq, attention_factor


def mla_softmax_scale(args: DeepseekArgs) -> float:
    """``1 / sqrt(qk_nope + qk_rope)``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN (reference code)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if args.rope_scaling is not None and args.rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(args.rope_scaling["factor"], args.rope_scaling["mscale_all_dim"]) ** 2
    return scale


class LatentCache(nn.Module):
    """MLA's generation cache: the normalised latent ``[B, S, kv_lora_rank]`` and rotated shared key
    ``[B, S, qk_rope_head_dim]`` per position — 576 numbers per token for DeepSeek-V2-Lite instead of
    ``2 * 16 * 192`` for full keys/values. Keys and values are re-expanded by ``kv_b_proj`` at every step."""

    def __init__(self, batch_size: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("latent", torch.zeros(batch_size, max_seq_len, kv_lora_rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("k_pe", torch.zeros(batch_size, max_seq_len, rope_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, start_pos: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes ``latent, k_pe`` (``[B, T, .]``) at ``start_pos`` and returns the filled prefixes."""
        end = start_pos + latent.shape[1]
        self.latent[:, start_pos:end] = latent
        self.k_pe[:, start_pos:end] = k_pe
        return self.latent[:, :end], self.k_pe[:, :end]


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, section 2.1).

    For input ``x`` (per position) and ``H`` heads:

        q = W_q x    or    W_qb RMSNorm(W_qa x)                      # [H, d_nope + d_rope]
        [c, k_r] = W_kva x;  c = RMSNorm(c)                           # latent c [kv_lora_rank], k_r [d_rope]
        [k_nope, v] = W_kvb c                                          # [H, d_nope], [H, d_v]
        k = [k_nope, RoPE(k_r)] (k_r shared by all heads),  q = [q_nope, RoPE(q_rope)]
        out = W_o softmax(q k^T * scale + causal) v,   scale = mla_softmax_scale(args)
    """

    def __init__(self, args: DeepseekArgs):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = args.n_heads, args.q_lora_rank, args.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(args.dim, args.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, args.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, args.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, args.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(args.n_heads * self.v_dim, args.dim, bias=False)
        self.softmax_scale = mla_softmax_scale(args)
        self.kv_cache: LatentCache | None = None

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, d_nope + d_rope]`` queries (rotary part not yet rotated)."""
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.unflatten(-1, (self.n_heads, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope[:, :, None], cos, sin)[:, :, 0]
        if self.kv_cache is not None:
            latent, k_rope = self.kv_cache.update(start_pos, latent, k_rope)
        k_nope, v = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start_pos,
                               scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class DeepseekMoE(nn.Module):
    """DeepSeekMoE feed-forward: softmax router ``gate``, routed ``experts`` and always-on ``shared_experts``.

    ``y = sum_j w_j Expert_{e_j}(x) + Shared(x)`` with ``(e_j, w_j)`` from ``moe.select_experts`` and
    ``moe.routing_weights``; in train mode with ``aux_loss_alpha > 0`` it also returns the load-balancing loss.
    """

    def __init__(self, args: DeepseekArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.n_routed_experts, bias=False)
        self.experts = RoutedExperts(args.n_routed_experts, args.dim, args.moe_hidden_dim, args.experts_backend)
        self.shared_experts = (FeedForward(args.dim, args.n_shared_experts * args.moe_hidden_dim)
                               if args.n_shared_experts else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router on ``x [N, H]``: float32 ``scores [N, E]``, ``topk_ids [N, k]``, ``topk_weights [N, k]``."""
        a = self.args
        with torch.autocast(x.device.type, enabled=False):  # float32 under mixed precision too, as in the reference
            scores = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        topk_scores, topk_ids = select_experts(scores, a.num_experts_per_tok, a.topk_method, a.n_group, a.topk_group)
        return scores, topk_ids, routing_weights(topk_scores, a.norm_topk_prob, a.routed_scaling_factor)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(y [B, T, H], aux_loss or None)`` for ``x`` ``[B, T, H]``: the balancing loss per sequence
        ``[B]`` (``seq_aux``) or of the batch (a scalar); ``valid`` ``[B, T]`` marks the real (unpadded) tokens it
        counts (default: all)."""
        bsz, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, topk_ids, topk_weights = self.route(flat)
        y = self.experts(flat, topk_ids, topk_weights).view(bsz, seqlen, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        aux = None
        if self.training and self.args.aux_loss_alpha > 0:
            if self.args.seq_aux:
                aux = sequence_aux_loss(scores.view(bsz, seqlen, -1), topk_ids.view(bsz, seqlen, -1),
                                        self.args.aux_loss_alpha, valid)
            else:
                aux = batch_aux_loss(scores, topk_ids, self.args.aux_loss_alpha,
                                     None if valid is None else valid.reshape(-1))
        return y, aux


class DeepseekBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``, the ffn dense or MoE."""

    def __init__(self, args: DeepseekArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args) if args.model_type == "deepseek" else MLAttention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = DeepseekMoE(args) if args.is_moe_layer(layer_id) else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the block output and the MoE balancing loss (``None`` for dense blocks or when not computed)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        if isinstance(self.mlp, DeepseekMoE):
            y, aux = self.mlp(self.post_attention_layernorm(h), valid)
            return h + y, aux
        return h + self.mlp(self.post_attention_layernorm(h)), None


class DeepseekTransformer(DecoderLM):
    """A decoder-only DeepSeek MoE model, with the same interface as ``llama.Transformer`` plus ``aux_loss``."""

    def __init__(self, args: DeepseekArgs):
        super().__init__(args, [DeepseekBlock(args, i) for i in range(args.n_layers)])
        self.last_aux_losses: list[torch.Tensor] = []

    def init_rope(self, device=None) -> None:
        """(Re)builds the rotary cos/sin tables (YaRN-scaled for DeepSeek-V2), e.g. after loading on meta."""
        a = self.args
        if a.model_type == "deepseek":
            inv_freq, attention_factor = rope_frequencies(a.head_dim, a.rope_theta, None), 1.0
        elif a.rope_scaling is None:
            inv_freq, attention_factor = rope_frequencies(a.qk_rope_head_dim, a.rope_theta, None), 1.0
        else:
            inv_freq, attention_factor = yarn_frequencies(a.qk_rope_head_dim, a.rope_theta, a.rope_scaling)
        cos, sin = rope_tables(inv_freq, a.max_seq_len, device)
        self.register_buffer("rope_cos", cos * attention_factor, persistent=False)
        self.register_buffer("rope_sin", sin * attention_factor, persistent=False)

    def run_layers(self, h: torch.Tensor, start_pos: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Runs every block over ``h``, collecting the MoE balancing losses (over the ``valid`` tokens) into
        ``last_aux_losses``."""
        cos, sin = self.rope_slice(start_pos, h.shape[1])
        self.last_aux_losses = []
        for layer in self.layers:
            h, aux = self.run_block(layer, h, cos, sin, start_pos, valid)
            if aux is not None:
                self.last_aux_losses.append(aux)
        return h

    def aux_loss(self, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over MoE layers of the balancing losses of the latest forward pass (0 in eval / when disabled).

        Without ``row_weights`` the mean over the batch's sequences (DeepSeek's loss); with ``row_weights``
        ``[B]`` the weighted sum ``sum_b w_b aux_b`` (SFT weights each sequence by its target tokens, so that
        gradient accumulation gives what one batch gives). The batch-level loss (``seq_aux=False``) is one value
        for the whole batch: ``aux · sum_b w_b``.

        Add it to the training loss after each forward, ``loss = task_loss + model.aux_loss()``: the next
        forward pass replaces it.
        """
        if not self.last_aux_losses:
            return torch.zeros((), device=self.embed_tokens.weight.device)
        aux = torch.stack(self.last_aux_losses).sum(dim=0)
        return aux.mean() if row_weights is None else (aux * row_weights).sum()

    def moe_layers(self) -> list[DeepseekMoE]:
        """The MoE feed-forward modules (e.g. to freeze or quantize their experts)."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, DeepseekMoE)]

    def set_experts_backend(self, name: str, transposed_copy: bool = False) -> None:
        """Selects how routed experts are computed: ``"torch"``, ``"cpu_kernel"`` or ``"cpu_kernel_int8"``.

        When the C++ kernel cannot be built or loaded here (no compiler, say), the kernel backends fall back to
        ``"torch"`` with a ``RuntimeWarning`` that gives the reason; ``args.experts_backend`` records what runs.
        ``transposed_copy`` (``"cpu_kernel"`` only) keeps transposed copies of the packed experts: the backward
        through the experts runs about 1.2x faster for twice their CPU memory.
        """
        if name not in EXPERT_BACKENDS:
            raise ValueError(f"unknown experts backend {name!r}; choose from {EXPERT_BACKENDS}")
        if name in KERNEL_WEIGHT_DTYPES:
            try:
                load_cpu_kernel()
            except RuntimeError as err:
                warnings.warn(f"{err}. Falling back to experts_backend='torch'.", RuntimeWarning, stacklevel=2)
                name = "torch"
        for moe in self.moe_layers():
            moe.experts.set_backend(name, transposed_copy and name in KERNEL_WEIGHT_DTYPES)
        self.args.experts_backend = name

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocates a generation cache in every attention layer: full keys/values for multi-head attention,
        the compressed latent and shared rotary key for MLA (see ``LatentCache``)."""
        a, dtype, device = self.args, self.cache_dtype(), self.embed_tokens.weight.device
        for attn in self.attention_modules():
            if a.model_type == "deepseek":
                attn.kv_cache = KVCache(batch_size, a.n_kv_heads, max_seq_len, a.head_dim, dtype, device)
            else:
                attn.kv_cache = LatentCache(batch_size, max_seq_len, a.kv_lora_rank, a.qk_rope_head_dim, dtype,
                                            device)
