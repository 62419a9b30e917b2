"""The demo task (dpo_llama/utils/demo_task.py), scripts/make_demo_assets.py and the committed demo assets."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from dpo_llama.configs import demo
from dpo_llama.models.checkpoint import load_model
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils import demo_task
from dpo_llama.utils.demo_task import Problem
from dpo_llama.utils.preference_formats import load_preference_records
from dpo_llama.utils.sft_formats import load_sft_records
from scripts.make_demo_assets import main as make_demo_assets

DATA_FILES = ("sft.jsonl", "preference_train.jsonl", "preference_test.jsonl", "eval.jsonl")
SIZES = {"sft": 50, "preference_train": 40, "preference_test": 30, "eval": 20}


@pytest.mark.parametrize("response, expected", [
    ("47 + 38 = 85", 1.0),
    ("85", 1.0),
    ("The answer is 85.", 1.0),
    ("47 + 38 = 85, I am sure. 12 apples", 1.0),   # the first number after the last "=" counts
    ("47 + 38 = 75", 0.0),                          # a forgotten carry
    ("47 + 38 = 95", 0.0),
    ("85 is wrong: 47 + 38 = 84", 0.0),             # the final answer counts, not an earlier number
    ("47 + 38 = 8 5", 0.0),                         # "8" is the final number
    ("47 + 38 =", 0.0),                             # malformed: nothing after "="
    ("I do not know", 0.0),
    ("", 0.0),
    ("= -85", 0.0),
    ("47 + 38 = 85.7", 0.0),                        # not a whole number
    ("12 + 73 = 85", 0.0),                          # the right sum of a false equation
    ("38 + 47 = 85", 1.0),                          # the same two numbers, swapped: a true equation
])
def test_reward_hand_written(response, expected):
    """47 + 38 = 85; the reward is 1 exactly when the parsed final number is 85 and an equation in the answer adds
    47 and 38."""
    assert demo_task.reward(Problem(47, 38), response) == expected
    assert demo_task.reward("What is 47 + 38?", response) == expected


def test_parse_final_number():
    assert demo_task.parse_final_number("10 + 20 = 30") == 30
    assert demo_task.parse_final_number("a = 3 = 4 then 7") == 4
    assert demo_task.parse_final_number("first 3 then 9.") == 9
    assert demo_task.parse_final_number("x = -5") == -5
    assert demo_task.parse_final_number("nothing") is None
    assert demo_task.parse_final_number("x = 85.7") is None and demo_task.parse_final_number("x = 85.") == 85


def test_parse_problem_and_its_errors():
    assert demo_task.parse_problem("What is 47 + 38?") == Problem(47, 38)
    assert demo_task.parse_problem("47+38") == Problem(47, 38)
    with pytest.raises(ValueError, match="no addition problem"):
        demo_task.parse_problem("What is the capital of France?")
    with pytest.raises(ValueError, match="no addition problem"):
        demo_task.reward("hello", "85")


def test_problem_text_and_carry():
    """47 + 38: ones 7 + 8 = 15 >= 10, a carry; 42 + 35: ones 2 + 5 = 7, none; 45 + 55: 5 + 5 = 10, a carry."""
    assert Problem(47, 38).question() == "What is 47 + 38?"
    assert Problem(47, 38).equation() == "47 + 38 = 85"
    assert Problem(47, 38).equation(75) == "47 + 38 = 75"
    assert Problem(47, 38).needs_carry
    assert not Problem(42, 35).needs_carry
    assert Problem(45, 55).needs_carry


def test_mistakes_hand_written():
    """47 + 38 = 85: forgetting the carry gives 4 + 3 = 7 tens, 75; a spurious one 95. 42 + 35 = 77: 67 / 87."""
    assert demo_task.mistake(Problem(47, 38), "ten_less") == 75
    assert demo_task.mistake(Problem(47, 38), "ten_more") == 95
    assert demo_task.mistake(Problem(42, 35), "ten_less") == 67
    assert demo_task.mistake(Problem(42, 35), "ten_more") == 87
    with pytest.raises(ValueError, match="unknown mistake kind"):
        demo_task.mistake(Problem(47, 38), "typo")


def test_mistakes_are_always_wrong_and_plausible():
    """On every problem each mistake is wrong, ten off, non-negative, and scores reward 0 (the truth scores 1)."""
    problems = demo_task.all_problems()
    assert len(problems) == 90 * 90
    for problem in problems:
        assert demo_task.reward(problem, problem.equation()) == 1.0
        for kind in demo_task.MISTAKE_KINDS:
            wrong = demo_task.mistake(problem, kind)
            assert abs(wrong - problem.answer) == 10 and wrong >= 0
            assert demo_task.reward(problem, problem.equation(wrong)) == 0.0


def test_rejected_answers_bracket_the_truth():
    """The checker's rejected sum is ten off, below or above the truth about equally often."""
    rng = random.Random(0)
    problems = demo_task.all_problems()
    rejected = [demo_task.rejected_answer(p, rng) for p in problems]
    assert all(abs(r - p.answer) == 10 for p, r in zip(problems, rejected))
    below = sum(r < p.answer for p, r in zip(problems, rejected)) / len(problems)
    assert 0.45 < below < 0.55


def test_sloppy_annotator_only_forgets_carries():
    rng = random.Random(0)
    problems = demo_task.all_problems()
    answers = [demo_task.sloppy_answer(p, 0.8, rng) for p in problems]
    for problem, answer in zip(problems, answers):
        assert answer in (problem.answer, problem.answer - 10)
        if not problem.needs_carry:
            assert answer == problem.answer
    carries = [a != p.answer for p, a in zip(problems, answers) if p.needs_carry]
    assert 0.75 < sum(carries) / len(carries) < 0.85
    assert all(demo_task.sloppy_answer(p, 0.0, rng) == p.answer for p in problems[:100])


def test_splits_deterministic_and_disjoint():
    first, again = demo_task.split_problems(3, SIZES), demo_task.split_problems(3, SIZES)
    assert first == again
    assert first["eval"] != demo_task.split_problems(4, SIZES)["eval"]
    assert {name: len(first[name]) for name in SIZES} == SIZES
    seen = set()
    for name in SIZES:
        assert not seen & set(first[name])
        seen |= set(first[name])
    held_out = set(first["eval"]) | set(first["preference_test"])
    assert not held_out & set(first["pretrain"])
    assert len(first["pretrain"]) == 90 * 90 - len(held_out)


def test_split_errors():
    with pytest.raises(ValueError, match="unknown splits"):
        demo_task.split_problems(0, {"test": 3})
    with pytest.raises(ValueError, match="only 8100 exist"):
        demo_task.split_problems(0, {"sft": 9000})


def test_rows_have_the_standard_shapes():
    problem = Problem(47, 38)
    assert demo_task.sft_row(problem, 75) == {"messages": [
        {"role": "user", "content": "What is 47 + 38?"}, {"role": "assistant", "content": "47 + 38 = 75"}]}
    assert demo_task.preference_row(problem, 75) == {
        "prompt": [{"role": "user", "content": "What is 47 + 38?"}],
        "chosen": [{"role": "assistant", "content": "47 + 38 = 85"}],
        "rejected": [{"role": "assistant", "content": "47 + 38 = 75"}]}
    assert demo_task.eval_row(problem) == {"prompt": [{"role": "user", "content": "What is 47 + 38?"}],
                                           "answer": 85}


def test_pretraining_lines_state_correct_sums():
    """Every line states the right sum (the reward parser reads it) and names the operands first, no chat markers."""
    rng = random.Random(0)
    lines = [(problem, demo_task.pretraining_line(problem, rng)) for problem in demo_task.all_problems()[:300]]
    for problem, line in lines:
        assert demo_task.reward(problem, line) == 1.0
        assert re.findall(r"\d+", line)[:2] == [str(problem.a), str(problem.b)]
        assert "[INST]" not in line
    fillers_seen = {f for f in demo_task.PRETRAIN_FILLERS if f and any(f in line for _, line in lines)}
    assert len(fillers_seen) >= 3


def test_jsonl_round_trip_and_errors(tmp_path):
    rows = [demo_task.eval_row(Problem(10, 20)), demo_task.eval_row(Problem(47, 38))]
    demo_task.write_jsonl(tmp_path / "eval.jsonl", rows)
    assert demo_task.read_jsonl(tmp_path / "eval.jsonl") == rows
    assert demo_task.load_eval_problems(tmp_path / "eval.jsonl") == [Problem(10, 20), Problem(47, 38)]
    with pytest.raises(FileNotFoundError):
        demo_task.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        demo_task.read_jsonl(tmp_path / "bad.jsonl")
    demo_task.write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}],
                                                      "answer": 4}])
    with pytest.raises(ValueError, match="answer 4 but 1 \\+ 2 = 3"):
        demo_task.load_eval_problems(tmp_path / "wrong.jsonl")
    for bad_row in ({"question": "What is 1 + 2?"}, {"prompt": ["What is 1 + 2?"], "answer": 3},
                    {"prompt": [{"role": "user", "content": "Hi"}], "answer": 3}):
        demo_task.write_jsonl(tmp_path / "bad_row.jsonl", [bad_row])
        with pytest.raises(ValueError, match="bad_row.jsonl row 0"):
            demo_task.load_eval_problems(tmp_path / "bad_row.jsonl")


def tiny_asset_args(out_dir, seed=0):
    return ["--output", str(out_dir), "--seed", str(seed), "--sft-size", "20", "--preference-train-size", "20",
            "--preference-test-size", "10", "--eval-size", "10", "--pretrain-steps", "3", "--batch-size", "8",
            "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--hidden-dim", "64"]


def test_make_demo_assets_is_deterministic(tmp_path):
    """Two runs with one seed write identical data, tokenizer and (same machine) weights; another seed differs."""
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert make_demo_assets(tiny_asset_args(tmp_path / name, seed)) == 0
    for name in ("pretrain.txt", *DATA_FILES, "base/tokenizer.model", "base/params.json",
                 "base/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()
    model = load_model(tmp_path / "a" / "base")
    assert model.args.dim == 32 and model.embed_tokens.weight.dtype == torch.bfloat16


def test_make_demo_assets_rejects_impossible_sizes(tmp_path, capsys):
    assert make_demo_assets(["--output", str(tmp_path), "--sft-size", "9000"]) == 1
    assert "only 8100 exist" in capsys.readouterr().err
    for flag in ("--pretrain-steps", "--eval-size"):  # nothing to train or to measure on
        with pytest.raises(SystemExit):
            make_demo_assets(["--output", str(tmp_path), flag, "0"])


@pytest.mark.parametrize("flags,message", [
    (["--error-rate", "1.5"], "argument --error-rate: must be a probability from 0 to 1, got '1.5'"),
    (["--lr", "-1"], "argument --lr: must be a finite number >= 0.0, got '-1'"),
    (["--n-heads", "3"], "--dim 32 must be a multiple of --n-heads 3"),
    (["--dim", "6"], "the head width --dim / --n-heads = 3 must be even"),
    (["--n-kv-heads", "3", "--n-heads", "4", "--dim", "64"], "--n-heads 4 must be a multiple of --n-kv-heads 3"),
])
def test_make_demo_assets_refuses_bad_rates_and_head_counts(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        make_demo_assets(tiny_asset_args(tmp_path / "demo") + flags)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flags,message", [
    (["--vocab-size", "100"], ("--vocab-size 100 does not fit the corpus (sentencepiece: Vocabulary size is smaller "
                               "than required_chars. 100 vs 301.)")),
    (["--vocab-size", "5000"], ("--vocab-size 5000 does not fit the corpus (sentencepiece: Vocabulary size too high "
                                "(5000). Please set it to a value <= ")),
    (["--max-seq-len", "8"], "--max-seq-len 8 is shorter than the longest pretraining line ("),
])
def test_make_demo_assets_refuses_a_vocabulary_or_length_that_does_not_fit_the_corpus(tmp_path, capsys, flags,
                                                                                       message):
    """Found once the tokenizer meets the corpus, before any pretraining: one error line, no output, no staging
    directory left behind (before, a sentencepiece traceback or a failure in the first step)."""
    assert make_demo_assets(tiny_asset_args(tmp_path / "demo") + flags) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.endswith(f"; nothing was written to {tmp_path / 'demo'}\n")
    assert list(tmp_path.iterdir()) == []


def test_make_demo_assets_refuses_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert make_demo_assets(["--output", str(tmp_path / "f")]) == 1
    assert f"{tmp_path / 'f'} is a file, not a directory" in capsys.readouterr().err


def test_an_interrupted_make_demo_assets_leaves_the_old_assets(tmp_path, monkeypatch):
    """Everything is made aside and moved in at the end: a run stopped during pretraining changes nothing (no new
    held-out data beside an old model), and a finished one replaces the assets but keeps other files."""
    assert make_demo_assets(tiny_asset_args(tmp_path / "demo")) == 0
    (tmp_path / "demo" / "README.md").write_text("hand-written")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "demo").rglob("*") if p.is_file()}

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("scripts.make_demo_assets.pretrain", interrupted)
        with pytest.raises(KeyboardInterrupt):
            make_demo_assets(tiny_asset_args(tmp_path / "demo", seed=1))
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "demo").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no partial folder left
    assert make_demo_assets(tiny_asset_args(tmp_path / "demo", seed=1)) == 0
    assert (tmp_path / "demo" / "eval.jsonl").read_bytes() != before[Path("demo/eval.jsonl")]
    assert (tmp_path / "demo" / "README.md").read_text() == "hand-written"


# The committed assets (regenerate them with `python scripts/make_demo_assets.py`).


def test_committed_base_model_and_tokenizer_load():
    model = load_model(demo.BASE_MODEL, dtype=torch.float32)
    tokenizer = load_tokenizer(demo.TOKENIZER)
    assert demo.TOKENIZER.is_file() and demo.TOKENIZER.parent == demo.BASE_MODEL
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert model.args.vocab_size == tokenizer.vocab_size
    digits = [tokenizer.decode([i]) for i in tokenizer.encode("47 + 38 = 85")]
    assert [d for d in digits if d.isdigit()] == ["4", "7", "3", "8", "8", "5"]
    logits = model(torch.tensor([tokenizer.encode("47 + 38 =", bos=True)]))
    assert logits.shape[-1] == tokenizer.vocab_size and torch.isfinite(logits).all()
    assert sum(path.stat().st_size for path in demo.ASSETS.rglob("*") if path.is_file()) < 5 * 1024**2


def test_committed_data_files_have_the_expected_keys():
    keys = {"sft.jsonl": {"messages"}, "preference_train.jsonl": {"prompt", "chosen", "rejected"},
            "preference_test.jsonl": {"prompt", "chosen", "rejected"}, "eval.jsonl": {"prompt", "answer"}}
    for name, expected in keys.items():
        rows = demo_task.read_jsonl(demo.ASSETS / name)
        assert rows and all(set(row) == expected for row in rows), name
    for line in (demo.ASSETS / "eval.jsonl").read_text().splitlines()[:3]:
        assert json.loads(line)["prompt"][0]["role"] == "user"


def test_committed_data_files_parse_with_the_repo_loaders():
    conversations, sft_report = load_sft_records(demo.SFT_DATA)
    assert sft_report.rows_skipped == 0 and len(conversations) == sft_report.rows_read
    for path in (demo.PREFERENCE_DATA, demo.PREFERENCE_TEST_DATA):
        pairs, report = load_preference_records(path)
        assert report.rows_skipped == 0
        for pair in pairs:
            problem = demo_task.parse_problem(pair.prompt[-1]["content"])
            assert demo_task.reward(problem, pair.chosen[-1]["content"]) == 1.0
            assert demo_task.reward(problem, pair.rejected[-1]["content"]) == 0.0


def test_committed_eval_prompts_are_held_out():
    """Eval and held-out preference prompts appear in no SFT, preference-train or pretraining example."""
    def questions(name, key):
        return {row[key][0]["content"] for row in demo_task.read_jsonl(demo.ASSETS / name)}

    eval_questions = questions("eval.jsonl", "prompt")
    test_questions = questions("preference_test.jsonl", "prompt")
    train_questions = questions("sft.jsonl", "messages") | questions("preference_train.jsonl", "prompt")
    assert not (eval_questions | test_questions) & train_questions
    assert not eval_questions & test_questions
    held_out = {demo_task.parse_problem(q) for q in eval_questions | test_questions}
    lines = (demo.ASSETS / "pretrain.txt").read_text().splitlines()
    pretrain = {Problem(*map(int, re.findall(r"\d+", line)[:2])) for line in lines}
    assert not held_out & pretrain
    problems = demo_task.load_eval_problems(demo.EVAL_DATA)
    assert len(problems) == len(eval_questions)
    assert 0.3 < sum(p.needs_carry for p in problems) / len(problems) < 0.6
