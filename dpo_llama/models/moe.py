"""Mixture-of-experts pieces of the DeepSeek models: the router, the expert weights and their backends.

Routing (Dai et al. 2024, "DeepSeekMoE"; DeepSeek-AI 2024, "DeepSeek-V2"). For a token ``x`` and router
weights ``W_g`` ``[E, H]``:

    s = softmax(W_g x)                                    # scores over E experts, float32
    ids = top-k(s)                                        # greedy, or group-limited (see ``select_experts``)
    w_j = s_ids_j / sum_j s_ids_j   if norm_topk_prob and k > 1
          s_ids_j * routed_scaling_factor   otherwise
    y = sum_j w_j * Expert_ids_j(x)                        # Expert_e(x) = W2_e(silu(W1_e x) * W3_e x)

The experts of one layer are stored stacked (``gate_proj [E, I, H]``, ``up_proj [E, I, H]``,
``down_proj [E, H, I]``) so a backend receives all of them at once. Every backend implements

    backend(x [T, H], topk_ids [T, k], topk_weights [T, k]) -> y [T, H]

differentiable in ``x`` and ``topk_weights``:

* ``"torch"``: tokens are grouped by expert (argsort of the flat expert ids), each expert multiplies one
  contiguous slice, the weighted rows are ``index_add``-ed back to their tokens. On a CUDA GPU with grouped
  GEMMs (compute capability 9.0+, bf16 experts, no expert adapters) the experts' products run as three
  ``torch._grouped_mm`` calls over all experts instead of a few kernels per expert (:func:`grouped_experts`).
* ``"cpu_kernel"``: the C++ kernel of ``dpo_llama.models.cpu_moe``. The experts are packed ONCE into the
  kernel's blocked bf16 layout in CPU RAM — as their tensors stream in while loading, or when the backend is
  selected on a loaded model — and the full-precision weights are then freed, so the experts are never
  held twice nor on the GPU. With the rest of the model on CUDA, inputs and outputs cross through pinned
  buffers (hybrid GPU + CPU training). It computes no expert-weight gradients, so the experts must be
  frozen. ``RoutedExperts.set_backend("cpu_kernel")`` raises a ``RuntimeError`` when the kernel is missing;
  the model-level ``DeepseekTransformer.set_experts_backend`` turns that into a ``RuntimeWarning`` giving the
  reason and falls back to ``"torch"`` (never silently).
* ``"cpu_kernel_int8"``: the same kernel with the experts packed as int8 (per output channel scales,
  activations quantized per token in the kernel): half the CPU memory of ``"cpu_kernel"`` and a faster
  forward, at the cost of the quantization (outputs within about 2 % of bf16). A different model
  numerically, so reference log-probs computed with it are fingerprinted as such.

Experts can be frozen as 4-bit weights (``RoutedExperts.quantize_4bit``, ``dpo_llama.models.quant``), one
``Packed4bit`` per expert and matrix; the torch backend dequantizes one expert at a time, on the fly.

LoRA on the routed experts (``RoutedExperts.add_lora``, the ``lora_moe_routed_experts`` switch of
``dpo_llama.models.lora``): every expert ``e`` gets its own adapters on each of its three projections,

    g = W1_e x + s B1_e A1_e x,   u = W3_e x + s B3_e A3_e x,   Expert_e(x) = W2_e h + s B2_e A2_e h,
    h = silu(g) * u,

with ``A`` ``[E, r, in]`` and ``B`` ``[E, out, r]`` stacked like the weights (Hu et al. 2021, per expert).
The torch backend adds the updates expert by expert. The ``"cpu_kernel"`` backend keeps the frozen base
products in the kernel: the adapters' gate/up updates enter it as an additive delta before the SiLU, it
returns ``h`` for the down adapter, and its backward returns ``[dg | du]`` for the adapters' gradients
(``cpu_moe.cpu_moe``), all experts' adapter products running in one :class:`GroupedLoRA` node. The adapters
live where the expert weights arrived: with ``"cpu_kernel"`` in CPU RAM, next to the kernel, so a hybrid
GPU + CPU run computes them on the CPU too. With ``lora_dropout``, the torch backend draws a dropout mask per
projection and (token, slot) pair; the kernel backend one mask per token for the gate and up adapters of all
its experts (which read the same token state) and one per pair for the down adapter.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpo_llama.models.llama import refuse_second_derivative, swiglu
from dpo_llama.models.lora import LoRAUpdate

EXPERT_BACKENDS = ("torch", "cpu_kernel", "cpu_kernel_int8")
KERNEL_WEIGHT_DTYPES = {"cpu_kernel": "bf16", "cpu_kernel_int8": "int8"}  # the C++ kernel's backends
TOPK_METHODS = ("greedy", "group_limited_greedy")
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def select_experts(scores: torch.Tensor, top_k: int, topk_method: str = "greedy", n_group: int | None = None,
                   topk_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses ``top_k`` experts per token from router scores ``[T, E]``.

    * ``"greedy"``: the ``top_k`` highest scores.
    * ``"group_limited_greedy"`` (DeepSeek-V2): experts form ``n_group`` consecutive groups of ``E / n_group``;
      a group's score is its best expert's score; only the ``topk_group`` best groups stay eligible (the
      others' scores are set to 0) and the ``top_k`` highest remaining scores are chosen.

    Returns:
        ``(topk_scores, topk_ids)``, both ``[T, top_k]``, in no particular order.
    """
    if topk_method == "group_limited_greedy":
        tokens, n_experts = scores.shape
        group_scores = scores.view(tokens, n_group, n_experts // n_group).amax(dim=-1)
        best_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(n_experts // n_group, dim=1)
        scores = scores.masked_fill(~expert_mask, 0.0)
    elif topk_method != "greedy":
        raise ValueError(f"unknown topk_method {topk_method!r}; choose from {TOPK_METHODS}")
    topk_scores, topk_ids = scores.topk(top_k, dim=-1, sorted=False)
    return topk_scores, topk_ids


def routing_weights(topk_scores: torch.Tensor, norm_topk_prob: bool, routed_scaling_factor: float) -> torch.Tensor:
    """Mixing weights of the chosen experts, exactly as DeepSeek's reference ``MoEGate``.

    ``w = s / (sum(s) + 1e-20)`` when ``norm_topk_prob`` and ``k > 1``; otherwise ``w = s * routed_scaling_factor``
    (the reference applies the scaling factor only to un-normalised weights).
    """
    if norm_topk_prob and topk_scores.shape[-1] > 1:
        return topk_scores / (topk_scores.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_scores * routed_scaling_factor


def sequence_aux_loss(scores: torch.Tensor, topk_ids: torch.Tensor, alpha: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek's sequence-level load-balancing loss (``seq_aux=True``), per sequence ``[B]``.

    For each sequence ``b`` of ``T_b`` real (unpadded) tokens with ``k`` experts per token among ``E``:

        ce_{b,i}  = count_{b,i} / (T_b k / E)        # how often expert i was chosen, 1 = perfectly balanced
        P_{b,i}   = mean_t s_{b,t,i}                  # mean router probability of expert i
        aux_b     = alpha * sum_i ce_{b,i} P_{b,i}

    DeepSeek's loss is their mean over the batch; kept per sequence, a training step can weight them by what
    each sequence counts for in its loss, which no split into micro-batches changes.

    Padding is left out of the counts and means: every pad position holds the same token, routed to the same
    experts, so counting it would penalise those experts by how much the batch happens to be padded.
    Gradients flow through the scores only (the counts are constants).

    Args:
        scores: ``[B, T, E]`` softmax router scores.
        topk_ids: ``[B, T, k]`` chosen experts.
        alpha: The loss weight ``aux_loss_alpha``.
        valid: Optional ``[B, T]`` bool, True on real tokens (default: all).
    """
    batch, seq_len, n_experts = scores.shape
    if valid is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=scores.device)
    weight = valid.float()
    tokens = weight.sum(dim=1).clamp(min=1)
    ids = topk_ids.reshape(batch, -1)
    ones = weight[:, :, None].expand(-1, -1, topk_ids.shape[-1]).reshape(batch, -1)
    counts = torch.zeros(batch, n_experts, device=scores.device).scatter_add_(1, ids, ones)
    ce = counts / (tokens[:, None] * topk_ids.shape[-1] / n_experts)
    mean_scores = (scores * weight[:, :, None]).sum(dim=1) / tokens[:, None]
    return alpha * (ce * mean_scores).sum(dim=1)


def batch_aux_loss(scores: torch.Tensor, topk_ids: torch.Tensor, alpha: float,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek's token-level load-balancing loss (``seq_aux=False``), over the ``N`` real tokens of the batch.

    ``f_i = E * (number of choices of expert i) / (N k)``, ``P_i = mean_t s_{t,i}``, ``aux = alpha * sum_i f_i P_i``.

    Args:
        scores: ``[N, E]`` softmax router scores.
        topk_ids: ``[N, k]`` chosen experts.
        alpha: The loss weight ``aux_loss_alpha``.
        valid: Optional ``[N]`` bool, True on real tokens (padding is left out, see :func:`sequence_aux_loss`).
    """
    if valid is not None:
        scores, topk_ids = scores[valid], topk_ids[valid]
    n_experts = scores.shape[-1]
    fraction = F.one_hot(topk_ids.reshape(-1), n_experts).float().mean(dim=0)
    return alpha * (scores.mean(dim=0) * fraction * n_experts).sum()


def torch_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  experts: "RoutedExperts") -> torch.Tensor:
    """The ``"torch"`` backend: token rows grouped by expert, one SwiGLU per expert, weighted sum per token.

    The ``T * k`` (token, expert) pairs are grouped by expert (:class:`PairGroups`), every expert's rows of
    ``x`` go through ``expert_forward`` (:class:`GatherPairs`), and the outputs, times their routing weights,
    are summed into the rows of their tokens in float32 (:class:`ScatterPairs`). Where grouped GEMMs run
    (:func:`grouped_gemm_runs`: CUDA, bf16, no adapters) all experts go through :func:`grouped_experts` at once.

    Args:
        x: ``[T, H]`` token states.
        topk_ids, topk_weights: ``[T, k]`` routing decisions and mixing weights.
        experts: Provides ``active_adapters()`` and ``expert_forward(rows, e, adapters)``.
    """
    pairs = PairGroups(topk_ids, experts.n_experts)
    if not pairs.spans():
        return torch.zeros_like(x)
    adapters = experts.active_adapters()
    if adapters is None and grouped_gemm_runs(x, experts):
        return grouped_experts(x, pairs, topk_weights, experts.gate_proj, experts.up_proj, experts.down_proj)
    blocks = GatherPairs.apply(x, pairs)
    outputs = [experts.expert_forward(rows, expert, adapters) for (expert, _), rows in zip(pairs.spans(), blocks)]
    return ScatterPairs.apply(pairs.sorted_weights(topk_weights), pairs, *outputs).to(x.dtype)


def grouped_gemm_runs(x: torch.Tensor, experts: RoutedExperts) -> bool:
    """Whether :func:`grouped_experts` serves these experts: full-precision bf16 experts and bf16 ``x`` on a CUDA
    GPU of compute capability 9.0 or more (where ``torch._grouped_mm`` has its fused kernel), with rows of a
    multiple of 16 bytes (its requirement: sizes multiple of 8)."""
    if not x.is_cuda or experts.quant is not None or experts.gate_proj is None:
        return False
    if experts.dim % 8 or experts.hidden_dim % 8:
        return False
    dtypes = {x.dtype, experts.gate_proj.dtype, experts.up_proj.dtype, experts.down_proj.dtype}
    return dtypes == {torch.bfloat16} and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_experts(x: torch.Tensor, pairs: PairGroups, topk_weights: torch.Tensor, gate_proj: torch.Tensor,
                    up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The ``"torch"`` backend's products as grouped GEMMs: each one multiplies every expert's rows at once.

    With ``X`` the ``[P, H]`` token rows of the pairs sorted by expert (:class:`PairGroups`) and expert ``e``
    owning rows ``[offs_{e-1}, offs_e)``::

        G = X W1_eᵀ,  U = X W3_eᵀ,  O = (silu(G) * U) W2_eᵀ   (row blocks of expert e, ``torch._grouped_mm``)
        y[t] = sum over the pairs (t, j) of w[t, j] O[pair]  (float32, :class:`ScatterPairs`)

    Three GEMM launches for all experts instead of a few kernels per expert: on a GPU the per-expert loop of
    64 experts is bound by launching kernels (``benchmarks/bench_hybrid_step.py``). It holds the ``[P, H]``
    rows and outputs whole, which the per-expert path (for CPU RAM) avoids.
    """
    offs = torch.tensor(pairs.counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
    whole = pairs.as_one_group()
    (rows,) = GatherPairs.apply(x, whole)
    hidden = swiglu(torch._grouped_mm(rows, gate_proj.transpose(1, 2), offs=offs),
                    torch._grouped_mm(rows, up_proj.transpose(1, 2), offs=offs))
    out = torch._grouped_mm(hidden, down_proj.transpose(1, 2), offs=offs)
    return ScatterPairs.apply(pairs.sorted_weights(topk_weights), whole, out).to(x.dtype)


class PairGroups:
    """The ``T * k`` (token, slot) pairs of a routing, grouped by expert.

    A stable argsort of the flat expert ids puts expert ``e``'s pairs in the contiguous slice
    ``[start_e, start_e + count_e)``; ``order[i]`` is the flat pair index (``t * k + j``) of sorted row ``i``
    and ``token_of[i] = order[i] // k`` its token.
    """

    def __init__(self, topk_ids: torch.Tensor, n_experts: int):
        flat_ids = topk_ids.reshape(-1)
        self.order = flat_ids.argsort(stable=True)
        self.token_of = self.order // topk_ids.shape[1]
        self.counts = torch.bincount(flat_ids, minlength=n_experts).tolist()
        self.tokens = topk_ids.shape[0]

    def spans(self) -> list[tuple[int, slice]]:
        """``(expert, its slice of the sorted rows)`` for every expert with pairs."""
        spans, start = [], 0
        for expert, count in enumerate(self.counts):
            if count:
                spans.append((expert, slice(start, start + count)))
            start += count
        return spans

    def as_one_group(self) -> PairGroups:
        """The same sorted pairs as one group: a single span over all rows (for products over all experts)."""
        whole = copy.copy(self)
        whole.counts = [sum(self.counts)]
        return whole

    def take(self, tensor: torch.Tensor, span: slice, by_token: bool) -> torch.Tensor:
        """The rows of ``tensor`` for the sorted pairs ``span``: the rows of their tokens if ``by_token``
        (``tensor`` is ``[T, ...]``), else those rows (``tensor`` has one row per pair)."""
        return tensor.index_select(0, self.token_of[span]) if by_token else tensor[span]

    def sorted_weights(self, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routing weight of every pair, in sorted order, ``[P]`` in float32 (float64 for a float64 model)."""
        return topk_weights.reshape(-1)[self.order].to(torch.promote_types(topk_weights.dtype, torch.float32))


class GatherPairs(torch.autograd.Function):
    """Every expert's rows of the token states, one block per expert with pairs: ``x[token_of[span_e]]``.

    Backward: ``dL/dx[t] = sum over the pairs (t, j) of their rows' gradients``, summed expert by expert into
    one ``[T, H]`` buffer of at least float32 (``index_add``). Gathering ``x[token_of]`` once and splitting it per
    expert would instead make a ``[pairs, H]`` copy in the forward and concatenate the experts' gradients into
    another in the backward, and a separate ``index_select`` per expert would give each expert its own zero-filled
    ``[T, H]`` gradient for autograd to add up.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pairs: PairGroups) -> tuple[torch.Tensor, ...]:
        ctx.pairs, ctx.shape, ctx.dtype = pairs, x.shape, x.dtype
        return tuple(pairs.take(x, span, by_token=True) for _, span in pairs.spans())

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        grad_x = grads[0].new_zeros(ctx.shape, dtype=torch.promote_types(grads[0].dtype, torch.float32))
        for (_, span), grad in zip(ctx.pairs.spans(), grads):
            grad_x.index_add_(0, ctx.pairs.token_of[span], grad.to(grad_x.dtype))
        return grad_x.to(ctx.dtype), None


class ScatterPairs(torch.autograd.Function):
    """The routing-weighted sum of the experts' outputs per token, in the weights' dtype (float32):

        y[t] = sum_j w[t, j] o[pair (t, j)],

    from the outputs ``o_e`` of every expert with pairs (its rows in :class:`PairGroups` order) and the pairs'
    weights ``w`` in sorted order. Backward, per expert, with ``g_e`` the rows of ``dL/dy`` of its pairs' tokens
    and ``w_e`` their weights:

        dL/do_e = w_e g_e,    dL/dw_e = rowsum(g_e ⊙ o_e).

    Expert by expert, so no ``[pairs, H]`` tensor is made (concatenated outputs, their weighted float32 copy,
    the gathered gradient), and only the outputs themselves are kept for the backward.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, pairs: PairGroups, *outputs: torch.Tensor) -> torch.Tensor:
        y = weights.new_zeros(pairs.tokens, outputs[0].shape[1])
        for (_, span), out in zip(pairs.spans(), outputs):
            y.index_add_(0, pairs.token_of[span], out.to(y.dtype) * weights[span, None])
        ctx.pairs = pairs
        ctx.save_for_backward(weights, *outputs)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weights, *outputs = ctx.saved_tensors
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[0] else None
        grad_outputs = []
        for (_, span), out in zip(ctx.pairs.spans(), outputs):
            grad = ctx.pairs.take(grad_y, span, by_token=True)
            if grad_weights is not None:
                grad_weights[span] = (grad * out.to(grad.dtype)).sum(dim=1)
            grad_outputs.append((grad * weights[span, None]).to(out.dtype))
        return grad_weights, None, *grad_outputs


def _column(row_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The per-row scales as a ``[rows, 1]`` column in the adapters' dtype (the routing weights stay float32 in a
    bf16 model), or None."""
    return None if row_scale is None else row_scale.to(dtype)[:, None]


class GroupedLoRA(torch.autograd.Function):
    """The updates of several adapters that share their input, for the (token, slot) pairs grouped by expert,
    in one pass (products in the adapters' dtype, into which the input is widened once).

    For adapters ``i`` (``A_i [E, r_i, in]``, ``B_i [E, out_i, r_i]``, scaling ``s_i``) and the input rows
    ``x_e`` of every expert ``e``, with optional per-row scales ``c``, the adapters' ``A`` stacked as
    ``A_e = [A_1,e; A_2,e; ...]``, ``S`` = each ``s_i`` repeated ``r_i`` times and ``t_i`` the columns of ``t``
    of adapter ``i``:

        t = (x_e A_eᵀ) ⊙ S,    o_e = [(c ⊙ t_1) B_1,eᵀ | (c ⊙ t_2) B_2,eᵀ | ...]

    and, for ``g`` the gradient of ``o_e`` (``g_i`` its columns of adapter ``i``, ``u_i = c ⊙ t_i``),

        dB_i,e = g_iᵀ u_i,   v = [g_1 B_1,e | g_2 B_2,e | ...],   dc = rowsum(v ⊙ t),
        d = v ⊙ c ⊙ S,   dA_e = dᵀ x_e,   dx_e = d A_e.

    The rows are the pairs in ``PairGroups`` order. With ``gather`` the input is the token states ``[T, in]``
    and ``x_e`` their rows of expert ``e``'s pairs, else the input has one row per pair; with ``scatter`` the
    output is ``[T, sum out_i]``, each pair's ``o`` added to its token's row, else one row per pair. So no
    ``[pairs, in]`` copy of the tokens nor ``[pairs, out]`` rows to sum are made, and autograd neither
    concatenates the experts' blocks nor gives each ``A_e`` its own full-size gradient. ``empty(shape, dtype)``
    (``torch.empty`` on the adapters' device if None) allocates the per-pair output and the per-pair input's
    gradient, the two ``[pairs, ...]`` tensors; the kernel backend passes ``cpu_moe.empty_cached``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_scale: torch.Tensor | None, pairs: PairGroups, gather: bool, scatter: bool,
                scalings: tuple[float, ...], empty: Callable | None, *weights: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = weights[0::2], weights[1::2]
        ranks, widths = [a.shape[1] for a in lora_a], [b.shape[1] for b in lora_b]
        column_scale = lora_a[0].new_tensor([s for s, r in zip(scalings, ranks) for _ in range(r)])
        hidden = lora_a[0].new_empty(len(pairs.token_of), sum(ranks))
        empty = empty or functools.partial(torch.empty, device=hidden.device)
        if scatter:
            out = lora_b[0].new_zeros(pairs.tokens, sum(widths))
        else:
            out = empty((hidden.shape[0], sum(widths)), dtype=hidden.dtype)
        x_wide, scale_wide = x.to(hidden.dtype), _column(row_scale, hidden.dtype)
        for e, rows in pairs.spans():
            t = torch.mm(pairs.take(x_wide, rows, gather), _stacked(lora_a, e).t(), out=hidden[rows])
            t.mul_(column_scale)
            u = t if scale_wide is None else t * scale_wide[rows]
            o = out.new_empty(u.shape[0], out.shape[1]) if scatter else out[rows]
            for b, u_i, o_i in zip(lora_b, u.split(ranks, dim=1), o.split(widths, dim=1)):
                torch.mm(u_i, b[e].t(), out=o_i)
            if scatter:
                out.index_add_(0, pairs.token_of[rows], o)
        ctx.pairs, ctx.gather, ctx.scatter, ctx.empty = pairs, gather, scatter, empty
        ctx.ranks, ctx.widths = ranks, widths
        ctx.save_for_backward(x, row_scale, hidden, column_scale, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        refuse_second_derivative("GroupedLoRA")
        x, row_scale, hidden, column_scale, *weights = ctx.saved_tensors
        lora_a, lora_b = weights[0::2], weights[1::2]
        pairs = ctx.pairs
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = hidden.new_zeros(x.shape) if ctx.gather else ctx.empty(tuple(x.shape), dtype=hidden.dtype)
        grad_scale = torch.zeros_like(row_scale) if ctx.needs_input_grad[1] else None
        grad_a, grad_b = [torch.zeros_like(a) for a in lora_a], [torch.zeros_like(b) for b in lora_b]
        x_wide, scale_wide = x.to(hidden.dtype), _column(row_scale, hidden.dtype)
        for e, rows in pairs.spans():
            t = hidden[rows]
            scale = None if scale_wide is None else scale_wide[rows]
            u = t if scale is None else t * scale
            g = pairs.take(grad_out, rows, ctx.scatter)
            v = torch.empty_like(t)
            for b, db, g_i, u_i, v_i in zip(lora_b, grad_b, g.split(ctx.widths, dim=1), u.split(ctx.ranks, dim=1),
                                            v.split(ctx.ranks, dim=1)):
                torch.mm(g_i.t(), u_i, out=db[e])
                torch.mm(g_i, b[e], out=v_i)
            if grad_scale is not None:
                grad_scale[rows] = (v * t).sum(dim=1)
            d = (v if scale is None else v * scale).mul_(column_scale)
            x_e = pairs.take(x_wide, rows, ctx.gather)
            for da, d_i in zip(grad_a, d.split(ctx.ranks, dim=1)):
                torch.mm(d_i.t(), x_e, out=da[e])
            if grad_x is not None:
                if ctx.gather:
                    grad_x.index_add_(0, pairs.token_of[rows], d @ _stacked(lora_a, e))
                else:
                    torch.mm(d, _stacked(lora_a, e), out=grad_x[rows])
        grad_weights = [g for pair in zip(grad_a, grad_b) for g in pair]
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        return grad_x, grad_scale, None, None, None, None, None, *grad_weights


def _stacked(lora_a: list[torch.Tensor], expert: int) -> torch.Tensor:
    """``[A_1,e; A_2,e; ...]`` of one expert (a view of ``A_1,e`` for a single adapter): one product then reads the
    expert's rows once for all the adapters. Per expert, as stacking all experts' ``A`` at once would copy
    ``E r in`` values per call (67 MB at r = 64 for the gate and up adapters of DeepSeek-V2-Lite)."""
    return lora_a[0][expert] if len(lora_a) == 1 else torch.cat([a[expert] for a in lora_a])


def grouped_lora(adapters: list["ExpertAdapters"], pairs: PairGroups, x: torch.Tensor, gather: bool = False,
                 scatter: bool = False, row_scale: torch.Tensor | None = None, empty: Callable | None = None
                 ) -> torch.Tensor:
    """The updates ``c · s B_e A_e dropout(x)`` of ``adapters`` (sharing their input and its dropout mask, the
    first adapter's) for every pair of ``pairs``, one column block per adapter, float32 (:class:`GroupedLoRA`:
    ``gather`` reads the pairs' rows from the token states ``x``, ``scatter`` sums them per token)."""
    weights = [w for adapter in adapters for w in (adapter.lora_A, adapter.lora_B)]
    scalings = tuple(adapter.scaling for adapter in adapters)
    return GroupedLoRA.apply(adapters[0].dropout(x), row_scale, pairs, gather, scatter, scalings, empty, *weights)


class ExpertAdapters(nn.Module):
    """LoRA adapters for one stacked projection of ``E`` experts: ``delta_e(x) = s · B_e A_e dropout(x)``.

    Attributes:
        lora_A: ``[E, r, in]`` float32, each expert's slice Kaiming-uniform (``a = √5``, as ``nn.Linear``).
        lora_B: ``[E, out, r]`` float32, zeros (training starts from the base experts).
        scaling: ``s``.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float = 0.0, device: torch.device | str | None = None):
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(n_experts, r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, out_features, r, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A_e ~ U(-1/sqrt(in), 1/sqrt(in))`` (Kaiming-uniform with ``a = √5``), ``B = 0``."""
        bound = 1 / math.sqrt(self.lora_A.shape[-1])
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def materialize(self, device: torch.device) -> None:
        """Fresh adapters on ``device`` if they are still on the meta device (built before the weights arrived)."""
        if self.lora_A.is_meta:
            self.lora_A = nn.Parameter(torch.empty_like(self.lora_A, device=device))
            self.lora_B = nn.Parameter(torch.empty_like(self.lora_B, device=device))
            self.reset_parameters()

    def per_expert(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(A_e, B_e)`` of every expert, for one forward pass.

        Views from ``unbind``, whose backward stacks the experts' gradients once: indexing ``lora_A[e]`` per
        expert would instead add a full-size ``[E, r, in]`` gradient (zeros but one slice) per expert.
        """
        return list(zip(self.lora_A.unbind(0), self.lora_B.unbind(0)))

    def delta(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """``s · B_e A_e dropout(x)`` in float32 for rows ``x`` ``[n, in]`` of one expert (``lora.LoRAUpdate``,
        which keeps ``x`` in its own dtype for the backward, once for the gate and up adapters that read it);
        without dropout if ``dropout`` is False (the update merged into the weights, taken back out)."""
        return LoRAUpdate.apply(self.dropout(x) if dropout else x, lora_a, lora_b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``s · B_e A_e`` of every expert in float32, ``[E, out, in]``."""
        return self.scaling * torch.bmm(self.lora_B.detach().float(), self.lora_A.detach().float())

    def extra_repr(self) -> str:
        n_experts, r, in_features = self.lora_A.shape
        return (f"n_experts={n_experts}, in_features={in_features}, out_features={self.lora_B.shape[1]}, r={r}, "
                f"scaling={self.scaling:g}")


def load_cpu_kernel():
    """Imports ``dpo_llama.models.cpu_moe``, raising a clear error if the kernel cannot be used here."""
    try:
        cpu_moe = importlib.import_module("dpo_llama.models.cpu_moe")
    except ImportError as err:
        raise RuntimeError(f"experts backend 'cpu_kernel' needs dpo_llama.models.cpu_moe, which failed to import: "
                           f"{err}; use experts_backend='torch'") from err
    error = cpu_moe.kernel_error()
    if error is not None:
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        cause = " | ".join(lines if len(lines) <= 3 else [lines[0], "...", *lines[-2:]])  # a build log's cause ends it
        raise RuntimeError(f"experts backend 'cpu_kernel': the C++ MoE kernel is not available on this machine "
                           f"({cause}); use experts_backend='torch'")
    return cpu_moe


class RoutedExperts(nn.Module):
    """The ``E`` routed SwiGLU experts of one MoE layer, stored stacked.

    Attributes:
        gate_proj, up_proj: ``[E, I, H]`` parameters; down_proj: ``[E, H, I]`` (None once 4-bit).
        backend: ``"torch"``, ``"cpu_kernel"`` or ``"cpu_kernel_int8"`` (see the module docstring).
        transposed_copy: With ``"cpu_kernel"``: the packing also keeps transposed copies of the weights, for a
            faster backward at twice the CPU memory (``cpu_moe.PackedExperts.from_weights``).
        quant: The ``Quant4bitConfig`` the experts are stored with, or None (full precision).
        quantized_tensors: The tensors ``quant`` applies to (``quant.stored_4bit``'s protocol); note that each
            expert's slice is quantized on its own.
        packed: With ``quant``: per weight name, one ``Packed4bit`` per expert.
        lora: With :meth:`add_lora`: one :class:`ExpertAdapters` per weight name, else None.
        merged: The full-precision weights currently hold ``W + s·B A`` (:meth:`merge`).
        adapter_enabled: When False the experts compute their base output (``lora.disable_adapters``).
    """

    quantized_tensors = EXPERT_WEIGHTS

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, backend: str = "torch"):
        super().__init__()
        self.n_experts, self.dim, self.hidden_dim = n_experts, dim, hidden_dim
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.backend = backend
        self.transposed_copy = False
        self.quant = None
        self.packed: dict[str, list] | None = None
        self.kernel_packed: Any = None
        self.lora: nn.ModuleDict | None = None
        self.merged = False
        self.adapter_enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation per expert: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        for name in EXPERT_WEIGHTS:
            weight = getattr(self, name)
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    def shape_of(self, name: str) -> tuple[int, int, int]:
        """Shape of the stacked weight ``name``."""
        if name == "down_proj":
            return self.n_experts, self.dim, self.hidden_dim
        return self.n_experts, self.hidden_dim, self.dim

    def extra_repr(self) -> str:
        quant = f", 4-bit {self.quant.quant_type}" if self.quant is not None else ""
        sizes = f"n_experts={self.n_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}"
        lora = f", lora r={self.lora['gate_proj'].lora_A.shape[1]}" if self.lora is not None else ""
        return f"{sizes}, backend={self.backend}{quant}{lora}"

    def add_lora(self, r: int, scaling: float, dropout: float = 0.0) -> None:
        """Adds LoRA adapters (:class:`ExpertAdapters`) to the gate, up and down projections of every expert.

        They are created where the weights are: on the meta device before a checkpoint streams in (then
        materialized where the weights arrive, see :meth:`load_tensor`), in CPU RAM for kernel-packed experts.

        Raises:
            ValueError: the experts already have adapters.
        """
        if self.lora is not None:
            raise ValueError("these experts already have LoRA adapters")
        device = "cpu" if self.kernel_packed is not None else self.weight_device()
        adapters = {}
        for name in EXPERT_WEIGHTS:
            _, out_features, in_features = self.shape_of(name)
            adapters[name] = ExpertAdapters(self.n_experts, in_features, out_features, r, scaling, dropout, device)
        self.lora = nn.ModuleDict(adapters)

    def weight_device(self) -> torch.device:
        """Device of the expert weights (full precision or 4-bit)."""
        if self.packed is not None:
            return next(iter(self.packed.values()))[0].device
        return self.gate_proj.device

    @property
    def adapter_sign(self) -> int:
        """How the adapters enter the output: +1 added; -1 subtracted (merged but disabled); 0 not at all."""
        if self.lora is None or self.adapter_enabled == self.merged:
            return 0
        return 1 if self.adapter_enabled else -1

    def merge(self) -> None:
        """``W_e <- W_e + s·B_e A_e`` for every expert and projection (sum in float32); for inference.

        Raises:
            ValueError: the experts are 4-bit or packed for the kernel (merge with
                ``scripts/convert_lora_checkpoint.py`` instead).
        """
        if not self.merged:
            self._add_to_weights(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Undoes :meth:`merge` (up to the weights' rounding)."""
        if self.merged:
            self._add_to_weights(-1.0)
            self.merged = False

    def _add_to_weights(self, sign: float) -> None:
        if self.gate_proj is None:
            raise ValueError("cannot merge LoRA into 4-bit or kernel-packed experts in place; "
                             "use scripts/convert_lora_checkpoint.py to write a merged checkpoint")
        with torch.no_grad():
            for name in EXPERT_WEIGHTS:
                weight = getattr(self, name)
                weight.copy_((weight.float() + sign * self.lora[name].delta_weight()).to(weight.dtype))

    def quantize_4bit(self, cfg) -> None:
        """Stores the experts as frozen 4-bit weights, one ``Packed4bit`` per expert and matrix.

        On a meta-device model (e.g. in ``load_model``'s ``prepare``) the weights are quantized as they load.

        Args:
            cfg: A ``dpo_llama.models.quant.Quant4bitConfig``.
        """
        self.quant = cfg
        for name in EXPERT_WEIGHTS:
            weight = getattr(self, name)
            if weight is not None and not weight.is_meta:
                self.load_tensor(name, weight.detach())

    @property
    def load_device(self) -> str | None:
        """Where checkpoint tensors should arrive (``load_model`` honours it): the CPU for the kernel backend."""
        return "cpu" if self.backend in KERNEL_WEIGHT_DTYPES else None

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Receives a checkpoint tensor (``load_model``); 4-bit experts are quantized on arrival, and for the
        ``cpu_kernel`` backend the experts are packed once all three weights have arrived. Adapters added on the
        meta device are created on the device of the first weight to arrive."""
        if name not in EXPERT_WEIGHTS:
            raise ValueError(f"unexpected tensor {name!r} for RoutedExperts")
        if tuple(tensor.shape) != self.shape_of(name):
            raise ValueError(f"shape mismatch for experts.{name}: got {tuple(tensor.shape)}, "
                             f"expected {self.shape_of(name)}")
        if self.kernel_packed is not None:
            raise RuntimeError(f"these experts are packed for the {self.backend!r} backend; load new weights into a "
                               "freshly built model (load_model)")
        if self.lora is not None:
            for adapters in self.lora.values():
                adapters.materialize(tensor.device)
        if self.quant is None:
            setattr(self, name, nn.Parameter(tensor, requires_grad=getattr(self, name).requires_grad))
            if self.backend in KERNEL_WEIGHT_DTYPES and not any(getattr(self, n).is_meta for n in EXPERT_WEIGHTS):
                self.pack_for_kernel()
            return
        from dpo_llama.models.quant import quantize_4bit  # bitsandbytes is only needed for 4-bit experts
        self.packed = self.packed or {}
        self.packed[name] = [quantize_4bit(weight, self.quant) for weight in tensor]
        setattr(self, name, None)

    def set_backend(self, name: str, transposed_copy: bool = False) -> None:
        """Selects ``"torch"``, ``"cpu_kernel"`` or ``"cpu_kernel_int8"``; the kernel backends pack loaded weights
        now (see the module docstring), with transposed copies of them if ``transposed_copy`` (bf16 only).

        Raises:
            ValueError: an unknown backend, 4-bit experts for a kernel backend, or transposed copies of int8
                experts.
            RuntimeError: the kernel is unavailable, the experts are merged with their adapters, or (another
                backend or transposed-copy setting) their full-precision weights were already freed by packing.
        """
        if name not in EXPERT_BACKENDS:
            raise ValueError(f"unknown experts backend {name!r}; choose from {EXPERT_BACKENDS}")
        if self.kernel_packed is not None and (name, transposed_copy) != (self.backend, self.transposed_copy):
            raise RuntimeError(f"these experts were packed for {self.backend!r} (transposed copies: "
                               f"{self.transposed_copy}) and their full-precision weights freed; reload the model to "
                               f"use {name!r} (transposed copies: {transposed_copy})")
        if name in KERNEL_WEIGHT_DTYPES:
            load_cpu_kernel()
            if self.quant is not None:
                raise ValueError(f"experts backend {name!r} does not take 4-bit experts; use experts_backend='torch'")
            if self.merged:
                raise RuntimeError(f"experts backend {name!r} needs unmerged LoRA adapters: call unmerge first")
            if transposed_copy and KERNEL_WEIGHT_DTYPES[name] != "bf16":
                raise ValueError("transposed copies are for bf16 experts (experts_backend='cpu_kernel')")
        previous = self.backend, self.transposed_copy
        self.backend, self.transposed_copy = name, transposed_copy
        if name in KERNEL_WEIGHT_DTYPES and self.gate_proj is not None and not self.gate_proj.is_meta:
            try:
                self.pack_for_kernel()
            except BaseException:  # a refused switch changes nothing
                self.backend, self.transposed_copy = previous
                raise

    def pack_for_kernel(self) -> None:
        """Packs the (frozen) experts into the kernel's CPU layout and frees the full-precision weights."""
        weights = [getattr(self, name) for name in EXPERT_WEIGHTS]
        if any(w.requires_grad for w in weights):
            raise RuntimeError(f"experts backend {self.backend!r} computes no gradients for expert weights: freeze "
                               "them (requires_grad_(False)) or use experts_backend='torch'")
        cpu_moe = load_cpu_kernel()
        self.kernel_packed = cpu_moe.PackedExperts.from_weights(*(w.detach().cpu() for w in weights),
                                                                weight_dtype=KERNEL_WEIGHT_DTYPES[self.backend],
                                                                transposed_copy=self.transposed_copy)
        for name in EXPERT_WEIGHTS:
            setattr(self, name, None)

    def _apply(self, fn, recurse=True):
        """``.to`` / ``.cuda`` also move 4-bit experts (never cast them)."""
        super()._apply(fn, recurse)
        if self.packed is not None:
            from dpo_llama.models.quant import applied_device
            for weight in (w for packed in self.packed.values() for w in packed):
                weight.to(applied_device(fn, weight.device))
        return self

    def active_adapters(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Per weight name, ``(A_e, B_e)`` of every expert (``ExpertAdapters.per_expert``), or None when the
        adapters do not enter the output (none, disabled, or merged)."""
        if not self.adapter_sign:
            return None
        return {name: adapters.per_expert() for name, adapters in self.lora.items()}

    def expert_forward(self, x: torch.Tensor, expert: int, adapters: dict | None = None) -> torch.Tensor:
        """``down (silu(gate x) * up x)`` for one expert and rows ``x`` ``[n, H]``, with ``adapters``
        (:meth:`active_adapters`) if given."""
        hidden = swiglu(self.project("gate_proj", x, expert, adapters), self.project("up_proj", x, expert, adapters))
        return self.project("down_proj", hidden, expert, adapters)

    def project(self, name: str, x: torch.Tensor, expert: int, adapters: dict | None) -> torch.Tensor:
        """``x W_eᵀ`` for the projection ``name`` of one expert, plus ``± s · B_e A_e x`` with ``adapters``
        (subtracted while merged but disabled, see :attr:`adapter_sign`).

        4-bit experts are dequantized on the fly by ``quant.linear_4bit`` (its backward dequantizes again
        instead of keeping the dequantized weight).
        """
        if self.quant is None:
            out = F.linear(x, getattr(self, name)[expert])
        else:
            from dpo_llama.models.quant import linear_4bit
            out = linear_4bit(x, self.packed[name][expert])
        if adapters is not None:
            sign = self.adapter_sign  # -1: the merged update, without dropout as merged, is taken back out
            delta = self.lora[name].delta(x, *adapters[name][expert], dropout=sign > 0)
            out = out + (sign * delta).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """``y_t = sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x_t)`` for ``x`` ``[T, H]``."""
        if self.backend == "torch":
            return torch_experts(x, topk_ids, topk_weights, self)
        if self.backend in KERNEL_WEIGHT_DTYPES:
            return self.cpu_kernel_forward(x, topk_ids, topk_weights)
        raise ValueError(f"unknown experts backend {self.backend!r}; choose from {EXPERT_BACKENDS}")

    def cpu_kernel_forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The kernel backends: packs on first use if needed, then runs the kernel (CPU or hybrid); with
        adapters, on their device (see :meth:`kernel_lora_forward`)."""
        cpu_moe = load_cpu_kernel()
        if self.kernel_packed is None:
            self.set_backend(self.backend, self.transposed_copy)
        if not self.adapter_sign:
            return cpu_moe.cpu_moe(x, topk_ids, topk_weights, self.kernel_packed)
        device = self.lora["gate_proj"].lora_A.device
        y = self.kernel_lora_forward(cpu_moe, x.to(device), topk_ids.to(device), topk_weights.to(device))
        return y.to(x.device)

    def kernel_lora_forward(self, cpu_moe, x: torch.Tensor, topk_ids: torch.Tensor,
                            topk_weights: torch.Tensor) -> torch.Tensor:
        """The kernel's frozen experts plus the adapters, computed in PyTorch around it.

        The gate/up updates ``s B A x`` of every (token, slot) pair go into the kernel as a delta before its
        SiLU; it returns ``h`` of every pair, and the down adapter's ``w s B2 A2 h`` (the routing weight ``w``
        applied to its rank-``r`` intermediate) is added to its output. Both tensors are in
        :class:`PairGroups`' sorted order, the kernel's. Autograd carries the gradients: the kernel's backward
        takes ``dL/dh`` from the down adapter and returns ``[dg | du]`` for the gate/up adapters. On the CPU the
        two ``[pairs, ...]`` tensors the adapters make (the delta, ``dL/dh``) come from the kernel's block cache.
        """
        pairs = PairGroups(topk_ids, self.n_experts)
        empty = cpu_moe.empty_cached if x.device.type == "cpu" else None
        delta = grouped_lora([self.lora["gate_proj"], self.lora["up_proj"]], pairs, x, gather=True, empty=empty)
        y, hidden = cpu_moe.cpu_moe(x, topk_ids, topk_weights, self.kernel_packed, gate_up_delta=delta,
                                    return_hidden=True)
        down = grouped_lora([self.lora["down_proj"]], pairs, hidden, scatter=True,
                            row_scale=pairs.sorted_weights(topk_weights), empty=empty)
        return (y.float() + down).to(x.dtype)
