"""dpo_llama.models.generation: the sampling rule (greedy and the nucleus) on hand-made distributions."""

import math

import torch

from dpo_llama.models.generation import sample_next_token


def sampled_support(probs: list[float], top_p: float, draws: int = 400) -> set[int]:
    """The tokens drawn from ``probs`` (as logits log p, temperature 1) with nucleus ``top_p``."""
    logits = torch.tensor([math.log(p) for p in probs])
    generator = torch.Generator().manual_seed(0)
    return {sample_next_token(logits, 1.0, top_p, generator) for _ in range(draws)}


def test_nucleus_is_the_smallest_set_reaching_top_p():
    """(0.5, 0.3, 0.2) with top_p 0.8: tokens 0 and 1 already hold 0.8, so token 2 is never drawn; four equal
    tokens with top_p 0.5 keep two of them; top_p 0 keeps the most likely token alone."""
    assert sampled_support([0.5, 0.3, 0.2], 0.8) == {0, 1}
    assert len(sampled_support([0.25] * 4, 0.5)) == 2
    assert sampled_support([0.5, 0.3, 0.2], 0.0) == {0}


def test_top_p_one_keeps_every_token_and_temperature_zero_is_greedy(monkeypatch):
    """With a 128k vocabulary the float32 cumulative sum passes 1.0 before the last tokens; top_p 1 must still
    leave every token a chance (the distribution handed to the sampler has no zero). Temperature 0 is argmax."""
    handed = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: handed.append(probs) or draw(probs, *a, **k))
    logits = 3 * torch.randn(128_256, generator=torch.Generator().manual_seed(0))
    sample_next_token(logits, 1.0, 1.0)
    assert (handed[0] > 0).all()
    assert sample_next_token(torch.tensor([0.1, 2.0, -1.0]), 0.0, 0.9) == 1
