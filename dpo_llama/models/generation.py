"""Autoregressive generation with a KV cache, shared by every model class.

A model takes part by providing ``forward_hidden(tokens, start_pos)``, ``output_logits(hidden)``,
``setup_cache(batch_size, max_seq_len)``, ``clear_cache()`` and ``args.max_seq_len``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> int:
    """Picks the next token from ``logits`` ``[vocab]``.

    ``temperature == 0`` is greedy (argmax). Otherwise tokens are drawn from ``softmax(logits / temperature)``
    restricted to the nucleus (Holtzman et al. 2020): the smallest set of most likely tokens whose total
    probability reaches ``top_p`` (always the most likely token; ``top_p >= 1`` keeps every token).
    """
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    if top_p < 1.0:  # at 1.0 float32 rounding of the cumulative sum would drop the least likely tokens
        outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before them already reaches p
        outside_nucleus[0] = False
        sorted_probs[outside_nucleus] = 0.0
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[int]:
    """Continues one prompt token by token, reusing keys/values through a KV cache.

    Args:
        model: A dpo_llama model (LLaMA or DeepSeek).
        prompt_ids: The prompt's token ids (e.g. ``render_prompt_and_response(...)[0]``).
        max_new_tokens: Upper bound on generated tokens (also capped by ``model.args.max_seq_len``).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: Nucleus mass for sampling (1.0 keeps every token).
        stop_ids: Generation ends right after producing one of these ids (it is included in the result,
            as Hugging Face's ``generate`` does).
        generator: Optional RNG for reproducible sampling.

    Returns:
        The newly generated token ids (the prompt is not repeated).
    """
    if len(prompt_ids) == 0:
        raise ValueError("generate() needs a non-empty prompt")
    if len(prompt_ids) >= model.args.max_seq_len:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room below "
                         f"max_seq_len={model.args.max_seq_len}")
    total = min(len(prompt_ids) + max_new_tokens, model.args.max_seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.setup_cache(1, total)
    try:
        tokens = torch.tensor([list(prompt_ids)], device=device)
        start_pos, new_ids = 0, []
        for _ in range(total - len(prompt_ids)):
            hidden = model.forward_hidden(tokens, start_pos)[:, -1]
            next_id = sample_next_token(model.output_logits(hidden)[0], temperature, top_p, generator)
            new_ids.append(next_id)
            if next_id in stop_ids:
                break
            start_pos += tokens.shape[1]
            tokens = torch.tensor([[next_id]], device=device)
    finally:
        model.clear_cache()
        model.train(was_training)
    return new_ids
