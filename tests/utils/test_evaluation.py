"""dpo_llama.utils.evaluation: preference accuracy of tokenized pairs and greedy generation rewards."""

import numpy as np
import pytest
import torch

from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils import evaluation
from dpo_llama.utils.evaluation import generation_rewards, preference_accuracy
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.templates import render_conversation, stop_ids
from tests.tokenizer_fixtures import make_sentencepiece


def pair(prompt, chosen, rejected) -> dict:
    example = {}
    for name, ids, scored in (("prompt", prompt, False), ("chosen", chosen, True), ("rejected", rejected, True)):
        example[name] = np.asarray(ids, dtype=np.int32)
        example[f"{name}_mask"] = np.full(len(ids), scored)
    return example


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=64))


def direct_logp(model, prompt, response) -> float:
    tokens = torch.tensor([prompt + response])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(response)])
    with torch.no_grad():
        return float(sequence_logps(model, tokens, mask)[0][0])


def test_preference_accuracy_counts_pairs_whose_chosen_is_likelier(model):
    """Each pair is won when log π(prompt + chosen) > log π(prompt + rejected), both computed one sequence at a
    time; pairs of different lengths share batches (batch_size 2 over 5 pairs); train mode comes back."""
    rng = np.random.default_rng(0)
    pairs = [pair([1, *rng.integers(3, 64, n)], list(rng.integers(3, 64, c)), list(rng.integers(3, 64, r)))
             for n, c, r in ((3, 2, 4), (5, 1, 1), (2, 6, 3), (4, 3, 3), (1, 2, 5))]
    model.eval()
    wins = [direct_logp(model, p["prompt"].tolist(), p["chosen"].tolist())
            > direct_logp(model, p["prompt"].tolist(), p["rejected"].tolist()) for p in pairs]
    model.train()
    assert preference_accuracy(model, pairs, pad_id=0, batch_size=2) == pytest.approx(sum(wins) / len(wins))
    assert model.training
    swapped = [pair(p["prompt"], p["rejected"], p["chosen"]) for p in pairs]
    assert preference_accuracy(model, swapped, pad_id=0) == pytest.approx(1 - sum(wins) / len(wins))


def test_generation_rewards_score_each_greedy_answer(tmp_path):
    """The reward function sees each prompt's index and its decoded greedy answer."""
    tokenizer = load_tokenizer(make_sentencepiece(tmp_path))
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    prompts = [[{"role": "user", "content": "1 + 2 ="}], [{"role": "user", "content": "3 + 4 ="}]]
    seen = []
    rewards = generation_rewards(model, tokenizer, "llama2", prompts, lambda i, text: seen.append((i, text)) or i,
                                 max_new_tokens=4)
    assert rewards == [0, 1] and [i for i, _ in seen] == [0, 1]
    assert all(isinstance(text, str) for _, text in seen)


def test_generation_rewards_prompt_with_the_template_and_score_only_the_answer(tmp_path, monkeypatch):
    """generate gets the prompt rendered with the assistant header and the template's stop ids; the reward sees
    the decoded answer alone, not the prompt."""
    tokenizer = load_tokenizer(make_sentencepiece(tmp_path))
    messages = [{"role": "user", "content": "1 + 2 ="}]
    calls, answer = [], tokenizer.encode(" 3")
    monkeypatch.setattr(evaluation, "generate", lambda model, prompt_ids, n, stop_ids: calls.append(
        (prompt_ids, stop_ids)) or answer)
    texts = generation_rewards(None, tokenizer, "llama2", [messages], lambda i, text: text)
    assert calls == [(render_conversation(messages, tokenizer, "llama2", add_generation_prompt=True)[0],
                      stop_ids(tokenizer, "llama2"))]
    assert texts == [tokenizer.decode(answer)]


def test_a_tied_pair_is_not_a_win(model):
    """Chosen and rejected equal: log π(chosen) = log π(rejected), so the pair is lost."""
    assert preference_accuracy(model, [pair([1, 5], [7, 8], [7, 8])], pad_id=0) == 0.0
