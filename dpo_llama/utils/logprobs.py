"""Log-probabilities of chosen tokens, computed only where they are scored.

For a sequence ``x_0 .. x_{T-1}`` and a boolean score mask ``m``, the quantity DPO and SFT need is

    log p(x) = sum_{t : m_t} log softmax(W h_{t-1})[x_t]

where ``h_{t-1}`` is the final hidden state at the position before ``x_t`` and ``W`` the output head. Prompt
tokens (``m_t = False``) never pass through the head: a 128k vocabulary times every prompt token would be
the largest tensor of the step. The scored rows are processed in chunks, and under autograd each chunk's
logits are recomputed in the backward pass (activation checkpointing), so only a few ``[chunk, vocab]``
blocks are alive at any time (measured: about 2x one block in the forward, 4x during the backward), never
``[tokens, vocab]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(hidden))[targets]`` = ``logit[target] - logsumexp(logits)``, in float32."""
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def token_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                chunk_size: int = 1024) -> torch.Tensor:
    """Log-probabilities of ``targets`` ``[N]`` under ``head(hidden)`` for hidden states ``[N, dim]``.

    Args:
        head: Maps hidden states to logits (``model.output_logits``).
        hidden: Hidden states of the positions that predict ``targets``.
        targets: Token ids.
        chunk_size: Rows per head application; peak memory grows with ``chunk_size x vocab`` floats.

    Returns:
        float32 ``[N]``.
    """
    pieces = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled():  # also when only the head trains (hidden needs no grad, the head's LoRA does)
            pieces.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, tokens: torch.Tensor, score_mask: torch.Tensor, chunk_size: int = 1024,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the scored tokens of each sequence.

    Args:
        model: A dpo_llama model (``forward_hidden`` + ``output_logits``).
        tokens: ``[B, T]`` right-padded token ids: the model has no attention mask, so padding before a row's
            last real token would be attended to and shift its positions.
        score_mask: ``[B, T]`` bool, True on the tokens whose probability is scored. Position 0 has no
            predecessor and must be False. The first response token IS scored (it is predicted from the last
            prompt position) — the ancestor DPO-LLaMA dropped it.
        chunk_size: See ``token_logps``.
        lengths: Optional ``[B]`` real tokens per right-padded row (a MoE model's balancing loss leaves the
            padding out).

    Returns:
        ``(sums, counts)``: float32 ``[B]`` summed log-probs and int64 ``[B]`` number of scored tokens.
    """
    if score_mask[:, 0].any():
        raise ValueError("score_mask[:, 0] must be False: the first token has no preceding position")
    hidden = model.forward_hidden(tokens) if lengths is None else model.forward_hidden(tokens, lengths=lengths)
    scored = score_mask[:, 1:]
    logps = token_logps(model.output_logits, hidden[:, :-1][scored], tokens[:, 1:][scored], chunk_size)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(scored)[scored]
    sums = torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device).index_add(0, rows, logps)
    return sums, scored.sum(-1)
