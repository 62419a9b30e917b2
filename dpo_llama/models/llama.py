"""The LLaMA transformer in one readable file (LLaMA-2, LLaMA-3/3.1/3.2, TinyLlama).

Architecture (Touvron et al. 2023, "LLaMA"; Grattafiori et al. 2024, "The Llama 3 Herd of Models"):

    h_0 = Embed(tokens)
    h_l' = h_{l-1} + Attention(RMSNorm(h_{l-1}))         # grouped-query attention with rotary positions
    h_l  = h_l'    + SwiGLU(RMSNorm(h_l'))                # W_down(silu(W_gate x) * W_up x)
    logits = W_out RMSNorm(h_L)                           # W_out may be tied to Embed

Rotary embeddings use Meta's *interleaved* layout: dimensions (2i, 2i+1) of every head form one rotating
pair. Hugging Face checkpoints permute the rows of q_proj / k_proj into a "rotate-half" layout;
``scripts/convert_hf_checkpoint.py`` undoes that permutation, so the math here is Meta's.

The model exposes two levels so trainers never build logits they do not need:

* ``model.forward_hidden(tokens)`` -> final hidden states ``[B, T, dim]`` (after the last RMSNorm);
* ``model.output_logits(hidden)`` -> logits for any subset of those hidden states.

``model(tokens)`` is simply ``output_logits(forward_hidden(tokens)).float()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    """Hyper-parameters of a LLaMA model; round-trips through ``params.json``.

    Attributes:
        model_type: Always ``"llama"`` for this class (selects the model class when loading).
        dim: Width of the residual stream.
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (grouped-query attention); ``None`` means ``n_heads``.
        head_dim: Per-head width; ``None`` means ``dim // n_heads``.
        vocab_size: Vocabulary size.
        hidden_dim: Inner width of the SwiGLU MLP.
        norm_eps: RMSNorm epsilon.
        rope_theta: Rotary base frequency.
        rope_scaling: ``None`` or ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (LLaMA-3.1 frequency scaling).
        max_seq_len: Longest sequence the rotary tables and KV cache are built for.
        tie_word_embeddings: Share the embedding matrix with the output head (LLaMA-3.2 1B/3B).
    """

    model_type: str = "llama"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        check_positive(self, ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "max_seq_len"))
        self.n_kv_heads, self.head_dim = attention_heads(self.dim, self.n_heads, self.n_kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (the content of ``params.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Builds args from ``params.json`` content, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown keys in params.json for {cls.__name__}: {unknown}")
        return cls(**params)


def check_positive(args: Any, names: tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming the first of ``args``' integer fields ``names`` that is not a positive int."""
    for name in names:
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def attention_heads(dim: int, n_heads: int, n_kv_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """Resolves and checks the head layout of a grouped-query attention: returns ``(n_kv_heads, head_dim)``, with
    ``n_kv_heads`` defaulting to ``n_heads`` and ``head_dim`` to ``dim / n_heads``.

    Raises:
        ValueError: ``n_heads`` is not a multiple of ``n_kv_heads``; ``dim`` is not a multiple of ``n_heads`` with
            no ``head_dim`` given; or ``head_dim`` is odd (rotary embeddings turn pairs of dimensions).
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads!r}")
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be a multiple of n_heads={n_heads} (or head_dim given)")
        head_dim = dim // n_heads
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r} must be a positive even integer (rotary embeddings turn pairs "
                         "of dimensions)")
    return n_kv_heads, head_dim


def refuse_second_derivative(name: str) -> None:
    """Called first in a hand-written backward: under ``create_graph=True`` (grad mode on in the backward) it
    raises, since the backward reads values the forward computed without a graph, and a second derivative through
    it (a gradient penalty, a Hessian-vector product) would come out silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name} has no second derivative (its backward is hand-written): create_graph=True "
                           "is not supported")


class RMSNormFunction(torch.autograd.Function):
    """``y = w * cast(x r)``, ``r = (mean(x^2) + eps)^(-1/2)`` over the last dimension (of size ``D``), computed in
    float32 (or float64 for float64 ``x``) and cast back to ``x``'s dtype before the weight multiply, as the
    reference implementations do. ``w`` is used in ``x``'s dtype (a trained norm weight is float32 beside bf16
    activations, see ``lora.widen_trained_norms``).

    Backward, with ``n = x r`` and ``g = cast(dL/dy * w)`` in that precision::

        dL/dx = g r - x r^3 sum(g x) / D  ( = r (g - n mean(g n)) ),    dL/dw = sum over tokens of dL/dy * cast(n)

    in the order autograd runs these operations, so the results are bitwise autograd's. It keeps ``x`` in its own
    dtype and ``r`` (one value per token); autograd would keep the float32 copy of ``x``, twice the bytes of a
    bfloat16 ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight.to(x.dtype) * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        refuse_second_derivative("RMSNorm")
        x, weight, r = ctx.saved_tensors
        x32 = x.to(r.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = (grad_y * weight.to(x.dtype)).to(x.dtype).to(r.dtype)
            grad_r = (g * x32).sum(-1, keepdim=True)
            grad_sq = ((-0.5 * grad_r) * r.pow(3)).expand_as(x32) / x.shape[-1]
            grad_x = (g * r + grad_sq * (2.0 * x32)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * (x32 * r).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``y = w * x / sqrt(mean(x^2) + eps)``.

    The statistics are computed in float32 and the result is cast back before the weight multiply, as the
    reference implementations do (:class:`RMSNormFunction`).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


def llama3_scale_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """LLaMA-3.1 rotary frequency scaling.

    With wavelength ``λ = 2π / f``, ``L = original_max_position_embeddings``, ``s = factor``,
    ``λ_hi = L / high_freq_factor`` and ``λ_lo = L / low_freq_factor``:

    * ``λ < λ_hi`` (high frequencies): unchanged;
    * ``λ > λ_lo`` (low frequencies): ``f / s``;
    * otherwise: ``(1 - a) f / s + a f`` with ``a = (L / λ - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    """
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, smoothed)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``f_i = theta^(-2i/d)`` for ``i < d/2``, optionally LLaMA-3.1 scaled, in float32 as
    Meta's and Hugging Face's code compute them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} for llama (supported: 'llama3')")
    return llama3_scale_frequencies(inv_freq, scaling)


def rope_tables(inv_freq: torch.Tensor, max_seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``cos, sin`` tables of shape ``[max_seq_len, len(inv_freq)]`` in float32.

    The angles ``t · f_i`` are float32 products, as in Meta's and Hugging Face's code: the models learned these
    rounded angles, which at position t differ from exact ones by up to about ``t · 8e-8`` radians (1.2e-3 at 16k).
    """
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq.float())
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs: ``(x_2i, x_2i+1) -> (x_2i c - x_2i+1 s, x_2i s + x_2i+1 c)``.

    Args:
        x: ``[B, T, H, D]`` queries or keys.
        cos, sin: ``[T, D/2]`` tables for the positions of ``x``.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Pre-allocated key/value cache of one attention layer: ``[B, n_kv_heads, max_seq_len, head_dim]``."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes ``k, v`` (``[B, H, T, D]``) at ``start_pos`` and returns the filled prefix of the cache."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_attention(q, k, v, start_pos: int, scale: float | None = None) -> torch.Tensor:
    """Causal SDPA of queries at positions ``start_pos..start_pos+T-1`` over keys ``0..start_pos+T-1``.

    SDPA's fused (flash) kernels need one head size for q, k and v. Where v's is smaller (DeepSeek's MLA: 192 for
    q and k, 128 for v), v is zero-padded to it and the output cut back: otherwise SDPA runs its math fallback,
    which keeps the ``[B, H, T, S]`` float32 attention probabilities for the backward (measured on CPU with 16
    heads at 2048 tokens: 310 instead of 13 MB kept, forward + backward 5.8x slower).

    Args:
        q: ``[B, H, T, D]``; k: ``[B, H_kv, S, D]``; v: ``[B, H_kv, S, D_v]`` with ``S = start_pos + T`` (``H`` a
            multiple of ``H_kv``, ``D_v <= D``).
        start_pos: Position of the first query.
        scale: Softmax scale; ``None`` means ``1 / sqrt(D)``.

    Returns:
        ``[B, H, T, D_v]``.
    """
    t, s, v_dim = q.shape[2], k.shape[2], v.shape[-1]
    options = {"scale": scale, "enable_gqa": q.shape[1] != k.shape[1]}
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    if t == 1:
        out = F.scaled_dot_product_attention(q, k, v, **options)
    elif start_pos == 0 and t == s:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
    else:
        q_pos = torch.arange(start_pos, start_pos + t, device=q.device)
        mask = torch.arange(s, device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
    return out[..., :v_dim]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions (Ainslie et al. 2023, "GQA")."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        out = causal_attention(q, k, v, start_pos)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class SwiGLU(torch.autograd.Function):
    """``h = silu(g) * u`` (Shazeer 2020, "GLU Variants Improve Transformer"), keeping only ``g`` and ``u`` for the
    backward.

    With ``s = sigmoid(g)`` and ``silu(g) = g s``::

        dL/du = dL/dh * silu(g),    dL/dg = dL/dh * u * silu'(g),    silu'(g) = s (1 + g (1 - s))

    The same operations as autograd on ``F.silu(g) * u`` (bitwise the same results), but autograd would also keep
    ``silu(g)`` for the product's backward, a third tensor of the MLP's width; here it is recomputed instead.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad_h * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad_h * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u``; in training only ``g`` and ``u`` are kept for the backward (:class:`SwiGLU`)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return SwiGLU.apply(g, u)
    return F.silu(g) * u


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020): ``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderLM(nn.Module):
    """What every dpo_llama model shares: token embeddings, a stack of blocks, the final RMSNorm, the head.

    Subclasses build their blocks and rotary tables (``init_rope``) and run the stack (``run_layers``);
    this class gives them one interface: ``forward_hidden``, ``output_logits``, ``forward`` and the
    generation-cache hooks used by ``generation.generate``.

    Attributes:
        activation_checkpointing: When True and training, every block's activations are recomputed in the
            backward pass instead of being stored (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, args, blocks: list[nn.Module]):
        super().__init__()
        self.args = args
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.init_rope()

    def init_rope(self, device=None) -> None:
        """(Re)builds the ``rope_cos`` / ``rope_sin`` buffers, e.g. after loading from the meta device."""
        raise NotImplementedError

    def run_layers(self, h: torch.Tensor, start_pos: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the blocks over the embeddings ``h`` of positions ``start_pos..``; ``valid`` ``[B, T]`` marks the
        real (unpadded) tokens, for what counts tokens across the batch (a MoE balancing loss)."""
        raise NotImplementedError

    def rope_slice(self, start_pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions ``start_pos .. start_pos + length - 1``."""
        end = start_pos + length
        if end > self.rope_cos.shape[0]:
            raise ValueError(f"sequence end {end} exceeds max_seq_len={self.rope_cos.shape[0]}")
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    def run_block(self, block: nn.Module, *inputs):
        """Calls one block, through activation checkpointing when it is on and gradients are needed."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward_hidden(self, tokens: torch.Tensor, start_pos: int = 0,
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the final hidden states ``[B, T, dim]`` (after the last RMSNorm), without the output head.

        ``lengths`` ``[B]``: real tokens per right-padded row, if the batch is padded (default: no padding).
        """
        valid = None if lengths is None else torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        return self.norm(self.run_layers(self.embed_tokens(tokens), start_pos, valid))

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Applies the output head to any hidden states ``[..., dim]`` -> ``[..., vocab]``."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Returns float32 logits ``[B, T, vocab]`` for ``tokens`` ``[B, T]``."""
        return self.output_logits(self.forward_hidden(tokens, start_pos)).float()

    def attention_modules(self) -> list[nn.Module]:
        """The attention modules that hold a cache during generation."""
        return [layer.self_attn for layer in self.layers]

    def cache_dtype(self) -> torch.dtype:
        """Dtype of generation caches: the embeddings' (float32 if they are not floating point)."""
        weight = self.embed_tokens.weight
        return weight.dtype if weight.is_floating_point() else torch.float32

    def clear_cache(self) -> None:
        """Frees the generation caches."""
        for attn in self.attention_modules():
            attn.kv_cache = None


class Transformer(DecoderLM):
    """A decoder-only LLaMA model (see the module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, [TransformerBlock(args) for _ in range(args.n_layers)])

    def init_rope(self, device=None) -> None:
        inv_freq = rope_frequencies(self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        cos, sin = rope_tables(inv_freq, self.args.max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def run_layers(self, h: torch.Tensor, start_pos: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self.rope_slice(start_pos, h.shape[1])  # dense layers: padding needs no special care
        for layer in self.layers:
            h = self.run_block(layer, h, cos, sin, start_pos)
        return h

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocates a KV cache in every attention layer (see ``generation.generate``)."""
        for attn in self.attention_modules():
            attn.kv_cache = KVCache(batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim,
                                    self.cache_dtype(), self.embed_tokens.weight.device)
