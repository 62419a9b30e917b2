"""dpo_llama.models.generation: the sampling rule (greedy and the nucleus) on hand-made distributions, and the
context limit of generate."""

import math

import pytest
import torch

from dpo_llama.models.generation import generate, sample_next_token
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset


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


def test_sampling_returns_vocabulary_ids_not_sorted_positions():
    """(0.2, 0.5, 0.3): sorted, the most likely token is id 1, then id 2. top_p 0.4 keeps id 1 alone, top_p 0.6
    ids 1 and 2; the ids drawn are the vocabulary's, not their ranks (0 and 1)."""
    assert sampled_support([0.2, 0.5, 0.3], 0.4) == {1}
    assert sampled_support([0.2, 0.5, 0.3], 0.6) == {1, 2}


def test_temperature_divides_the_logits_once(monkeypatch):
    """Temperature 0.5 hands the sampler softmax(logits / 0.5): (0.2, 0.5, 0.3) becomes (0.04, 0.25, 0.09) / 0.38
    (sorted by probability, as the nucleus is built)."""
    handed = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: handed.append(probs) or draw(probs, *a, **k))
    sample_next_token(torch.tensor([math.log(0.2), math.log(0.5), math.log(0.3)]), 0.5, 1.0)
    torch.testing.assert_close(handed[0], torch.tensor([0.25, 0.09, 0.04]) / 0.38)


def tiny_llama(max_seq_len: int = 16) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=64, max_seq_len=max_seq_len))


def test_generation_stops_at_the_context_and_refuses_a_full_prompt():
    """max_seq_len 16: a 3-token prompt gets at most 13 new tokens however many are asked for; a 16-token prompt
    leaves no room and is refused. The model's training mode is restored afterwards."""
    model = tiny_llama().train()
    assert len(generate(model, [1, 2, 3], 40)) == 13
    assert model.training
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, list(range(1, 17)), 1)
