"""Model-level evaluation: preference accuracy on held-out pairs and a generation-level reward.

* Preference accuracy = share of pairs where the model gives the chosen response a higher summed
  log-probability than the rejected one, ``log π(y_w | x) > log π(y_l | x)``. Unlike the implicit-reward
  accuracy logged during DPO training (``β log π/π_ref``), it needs no reference model, so an SFT model and
  a DPO model are measured the same way.
* Generation reward = ``reward(prompt, greedy answer)`` on held-out prompts (report the mean): what a user of
  the model actually gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from dpo_llama.models.generation import generate
from dpo_llama.models.tokenizer import Tokenizer
from dpo_llama.utils.dpo import collate_pairs
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.templates import render_conversation, stop_ids


@torch.inference_mode()
def preference_accuracy(model, examples: Sequence[dict], pad_id: int, batch_size: int = 32) -> float:
    """Share of tokenized pairs (``preference_data`` examples) with ``log π(chosen) > log π(rejected)``, measured
    in eval mode (no dropout); the model's train / eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for start in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[start:start + batch_size], pad_id)
        sums, _ = sequence_logps(model, batch["tokens"].to(device), batch["mask"].to(device))
        half = len(sums) // 2
        wins += int((sums[:half] > sums[half:]).sum())
    model.train(was_training)
    return wins / len(examples)


def generation_rewards(model, tokenizer: Tokenizer, template: str, prompts: Sequence[list[dict]],
                       reward: Callable[[int, str], float], max_new_tokens: int = 32,
                       desc: str = "generating") -> list[float]:
    """``reward(i, text)`` of the greedy answer to each of ``prompts`` (message lists ending with a user turn)."""
    stops = stop_ids(tokenizer, template)
    rewards = []
    for i, messages in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=None)):
        prompt_ids, _ = render_conversation(messages, tokenizer, template, add_generation_prompt=True)
        answer = generate(model, prompt_ids, max_new_tokens, stop_ids=stops)
        rewards.append(reward(i, tokenizer.decode(answer)))
    return rewards
