"""scripts/build_finetune_datasets.py on the real-shaped SFT fixtures, with every chat template family.

Expected token ids are derived from each template's definition (``dpo_llama/utils/templates.py``): special
tokens are single ids, and the text between two of them is encoded as ONE string whose first part (role
headers, user text) is unmasked and whose rest (the assistant's answer) is masked, together with the
token that ends the turn.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.dataset_io import META_FILE, TRAIN_FILE, VAL_FILE
from dpo_llama.utils.dataset_io import load_examples as read_split
from dpo_llama.utils.sft_formats import load_sft_records
from dpo_llama.utils.templates import TEMPLATE_NAMES
from scripts.build_finetune_datasets import main as build
from tests.data_fixtures import FIXTURES
from tests.pipeline_fixtures import flags, write_jsonl
from tests.tokenizer_fixtures import make_hf_tokenizer, make_sentencepiece

END_TOKENS = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
# fixture -> (rows read, rows kept, skipped by reason), counted by reading the files.
SFT_FIXTURES = {
    "alpaca_data.json": (5, 3, {"empty response": 1, "missing field": 1}),
    "sharegpt.json": (6, 3, {"does not end with an assistant turn": 1, "tools not supported": 1,
                             "roles do not alternate": 1}),
    "openai_messages.jsonl": (6, 3, {"non-string content": 1, "malformed JSON": 1, "unknown role": 1}),
    "hh_rlhf_harmless_test.jsonl.gz": (6, 5, {"empty response": 1}),
    "databricks-dolly-15k.jsonl": (4, 3, {"empty response": 1}),
}


@pytest.fixture(scope="module")
def tokenizer_paths(tmp_path_factory) -> dict[str, Path]:
    """template -> tokenizer: a LLaMA-2-like sentencepiece model for llama2, tokenizer.json dirs for the rest."""
    root = tmp_path_factory.mktemp("tokenizers")
    paths = {"llama2": make_sentencepiece(root / "llama2")}
    paths.update({style: make_hf_tokenizer(root / style, style) for style in ("llama3", "deepseek", "chatml")})
    return paths


def run_builder(tmp_path: Path, tokenizer: Path, template: str, inputs: list[Path], **extra) -> tuple[int, Path]:
    """Runs the builder with every example in train (val ratio 0 unless overridden); returns (rc, output dir)."""
    out = tmp_path / f"sft-{template}"
    argv = ["--input", *map(str, inputs)] + flags(tokenizer=tokenizer, template=template, output=out,
                                                  **{"val_ratio": 0.0, **extra})
    return build(argv), out


def load_examples(out: Path) -> tuple[list[dict], dict]:
    """All examples (train + validation) and meta.json of a built dataset."""
    return read_split(out / TRAIN_FILE) + read_split(out / VAL_FILE), json.loads((out / META_FILE).read_text())


def expected(tokenizer, parts) -> tuple[list[int], list[bool]]:
    """Ids and mask from template parts: ``(special_id, masked)`` or ``(unmasked_text, masked_text)``; the two
    texts of a part are encoded as one string, split where the unmasked text's own encoding ends."""
    ids, mask = [], []
    for first, second in parts:
        if isinstance(first, int):
            ids.append(first)
            mask.append(second)
            continue
        run, head = tokenizer.encode(first + second), tokenizer.encode(first) if first else []
        assert run[:len(head)] == head
        ids += run
        mask += [False] * len(head) + [True] * (len(run) - len(head))
    return ids, mask


def end_token(tokenizer, template: str) -> int:
    """The token that closes an assistant turn in ``template`` (EOS for llama2 and deepseek)."""
    return tokenizer.token_id(END_TOKENS[template]) if template in END_TOKENS else tokenizer.eos_id


def masked_runs(example: dict) -> list[np.ndarray]:
    """The token ids of each maximal run of masked (True) positions."""
    mask = example["mask"].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [example["tokens"][start:end] for start, end in zip(edges[::2], edges[1::2])]


HAND_CHECKED = {
    # llama2, sharegpt row 0 (two turn pairs, each with its own BOS): B "[INST] q [/INST]" *" a " E*
    "llama2": ("sharegpt.json", lambda t: [
        (t.bos_id, False), ("[INST] What is the capital of Italy? [/INST]", " Rome. "), (t.eos_id, True),
        (t.bos_id, False), ("[INST] And of Spain? [/INST]", " Madrid. "), (t.eos_id, True)]),
    # llama3, messages row 1 (system prompt): <|begin_of_text|> then per message header "\n\n" content <|eot_id|>
    "llama3": ("openai_messages.jsonl", lambda t: [
        (t.bos_id, False),
        (t.token_id("<|start_header_id|>"), False), ("system", ""), (t.token_id("<|end_header_id|>"), False),
        ("\n\nYou are a concise assistant.", ""), (t.token_id("<|eot_id|>"), False),
        (t.token_id("<|start_header_id|>"), False), ("user", ""), (t.token_id("<|end_header_id|>"), False),
        ("\n\nWhat is the boiling point of water?", ""), (t.token_id("<|eot_id|>"), False),
        (t.token_id("<|start_header_id|>"), False), ("assistant", ""), (t.token_id("<|end_header_id|>"), False),
        ("\n\n", "100 °C at sea level."), (t.token_id("<|eot_id|>"), True)]),
    # deepseek, alpaca row 3 (system + history): B "{system}\n\nUser: {q}\n\nAssistant:" *" {a}" E* ...
    "deepseek": ("alpaca_data.json", lambda t: [
        (t.bos_id, False),
        ("You are a translator.\n\nUser: Say hello in French.\n\nAssistant:", " Bonjour."), (t.eos_id, True),
        ("User: And in Spanish?\n\nAssistant:", " Hola."), (t.eos_id, True)]),
    # chatml, dolly row 0 (instruction + "\n\n" + context): <|im_start|> "role\n" content <|im_end|>, joined by "\n"
    "chatml": ("databricks-dolly-15k.jsonl", lambda t: [
        (t.token_id("<|im_start|>"), False),
        ("user\nWhen did Virgin Australia start operating?\n\nVirgin Australia commenced services on 31 August "
         "2000 as Virgin Blue, with two aircraft on a single route.", ""), (t.token_id("<|im_end|>"), False),
        ("\n", ""), (t.token_id("<|im_start|>"), False),
        ("assistant\n", "Virgin Australia commenced services on 31 August 2000 as Virgin Blue."),
        (t.token_id("<|im_end|>"), True)]),
}


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_hand_checked_example_per_template_family(tmp_path, tokenizer_paths, template):
    """One example per template family, built from a fixture file, has exactly the template's ids and mask."""
    fixture, parts = HAND_CHECKED[template]
    tokenizer = load_tokenizer(tokenizer_paths[template])
    rc, out = run_builder(tmp_path, tokenizer_paths[template], template, [FIXTURES / fixture])
    assert rc == 0
    ids, mask = expected(tokenizer, parts(tokenizer))
    examples, _ = load_examples(out)
    found = [e for e in examples if e["tokens"].tolist() == ids]
    assert len(found) == 1
    assert found[0]["tokens"].dtype == np.int32 and found[0]["mask"].dtype == np.bool_
    assert found[0]["mask"].tolist() == mask


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("fixture", list(SFT_FIXTURES))
def test_every_format_masks_exactly_the_assistant_turns(tmp_path, tokenizer_paths, fixture, template, capsys):
    """For every fixture and template: one example per usable row; the masked runs are exactly the assistant
    turns in order (each decodes to the turn's text and ends with the turn's end token); bad rows are counted
    in meta.json and in the printed summary."""
    rows_read, rows_kept, skipped = SFT_FIXTURES[fixture]
    tokenizer = load_tokenizer(tokenizer_paths[template])
    rc, out = run_builder(tmp_path, tokenizer_paths[template], template, [FIXTURES / fixture])
    assert rc == 0
    examples, meta = load_examples(out)
    assert len(examples) == rows_kept == meta["counts"]["train"]
    assert meta["rows"]["rows_read"] == rows_read and meta["rows"]["rows_kept"] == rows_kept
    assert meta["rows"]["skipped_by_reason"] == skipped
    assert meta["template"] == template and meta["tokenizer_fingerprint"] == tokenizer.fingerprint()
    printed = capsys.readouterr().out
    assert f"Read {rows_read} rows from 1 file(s): kept {rows_kept}, skipped {rows_read - rows_kept}." in printed
    assert all(f"{reason}: {count}" in printed for reason, count in skipped.items())

    records, _ = load_sft_records(FIXTURES / fixture)
    expected_turns = sorted(tuple(m["content"].strip() for m in r.messages if m["role"] == "assistant")
                            for r in records)
    end = end_token(tokenizer, template)
    got_turns = []
    for example in examples:
        assert not example["mask"][0]
        runs = masked_runs(example)
        assert all(run[-1] == end for run in runs)
        got_turns.append(tuple(tokenizer.decode(run.tolist()).strip() for run in runs))
    assert sorted(got_turns) == expected_turns


def test_several_files_and_validation_split(tmp_path, tokenizer_paths):
    """Two files are read in order into one report; val_ratio 0.25 of 6 examples holds out round(1.5) = 2."""
    inputs = [FIXTURES / "sharegpt.json", FIXTURES / "databricks-dolly-15k.jsonl"]
    rc, out = run_builder(tmp_path, tokenizer_paths["llama2"], "llama2", inputs, val_ratio=0.25)
    assert rc == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["counts"] == {"train": 4, "validation": 2}
    assert meta["rows"]["files"] == [str(p) for p in inputs]
    assert meta["rows"]["rows_kept"] == 6 and meta["rows"]["rows_skipped"] == 3 + 1


def test_the_seed_picks_the_split_and_meta_counts_target_tokens(tmp_path, tokenizer_paths):
    """--seed decides which 2 of the 6 examples are held out (the same seed the same split); meta's target token
    total is the number of scored tokens over both splits, fewer than all tokens."""
    inputs = [FIXTURES / "sharegpt.json", FIXTURES / "databricks-dolly-15k.jsonl"]
    splits = {}
    for seed in (1, 1, 3, 4):
        rc, out = run_builder(tmp_path / str(len(splits)), tokenizer_paths["llama2"], "llama2", inputs,
                              val_ratio=0.25, seed=seed)
        assert rc == 0
        splits.setdefault(seed, []).append([e["tokens"].tolist() for e in read_split(out / VAL_FILE)])
    assert splits[1][0] == splits[1][1] and splits[1][0] not in (splits[3][0], splits[4][0])
    examples, meta = load_examples(out)
    assert meta["target_tokens"]["total"] == sum(int(e["mask"].sum()) for e in examples)
    assert meta["target_tokens"]["total"] < meta["tokens"]["total"]


def test_invalid_unicode_rows_are_skipped_and_train_is_never_empty(tmp_path, tokenizer_paths, capsys):
    """A lone surrogate escape (valid JSON, seen in scraped data) is counted and skipped, not a crash; a ratio that
    would hold out everything keeps one example for training; a bad ratio is refused before any tokenization."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Broken emoji \\ud83d here", "input": "", "output": "ok"}\n'
                    + "".join(json.dumps({"instruction": f"Q{i}", "input": "", "output": f"A{i}"}) + "\n"
                              for i in range(3)))
    for style in ("llama2", "llama3"):
        rc, out = run_builder(tmp_path / style, tokenizer_paths[style], style, [data], val_ratio=0.9)
        assert rc == 0
        meta = json.loads((out / META_FILE).read_text())
        assert meta["counts"] == {"train": 1, "validation": 2}
        assert meta["rows"]["skipped_by_reason"] == {"template error": 1}
    assert run_builder(tmp_path / "bad", tokenizer_paths["llama2"], "llama2", [data], val_ratio=1.0)[0] == 1
    assert "val_ratio must be in [0, 1)" in capsys.readouterr().err


def test_truncation_keeps_the_start_and_drops_examples_without_assistant_tokens(tmp_path, tokenizer_paths,
                                                                                  capsys):
    """With --max-seq-len L every example is its full rendering cut to the first L tokens; a conversation
    whose first L tokens hold no assistant token is dropped and counted."""
    tokenizer, inputs = tokenizer_paths["llama2"], [FIXTURES / "openai_messages.jsonl",
                                                     FIXTURES / "hh_rlhf_harmless_test.jsonl.gz"]
    assert run_builder(tmp_path / "full", tokenizer, "llama2", inputs, max_seq_len=4096)[0] == 0
    full, _ = load_examples(tmp_path / "full" / "sft-llama2")
    limit = 24
    kept = [e for e in full if e["mask"][:limit].any()]
    assert 0 < len(kept) < len(full) and any(len(e["tokens"]) > limit for e in kept)
    capsys.readouterr()

    assert run_builder(tmp_path / "cut", tokenizer, "llama2", inputs, max_seq_len=limit)[0] == 0
    cut, meta = load_examples(tmp_path / "cut" / "sft-llama2")
    assert sorted(e["tokens"].tolist() for e in cut) == sorted(e["tokens"][:limit].tolist() for e in kept)
    assert sorted(e["mask"].tolist() for e in cut) == sorted(e["mask"][:limit].tolist() for e in kept)
    dropped = len(full) - len(kept)
    assert meta["rows"]["skipped_by_reason"]["no assistant token within max_seq_len"] == dropped
    assert meta["rows"]["rows_kept"] == len(kept)
    assert f"no assistant token within max_seq_len: {dropped}" in capsys.readouterr().out


def test_a_file_without_a_usable_row_is_an_error(tmp_path, tokenizer_paths, capsys):
    """Every row bad -> exit 1 with one error naming the file and the reasons; nothing is written."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hi", "output": ""},
                                                 {"instruction": "Hello", "input": ""}])
    rc, out = run_builder(tmp_path, tokenizer_paths["llama2"], "llama2", [bad], format="alpaca")
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: no usable rows (2 skipped") and "empty response: 1" in err
    assert not out.exists()


def test_an_output_over_the_input_file_is_one_error_line(tmp_path, tokenizer_paths, capsys):
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    assert build(["--input", str(rows)] + flags(tokenizer=tokenizer_paths["llama2"], template="llama2",
                                                output=rows)) == 1
    assert capsys.readouterr().err == f"error: --output {rows}: {rows} is a file, not a directory\n"
    assert rows.read_text().startswith('{"instruction"')


def test_no_example_left_after_truncation_is_an_error(tmp_path, tokenizer_paths, capsys):
    """--max-seq-len 3 leaves no assistant token in any conversation: exit 1 with the row summary."""
    rc, out = run_builder(tmp_path, tokenizer_paths["llama2"], "llama2", [FIXTURES / "databricks-dolly-15k.jsonl"],
                          max_seq_len=3)
    assert rc == 1
    err = capsys.readouterr().err
    assert "no usable example left after tokenization" in err
    assert "no assistant token within max_seq_len: 3" in err
    assert not out.exists()


def test_a_template_the_tokenizer_cannot_render_is_a_clear_error(tmp_path, tokenizer_paths, capsys):
    """A sentencepiece model has no <|im_start|>: each conversation is counted as a 'template error' and,
    none being left, the build exits 1 with the counts and the reason instead of a traceback."""
    rc, _ = run_builder(tmp_path, tokenizer_paths["llama2"], "chatml", [FIXTURES / "databricks-dolly-15k.jsonl"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "template error: 3" in err and "<|im_start|>" in err


def test_the_template_may_be_left_out_only_with_the_demo_tokenizer(tmp_path, tokenizer_paths, capsys):
    """No --template: the demo's tokenizer gets llama2 (its template); another tokenizer is refused, since any
    template would render it without an error."""
    data = [FIXTURES / "databricks-dolly-15k.jsonl"]
    assert build(["--input", *map(str, data)] + flags(output=tmp_path / "demo", val_ratio=0.0)) == 0
    assert json.loads((tmp_path / "demo" / META_FILE).read_text())["template"] == "llama2"
    argv = ["--input", *map(str, data)] + flags(tokenizer=tokenizer_paths["llama3"], output=tmp_path / "other")
    assert build(argv) == 1
    assert "pass --template (llama2, llama3, deepseek, chatml)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_parquet_without_pyarrow_is_one_error_line(tmp_path, tokenizer_paths, capsys, monkeypatch):
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, _ = run_builder(tmp_path, tokenizer_paths["llama2"], "llama2", [tmp_path / "train.parquet"])
    assert rc == 1 and capsys.readouterr().err.startswith("error: reading ")
