"""dpo_llama.utils.preference_data: tokenized pairs (and KTO examples), the truncation rule, the resumable
reference precompute and the reference fingerprint.

Expected ids follow the llama2 template (``B "[INST] {user} [/INST]" *" {answer} " E*`` per turn pair, each
turn pair's text encoded as one string): the prompt is the conversation up to and including the last
``[/INST]``, a continuation is everything after it.
"""

import numpy as np
import pytest
import torch

from dpo_llama.models.checkpoint import checkpoint_fingerprint, save_model
from dpo_llama.models.llama import Transformer
from dpo_llama.models.lora import LoRAConfig, apply_lora, quantize_frozen_layers
from dpo_llama.models.presets import get_preset
from dpo_llama.models.quant import Quant4bitConfig
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.preference_data import (
    add_kl_pairs,
    all_sequences,
    compute_reference_logps,
    fingerprint_mismatches,
    kl_sequence,
    length_sorted_batches,
    model_fingerprint,
    reference_fingerprint,
    sequences_digest,
    store_reference,
    tokenize_pair,
    tokenize_records,
    tokenize_unpaired,
    truncate_prompt,
)
from dpo_llama.utils.preference_formats import PreferencePair, load_preference_records
from dpo_llama.utils.raw_data import ParseReport
from dpo_llama.utils.templates import render_conversation
from tests.data_fixtures import FIXTURES, assistant, user
from tests.pipeline_fixtures import tokenizer_files
from tests.tokenizer_fixtures import make_hf_tokenizer, make_sentencepiece

LONG = 4096  # no truncation


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_sentencepiece(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()


def turn_pair(tokenizer, question: str, answer: str) -> tuple[list[int], list[bool]]:
    """``B "[INST] q [/INST]" *" a " E*``: ids and the assistant mask."""
    head, run = tokenizer.encode(f"[INST] {question} [/INST]"), tokenizer.encode(f"[INST] {question} [/INST] {answer} ")
    return ([tokenizer.bos_id, *run, tokenizer.eos_id],
            [False] * (1 + len(head)) + [True] * (len(run) - len(head) + 1))


def opening(tokenizer, question: str) -> list[int]:
    """``B "[INST] q [/INST]"``: a generation prompt."""
    return [tokenizer.bos_id, *tokenizer.encode(f"[INST] {question} [/INST]")]


def as_lists(example: dict) -> dict:
    return {key: value.tolist() for key, value in example.items() if isinstance(value, np.ndarray)}


def test_single_turn_pair_hand_checked(tokenizer):
    """TRL standard row 1: prompt B "[INST] The sky is [/INST]"; each response is the rest of its turn pair,
    all of it scored (answer + EOS); the prompt is never scored."""
    records, _ = load_preference_records(FIXTURES / "trl_preference.jsonl")
    example = as_lists(tokenize_pair(records[0], tokenizer, "llama2", LONG, LONG, False))
    prompt = opening(tokenizer, "The sky is")
    chosen, chosen_mask = turn_pair(tokenizer, "The sky is", "blue.")
    rejected, rejected_mask = turn_pair(tokenizer, "The sky is", "green.")
    assert example["prompt"] == prompt and example["prompt_mask"] == [False] * len(prompt)
    assert example["chosen"] == chosen[len(prompt):] and example["chosen_mask"] == chosen_mask[len(prompt):]
    assert example["rejected"] == rejected[len(prompt):] and all(example["rejected_mask"])
    assert rejected_mask[:len(prompt)] == [False] * len(prompt)


def test_multi_turn_history_is_scored_only_with_score_all(tokenizer):
    """HH row 2 (one earlier exchange in the prompt). Default: only the final answer (+ EOS) is scored.
    --score-all-assistant-turns: the earlier answer and its EOS inside the prompt are scored too."""
    records, _ = load_preference_records(FIXTURES / "hh_rlhf_harmless_test.jsonl.gz")
    pair = records[1]
    first, first_mask = turn_pair(tokenizer, "How do I boil an egg?", "Do you want it soft or hard boiled?")
    second = opening(tokenizer, "Hard boiled, please.")
    answer = "Put the egg in boiling water for about ten minutes, then cool it in cold water."
    final, _ = turn_pair(tokenizer, "Hard boiled, please.", answer)

    default = as_lists(tokenize_pair(pair, tokenizer, "llama2", LONG, LONG, False))
    assert default["prompt"] == first + second and not any(default["prompt_mask"])
    assert default["chosen"] == final[len(second):] and all(default["chosen_mask"])

    score_all = as_lists(tokenize_pair(pair, tokenizer, "llama2", LONG, LONG, True))
    assert score_all["prompt"] == default["prompt"] and score_all["chosen"] == default["chosen"]
    assert score_all["prompt_mask"] == first_mask + [False] * len(second)
    assert all(score_all["chosen_mask"]) and all(score_all["rejected_mask"])


def test_multi_turn_continuation_scores_its_last_turn_or_all_turns(tokenizer):
    """TRL conversational row 3: the chosen continuation is answer, user, answer. Default: only the final
    answer is scored; with score_all both answers (each with its EOS), never the user turn."""
    records, _ = load_preference_records(FIXTURES / "trl_conversational_preference.jsonl")
    pair = records[2]
    question = "Ask me a question, then answer my reply."
    first, first_mask = turn_pair(tokenizer, question, "What is your favourite color?")
    second, second_mask = turn_pair(tokenizer, "Green.", "Green is a calm color.")
    prompt = opening(tokenizer, question)
    continuation = (first + second)[len(prompt):]

    default = as_lists(tokenize_pair(pair, tokenizer, "llama2", LONG, LONG, False))
    assert default["prompt"] == prompt and default["chosen"] == continuation
    assert default["chosen_mask"] == [False] * (len(first) - len(prompt)) + second_mask
    score_all = as_lists(tokenize_pair(pair, tokenizer, "llama2", LONG, LONG, True))
    assert score_all["chosen_mask"] == (first_mask + second_mask)[len(prompt):]


PAIRED_FIXTURES = {  # file: pairs kept
    "hh_rlhf_harmless_test.jsonl.gz": 3, "trl_preference.jsonl": 2, "trl_conversational_preference.jsonl": 3,
    "ultrafeedback_binarized.jsonl": 3, "dpo_en_demo.json": 4, "alpaca_ranking.json": 3,
    "shp_askculinary_train.json": 4,
}


def masked_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m]).strip()


@pytest.mark.parametrize("fixture", list(PAIRED_FIXTURES))
def test_every_paired_format_gives_prompt_and_scored_final_turns(tokenizer, fixture):
    """For each record: prompt = the conversation's generation prompt; prompt + chosen = the whole chosen
    conversation; the scored tokens are exactly the final assistant turn and its EOS (same for rejected)."""
    records, _ = load_preference_records(FIXTURES / fixture)
    report = ParseReport(rows_kept=len(records))
    examples = tokenize_records(records, tokenizer, "llama2", LONG, LONG, False, report)
    assert len(examples) == PAIRED_FIXTURES[fixture] == report.rows_kept
    for pair, example in zip(records, examples):
        example = as_lists(example)
        assert example["prompt"] == render_conversation(pair.prompt, tokenizer, "llama2", True)[0]
        assert not any(example["prompt_mask"])
        for side in ("chosen", "rejected"):
            full, _ = render_conversation(pair.prompt + getattr(pair, side), tokenizer, "llama2")
            ids, mask = example[side], example[f"{side}_mask"]
            assert example["prompt"] + ids == full
            assert ids[-1] == tokenizer.eos_id and mask[-1]
            assert masked_text(tokenizer, ids, mask) == getattr(pair, side)[-1]["content"].strip()


@pytest.mark.parametrize("fixture", ["kto_en_demo.json", "kto_mix.jsonl", "kto_standard.jsonl"])
def test_kto_shapes_give_prompt_completion_label_and_kl_pairs(tokenizer, fixture):
    """messages + label and prompt / completion / label rows alike: prompt + completion is the conversation,
    the completion's answer is scored, and each example's KL completion is its neighbour's completion."""
    records, _ = load_preference_records(FIXTURES / fixture)
    examples = tokenize_records(records, tokenizer, "llama2", LONG, LONG, False, ParseReport())
    add_kl_pairs(examples)
    assert len(examples) == 2
    for index, (record, example) in enumerate(zip(records, examples)):
        full, _ = render_conversation(record.prompt + record.completion, tokenizer, "llama2")
        assert example["prompt"].tolist() + example["completion"].tolist() == full
        assert example["desirable"] == record.desirable
        assert masked_text(tokenizer, example["completion"], example["completion_mask"]) == \
            record.completion[-1]["content"].strip()
        neighbour = examples[(index + 1) % 2]
        assert example["kl_completion"] is neighbour["completion"]
        ids, mask = kl_sequence(example, LONG)
        assert ids.tolist() == example["prompt"].tolist() + neighbour["completion"].tolist()
        assert not mask[:len(example["prompt"])].any()


def test_kto_multi_turn_prompt_history_scored_only_with_score_all(tokenizer):
    """LLaMA-Factory KTO row 1: prompt = user, assistant "Mars.", user; completion "The Moon."."""
    record = load_preference_records(FIXTURES / "kto_en_demo.json")[0][1]
    first, first_mask = turn_pair(tokenizer, "Name a planet.", "Mars.")
    second = opening(tokenizer, "Another one?")
    default = tokenize_unpaired(record, tokenizer, "llama2", LONG, LONG, False)
    assert default["prompt"].tolist() == first + second and not default["prompt_mask"].any()
    assert default["desirable"] is False
    score_all = tokenize_unpaired(record, tokenizer, "llama2", LONG, LONG, True)
    assert score_all["prompt_mask"].tolist() == first_mask + [False] * len(second)
    neighbour = tokenize_unpaired(load_preference_records(FIXTURES / "kto_en_demo.json")[0][0], tokenizer, "llama2",
                                  LONG, LONG, True)
    add_kl_pairs([score_all, neighbour])
    _, mask = kl_sequence(score_all, LONG)  # the KL pair scores only the mismatched completion, never history
    assert not mask[:len(score_all["prompt"])].any()
    assert mask[len(score_all["prompt"]):].tolist() == score_all["kl_completion_mask"].tolist()


def long_pair(words: int = 40) -> PreferencePair:
    return PreferencePair([user("Tell me about " + "the quick brown fox " * (words // 4))],
                          [assistant("The capital of France is Paris and the capital of Italy is Rome.")],
                          [assistant("Rome is the capital of France.")], "x:1")


def test_long_prompt_is_cut_first_keeping_its_end_and_bos(tokenizer):
    """max_seq_len 40, max_prompt_len 16, longest response L: the prompt keeps BOS + its last
    max(16, 40 - L) - 1 tokens; the responses then fit whole or are cut to their first 40 - prompt tokens."""
    pair = long_pair()
    full = as_lists(tokenize_pair(pair, tokenizer, "llama2", LONG, LONG, False))
    longest = max(len(full["chosen"]), len(full["rejected"]))
    keep = max(16, 40 - longest)
    cut = as_lists(tokenize_pair(pair, tokenizer, "llama2", 40, 16, False))
    assert cut["prompt"] == full["prompt"][:1] + full["prompt"][-(keep - 1):]
    assert cut["prompt"][0] == tokenizer.bos_id and len(cut["prompt"]) == keep
    for side in ("chosen", "rejected"):
        assert cut[side] == full[side][:40 - keep]
        assert len(cut["prompt"]) + len(cut[side]) <= 40


def test_truncate_prompt_keeps_bos_even_when_it_keeps_one_token():
    """BOS (id 1) is the first kept token for any keep >= 1; without BOS the last ``keep`` tokens are kept and the
    first of them is not scored."""
    ids, mask = [1, 5, 6, 7], [False, True, True, False]
    assert truncate_prompt(ids, mask, 3, 1) == ([1, 6, 7], [False, True, False])
    assert truncate_prompt(ids, mask, 1, 1) == ([1], [False])
    assert truncate_prompt(ids, mask, 2, None) == ([6, 7], [False, False])
    assert truncate_prompt(ids, mask, 4, 1) == (ids, mask)


def test_sequences_never_exceed_max_seq_len_even_with_a_larger_max_prompt_len(tokenizer):
    """max_prompt_len (default 256) above max_seq_len: the prompt is still cut so that prompt + response fits
    (it keeps at most max_seq_len - 1 tokens, leaving room for a response token)."""
    cut = tokenize_pair(long_pair(), tokenizer, "llama2", 24, 256, False)
    for side in ("chosen", "rejected"):
        assert 1 <= len(cut[side]) and len(cut["prompt"]) + len(cut[side]) <= 24


def test_pairs_identical_or_empty_after_truncation_are_dropped_and_counted(tokenizer):
    """Responses that share their first tokens become identical when cut there; a two-turn continuation cut
    inside its first answer has no final-turn token left to score."""
    shared = long_pair()
    shared_prefix = PreferencePair([user("Hi")], [assistant("The capital of France is Paris.")],
                                   [assistant("The capital of France is Rome.")], "x:2")
    two_turns = PreferencePair([user("Hi")], [assistant("Hello there, how are you doing today?"), user("Fine."),
                                              assistant("Good.")], [assistant("Bye.")], "x:3")
    prompt_len = len(opening(tokenizer, "Hi"))
    report = ParseReport(rows_kept=3)
    examples = tokenize_records([shared, shared_prefix, two_turns], tokenizer, "llama2", prompt_len + 3, 8, False,
                                report)
    assert len(examples) == 1 and report.rows_kept == 1
    assert dict(report.skipped) == {"identical responses after truncation": 1, "empty response after truncation": 1}
    swapped = PreferencePair(two_turns.prompt, two_turns.rejected, two_turns.chosen, "x:4")
    report = ParseReport(rows_kept=1)
    assert tokenize_records([swapped], tokenizer, "llama2", prompt_len + 3, 8, False, report) == []
    assert dict(report.skipped) == {"empty response after truncation": 1}  # the rejected side is the empty one


def test_a_cut_prompt_never_scores_its_first_token(tmp_path):
    """chatml has no BOS: with score_all, keeping the prompt's last tokens can start inside an earlier answer.
    That first token has no position before it to predict it from, so it is not scored (the reference
    precompute refuses such a sequence); the rest of the kept answer still is."""
    chatml = load_tokenizer(make_hf_tokenizer(tmp_path, "chatml"))
    pair = PreferencePair([user("Hello"), assistant("The quick brown fox jumps over the lazy dog, again."),
                           user("What is the capital of France?")], [assistant("Paris.")], [assistant("Rome.")], "x")
    full = as_lists(tokenize_pair(pair, chatml, "chatml", LONG, LONG, True))
    response = max(len(full["chosen"]), len(full["rejected"]))
    keep = next(k for k in range(2, len(full["prompt"])) if full["prompt_mask"][-k] and full["prompt_mask"][-k + 1])
    cut = tokenize_pair(pair, chatml, "chatml", keep + response, keep, True)
    assert cut["prompt"].tolist() == full["prompt"][-keep:]
    assert cut["prompt_mask"].tolist() == [False] + full["prompt_mask"][-keep + 1:]
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=chatml.vocab_size)).eval()
    sequences = all_sequences([cut], keep + response)
    logps = compute_reference_logps(model, sequences, chatml.pad_id, "cpu", tmp_path / "cache", {"k": 1})
    assert np.isfinite(logps).all()


def test_sequences_digest_tells_apart_lists_with_the_same_bytes():
    """Two lists whose arrays concatenate to the same bytes (one sequence of 2 tokens, two of 1) differ."""
    one = [(np.array([5, 1793], dtype=np.int32), np.array([False, True]))]
    two = [(np.array([5], dtype=np.int32), np.array([True])), (np.array([7], dtype=np.int32), np.array([True]))]
    assert sequences_digest(one) != sequences_digest(two)


def test_a_lone_kto_example_takes_its_kl_completion_from_the_spare():
    """With one example in a split, the shift by one would pair it with its own completion: it takes the spare's."""
    examples = [{"completion": np.array([i]), "completion_mask": np.array([True])} for i in range(3)]
    add_kl_pairs(examples[:1], spare=examples[2])
    assert examples[0]["kl_completion"].tolist() == [2]
    add_kl_pairs(examples[:2], spare=examples[2])
    assert [e["kl_completion"].tolist() for e in examples[:2]] == [[1], [0]]


def test_template_errors_are_counted_under_one_reason(tmp_path):
    """A chatml answer starting with a newline merges with the role header into one token: the pair is dropped as
    "template error" (its text only in the details), so that many such rows make one count, not one key each."""
    chatml = load_tokenizer(make_hf_tokenizer(tmp_path, "chatml"))
    pairs = [PreferencePair([user(f"Q{i}")], [assistant(f"\nAnswer {i}")], [assistant("No.")], f"x:{i}")
             for i in range(2)]
    report = ParseReport(rows_kept=2)
    assert tokenize_records(pairs, chatml, "chatml", LONG, LONG, False, report) == []
    assert dict(report.skipped) == {"template error": 2}


def fixture_sequences(tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """The chosen / rejected sequences of three fixture files (lengths ~15 to ~60)."""
    examples = []
    for name in ("hh_rlhf_harmless_test.jsonl.gz", "dpo_en_demo.json", "trl_conversational_preference.jsonl"):
        records, _ = load_preference_records(FIXTURES / name)
        examples += tokenize_records(records, tokenizer, "llama2", LONG, LONG, True, ParseReport())
    return all_sequences(examples, LONG)


def direct_logps(model, sequences) -> np.ndarray:
    """sequence_logps on each sequence alone (batch of one, no padding)."""
    with torch.no_grad():
        return np.array([float(sequence_logps(model, torch.from_numpy(ids).long()[None],
                                              torch.from_numpy(mask)[None])[0][0]) for ids, mask in sequences])


def test_reference_logps_equal_a_direct_recomputation_for_any_batching(tokenizer, model, tmp_path):
    sequences = fixture_sequences(tokenizer)
    expected = direct_logps(model, sequences)
    for tokens, size in ((8192, 64), (128, 3)):
        got = compute_reference_logps(model, sequences, tokenizer.pad_id, "cpu", tmp_path / f"c{size}", {},
                                      max_batch_tokens=tokens, max_batch_size=size)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-6)


class CountingModel(torch.nn.Module):
    """A model wrapper that counts forward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward_hidden(self, tokens):
        self.calls += 1
        return self.inner.forward_hidden(tokens)

    def output_logits(self, hidden):
        return self.inner.output_logits(hidden)


class Crash(Exception):
    pass


def crash_after_first_chunk(number: int) -> None:
    raise Crash(f"chunk {number} saved")


def test_interrupted_precompute_resumes_where_it_stopped(tokenizer, model, tmp_path):
    """One batch per chunk, crash after chunk 0 is saved: the rerun computes only the other batches, and
    the values are identical to an uninterrupted run's."""
    sequences = fixture_sequences(tokenizer)
    limits = dict(max_batch_tokens=128, max_batch_size=4, chunk_batches=1)
    batches = length_sorted_batches([len(ids) for ids, _ in sequences], 128, 4)
    uninterrupted = compute_reference_logps(model, sequences, tokenizer.pad_id, "cpu", tmp_path / "a", {"r": 1},
                                            **limits)
    with pytest.raises(Crash, match="chunk 0 saved"):
        compute_reference_logps(model, sequences, tokenizer.pad_id, "cpu", tmp_path / "b", {"r": 1},
                                on_chunk=crash_after_first_chunk, **limits)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["chunk-000000.safetensors", "manifest.json"]
    counting = CountingModel(model)
    resumed = compute_reference_logps(counting, sequences, tokenizer.pad_id, "cpu", tmp_path / "b", {"r": 1},
                                      **limits)
    assert counting.calls == len(batches) - 1
    np.testing.assert_array_equal(resumed, uninterrupted)


def test_the_last_partial_chunk_is_saved_too(tokenizer, model, tmp_path):
    """16 batches in chunks of 3: 6 chunks are saved, the last one holding the 16th batch alone, so a crash after
    the precompute (before the dataset is written) loses no batch."""
    sequences = fixture_sequences(tokenizer)
    batches = length_sorted_batches([len(ids) for ids, _ in sequences], 128, 2)
    saved = []
    compute_reference_logps(model, sequences, tokenizer.pad_id, "cpu", tmp_path, {"r": 1}, max_batch_tokens=128,
                            max_batch_size=2, chunk_batches=3, on_chunk=saved.append)
    assert len(batches) == 16 and saved == [0, 1, 2, 3, 4, 5]


def test_cache_of_another_key_data_or_batching_is_discarded(tokenizer, model, tmp_path):
    """A partial cache written for reference "A" is not reused for reference "B" (another model), nor for the
    same reference with other data or another batching: every value is recomputed."""
    sequences = fixture_sequences(tokenizer)
    torch.manual_seed(1)
    other = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    cache = tmp_path / "cache"

    def partial_cache_of_a():
        with pytest.raises(Crash):
            compute_reference_logps(model, sequences, tokenizer.pad_id, "cpu", cache, {"reference": "A"},
                                    max_batch_size=4, chunk_batches=1, on_chunk=crash_after_first_chunk)

    partial_cache_of_a()
    got = compute_reference_logps(other, sequences, tokenizer.pad_id, "cpu", cache, {"reference": "B"},
                                  max_batch_size=4)
    np.testing.assert_allclose(got, direct_logps(other, sequences), atol=1e-5, rtol=1e-6)

    for changed in (dict(sequences=sequences[2:]), dict(max_batch_size=5)):
        partial_cache_of_a()
        counting = CountingModel(model)
        args = {"sequences": sequences, "max_batch_size": 4, **changed}
        compute_reference_logps(counting, args["sequences"], tokenizer.pad_id, "cpu", cache, {"reference": "A"},
                                max_batch_size=args["max_batch_size"])
        assert counting.calls == len(length_sorted_batches([len(s[0]) for s in args["sequences"]], 8192,
                                                           args["max_batch_size"]))


def test_length_sorted_batches_respect_both_limits():
    """Lengths [5, 3, 8, 1], at most 16 padded tokens and 3 sequences: longest first, [8, 5] pads to
    2 x 8 = 16; adding 3 would pad to 3 x 8 = 24 > 16, so [3, 1] start a new batch."""
    assert length_sorted_batches([5, 3, 8, 1], 16, 3) == [[2, 0], [1, 3]]
    assert length_sorted_batches([5, 3, 8, 1], 100, 2) == [[2, 0], [1, 3]]
    assert length_sorted_batches([50, 3], 16, 3) == [[0], [1]]


def test_reference_values_are_stored_in_sequence_order():
    """all_sequences yields (chosen, rejected) per pair, or (completion, KL pair) per KTO example."""
    pair = {"prompt": np.array([1, 5]), "prompt_mask": np.array([False, False]), "chosen": np.array([6]),
            "chosen_mask": np.array([True]), "rejected": np.array([7, 8]), "rejected_mask": np.array([True, True])}
    pairs = [dict(pair), dict(pair)]
    assert [len(ids) for ids, _ in all_sequences(pairs, 8)] == [3, 4, 3, 4]
    store_reference(pairs, np.array([-1.0, -2.0, -3.0, -4.0]))
    assert [(p["ref_chosen_logps"], p["ref_rejected_logps"]) for p in pairs] == [(-1.0, -2.0), (-3.0, -4.0)]
    kto = [{"prompt": np.array([1]), "prompt_mask": np.array([False]), "completion": np.array([6, 7]),
            "completion_mask": np.array([True, True]), "desirable": True} for _ in range(2)]
    add_kl_pairs(kto)
    store_reference(kto, np.array([-1.0, -2.0, -3.0, -4.0]))
    assert [(e["ref_logps"], e["ref_kl_logps"]) for e in kto] == [(-1.0, -2.0), (-3.0, -4.0)]


def test_fingerprint_names_each_difference():
    """The digest covers every part; mismatches name the part and both values, ignoring unfingerprinted
    entries such as the checkpoint path recorded beside the fingerprint."""
    parts = dict(weights_sha256="w", lora_sha256=None, quant=None, dtype="fp32", experts_backend="torch",
                 tokenizer_fingerprint="t", template="llama2", autocast=None)
    reference = reference_fingerprint(**parts)
    assert fingerprint_mismatches({**reference, "ckpt_dir": "/data/sft"}, reference) == []
    for key, value in (("weights_sha256", "w2"), ("lora_sha256", "l"), ("quant", {"tensors": 1}),
                       ("dtype", "bf16"), ("experts_backend", "cpu_kernel"), ("tokenizer_fingerprint", "t2"),
                       ("template", "chatml"), ("autocast", "bf16")):
        other = reference_fingerprint(**{**parts, key: value})
        assert other["digest"] != reference["digest"]
        assert fingerprint_mismatches(reference, other) == [
            f"{key}: dataset has {parts[key]!r}, policy has {value!r}"]


def test_model_fingerprint_sees_weights_and_the_4bit_layout(tokenizer, tmp_path):
    """A QLoRA policy (every linear 4-bit, adapters beside them) has the same 4-bit layout as a reference
    with every frozen linear quantized; a LoRA policy without 4-bit has none."""
    torch.manual_seed(0)
    base = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    save_model(base, tmp_path / "base", tokenizer_files(tokenizer.files[0]))
    quant = Quant4bitConfig("nf4", 64, True, torch.float32)
    reference = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    quantize_frozen_layers(reference, quant)
    qlora = apply_lora(Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)),
                       LoRAConfig(lora_r=4, lora_attn_key=True, lora_mlp_down=True, quant_4bit=True,
                                  quant_lora_4bit=True, quant_4bit_compute_dtype="fp32"))
    lora = apply_lora(Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)), LoRAConfig(lora_r=4))

    def fingerprint(model):
        return model_fingerprint(model, tmp_path / "base", None, "fp32", tokenizer, "llama2")

    assert fingerprint(base)["weights_sha256"] == checkpoint_fingerprint(tmp_path / "base")
    assert fingerprint(base)["quant"] is None and fingerprint(lora)["quant"] is None
    assert fingerprint(qlora)["quant"] == fingerprint(reference)["quant"]
    assert fingerprint(reference)["quant"]["tensors"] == 2 * 7
    assert fingerprint(qlora)["digest"] == fingerprint(reference)["digest"] != fingerprint(base)["digest"]
