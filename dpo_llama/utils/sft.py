"""Supervised fine-tuning: tokenized examples, batching and the loss.

An example is ``{"tokens": int32[T], "mask": bool[T]}`` where ``mask`` is True on assistant output (every
assistant turn and its end-of-turn token). The loss is the negative log-likelihood of the masked tokens,

    L = -(1 / N) * sum_{sequences} sum_{t : mask_t} log p(x_t | x_<t),

averaged over the N real (non-pad) target tokens of the whole optimizer step — the trainer divides the
summed loss by N across all accumulated micro-batches, so accumulation equals one large batch.

Truncation rule: a conversation longer than ``max_seq_len`` tokens keeps its first ``max_seq_len`` tokens
(the system prompt and the earliest turns); later turns are lost. An example with no assistant token left
is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dpo_llama.models.tokenizer import Tokenizer
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.raw_data import ParseReport
from dpo_llama.utils.sft_formats import Conversation
from dpo_llama.utils.templates import render_conversation


def context_only_turns_unscored(mask: list[bool], messages: list[dict]) -> list[bool]:
    """``mask`` with the scored run of every assistant message marked ``"train": False`` cleared.

    Every template scores each assistant turn as one run (its content and end token) between unscored headers,
    so run k is assistant message k.
    """
    trained = [message.get("train", True) for message in messages if message["role"] == "assistant"]
    out, run = [], -1
    for index, scored in enumerate(mask):
        run += scored and (index == 0 or not mask[index - 1])
        out.append(scored and trained[run])
    if run + 1 != len(trained):
        raise ValueError(f"{run + 1} scored runs for {len(trained)} assistant turns")
    return out


def tokenize_conversation(messages: list[dict], tokenizer: Tokenizer, template: str,
                          max_seq_len: int) -> dict[str, np.ndarray] | None:
    """Renders one conversation (assistant turns marked ``"train": False`` kept as context only); returns None
    when no scored token survives truncation."""
    ids, mask = render_conversation(messages, tokenizer, template)
    mask = context_only_turns_unscored(mask, messages)
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if not any(mask):
        return None
    return {"tokens": np.asarray(ids, dtype=np.int32), "mask": np.asarray(mask, dtype=np.bool_)}


def tokenize_conversations(records: Sequence[Conversation], tokenizer: Tokenizer, template: str,
                           max_seq_len: int, report: ParseReport, progress=None) -> list[dict]:
    """Tokenizes records, counting template errors and truncation drops in ``report``."""
    examples = []
    for record in records:
        if progress is not None:
            progress.update(1)
        try:
            example = tokenize_conversation(record.messages, tokenizer, template, max_seq_len)
        except ValueError as err:
            report.drop(record.source, "template error", str(err))
            continue
        if example is None:
            report.drop(record.source, "no assistant token within max_seq_len")
        else:
            examples.append(example)
    return examples


def pad_sequences(arrays: Sequence[np.ndarray], pad_value, dtype: torch.dtype) -> torch.Tensor:
    """Right-pads 1-D arrays into a ``[B, max_len]`` tensor."""
    out = torch.full((len(arrays), max(len(a) for a in arrays)), pad_value, dtype=dtype)
    for row, array in enumerate(arrays):
        out[row, :len(array)] = torch.from_numpy(np.asarray(array))
    return out


def collate_sft(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``tokens`` ``[B, T]``, ``mask`` ``[B, T]`` (False on padding) and ``lengths`` ``[B]``."""
    return {"tokens": pad_sequences([e["tokens"] for e in examples], pad_id, torch.long),
            "mask": pad_sequences([e["mask"] for e in examples], False, torch.bool),
            "lengths": torch.tensor([len(e["tokens"]) for e in examples])}


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor], aux_loss_weight: float = 1.0):
    """Summed NLL of the masked tokens (the trainer divides by the step's target-token count).

    For MoE models the router's load-balancing loss (already scaled by its alpha) is added once per target
    token of each sequence, ``aux_loss_weight · sum_b n_b aux_b``, so that after the trainer's division it enters
    the step loss as the token-weighted mean of the sequences' losses, with weight ``aux_loss_weight``, however
    the step is split into micro-batches (the batch-level loss, ``seq_aux=False``, depends on the split).
    """
    logps, counts = sequence_logps(model, batch["tokens"], batch["mask"], lengths=batch.get("lengths"))
    loss_sum = -logps.sum()
    metrics = {}
    if hasattr(model, "aux_loss") and aux_loss_weight > 0:
        aux = model.aux_loss(counts.to(logps.dtype))
        loss_sum = loss_sum + aux_loss_weight * aux
        metrics["aux_loss"] = aux.detach()
    return loss_sum, metrics


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of scored tokens in a batch (the unit the SFT loss is averaged over)."""
    return int(batch["mask"][:, 1:].sum())


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of token positions the forward pass processed, padding included (for tokens/s)."""
    return batch["tokens"].numel()


def add_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """Validation hook: ``perplexity = exp(loss)``."""
    return {**metrics, "perplexity": float(np.exp(min(metrics["loss"], 50.0)))}
