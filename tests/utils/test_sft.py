"""dpo_llama.utils.sft: tokenized examples with the truncation rule, batching and the token-averaged NLL.

Notation: an example is ``tokens`` x_0..x_{T-1} with ``mask`` m; the loss of a step over examples e is

    L = -(1 / N) * sum_e sum_{t >= 1 : m_t} log p(x_t | x_<t),    N = sum_e #{t >= 1 : m_t},

so every target token of the step has the same weight, whatever example or micro-batch it sits in.
"""

import math
from unittest.mock import Mock

import numpy as np
import pytest
import torch

from dpo_llama.models.deepseek import DeepseekTransformer
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.raw_data import ParseReport
from dpo_llama.utils.sft import (add_perplexity, batch_tokens, collate_sft, context_only_turns_unscored, sft_loss,
                                 target_tokens, tokenize_conversation, tokenize_conversations)
from dpo_llama.utils.sft_formats import Conversation
from tests.tokenizer_fixtures import make_sentencepiece

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_sentencepiece(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=64)).eval()


def llama2_chat(tokenizer) -> tuple[list[int], list[bool]]:
    """``B "[INST] Hi [/INST]" *" Hello " E* B "[INST] Bye [/INST]" *" See you " E*`` (llama2 template)."""
    ids, mask = [], []
    for user, answer in (("Hi", "Hello"), ("Bye", "See you")):
        head = tokenizer.encode(f"[INST] {user} [/INST]")
        run = tokenizer.encode(f"[INST] {user} [/INST] {answer} ")
        ids += [tokenizer.bos_id, *run, tokenizer.eos_id]
        mask += [False] * (1 + len(head)) + [True] * (len(run) - len(head) + 1)
    return ids, mask


def test_tokenize_conversation_masks_every_assistant_turn(tokenizer):
    """Both answers and both EOS tokens are masked; BOS, [INST] ... [/INST] are not."""
    ids, mask = llama2_chat(tokenizer)
    example = tokenize_conversation(CHAT, tokenizer, "llama2", max_seq_len=1000)
    assert example["tokens"].tolist() == ids and example["mask"].tolist() == mask
    assert example["tokens"].dtype == np.int32 and example["mask"].dtype == np.bool_
    assert tokenizer.decode(example["tokens"][example["mask"]].tolist()).split() == ["Hello", "See", "you"]


def test_a_context_only_assistant_turn_is_not_scored(tokenizer):
    """The first answer marked ``"train": False`` (OpenAI ``"weight": 0``) keeps its tokens, unscored; the
    second answer and its EOS stay scored."""
    ids, mask = llama2_chat(tokenizer)
    second = mask.index(True, mask.index(False, mask.index(True)))
    chat = [CHAT[0], {**CHAT[1], "train": False}, *CHAT[2:]]
    example = tokenize_conversation(chat, tokenizer, "llama2", max_seq_len=1000)
    assert example["tokens"].tolist() == ids
    assert example["mask"].tolist() == [False] * second + mask[second:]
    assert tokenize_conversation(chat, tokenizer, "llama2", max_seq_len=second) is None


def test_scored_runs_must_match_the_assistant_turns():
    """Run k of the mask is assistant turn k; a mask with one run for two assistant turns is a template bug."""
    answers = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b", "train": False}]
    assert context_only_turns_unscored([True, False, True], answers) == [True, False, False]
    with pytest.raises(ValueError, match="1 scored runs for 2 assistant turns"):
        context_only_turns_unscored([False, True, True, False], answers)


def test_truncation_keeps_the_first_tokens_and_drops_examples_without_assistant_tokens(tokenizer):
    """The first turn pair ends at index P = 1 + len("[INST] Hi [/INST] Hello ") + 1; cutting to P keeps it
    whole; cutting to the first masked position (exclusive) leaves no assistant token: None."""
    ids, mask = llama2_chat(tokenizer)
    first_pair = mask.index(False, mask.index(True))
    kept = tokenize_conversation(CHAT, tokenizer, "llama2", max_seq_len=first_pair)
    assert kept["tokens"].tolist() == ids[:first_pair] and kept["mask"].tolist() == mask[:first_pair]
    assert kept["tokens"][-1] == tokenizer.eos_id
    assert tokenize_conversation(CHAT, tokenizer, "llama2", max_seq_len=mask.index(True)) is None
    one_token = tokenize_conversation(CHAT, tokenizer, "llama2", max_seq_len=mask.index(True) + 1)
    assert one_token["mask"].sum() == 1


def test_tokenize_conversations_counts_what_it_drops(tokenizer):
    """Of 3 kept records, one is too long to keep an assistant token and one cannot be rendered (llama2 needs
    alternating roles): both move from kept to skipped; the progress bar sees all 3."""
    records = [Conversation(CHAT, "a:1"), Conversation([{"role": "user", "content": "x " * 50},
                                                        {"role": "assistant", "content": "y"}], "a:2"),
               Conversation([{"role": "assistant", "content": "z"}], "a:3")]
    report = ParseReport(files=["a"], rows_kept=3)
    progress = Mock()
    examples = tokenize_conversations(records, tokenizer, "llama2", 40, report, progress)
    assert len(examples) == 1 and progress.update.call_count == 3
    assert report.rows_kept == 1
    assert dict(report.skipped) == {"no assistant token within max_seq_len": 1, "template error": 1}
    assert report.first_skipped[0] == "a:2: no assistant token within max_seq_len"


def examples_with_target_counts(counts, seed=0) -> list[dict]:
    """Examples of random tokens whose last ``count`` positions are targets (1 + 2 prompt tokens first)."""
    rng = np.random.default_rng(seed)
    examples = []
    for count in counts:
        length = 3 + count
        examples.append({"tokens": rng.integers(0, 64, length).astype(np.int32),
                         "mask": np.arange(length) >= 3})
    return examples


def test_collate_pads_right_and_never_scores_padding():
    examples = examples_with_target_counts([2, 5])
    batch = collate_sft(examples, pad_id=7)
    assert batch["tokens"].shape == (2, 8) and batch["tokens"].dtype == torch.long
    assert batch["tokens"][0, 5:].tolist() == [7, 7, 7] and not batch["mask"][0, 5:].any()
    assert batch["tokens"][1].tolist() == examples[1]["tokens"].tolist()
    assert target_tokens(batch) == 7 and batch_tokens(batch) == 16


def test_sft_loss_is_the_summed_nll_of_the_masked_tokens(model):
    """loss_sum = -sum_{t : m_t} log softmax(logits[t - 1])[x_t], from the full logits by hand."""
    examples = examples_with_target_counts([2, 5])
    batch = collate_sft(examples, pad_id=0)
    loss_sum, metrics = sft_loss(model, batch)
    expected = 0.0
    with torch.no_grad():
        for example in examples:
            tokens = torch.from_numpy(example["tokens"]).long()[None]
            logps = model(tokens)[0].log_softmax(-1)
            expected -= sum(logps[t - 1, tokens[0, t]] for t in np.flatnonzero(example["mask"]))
    torch.testing.assert_close(loss_sum, torch.as_tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-6)
    assert metrics == {}


def test_accumulation_of_single_examples_equals_one_batch(model):
    """Four examples with 1, 4, 9 and 16 targets (N = 30). One batch: grad(loss_sum / 30). Four micro-batches
    of one: grad(sum_i loss_sum_i / 30) — the same gradient. Averaging each micro-batch over its own tokens
    instead (what dividing by the number of micro-batches gives) weights the 1-token example 16x more per
    token than the 16-token one, and the gradient differs."""
    model.train()
    params = [p for p in model.parameters()]
    examples = examples_with_target_counts([1, 4, 9, 16], seed=3)

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in params])

    full = collate_sft(examples, pad_id=0)
    n = target_tokens(full)
    assert n == 30
    one_batch = grads(lambda: sft_loss(model, full)[0] / n)
    singles = [collate_sft([e], pad_id=0) for e in examples]
    accumulated = grads(lambda: sum(sft_loss(model, b)[0] for b in singles) / n)
    naive = grads(lambda: sum(sft_loss(model, b)[0] / target_tokens(b) for b in singles) / len(singles))
    model.eval()
    torch.testing.assert_close(accumulated, one_batch, atol=1e-6, rtol=1e-5)
    assert (naive - one_batch).abs().max() > 1e-3


def test_moe_aux_loss_is_added_once_per_target_token():
    """loss_sum(weight w) = NLL_sum + w · Σ_b n_b aux_b (n_b = the sequence's target tokens), so after the
    trainer's division by N = Σ n_b the step loss is NLL + w · (token-weighted mean aux); the metric aux_loss
    = Σ_b n_b aux_b likewise averages to it."""
    torch.manual_seed(0)
    model = DeepseekTransformer(get_preset("tiny-deepseek-v2", vocab_size=64)).train()
    batch = collate_sft(examples_with_target_counts([3, 6]), pad_id=0)
    plain, plain_metrics = sft_loss(model, batch, aux_loss_weight=0.0)
    weighted, metrics = sft_loss(model, batch, aux_loss_weight=2.0)
    per_sequence = torch.stack(model.last_aux_losses).sum(0).detach()
    expected = 3 * per_sequence[0] + 6 * per_sequence[1]
    assert per_sequence.shape == (2,) and (per_sequence > 0).all() and plain_metrics == {}
    torch.testing.assert_close(metrics["aux_loss"], expected)
    torch.testing.assert_close(weighted.detach(), plain.detach() + 2.0 * expected)


def step_gradients(model, examples, micro_batch_size: int, aux_loss_weight: float) -> list[torch.Tensor]:
    """Gradients of one trainer step over ``examples``: each micro-batch back-propagates loss_sum / N."""
    model.zero_grad()
    batches = [collate_sft(examples[i:i + micro_batch_size], pad_id=0)
               for i in range(0, len(examples), micro_batch_size)]
    total = sum(target_tokens(batch) for batch in batches)
    for batch in batches:
        (sft_loss(model, batch, aux_loss_weight)[0] / total).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_moe_aux_loss_accumulates_exactly():
    """4 micro-batches of 1 give the gradients of 1 batch of 4, the balancing loss included (each sequence's loss
    weighted by its target tokens 1, 8, 2, 15 in both); weighting each micro-batch's mean by its tokens did not."""
    torch.manual_seed(0)
    model = DeepseekTransformer(get_preset("tiny-deepseek-v2", vocab_size=64, aux_loss_alpha=1.0)).train()
    examples = examples_with_target_counts([1, 8, 2, 15])
    one_batch = step_gradients(model, examples, 4, aux_loss_weight=1.0)
    accumulated = step_gradients(model, examples, 1, aux_loss_weight=1.0)
    nll_only = step_gradients(model, examples, 4, aux_loss_weight=0.0)
    for g_one, g_acc, g_nll in zip(one_batch, accumulated, nll_only):
        torch.testing.assert_close(g_acc, g_one, atol=1e-6, rtol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(one_batch, nll_only)) > 1e-3  # the aux term counts


def test_perplexity_is_exp_of_the_loss():
    assert add_perplexity({"loss": math.log(7.0)}) == {"loss": math.log(7.0), "perplexity": pytest.approx(7.0)}
    assert add_perplexity({"loss": 1000.0})["perplexity"] == pytest.approx(math.exp(50.0))  # capped, no overflow
