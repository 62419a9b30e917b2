"""scripts/build_preference_datasets.py: every preference fixture through the builder with a tiny reference
model, the precompute (direct recomputation, batching, interruption), truncation and the recorded reference."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo_llama.utils.preference_data as preference_data
import scripts.build_preference_datasets as builder
from dpo_llama.models.checkpoint import checkpoint_fingerprint, load_model
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.dataset_io import META_FILE, TRAIN_FILE, VAL_FILE, load_examples
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.preference_data import all_sequences
from tests.data_fixtures import FIXTURES
from tests.pipeline_fixtures import flags, tiny_llama, write_jsonl
from tests.tokenizer_fixtures import make_sentencepiece

# fixture -> (rows read, examples kept, skipped by reason), counted by reading the files.
PREFERENCE_FIXTURES = {
    "hh_rlhf_harmless_test.jsonl.gz": (6, 3, {"empty response": 1, "identical chosen and rejected": 1,
                                              "transcripts diverge before the last assistant turn": 1}),
    "trl_preference.jsonl": (4, 2, {"identical chosen and rejected": 1, "non-string content": 1}),
    "trl_conversational_preference.jsonl": (4, 3, {"empty response": 1}),
    "ultrafeedback_binarized.jsonl": (4, 3, {"no shared prompt": 1}),
    "dpo_en_demo.json": (6, 4, {"identical chosen and rejected": 1, "roles do not alternate": 1}),
    "alpaca_ranking.json": (4, 3, {"empty response": 1}),
    "shp_askculinary_train.json": (5, 4, {"score ratio below minimum": 1}),
    "kto_en_demo.json": (4, 2, {"invalid label": 1, "no assistant turn": 1}),
    "kto_mix.jsonl": (2, 2, {}),
    "kto_standard.jsonl": (2, 2, {}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A tiny LLaMA checkpoint with its sentencepiece tokenizer.model."""
    root = tmp_path_factory.mktemp("ref")
    return tiny_llama(root / "base", make_sentencepiece(root / "tok"))


def build(reference: Path, out: Path, inputs, *switches: str, **options) -> int:
    """The builder on the CPU (the checks below recompute there), whatever GPU this machine has."""
    argv = ["--input", *map(str, inputs), *switches] + flags(
        ref_model=reference, template="llama2", output=out, **{"val_ratio": 0.0, "device": "cpu", **options})
    return builder.main(argv)


def load(out: Path) -> tuple[list[dict], dict]:
    return load_examples(out / TRAIN_FILE) + load_examples(out / VAL_FILE), json.loads((out / META_FILE).read_text())


def recomputed(reference: Path, examples: list[dict]) -> np.ndarray:
    """Each stored sequence scored alone by the reference model."""
    model = load_model(reference)
    with torch.no_grad():
        return np.array([float(sequence_logps(model, torch.from_numpy(ids).long()[None],
                                              torch.from_numpy(mask)[None])[0][0])
                         for ids, mask in all_sequences(examples, 4096)])


def stored(examples: list[dict]) -> np.ndarray:
    keys = ("ref_logps", "ref_kl_logps") if "completion" in examples[0] else ("ref_chosen_logps",
                                                                                "ref_rejected_logps")
    return np.array([float(e[key]) for e in examples for key in keys])


@pytest.mark.parametrize("fixture", list(PREFERENCE_FIXTURES))
def test_every_format_is_built_with_reference_logps(reference, tmp_path, fixture, capsys):
    """Auto-detected format; one example per usable row; bad rows in meta.json and the printed summary;
    reference log-probs equal the reference model's on each sequence alone; the chunk cache is removed."""
    rows_read, kept, skipped = PREFERENCE_FIXTURES[fixture]
    out = tmp_path / "data"
    assert build(reference, out, [FIXTURES / fixture], max_seq_len=4096, max_prompt_len=4096) == 0
    examples, meta = load(out)
    unpaired = fixture.startswith("kto")
    assert len(examples) == kept and meta["unpaired"] == unpaired and meta["kind"] == "preference"
    assert meta["rows"]["rows_read"] == rows_read and meta["rows"]["skipped_by_reason"] == skipped
    assert f"Read {rows_read} rows from 1 file(s): kept {kept}, skipped {rows_read - kept}." in capsys.readouterr().out
    np.testing.assert_allclose(stored(examples), recomputed(reference, examples), atol=1e-5, rtol=1e-6)
    assert not (out / builder.CACHE_DIR).exists()
    if unpaired:
        assert {"completion", "kl_completion", "desirable", "ref_logps", "ref_kl_logps"} <= set(examples[0])
        assert sorted(e["desirable"] for e in examples) == [False, True]
    else:
        assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(examples[0])


def test_meta_records_the_reference_fingerprint(reference, tmp_path):
    assert build(reference, tmp_path / "d", [FIXTURES / "dpo_en_demo.json"]) == 0
    recorded = load(tmp_path / "d")[1]["reference"]
    tokenizer = load_tokenizer(reference)
    assert recorded["ckpt_dir"] == str(reference) and recorded["lora"] is None
    assert recorded["weights_sha256"] == checkpoint_fingerprint(reference)
    assert recorded["tokenizer_fingerprint"] == tokenizer.fingerprint()
    assert (recorded["quant"], recorded["dtype"], recorded["template"]) == (None, "fp32", "llama2")
    assert recorded["autocast"] is None  # mixed precision autocasts on CUDA only
    assert build(reference, tmp_path / "q", [FIXTURES / "dpo_en_demo.json"], quant_4bit="nf4") == 0
    quant = load(tmp_path / "q")[1]["reference"]["quant"]
    assert quant["tensors"] == 2 * 7 and "nf4" in quant["configs"][0]


def test_reference_logps_do_not_depend_on_the_batching(reference, tmp_path):
    """One sequence per batch vs up to 64 sequences / 8192 padded tokens: equal to float32 rounding.

    Batching changes the summation order inside the matmuls, so sums of ~100 token log-probs may differ by a
    few ulps (1 ulp of 135.0 in float32 is 1.5e-5): the tolerance is relative, 1e-6.
    """
    inputs = [FIXTURES / "hh_rlhf_harmless_test.jsonl.gz", FIXTURES / "dpo_en_demo.json"]
    assert build(reference, tmp_path / "big", inputs) == 0
    assert build(reference, tmp_path / "small", inputs, batch_size=1, batch_tokens=16) == 0
    big, small = (load(tmp_path / name)[0] for name in ("big", "small"))
    assert [e["chosen"].tolist() for e in big] == [e["chosen"].tolist() for e in small]
    np.testing.assert_allclose(stored(small), stored(big), atol=1e-5, rtol=1e-6)


class Crash(Exception):
    pass


def test_interrupted_build_resumes_from_its_saved_chunks(reference, tmp_path, monkeypatch):
    """The first build dies after saving one chunk of one batch (no dataset written, the chunk kept); the
    rerun with the same flags scores only the remaining batches and writes the same dataset as an
    uninterrupted build."""
    inputs = [FIXTURES / "hh_rlhf_harmless_test.jsonl.gz", FIXTURES / "trl_conversational_preference.jsonl"]
    options = dict(batch_size=2, val_ratio=0.25)
    assert build(reference, tmp_path / "whole", inputs, **options) == 0
    compute = builder.compute_reference_logps

    def crash_after_one_batch(*args, **kwargs):
        def crash(number):
            raise Crash(number)
        return compute(*args, **kwargs, chunk_batches=1, on_chunk=crash)

    monkeypatch.setattr(builder, "compute_reference_logps", crash_after_one_batch)
    with pytest.raises(Crash):
        build(reference, tmp_path / "resumed", inputs, **options)
    assert not (tmp_path / "resumed" / META_FILE).exists()
    assert len(list((tmp_path / "resumed" / builder.CACHE_DIR).glob("chunk-*.safetensors"))) == 1

    monkeypatch.setattr(builder, "compute_reference_logps", compute)
    batches = []
    score = preference_data.batch_logps
    monkeypatch.setattr(preference_data, "batch_logps", lambda m, seqs, *a: batches.append(len(seqs)) or score(
        m, seqs, *a))
    assert build(reference, tmp_path / "resumed", inputs, **options) == 0
    whole, resumed = load(tmp_path / "whole"), load(tmp_path / "resumed")
    assert sum(batches) == len(stored(resumed[0])) - 2
    assert len(resumed[0]) == len(whole[0]) and resumed[1]["counts"] == whole[1]["counts"]
    np.testing.assert_array_equal(stored(resumed[0]), stored(whole[0]))
    assert not (tmp_path / "resumed" / builder.CACHE_DIR).exists()


def test_score_all_assistant_turns_scores_the_history(reference, tmp_path):
    """Multi-turn prompts: default never scores the prompt; with the switch their earlier answers are."""
    fixture = [FIXTURES / "dpo_en_demo.json"]
    assert build(reference, tmp_path / "last", fixture) == 0
    assert build(reference, tmp_path / "all", fixture, "--score-all-assistant-turns") == 0
    last, (every, meta) = load(tmp_path / "last")[0], load(tmp_path / "all")
    assert meta["score_all_assistant_turns"] is True
    assert not any(e["prompt_mask"].any() for e in last)
    assert sum(e["prompt_mask"].any() for e in every) == 1  # only dpo_en_demo [2] has an answer in its prompt
    assert all(np.array_equal(a["chosen"], b["chosen"]) for a, b in zip(last, every))


def test_truncation_limits_and_counts(reference, tmp_path, capsys):
    """--max-seq-len 16 --max-prompt-len 8: the long prompt keeps BOS and its last max(8, 16 - longest) - 1
    tokens, the responses their first 16 - prompt tokens; two responses that agree on their first tokens become
    identical when cut there and are dropped and counted."""
    rows = [{"prompt": "Tell me about " + "the quick brown fox " * 8, "chosen": "Paris is big.",
             "rejected": "Rome is old."},
            {"prompt": "Hi", "chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert build(reference, tmp_path / "full", [data], max_seq_len=4096) == 0
    full = next(e for e in load(tmp_path / "full")[0] if len(e["prompt"]) > 16)
    assert build(reference, tmp_path / "d", [data], max_seq_len=16, max_prompt_len=8) == 0
    examples, meta = load(tmp_path / "d")
    assert len(examples) == 1 and meta["rows"]["skipped_by_reason"] == {"identical responses after truncation": 1}
    kept, keep = examples[0], max(8, 16 - max(len(full["chosen"]), len(full["rejected"])))
    assert kept["prompt"].tolist() == full["prompt"][:1].tolist() + full["prompt"][-(keep - 1):].tolist()
    assert kept["prompt"][0] == load_tokenizer(reference).bos_id
    for side in ("chosen", "rejected"):
        assert kept[side].tolist() == full[side][:16 - keep].tolist()
    assert "identical responses after truncation: 1" in capsys.readouterr().out


def test_no_reference_build_needs_no_model(reference, tmp_path):
    assert build(reference, tmp_path / "d", [FIXTURES / "trl_preference.jsonl"], "--no-reference") == 0
    examples, meta = load(tmp_path / "d")
    assert meta["reference"] is None and "ref_chosen_logps" not in examples[0]


def test_shp_minimum_score_ratio_reaches_the_parser(reference, tmp_path):
    """The SHP fixture's ratios are 4.33, 1.04, 3.33, inf and 2.0: the default minimum 2 keeps 4 pairs,
    --shp-min-score-ratio 1 all 5."""
    shp = FIXTURES / "shp_askculinary_train.json"
    assert build(reference, tmp_path / "default", [shp], "--no-reference") == 0
    assert build(reference, tmp_path / "one", [shp], "--no-reference", shp_min_score_ratio=1.0) == 0
    assert [len(load(tmp_path / name)[0]) for name in ("default", "one")] == [4, 5]
    for bad in ("nan", "0.5"):  # NaN would keep every pair; a ratio (higher / lower) is never below 1
        with pytest.raises(SystemExit):
            build(reference, tmp_path / "bad", [shp], "--no-reference", "--shp-min-score-ratio", bad)


def test_bool_flags_take_the_trainers_forms():
    """--mixed-precision / --quant-4bit-double are spelt as the trainers spell them: bare, with a value, or --no-."""
    assert builder.parse_args([]).mixed_precision is True
    assert builder.parse_args(["--no-mixed-precision"]).mixed_precision is False
    assert builder.parse_args(["--mixed-precision", "false", "--quant-4bit-double"]).mixed_precision is False
    assert builder.parse_args(["--no-quant-4bit-double"]).quant_4bit_double is False


def test_a_kto_example_alone_in_its_split_gets_another_examples_completion(reference, tmp_path):
    """kto_en_demo.json keeps 2 examples; val_ratio 0.5 leaves one in each split, so each one's KL completion is
    the other split's completion, never its own."""
    assert build(reference, tmp_path / "d", [FIXTURES / "kto_en_demo.json"], "--no-reference", val_ratio=0.5) == 0
    train, validation = (load_examples(tmp_path / "d" / name) for name in (TRAIN_FILE, VAL_FILE))
    assert len(train) == len(validation) == 1
    for example, other in ((train[0], validation[0]), (validation[0], train[0])):
        assert np.array_equal(example["kl_completion"], other["completion"])
        assert not np.array_equal(example["kl_completion"], example["completion"])


def test_unusable_inputs_are_clear_errors(reference, tmp_path, capsys):
    """A file with no usable row, paired mixed with unpaired files, and KTO data with a scored history: exit 1,
    one error line, no output."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}])
    assert build(reference, tmp_path / "a", [bad]) == 1
    assert "no usable rows" in capsys.readouterr().err
    assert build(reference, tmp_path / "b", [FIXTURES / "trl_preference.jsonl", FIXTURES / "kto_standard.jsonl"]) == 1
    assert "cannot mix paired and unpaired" in capsys.readouterr().err
    assert build(reference, tmp_path / "c", [FIXTURES / "kto_en_demo.json"], "--score-all-assistant-turns") == 1
    assert "--score-all-assistant-turns is for paired data" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_output_under_a_file_is_one_error_line(reference, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert build(reference, tmp_path / "f" / "out", [FIXTURES / "trl_preference.jsonl"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --output {tmp_path / 'f' / 'out'}: {tmp_path / 'f'} is a file")


def test_a_misspelt_reference_is_named_as_the_model(reference, tmp_path, capsys):
    assert build(tmp_path / "nosuch", tmp_path / "out", [FIXTURES / "trl_preference.jsonl"]) == 1
    assert capsys.readouterr().err == f"error: model checkpoint directory not found: {tmp_path / 'nosuch'}\n"


def test_a_tokenizer_larger_than_the_reference_vocabulary_is_refused(reference, tmp_path, capsys):
    """The reference has the 400 ids of the default tokenizer: one id more is refused (equal sizes are built by
    every other test)."""
    other = make_sentencepiece(tmp_path / "tok", vocab_size=401)
    assert build(reference, tmp_path / "d", [FIXTURES / "trl_preference.jsonl"], tokenizer=other) == 1
    assert "the tokenizer has 401 ids but the reference model" in capsys.readouterr().err


def test_sequences_longer_than_the_reference_takes_are_refused_before_its_pass(reference, tmp_path, capsys):
    """The tiny reference takes 256 positions: longer sequences (allowed by --max-seq-len) stop the build with the
    limit to pass, before any reference batch runs, and nothing is written."""
    long_answer = " ".join(["the sky is blue"] * 80)
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Describe the sky.", "chosen": long_answer,
                                                  "rejected": "It is green."}])
    assert build(reference, tmp_path / "out", [data], max_seq_len=1024) == 1
    assert "takes at most 256: pass --max-seq-len 256 or less" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_template_is_required_with_a_reference_other_than_the_demo(reference, tmp_path, capsys):
    """The reference's own tokenizer is not the demo's: without --template the build stops before any work."""
    argv = ["--input", str(FIXTURES / "trl_preference.jsonl")] + flags(ref_model=reference, output=tmp_path / "out")
    assert builder.main(argv) == 1
    assert "pass --template" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_interrupted_build_says_how_to_go_on(reference, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the reference pass: exit status 130 and one line naming the cache a re-run goes on from."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "add_reference", interrupted)
    assert build(reference, tmp_path / "d", [FIXTURES / "trl_preference.jsonl"]) == 130
    assert "run the same command again to go on from them" in capsys.readouterr().err


def test_a_prompt_limit_at_the_sequence_limit_is_warned_about(reference, tmp_path, capsys):
    """--max-prompt-len (default 256) >= --max-seq-len lets a long prompt leave each response one token."""
    build(reference, tmp_path / "d", [FIXTURES / "trl_preference.jsonl"], "--no-reference", max_seq_len=64)
    assert "--max-prompt-len 256 >= --max-seq-len 64" in capsys.readouterr().err
