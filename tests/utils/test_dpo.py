"""dpo_llama.utils.dpo: paired / KTO batches, the per-batch losses and metrics, and the step-0 reference check.

Notation as in test_losses.py: πc, πr are policy log-probs (sums over scored tokens), refc, refr the stored
reference ones, h = (πc − πr) − (refc − refr); softplus(x) = log(1 + eˣ) = −log σ(−x).
"""

import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpo_llama.models.deepseek import DeepseekTransformer
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.utils.dpo import (add_step_kl_logps, batch_tokens, collate_pairs, collate_unpaired, example_length,
                                 kto_loss, num_units, paired_loss, policy_logps, reference_check, with_aux_loss)
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.preference_data import add_kl_pairs
from dpo_llama.utils.trainer import evaluate

LN2 = math.log(2)


def cfg(**overrides) -> SimpleNamespace:
    values = dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.0, simpo_gamma=0.0, sft_weight=0.0,
                  desirable_weight=1.0, undesirable_weight=1.0, aux_loss_weight=1.0)
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=64)).eval()


def arrays(ids, mask):
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.bool_)


def pair(prompt, chosen, rejected, ref=(-1.0, -2.0)) -> dict:
    """A paired example; prompt tokens unscored, responses fully scored."""
    example = {}
    for name, ids, scored in (("prompt", prompt, False), ("chosen", chosen, True), ("rejected", rejected, True)):
        example[name], example[f"{name}_mask"] = arrays(ids, [scored] * len(ids))
    if ref is not None:
        example["ref_chosen_logps"], example["ref_rejected_logps"] = map(np.float32, ref)
    return example


PAIRS = [pair([1, 5, 6], [7, 8], [9]), pair([1, 5], [10, 11, 12], [13, 14], ref=(-3.0, -4.0))]


def test_collate_pairs_puts_chosen_rows_first_then_rejected():
    """B = 2 pairs -> 4 rows: prompt + chosen of pair 0, 1, then prompt + rejected of pair 0, 1; padded with
    the pad id to the longest (2 + 3 = 5) and never scored there."""
    batch = collate_pairs(PAIRS, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 5, 6, 7, 8], [1, 5, 10, 11, 12], [1, 5, 6, 9, 0], [1, 5, 13, 14, 0]]
    assert batch["mask"].tolist() == [[False, False, False, True, True], [False, False, True, True, True],
                                      [False, False, False, True, False], [False, False, True, True, False]]
    assert batch["ref_chosen"].tolist() == [-1.0, -3.0] and batch["ref_rejected"].tolist() == [-2.0, -4.0]
    assert num_units(batch) == 2 and batch_tokens(batch) == 20
    assert batch["lengths"].tolist() == [5, 5, 4, 4]  # real tokens per row: the MoE balancing loss skips padding


def test_collate_pairs_without_reference_serves_reference_free_losses(model):
    """Data built with --no-reference: no reference tensors, still 2 units; SimPO runs on it."""
    batch = collate_pairs([pair([1, 5, 6], [7, 8], [9], ref=None), pair([1, 5], [10], [13], ref=None)], pad_id=0)
    assert "ref_chosen" not in batch and num_units(batch) == 2
    logps = policy_logps(model, batch)
    assert logps.ref_chosen_logps is None
    loss_sum, metrics = paired_loss(model, batch, cfg(loss_type="simpo"))
    assert torch.isfinite(loss_sum) and set(metrics) >= {"rewards/accuracies", "rewards/margins"}


def test_policy_logps_are_each_pairs_chosen_then_rejected_sequence(model):
    """Against sequence_logps of each prompt + response alone (no batch, no padding): chosen first, rejected second."""
    logps = policy_logps(model, collate_pairs(PAIRS, pad_id=0))
    for i, example in enumerate(PAIRS):
        for side, got in (("chosen", logps.policy_chosen_logps[i]), ("rejected", logps.policy_rejected_logps[i])):
            tokens = torch.from_numpy(np.concatenate([example["prompt"], example[side]])).long()[None]
            mask = torch.from_numpy(np.concatenate([example["prompt_mask"], example[f"{side}_mask"]]))[None]
            torch.testing.assert_close(got, sequence_logps(model, tokens, mask)[0][0], atol=1e-5, rtol=1e-5)


def with_reference(model, examples, shift_chosen=0.0, shift_rejected=0.0) -> dict:
    """A batch whose stored reference log-probs are the model's own, shifted."""
    batch = collate_pairs(examples, pad_id=0)
    with torch.no_grad():
        logps = policy_logps(model, batch)
    batch["ref_chosen"] = logps.policy_chosen_logps + shift_chosen
    batch["ref_rejected"] = logps.policy_rejected_logps + shift_rejected
    return batch


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(model):
    """h = 0: loss = softplus(0) = ln 2 per pair, summed over B = 2; rewards 0, no pair counted as won."""
    loss_sum, metrics = paired_loss(model, with_reference(model, PAIRS), cfg())
    assert loss_sum.item() == pytest.approx(2 * LN2)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[name]) == pytest.approx(0.0, abs=1e-6)


def test_shifted_reference_gives_the_hand_computed_loss_and_metrics(model):
    """refc = πc − 1, refr = πr + 1: h = 2, β = 0.5, so each pair has loss softplus(−1) = 0.31326, rewards
    β·(π − ref) = +0.5 (chosen) and −0.5 (rejected), margin 1 and is won."""
    batch = with_reference(model, PAIRS, shift_chosen=-1.0, shift_rejected=1.0)
    loss_sum, metrics = paired_loss(model, batch, cfg())
    assert loss_sum.item() == pytest.approx(2 * math.log1p(math.exp(-1.0)), rel=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(2 * 0.5, rel=1e-5)
    assert float(metrics["rewards/rejected"]) == pytest.approx(2 * -0.5, rel=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(2 * 1.0, rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == 2.0
    expected_chosen = float(batch["ref_chosen"].sum()) + 2.0
    assert float(metrics["logps/chosen"]) == pytest.approx(expected_chosen, rel=1e-5)
    expected_rejected = float(batch["ref_rejected"].sum()) - 2.0
    assert float(metrics["logps/rejected"]) == pytest.approx(expected_rejected, rel=1e-5)


def test_policy_logps_counts_scored_tokens_per_side(model):
    """PAIRS score 2 and 3 chosen tokens, 1 and 2 rejected ones; the per-token losses divide by these counts:
    IPO's loss is (h̄ − 1/(2β))² with h̄ from the sums over each side's own count (refc = πc − 1, refr = πr + 2
    gives h̄ = 1/2 + 2/1 = 2.5 and 1/3 + 2/2 = 1.3333; β = 0.5: (2.5 − 1)² + (1.3333 − 1)² = 2.36111; with the
    counts swapped it would be 1.02778)."""
    logps = policy_logps(model, collate_pairs(PAIRS, pad_id=0))
    assert logps.chosen_counts.tolist() == [2, 3] and logps.rejected_counts.tolist() == [1, 2]
    batch = with_reference(model, PAIRS, shift_chosen=-1.0, shift_rejected=2.0)
    loss_sum, _ = paired_loss(model, batch, cfg(loss_type="ipo"))
    assert loss_sum.item() == pytest.approx(1.5**2 + (4 / 3 - 1) ** 2, rel=1e-4)


def test_reference_check_measures_ln2_then_the_mismatch(model):
    """Equal log-probs: max |diff| 0, loss ln 2, mean |reward| 0. refc off by +0.3 on one pair: max |diff|
    0.3 (0.1 per token: its chosen response scores 3 tokens), h = −0.3 there, mean |reward| = β·0.3/4 over the
    4 sequences. The model's mode is restored."""
    model.train()
    exact = reference_check(model, with_reference(model, PAIRS), cfg())
    assert exact == {"max_abs_logp_diff": 0.0, "max_abs_logp_diff_per_token": 0.0, "sigmoid_loss": pytest.approx(LN2),
                     "ln2": LN2, "mean_abs_reward": 0.0, "pairs": 2}
    assert model.training
    batch = with_reference(model, PAIRS)
    batch["ref_chosen"][1] += 0.3
    off = reference_check(model, batch, cfg())
    model.eval()
    assert off["max_abs_logp_diff"] == pytest.approx(0.3, rel=1e-4)
    assert off["max_abs_logp_diff_per_token"] == pytest.approx(0.1, rel=1e-4)
    assert off["sigmoid_loss"] == pytest.approx((LN2 + math.log1p(math.exp(0.5 * 0.3))) / 2, rel=1e-4)
    assert off["mean_abs_reward"] == pytest.approx(0.5 * 0.3 / 4, rel=1e-4)


def kto_examples() -> list[dict]:
    examples = []
    for prompt, completion, desirable in (([1, 5], [7, 8], True), ([1, 6, 2], [9], False), ([1], [10, 11], True)):
        example = {"desirable": desirable}
        example["prompt"], example["prompt_mask"] = arrays(prompt, [False] * len(prompt))
        example["completion"], example["completion_mask"] = arrays(completion, [True] * len(completion))
        examples.append(example)
    add_kl_pairs(examples)
    return examples


def kto_batch(model, examples) -> dict:
    """A KTO batch whose reference log-probs are the model's own."""
    for example in examples:
        example["ref_logps"] = example["ref_kl_logps"] = np.float32(0.0)
    batch = collate_unpaired(examples, pad_id=0, max_seq_len=16)
    with torch.no_grad():
        batch["ref_logps"] = sequence_logps(model, batch["tokens"], batch["mask"])[0]
        batch["ref_kl_logps"] = sequence_logps(model, batch["kl_tokens"], batch["kl_mask"])[0]
    return batch


def test_example_length_is_the_longest_row_an_example_adds():
    """--group-by-length sorts by the row an example adds to its batch: prompt + the longer response (3 + 2 and
    2 + 3 for PAIRS), prompt + completion for KTO (2 + 2, 3 + 1, 1 + 2)."""
    assert [example_length(e) for e in PAIRS] == [5, 5]
    assert [example_length(e) for e in kto_examples()] == [4, 4, 3]


def test_collate_unpaired_pairs_each_prompt_with_the_next_completion():
    examples = kto_examples()
    for example in examples:
        example["ref_logps"], example["ref_kl_logps"] = np.float32(-1.0), np.float32(-2.0)
    batch = collate_unpaired(examples, pad_id=0, max_seq_len=16)
    assert batch["tokens"].tolist() == [[1, 5, 7, 8], [1, 6, 2, 9], [1, 10, 11, 0]]
    assert batch["kl_tokens"].tolist() == [[1, 5, 9, 0, 0], [1, 6, 2, 10, 11], [1, 7, 8, 0, 0]]
    assert batch["kl_mask"].tolist()[1] == [False, False, False, True, True]
    assert batch["desirable"].tolist() == [True, False, True]
    assert num_units(batch) == 3 and batch_tokens(batch) == 12 + 15


def test_kto_policy_equal_to_reference(model):
    """r = 0 and z0 = max(0, mean(π_KL − ref_KL)) = 0: every loss is 1 − σ(0) = 1/2, summed over 3 examples;
    no example has a reward of its label's sign."""
    batch = kto_batch(model, kto_examples())
    loss_sum, metrics = kto_loss(model, batch, cfg(loss_type="kto"))
    assert loss_sum.item() == pytest.approx(1.5, abs=1e-6)
    assert float(metrics["kl"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0
    assert float(metrics["logps/completion"]) == pytest.approx(float(batch["ref_logps"].sum()), rel=1e-6)
    assert "logps/chosen" not in metrics  # the completions are desirable and undesirable alike


def test_kto_reward_signs_by_label(model):
    """ref − 2 for every completion: r = 2, β = 0.5, z0 = 0 (KL pairs unchanged). Desirable examples: loss
    1 − σ(1) = 0.26894 and a positive reward (won); the undesirable one: 1 − σ(−1) = 0.73106, lost; the
    signed margins are +1, −1, +1."""
    batch = kto_batch(model, kto_examples())
    batch["ref_logps"] = batch["ref_logps"] - 2.0
    loss_sum, metrics = kto_loss(model, batch, cfg(loss_type="kto"))
    sigma1 = 1 / (1 + math.exp(-1.0))
    assert loss_sum.item() == pytest.approx(2 * (1 - sigma1) + sigma1, rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == 2.0
    assert float(metrics["rewards/margins"]) == pytest.approx(1.0, rel=1e-5)


def test_reference_check_on_kto_compares_completions_and_kl_completions(model):
    """Equal log-probs: max |diff| 0 over the 3 completions and 3 KL completions, mean |reward| 0. A KL
    reference off by 0.2 shows in max |diff| only (the KL completions carry no reward); a completion's
    reference off by 0.4 gives mean |reward| = β·0.4/3 (β = 0.5)."""
    exact = reference_check(model, kto_batch(model, kto_examples()), cfg(loss_type="kto"))
    assert exact == {"max_abs_logp_diff": 0.0, "max_abs_logp_diff_per_token": 0.0, "mean_abs_reward": 0.0,
                     "examples": 3}
    batch = kto_batch(model, kto_examples())
    batch["ref_kl_logps"][1] += 0.2
    off_kl = reference_check(model, batch, cfg(loss_type="kto"))
    assert off_kl["max_abs_logp_diff"] == pytest.approx(0.2, rel=1e-4) and off_kl["mean_abs_reward"] == 0.0
    batch = kto_batch(model, kto_examples())
    batch["ref_logps"][0] -= 0.4
    off = reference_check(model, batch, cfg(loss_type="kto"))
    assert off["max_abs_logp_diff"] == pytest.approx(0.4, rel=1e-4)
    assert off["max_abs_logp_diff_per_token"] == pytest.approx(0.2, rel=1e-4)  # completion 0 scores 2 tokens
    assert off["mean_abs_reward"] == pytest.approx(0.5 * 0.4 / 3, rel=1e-4)


def kto_step_gradients(model, examples, micro_batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """The gradient of one trainer step over ``examples`` (add_step_kl_logps as prepare_step, each micro-batch
    back-propagating loss_sum / units) and the z0 each micro-batch used. References: the model's own minus
    1, 2, 3 on the KL pairs (pair estimates 1, 2, 3) and minus 0.5 on the completions."""
    model.zero_grad()
    batches = []
    for i in range(0, len(examples), micro_batch_size):
        batch = kto_batch(model, examples[i:i + micro_batch_size])
        batch["ref_kl_logps"] = batch["ref_kl_logps"] - torch.arange(i + 1.0, i + 1.0 + len(batch["ref_kl_logps"]))
        batch["ref_logps"] = batch["ref_logps"] - 0.5
        batches.append(batch)
    add_step_kl_logps(model, batches)
    z0 = []
    for batch in batches:
        loss_sum, metrics = kto_loss(model, batch, cfg(loss_type="kto"))
        (loss_sum / len(examples)).backward()
        z0.append(float(metrics["kl"]) / num_units(batch))
    return model.lm_head.weight.grad.clone(), z0


def test_kto_accumulation_uses_the_steps_reference_point():
    """3 micro-batches of 1 give the gradient of 1 batch of 3: every micro-batch uses z0 = mean(1, 2, 3) = 2 of
    the whole step, where its own pair alone would give 1, 2 or 3."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=64))
    one_grad, one_z0 = kto_step_gradients(model, kto_examples(), 3)
    acc_grad, acc_z0 = kto_step_gradients(model, kto_examples(), 1)
    assert one_z0 == pytest.approx([2.0], abs=1e-4) and acc_z0 == pytest.approx([2.0] * 3, abs=1e-4)
    torch.testing.assert_close(acc_grad, one_grad, atol=1e-7, rtol=1e-5)
    assert one_grad.abs().max() > 1e-4


def test_kto_validation_uses_the_steps_reference_point():
    """Validation hands add_step_kl_logps groups of N micro-batches, as training does: 3 micro-batches of 1 in
    a group of 3 validate like 1 batch of 3 (z0 = mean(1, 2, 3) = 2 for every example); without the grouping each
    example would use its own pair's estimate 1, 2 or 3, a different loss."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=64))
    examples = kto_examples()
    for i, example in enumerate(examples):
        own = kto_batch(model, [dict(example)])
        example["ref_logps"] = np.float32(own["ref_logps"][0] - 0.5)
        example["ref_kl_logps"] = np.float32(own["ref_kl_logps"][0] - (i + 1))

    def validate(batch_size, **grouping):
        return evaluate(model, examples, partial(collate_unpaired, pad_id=0, max_seq_len=16),
                        partial(kto_loss, cfg=cfg(loss_type="kto")), num_units, batch_size=batch_size, **grouping)

    one = validate(3, prepare_step=add_step_kl_logps)
    grouped = validate(1, prepare_step=add_step_kl_logps, group_size=3)
    assert one["kl"] == pytest.approx(2.0, abs=1e-4) and grouped["kl"] == pytest.approx(2.0, abs=1e-4)
    assert grouped["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert validate(1)["loss"] != pytest.approx(one["loss"], rel=1e-3)


def test_moe_aux_loss_is_added_once_per_pair():
    """loss_sum + w · aux · units, and the aux_loss metric aux · units (both average to per-pair values)."""
    torch.manual_seed(0)
    moe = DeepseekTransformer(get_preset("tiny-deepseek-v2", vocab_size=64)).train()
    batch = with_reference(moe, PAIRS)
    plain, _ = paired_loss(moe, batch, cfg(aux_loss_weight=0.0))
    weighted, metrics = paired_loss(moe, batch, cfg(aux_loss_weight=3.0))
    aux = moe.aux_loss().detach()
    assert aux > 0
    torch.testing.assert_close(metrics["aux_loss"], aux * 2)
    torch.testing.assert_close(weighted.detach(), plain.detach() + 3.0 * aux * 2)
    unchanged = torch.tensor(1.0)
    assert with_aux_loss(Transformer(get_preset("tiny", vocab_size=64)), unchanged, 2, 1.0, {}) is unchanged
