"""Tests for dpo_llama.utils.preference_formats: preference / KTO formats -> records.

Fixtures under tests/fixtures/ copy the shape of the public files (keys, nesting, JSON layout)
with short made-up text, plus a few bad rows of the kinds found in the real data.
"""

import math

import json

import pytest

from dpo_llama.utils.preference_formats import (
    PreferencePair,
    UnpairedExample,
    detect_preference_format,
    is_unpaired,
    load_preference_records,
    shp_score_ratio,
    split_shared_prompt,
)
from dpo_llama.utils.raw_data import iter_rows
from tests.data_fixtures import FIXTURES, assistant, first_row, system, user


def test_hh():
    """HH-RLHF transcripts: the prompt is everything up to the last shared "Assistant:"; rows with an
    empty reply, identical sides, or sides that diverge before the last reply are skipped."""
    path = FIXTURES / "hh_rlhf_harmless_test.jsonl.gz"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair(
            [user("What is a good name for a pet goldfish?")],
            [assistant("How about “Bubbles”? It’s cheerful and easy to say.")],
            [assistant("I don’t know.")],
            f"{path}:1",
        ),
        PreferencePair(
            [
                user("How do I boil an egg?"),
                assistant("Do you want it soft or hard boiled?"),
                user("Hard boiled, please."),
            ],
            [assistant("Put the egg in boiling water for about ten minutes, then cool it in cold water.")],
            [assistant("Just microwave it.")],
            f"{path}:2",
        ),
        PreferencePair(
            [
                user("Tell me a fact about owls."),
                assistant(
                    "Owls can turn their heads about 270 degrees.\n\nThey also fly almost silently.  Human: Really?"
                ),
                user("Why is that?"),
            ],
            [assistant("Their feathers have soft, comb-like edges.")],
            [assistant("Nobody knows.")],
            f"{path}:5",
        ),
    ]
    assert report.first_skipped == [
        f"{path}:3: empty response (assistant turn 1)",
        f"{path}:4: identical chosen and rejected",
        f"{path}:6: transcripts diverge before the last assistant turn",
    ]


def test_trl_standard():
    path = FIXTURES / "trl_preference.jsonl"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair([user("The sky is")], [assistant(" blue.")], [assistant(" green.")], f"{path}:1"),
        PreferencePair([user("Water freezes at")], [assistant(" 0 °C.")], [assistant(" 50 °C.")], f"{path}:2"),
    ]
    assert report.first_skipped == [
        f"{path}:3: identical chosen and rejected",
        f"{path}:4: non-string content (field 'chosen' is list)",
    ]


def test_trl_rows_with_an_hh_transcript_prompt_are_split_into_turns(tmp_path):
    """Dahoas/rm-static rows: the prompt is an HH transcript up to its last "Assistant:"; it is split into turns
    (as the hh format would), not kept as one user message with the markers inside."""
    path = tmp_path / "rm_static.jsonl"
    path.write_text(json.dumps({"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
                                          "\n\nHuman: And Italy?\n\nAssistant:",
                                "chosen": " Rome.", "rejected": " Milan."}) + "\n")
    records, _ = load_preference_records(path)
    assert records == [PreferencePair([user("What is the capital of France?"), assistant("Paris."),
                                       user("And Italy?")], [assistant("Rome.")], [assistant("Milan.")],
                                      f"{path}:1")]


def test_trl_conversational_explicit_prompt():
    """Multi-turn prompt with a system message, and a multi-message chosen trajectory."""
    path = FIXTURES / "trl_conversational_preference.jsonl"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair(
            [user("What color is the sky?")], [assistant("It is blue.")], [assistant("It is green.")], f"{path}:1"
        ),
        PreferencePair(
            [system("Be brief."), user("Hi"), assistant("Hello!"), user("What is 3 x 3?")],
            [assistant("9")],
            [assistant("6")],
            f"{path}:2",
        ),
        PreferencePair(
            [user("Ask me a question, then answer my reply.")],
            [assistant("What is your favourite color?"), user("Green."), assistant("Green is a calm color.")],
            [assistant("No.")],
            f"{path}:3",
        ),
    ]
    assert report.first_skipped == [f"{path}:4: empty response (assistant turn 1)"]


@pytest.mark.parametrize("fmt, good", [
    ("trl_conversational", {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}),
    ("sharegpt_ranking", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                          "rejected": {"from": "gpt", "value": "b"}}),
    ("kto", {"prompt": [user("q")], "completion": [assistant("a")], "label": True}),
    ("trl", {"prompt": "q", "chosen": "a", "rejected": "b"}),
    ("alpaca_ranking", {"instruction": "q", "chosen": "a", "rejected": "b"}),
])
def test_rows_declaring_tools_are_skipped(tmp_path, fmt, good):
    """TRL's and LLaMA-Factory's tools column would be dropped from the prompt, so such rows are skipped."""
    path = tmp_path / "data.jsonl"
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tools": tools}) + "\n")
    records, report = load_preference_records(path, format=fmt)
    assert len(records) == 1 and report.skipped == {"tools not supported": 1}


GOOD_ROWS = {"trl_conversational": {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
             "kto": {"prompt": "q", "completion": "a", "label": True},
             "shp": {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 10, "score_B": 2}}


@pytest.mark.parametrize("fmt, bad, reason", [
    # a prompt ending on another turn than the user's: the continuation would score the user turn it starts with
    ("trl_conversational", {"prompt": [user("q"), assistant("a")], "chosen": [user("q2"), assistant("b")],
                            "rejected": [user("q2"), assistant("c")]}, "prompt does not end with a user turn"),
    ("kto", {"label": 1}, "invalid label"),  # a bool, not a number or a string
    ("kto", {"label": "true"}, "invalid label"),
    ("shp", {"score_A": True, "score_B": False}, "invalid scores"),
])
def test_malformed_rows_are_skipped_with_their_reason(tmp_path, fmt, bad, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD_ROWS[fmt]) + "\n" + json.dumps({**GOOD_ROWS[fmt], **bad}) + "\n")
    records, report = load_preference_records(path, format=fmt)
    assert len(records) == 1 and report.skipped == {reason: 1}


def test_trl_conversational_string_prompt_with_assistant_only_responses(tmp_path):
    """A string prompt beside assistant-message responses is the prompt (a user message); beside whole
    conversations (UltraFeedback) the prompt is their shared start, tested below."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2?", "chosen": [assistant("4")], "rejected": [assistant("5")]}) + "\n")
    records, _ = load_preference_records(path, "trl_conversational")
    assert records == [PreferencePair([user("2 + 2?")], [assistant("4")], [assistant("5")], f"{path}:1")]


def test_trl_conversational_implicit_prompt():
    """trl-lib/ultrafeedback_binarized rows (no prompt) and a HuggingFaceH4/ultrafeedback_binarized row
    (prompt string beside full conversations): the prompt is the shared message prefix."""
    path = FIXTURES / "ultrafeedback_binarized.jsonl"
    records, report = load_preference_records(path, format="trl_conversational")
    assert records == [
        PreferencePair(
            [user("Use three words to describe the ocean.")],
            [assistant("Vast, deep, blue.")],
            [assistant("Wet.")],
            f"{path}:1",
        ),
        PreferencePair(
            [user("Hi!"), assistant("Hello! How can I help?"), user("What is the largest planet?")],
            [assistant("Jupiter.")],
            [assistant("Mars.")],
            f"{path}:2",
        ),
        PreferencePair(
            [user("Name a mammal that can fly.")], [assistant("The bat.")], [assistant("The penguin.")], f"{path}:3"
        ),
    ]
    assert report.first_skipped == [f"{path}:4: no shared prompt (chosen and rejected start differently)"]


def test_implicit_prompt_split_matches_trl_extract_prompt():
    """TRL's own extract_prompt as an oracle on the well-formed implicit-prompt rows."""
    from trl import data_utils
    rows = [row for row, _ in iter_rows(FIXTURES / "ultrafeedback_binarized.jsonl")][:3]
    for row in rows:
        chosen = [{"role": m["role"], "content": m["content"]} for m in row["chosen"]]
        rejected = [{"role": m["role"], "content": m["content"]} for m in row["rejected"]]
        expected = data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
        assert split_shared_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_split_shared_prompt_ends_with_a_user_turn():
    """Sides that share [user, assistant] and then differ: the prompt is cut back to the user turn."""
    chosen = [user("q"), assistant("a"), user("q2"), assistant("b")]
    rejected = [user("q"), assistant("a"), user("q3"), assistant("c")]
    assert split_shared_prompt(chosen, rejected) == ([user("q")], chosen[1:], rejected[1:])


def test_sharegpt_ranking():
    """LLaMA-Factory dpo_en_demo.json shape: system as a first turn or as a key; identical sides and a
    conversation that ends with gpt (no user turn to answer) are skipped."""
    path = FIXTURES / "dpo_en_demo.json"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair(
            [user("Suggest a name for a bakery.")],
            [assistant("“Rise & Shine Bakery” 😊")],
            [assistant("Bakery.")],
            f"{path}:[0]",
        ),
        PreferencePair(
            [system("You are a teacher."), user("What is photosynthesis?")],
            [assistant("It is how plants turn light, water and CO2 into sugar and oxygen.")],
            [assistant("Plants eating sunlight.")],
            f"{path}:[1]",
        ),
        PreferencePair(
            [user('Who wrote "Pride and Prejudice"?'), assistant("Jane Austen"), user("When was it published?")],
            [assistant("In 1813.")],
            [assistant("In 1950.")],
            f"{path}:[2]",
        ),
        PreferencePair(
            [system("Answer briefly."), user("Is the sea salty?")],
            [assistant("Yes, about 3.5% salt.")],
            [assistant("No.")],
            f"{path}:[3]",
        ),
    ]
    assert report.first_skipped == [
        f"{path}:[4]: identical chosen and rejected",
        f"{path}:[5]: roles do not alternate (turn 2 is assistant, expected user)",
    ]


def test_sharegpt_ranking_with_role_and_content_tags(tmp_path):
    """LLaMA-Factory's other tag set, in the conversation and in the chosen/rejected messages."""
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps([{"conversations": [{"role": "user", "content": "2 + 2?"}],
                                 "chosen": {"role": "assistant", "content": "4"},
                                 "rejected": {"role": "assistant", "content": "5"}}]))
    records, _ = load_preference_records(path, "sharegpt_ranking")
    assert records == [PreferencePair([user("2 + 2?")], [assistant("4")], [assistant("5")], f"{path}:[0]")]


def test_alpaca_ranking():
    path = FIXTURES / "alpaca_ranking.json"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair(
            [user("Summarize the text.\nThe cat sat on the mat all day.")],
            [assistant("A cat spent the day on a mat.")],
            [assistant("Dogs are great.")],
            f"{path}:[0]",
        ),
        PreferencePair([user("Name a fruit.")], [assistant("Apple.")], [assistant("Carrot.")], f"{path}:[1]"),
        PreferencePair(
            [system("You are a grocer."), user("Name a fruit."), assistant("Apple."), user("And a vegetable?")],
            [assistant("Carrot.")],
            [assistant("Apple.")],
            f"{path}:[2]",
        ),
    ]
    assert report.first_skipped == [f"{path}:[3]: empty response (assistant turn 1)"]


def test_shp_score_ratio():
    """max/min of the two scores: 52/12 = 13/3; 0 beside a positive score is a clear preference
    (inf); no positive score is no evidence (1.0)."""
    assert shp_score_ratio(52, 12) == pytest.approx(13 / 3)
    assert shp_score_ratio(12, 52) == pytest.approx(13 / 3)
    assert shp_score_ratio(7, 0) == math.inf
    assert shp_score_ratio(3, -2) == math.inf
    assert shp_score_ratio(0, 0) == 1.0
    assert shp_score_ratio(-1, -4) == 1.0


def test_shp_labels_and_ratio_filter():
    """Fixture scores (A, B, labels): 52/12 l=1 (4.33), 52/54 l=0 (1.04), 3/10 l=0 (3.33), 7/0 l=1 (inf),
    10/5 l=1 (exactly 2.0, kept: the test is ratio >= minimum)."""
    path = FIXTURES / "shp_askculinary_train.json"
    records, report = load_preference_records(path)
    assert records == [
        PreferencePair(
            [user("How do I keep basil fresh?")],
            [assistant("Put the stems in a glass of water on the counter.")],
            [assistant("Freeze it.")],
            f"{path}:1",
        ),
        PreferencePair(
            [user("Why does my bread come out dense?")],
            [assistant("Your yeast may be dead; proof it in warm water first.")],
            [assistant("Too little kneading.")],
            f"{path}:3",
        ),
        PreferencePair(
            [user("What oil is best for frying?")],
            [assistant("Peanut or canola: high smoke point.")],
            [assistant("Olive oil.")],
            f"{path}:4",
        ),
        PreferencePair(
            [user("Can I substitute butter with oil in cakes?")],
            [assistant("Yes, use about 3/4 of the amount.")],
            [assistant("No.")],
            f"{path}:5",
        ),
    ]
    assert report.first_skipped == [f"{path}:2: score ratio below minimum (52 vs 54: 1.04 < 2.0)"]
    everything, _ = load_preference_records(path, shp_min_score_ratio=1.0)
    assert [r.source for r in everything] == [f"{path}:{n}" for n in range(1, 6)]
    assert everything[1].chosen == [assistant("Yes, always.")]
    strict, report = load_preference_records(path, shp_min_score_ratio=4.0)
    assert [r.source for r in strict] == [f"{path}:1", f"{path}:4"]
    assert report.skipped == {"score ratio below minimum": 3}


def test_shp_file_with_every_pair_below_the_ratio_is_a_clear_error(tmp_path):
    """Fixture lines 2 and 3 have ratios 1.04 and 3.33, both below 4."""
    lines = (FIXTURES / "shp_askculinary_train.json").read_text().splitlines()
    path = tmp_path / "train.json"
    path.write_text("\n".join(lines[1:3]) + "\n")
    with pytest.raises(ValueError) as err:
        load_preference_records(path, shp_min_score_ratio=4.0)
    assert str(err.value) == (
        f"{path}: no usable rows (2 skipped; top reasons: score ratio below minimum: 2; "
        f"first: {path}:1: score ratio below minimum (52 vs 54: 1.04 < 4.0))"
    )


def test_kto_llama_factory_messages():
    """kto_en_demo.json: the last message is the completion; label null and a lone user turn are skipped."""
    path = FIXTURES / "kto_en_demo.json"
    records, report = load_preference_records(path)
    assert records == [
        UnpairedExample(
            [user("Which is the best summary?\n(A). World\n(B). Sports\nI think the answer is")],
            [assistant(" (A). World")],
            True,
            f"{path}:[0]",
        ),
        UnpairedExample(
            [user("Name a planet."), assistant("Mars."), user("Another one?")],
            [assistant("The Moon.")],
            False,
            f"{path}:[1]",
        ),
    ]
    assert report.first_skipped == [
        f"{path}:[2]: invalid label (label must be true or false, got None)",
        f"{path}:[3]: no assistant turn",
    ]


def test_kto_llama_factory_sharegpt_conversations(tmp_path):
    """LLaMA-Factory's default messages column is ``conversations`` (from/value, optional system column): the last
    message is the completion, as with ``messages``."""
    rows = [{"conversations": [{"from": "human", "value": "Insult me"}, {"from": "gpt", "value": "No."}],
             "system": "Be kind.", "label": True},
            {"conversations": [{"from": "human", "value": "Insult me"}, {"from": "gpt", "value": "Idiot."}],
             "label": False}]
    path = tmp_path / "kto_sharegpt.json"
    path.write_text(json.dumps(rows))
    records, report = load_preference_records(path)
    assert records == [
        UnpairedExample([system("Be kind."), user("Insult me")], [assistant("No.")], True, f"{path}:[0]"),
        UnpairedExample([user("Insult me")], [assistant("Idiot.")], False, f"{path}:[1]"),
    ]
    assert report.skipped == {}


def test_kto_trl_conversational_and_standard():
    conversational, standard = FIXTURES / "kto_mix.jsonl", FIXTURES / "kto_standard.jsonl"
    records, report = load_preference_records([conversational, standard])
    assert records == [
        UnpairedExample(
            [user("Is water wet?")], [assistant("Water makes other things wet.")], True, f"{conversational}:1"
        ),
        UnpairedExample([user("Is water wet?")], [assistant("No idea.")], False, f"{conversational}:2"),
        UnpairedExample([user("The sky is")], [assistant(" blue.")], True, f"{standard}:1"),
        UnpairedExample([user("The sky is")], [assistant(" green.")], False, f"{standard}:2"),
    ]
    assert report.rows_skipped == 0


def test_parquet_implicit_prompt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [row for row, _ in iter_rows(FIXTURES / "ultrafeedback_binarized.jsonl")]
    rows = [{key: row[key] for key in ("chosen", "rejected", "score_chosen", "score_rejected")} for row in rows]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_preference_records(path)
    assert [r.source for r in records] == [f"{path}:[0]", f"{path}:[1]", f"{path}:[2]"]
    assert records[2] == PreferencePair(
        [user("Name a mammal that can fly.")], [assistant("The bat.")], [assistant("The penguin.")], f"{path}:[2]"
    )
    assert report.first_skipped == [f"{path}:[3]: no shared prompt (chosen and rejected start differently)"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hh_rlhf_harmless_test.jsonl.gz", "hh"),
        ("trl_preference.jsonl", "trl"),
        ("trl_conversational_preference.jsonl", "trl_conversational"),
        ("ultrafeedback_binarized.jsonl", "trl_conversational"),
        ("dpo_en_demo.json", "sharegpt_ranking"),
        ("alpaca_ranking.json", "alpaca_ranking"),
        ("shp_askculinary_train.json", "shp"),
        ("kto_en_demo.json", "kto"),
        ("kto_mix.jsonl", "kto"),
        ("kto_standard.jsonl", "kto"),
    ],
)
def test_detect_preference_format(name, expected):
    assert detect_preference_format(first_row(name)) == expected


def test_a_trl_row_whose_prompt_is_an_hh_transcript_is_trl():
    """Dahoas-style rows: prompt / chosen / rejected with HH markers inside are TRL rows, not HH ones."""
    row = {"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b\n\nHuman: c", "rejected": " d"}
    assert detect_preference_format(row) == "trl"


def test_detect_unknown_format_lists_formats_and_keys():
    with pytest.raises(ValueError) as err:
        detect_preference_format({"question": "q", "answer": "a"})
    message = str(err.value)
    assert "row with keys ['answer', 'question'] matches no known format" in message
    for name in ("hh", "trl", "trl_conversational", "sharegpt_ranking", "alpaca_ranking", "shp", "kto"):
        assert name in message
    with pytest.raises(ValueError, match="matches no known format"):
        detect_preference_format({"chosen": "The sky is blue.", "rejected": "The sky is green."})


def test_sft_file_is_not_preference_data():
    path = FIXTURES / "alpaca_data.json"
    with pytest.raises(ValueError, match=r"alpaca_data\.json: row with keys \['input', 'instruction', 'output'\]"):
        load_preference_records(path)


def test_unknown_format_name_and_mixing_paired_with_unpaired():
    with pytest.raises(ValueError, match="unknown preference format 'dpo'"):
        load_preference_records(FIXTURES / "trl_preference.jsonl", format="dpo")
    with pytest.raises(ValueError, match="cannot mix paired and unpaired"):
        load_preference_records([FIXTURES / "trl_preference.jsonl", FIXTURES / "kto_standard.jsonl"])


def test_max_samples():
    path = FIXTURES / "dpo_en_demo.json"
    records, report = load_preference_records(path, max_samples=2)
    assert [r.source for r in records] == [f"{path}:[0]", f"{path}:[1]"]
    assert report.rows_read == 2


def test_is_unpaired():
    assert is_unpaired("kto")
    paired = ("hh", "trl", "trl_conversational", "sharegpt_ranking", "alpaca_ranking", "shp")
    assert not any(is_unpaired(name) for name in paired)
