"""Tests for dpo_llama.utils.sft_formats: SFT formats -> Conversation records.

Fixtures under tests/fixtures/ copy the shape of the public files (keys, nesting, JSON layout)
with short made-up text, plus a few bad rows of the kinds found in the real data.
"""

import json

import pytest

from dpo_llama.utils.raw_data import BadRowError
from dpo_llama.utils.sft_formats import (
    Conversation,
    check_conversation,
    detect_sft_format,
    load_sft_records,
    parse_hh_transcript,
)
from tests.data_fixtures import FIXTURES, assistant, first_row, system, user


def test_alpaca():
    """alpaca_data.json: Stanford Alpaca rows plus LLaMA-Factory's system / history columns."""
    path = FIXTURES / "alpaca_data.json"
    records, report = load_sft_records(path, format="alpaca")
    assert records == [
        Conversation(
            [
                user("Give three tips for staying healthy."),
                assistant("1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."),
            ],
            f"{path}:[0]",
        ),
        Conversation(
            [user("Translate the sentence into French.\nI’m hungry."), assistant("J’ai faim.")], f"{path}:[1]"
        ),
        Conversation(
            [
                system("You are a translator."),
                user("Say hello in French."),
                assistant("Bonjour."),
                user("And in Spanish?"),
                assistant("Hola."),
            ],
            f"{path}:[3]",
        ),
    ]
    assert report.skipped == {"empty response": 1, "missing field": 1}
    assert report.first_skipped == [
        f"{path}:[2]: empty response (assistant turn 1)",
        f"{path}:[4]: missing field ('output')",
    ]


def test_sharegpt():
    """sharegpt.json: ShareGPT rows, a leading system turn, LLaMA-Factory's system key, and bad rows
    (ends with a human turn, LLaMA-Factory tool use with its tools column, a conversation opened by gpt)."""
    path = FIXTURES / "sharegpt.json"
    records, report = load_sft_records(path)
    assert records == [
        Conversation(
            [user("What is the capital of Italy?"), assistant("Rome."), user("And of Spain?"), assistant("Madrid.")],
            f"{path}:[0]",
        ),
        Conversation([system("Answer in one word."), user("Opposite of hot?"), assistant("Cold.")], f"{path}:[1]"),
        Conversation(
            [system("You are a literature tutor."), user("Who wrote Hamlet?"), assistant("William Shakespeare.")],
            f"{path}:[2]",
        ),
    ]
    assert report.first_skipped == [
        f"{path}:[3]: does not end with an assistant turn",
        f"{path}:[4]: tools not supported (a non-empty 'tools' field)",
        f"{path}:[5]: roles do not alternate (turn 0 is assistant, expected user)",
    ]


def test_messages():
    """openai_messages.jsonl: OpenAI fine-tuning rows; a tool call (content null), a truncated line,
    a blank line and a tool message."""
    path = FIXTURES / "openai_messages.jsonl"
    records, report = load_sft_records(path)
    assert records == [
        Conversation(
            [
                system("You are a concise assistant."),
                user("What is the boiling point of water?"),
                assistant("100 °C at sea level."),
            ],
            f"{path}:1",
        ),
        Conversation(
            [user("Hi"), assistant("Hello! How can I help?"), user("Spell cat backwards."), assistant("tac")],
            f"{path}:2",
        ),
        Conversation([user("Name a prime number."), assistant("7")], f"{path}:7"),
    ]
    assert report.skipped == {"non-string content": 1, "malformed JSON": 1, "unknown role": 1}
    assert report.first_skipped[0] == f"{path}:3: non-string content (assistant message content is NoneType)"
    assert report.first_skipped[1].startswith(f"{path}:4: malformed JSON")
    assert report.first_skipped[2] == f"{path}:6: unknown role ('tool')"


def test_hh_chosen_side():
    """HH-RLHF chosen transcripts as SFT data: multi-turn, an empty final reply (skipped), repeated
    Assistant turns (merged) and "Human:" inside a reply (kept as text)."""
    path = FIXTURES / "hh_rlhf_harmless_test.jsonl.gz"
    records, report = load_sft_records(path)
    assert records == [
        Conversation(
            [
                user("What is a good name for a pet goldfish?"),
                assistant("How about “Bubbles”? It’s cheerful and easy to say."),
            ],
            f"{path}:1",
        ),
        Conversation(
            [
                user("How do I boil an egg?"),
                assistant("Do you want it soft or hard boiled?"),
                user("Hard boiled, please."),
                assistant("Put the egg in boiling water for about ten minutes, then cool it in cold water."),
            ],
            f"{path}:2",
        ),
        Conversation([user("Say hello."), assistant("Hello!")], f"{path}:4"),
        Conversation(
            [
                user("Tell me a fact about owls."),
                assistant(
                    "Owls can turn their heads about 270 degrees.\n\nThey also fly almost silently.  Human: Really?"
                ),
                user("Why is that?"),
                assistant("Their feathers have soft, comb-like edges."),
            ],
            f"{path}:5",
        ),
        Conversation(
            [user("Recommend a book."), assistant("Try “The Hobbit”.  Human: Is it long?\n\nNo, about 300 pages.")],
            f"{path}:6",
        ),
    ]
    assert report.first_skipped == [f"{path}:3: empty response (assistant turn 1)"]


def test_dolly():
    """databricks-dolly-15k.jsonl: the context follows the instruction after a blank line."""
    path = FIXTURES / "databricks-dolly-15k.jsonl"
    records, report = load_sft_records(path)
    assert records == [
        Conversation(
            [
                user(
                    "When did Virgin Australia start operating?\n\nVirgin Australia commenced services on "
                    "31 August 2000 as Virgin Blue, with two aircraft on a single route."
                ),
                assistant("Virgin Australia commenced services on 31 August 2000 as Virgin Blue."),
            ],
            f"{path}:1",
        ),
        Conversation([user("Which is a species of fish? Tope or Rope"), assistant("Tope")], f"{path}:2"),
        Conversation(
            [
                user("Why can camels survive for long without water?"),
                assistant(
                    "Camels use the fat in their humps to keep them filled with energy and hydration for long "
                    "periods of time."
                ),
            ],
            f"{path}:4",
        ),
    ]
    assert report.first_skipped == [f"{path}:3: empty response (assistant turn 1)"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("alpaca_data.json", "alpaca"),
        ("sharegpt.json", "sharegpt"),
        ("openai_messages.jsonl", "messages"),
        ("hh_rlhf_harmless_test.jsonl.gz", "hh"),
        ("databricks-dolly-15k.jsonl", "dolly"),
        ("kto_en_demo.json", "messages"),
    ],
)
def test_detect_sft_format(name, expected):
    assert detect_sft_format(first_row(name)) == expected


def test_detect_unknown_or_ambiguous_format_lists_formats_and_keys():
    with pytest.raises(ValueError) as err:
        detect_sft_format({"text": "The sky is blue."})
    message = str(err.value)
    assert "row with keys ['text'] matches no known format" in message
    for name in ("alpaca", "sharegpt", "messages", "hh", "dolly"):
        assert name in message
    with pytest.raises(ValueError, match="ambiguous between formats sharegpt, messages"):
        detect_sft_format({"conversations": [], "messages": []})


def test_auto_detection_error_names_the_file():
    path = FIXTURES / "trl_preference.jsonl"
    with pytest.raises(ValueError, match=r"trl_preference\.jsonl: row with keys \['chosen', 'prompt', 'rejected'\]"):
        load_sft_records(path)


def test_unknown_format_name():
    with pytest.raises(ValueError, match="unknown SFT format 'csv'"):
        load_sft_records(FIXTURES / "alpaca_data.json", format="csv")


def test_wrong_explicit_format_gives_no_usable_rows_error():
    path = FIXTURES / "databricks-dolly-15k.jsonl"
    with pytest.raises(ValueError) as err:
        load_sft_records(path, format="alpaca")
    assert str(err.value).startswith(f"{path}: no usable rows (4 skipped; top reasons: missing field: 4;")


def test_several_files_and_max_samples():
    alpaca, dolly = FIXTURES / "alpaca_data.json", FIXTURES / "databricks-dolly-15k.jsonl"
    records, report = load_sft_records([alpaca, dolly])
    assert [r.source for r in records] == [
        f"{alpaca}:[0]", f"{alpaca}:[1]", f"{alpaca}:[3]", f"{dolly}:1", f"{dolly}:2", f"{dolly}:4"
    ]
    assert (report.rows_read, report.rows_kept, report.files) == (9, 6, [str(alpaca), str(dolly)])
    records, report = load_sft_records([alpaca, dolly], max_samples=4)
    assert [r.source for r in records] == [f"{alpaca}:[0]", f"{alpaca}:[1]", f"{alpaca}:[3]", f"{dolly}:1"]
    assert report.rows_read == 6


def test_parquet_messages(tmp_path):
    """Hub parquet files store messages as structs with fields in alphabetical order (content, role)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "train-00000-of-00001.parquet"
    rows = [
        {"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}]},
        {"messages": [{"content": "Bye", "role": "user"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_sft_records(path)
    assert records == [Conversation([user("Hi"), assistant("Hello!")], f"{path}:[0]")]
    assert report.first_skipped == [f"{path}:[1]: no assistant turn"]


def test_parse_hh_transcript_quirks():
    assert parse_hh_transcript("Human: hi\n\nAssistant: hello") == [user("hi"), assistant("hello")]
    assert parse_hh_transcript("\n\nHuman: a\n\nHuman: b \n\nAssistant:  c  ") == [user("a\n\nb"), assistant("c")]
    assert parse_hh_transcript("\n\nHuman: x\n\nAssistant: ") == [user("x"), assistant("")]
    # only a blank line starts a turn: a reply quoting "Human:" after a single newline stays the reply
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: sure.\nHuman: really?") == [
        user("hi"), assistant("sure.\nHuman: really?")]
    for text in ("no markers at all", "Intro\n\nHuman: hi\n\nAssistant: hello"):
        with pytest.raises(BadRowError, match="not an HH transcript"):
            parse_hh_transcript(text)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "q", "output": "a", "history": "q0 a0"}, "malformed history"),
        ({"instruction": "q", "output": "a", "history": [["q0"]]}, "malformed history"),
        ({"instruction": "q", "output": "a", "history": [["q0", 1]]}, "malformed history"),
        ({"instruction": ["q"], "output": "a"}, "non-string content"),
        ({"instruction": "q", "output": "a", "system": 5}, "non-string content"),
    ],
)
def test_alpaca_bad_rows(tmp_path, row, reason):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, row]))
    records, report = load_sft_records(path, format="alpaca")
    assert len(records) == 1
    assert report.skipped == {reason: 1}
    assert report.first_skipped[0].startswith(f"{path}:[1]: {reason}")


@pytest.mark.parametrize("fmt, row, messages", [
    ("messages", {"messages": [system(""), user("q"), assistant("a")]}, [user("q"), assistant("a")]),
    ("alpaca", {"instruction": "q", "output": "a", "system": "  "}, [user("q"), assistant("a")]),
    # a leading system turn wins over the system key
    ("sharegpt", {"system": "key", "conversations": [{"from": "system", "value": "turn"},
                                                     {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     [system("turn"), user("q"), assistant("a")]),
    ("sharegpt", {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
     [user("q"), assistant("a")]),
])
def test_system_messages_and_role_aliases(tmp_path, fmt, row, messages):
    """An empty or blank system message is no system message; ShareGPT also names its roles user/assistant."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([row]))
    records, _ = load_sft_records(path, format=fmt)
    assert records[0].messages == messages


def test_openai_weight_zero_keeps_an_assistant_turn_as_context(tmp_path):
    """OpenAI's per-message weight: 0 marks the assistant turn train=False, 1 (or none) trains it; a row whose
    assistant turns all have weight 0, or another weight, is skipped."""
    rows = [{"messages": [user("Capital of France?"), {**assistant("Paris"), "weight": 0}, user("Sure?"),
                          {**assistant("Yes, Paris."), "weight": 1}]},
            {"messages": [user("q"), {**assistant("a"), "weight": 0}]},
            {"messages": [user("q"), {**assistant("a"), "weight": 0.5}]},
            {"messages": [user("q"), {**assistant("a"), "weight": None}]}]  # what Parquet stores for "no weight"
    path = tmp_path / "weights.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, report = load_sft_records(path)
    assert [m.get("train", True) for m in records[0].messages] == [True, False, True, True]
    assert [m.get("train", True) for m in records[1].messages] == [True, True]
    assert report.skipped == {"no trained assistant turn": 1, "invalid weight": 1}


def test_openai_text_parts_and_the_developer_role(tmp_path):
    """OpenAI's content may be a list of text parts (joined), and its newer ``developer`` role is the system
    prompt; a part that is not text (an image) keeps the row out."""
    rows = [{"messages": [{"role": "developer", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                       {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "A cat."}]}]
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, report = load_sft_records(path)
    assert records[0].messages == [system("Be brief."), user("Hi there"), assistant("Hello!")]
    assert report.skipped == {"non-string content": 1}


def test_sharegpt_with_role_and_content_tags(tmp_path):
    """LLaMA-Factory's other ShareGPT tag set (``role``/``content``, roles user/assistant) reads as from/value."""
    path = tmp_path / "sharegpt_role.json"
    path.write_text(json.dumps([{"conversations": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello!"}],
                                 "system": "Be kind."}]))
    records, _ = load_sft_records(path, "sharegpt")
    assert records[0].messages == [system("Be kind."), user("Hi"), assistant("Hello!")]


@pytest.mark.parametrize("row, reason", [
    ({"messages": [user("q"), assistant("a")], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools not supported"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "tools": "[{\"name\": \"get_weather\"}]"}, "tools not supported"),
    ({"instruction": "q", "output": "a", "tools": "[{\"name\": \"get_weather\"}]"}, "tools not supported"),
    ({"messages": [user("q"), assistant("a")], "label": False}, "KTO row"),
    ({"messages": [user("q"), assistant("a")], "label": None}, "KTO row"),
    ({"instruction": "q", "output": "a", "label": True}, "KTO row"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "label": False}, "KTO row"),
])
def test_rows_with_tools_or_a_kto_label_are_skipped(tmp_path, row, reason):
    """A declared tool list (LLaMA-Factory's tools column, OpenAI's tools) would be dropped from the prompt; a
    KTO row's completion may be undesirable: neither is an SFT demonstration."""
    fmt = "messages" if "messages" in row else "sharegpt" if "conversations" in row else "alpaca"
    good = {"messages": [user("ok"), assistant("fine")]} if fmt == "messages" else (
        {"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "fine"}]}
        if fmt == "sharegpt" else {"instruction": "ok", "output": "fine"})
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, row]))
    records, report = load_sft_records(path, format=fmt)
    assert len(records) == 1 and report.skipped == {reason: 1}


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "no assistant turn"),
        ([system("s"), user("q")], "no assistant turn"),
        ([user("q"), assistant("a"), user("q2")], "does not end with an assistant turn"),
        ([assistant("a")], "roles do not alternate"),
        ([user("q"), user("q2"), assistant("a")], "roles do not alternate"),
        ([user("q"), system("s"), assistant("a")], "misplaced system message"),
        ([user("q"), assistant(" \n")], "empty response"),
        ([user(""), assistant("a")], "empty message"),
        ([user("q"), assistant(" "), user("q2"), assistant("a")], "empty message"),  # not the final response
    ],
)
def test_check_conversation_rejects(messages, reason):
    with pytest.raises(BadRowError) as err:
        check_conversation(messages)
    assert err.value.reason == reason


def test_check_conversation_accepts_and_returns_messages():
    messages = [system("s"), user("q"), assistant("a"), user("q2"), assistant("a2")]
    assert check_conversation(messages) is messages
