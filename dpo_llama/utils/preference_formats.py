"""Preference data formats, normalised into :class:`PreferencePair` or :class:`UnpairedExample` records.

A :class:`PreferencePair` holds the shared ``prompt`` (optional system message, alternating
turns, ending with a user turn) and the ``chosen`` / ``rejected`` continuations after it
(usually one assistant message each; longer trajectories are allowed when a TRL
conversational file has them). ``prompt + chosen`` and ``prompt + rejected`` must each pass
:func:`~dpo_llama.utils.sft_formats.check_conversation`. Nothing is tokenized here.

Formats (``format=`` name: the keys of one row):

* ``"hh"``: Anthropic HH-RLHF, ``chosen`` / ``rejected`` full transcripts. Both are parsed with
  :func:`~dpo_llama.utils.sft_formats.parse_hh_transcript`; the prompt is the longest shared
  message prefix, cut back to its last user turn, i.e. everything up to the last
  ``"\\n\\nAssistant:"`` both share. The transcripts must then differ only in their final
  assistant turn; a few real rows diverge earlier and are skipped.
* ``"trl"``: TRL standard preference, ``prompt`` / ``chosen`` / ``rejected`` strings, read as one
  user turn and one assistant turn each.
* ``"trl_conversational"``: TRL conversational preference, message lists. With a ``prompt``
  list the prompt is explicit. Without one (implicit prompt, e.g. trl-lib/ultrafeedback_binarized),
  or with a ``prompt`` string beside full ``chosen`` / ``rejected`` conversations
  (HuggingFaceH4/ultrafeedback_binarized), the prompt is the longest shared message prefix of
  ``chosen`` and ``rejected``, cut back to its last user turn.
* ``"sharegpt_ranking"``: LLaMA-Factory, ``conversations`` plus ``chosen`` / ``rejected``
  ``{"from": "gpt", "value": ...}`` objects and an optional ``system`` key.
* ``"alpaca_ranking"``: LLaMA-Factory, ``instruction``, optional ``input``, ``chosen``,
  ``rejected``, optional ``system`` and ``history``.
* ``"shp"``: stanfordnlp/SHP, ``history`` (the post), ``human_ref_A``, ``human_ref_B``,
  ``labels`` (1: A preferred), ``score_A``, ``score_B``; filtered by score ratio (see
  :func:`shp_score_ratio`).
* ``"kto"`` (unpaired): ``messages`` or ShareGPT ``conversations`` plus ``label`` (LLaMA-Factory; the last
  message is the completion), or TRL's ``prompt`` / ``completion`` / ``label`` with strings or message lists.

Rows are skipped and counted when they have missing fields, non-string content, empty
responses, identical chosen and rejected, an SHP score ratio below the minimum, declared tools
(``tools`` / ``functions``), or anything
:func:`~dpo_llama.utils.sft_formats.check_conversation` rejects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from dpo_llama.utils.raw_data import BadRowError, ParseReport, PathLike, read_records, text_field
from dpo_llama.utils.sft_formats import (
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    Message,
    alpaca_prompt,
    check_conversation,
    format_detection_error,
    is_hh_row,
    parse_hh_transcript,
    refuse_tools,
    sharegpt_keys,
    sharegpt_messages,
    to_message,
    to_messages,
)

Split = tuple[list[Message], list[Message], list[Message]]


@dataclass
class PreferencePair:
    """One paired preference example (DPO and relatives).

    Attributes:
        prompt: Shared history, ending with a user message.
        chosen: The preferred continuation after ``prompt``.
        rejected: The dispreferred continuation after ``prompt``.
        source: Where the row came from, ``"path:line"`` or ``"path:[index]"``.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str


@dataclass
class UnpairedExample:
    """One unpaired preference example (KTO).

    Attributes:
        prompt: History, ending with a user message.
        completion: The continuation being judged.
        desirable: True if the completion is good (KTO's desirable set), False otherwise.
        source: Where the row came from.
    """

    prompt: list[Message]
    completion: list[Message]
    desirable: bool
    source: str


def user(text: str) -> list[Message]:
    """``[{"role": "user", "content": text}]``."""
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[Message]:
    """``[{"role": "assistant", "content": text}]``."""
    return [{"role": "assistant", "content": text}]


def split_shared_prompt(chosen: list[Message], rejected: list[Message]) -> Split:
    """Split two full conversations into ``(prompt, chosen, rejected)``.

    The prompt is the longest common message prefix, cut back so that it ends with a user
    message (so both continuations start with the assistant).

    Raises:
        BadRowError: ``"no shared prompt"`` when the conversations share no user turn.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise BadRowError("no shared prompt", "chosen and rejected start differently")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_prompt(prompt: list[Message], *continuations: list[Message]) -> None:
    """Check that ``prompt`` ends with a user turn and each ``prompt + continuation`` is a valid conversation.

    Raises:
        BadRowError: Naming the first problem found.
    """
    for continuation in continuations:
        check_conversation(prompt + continuation)
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRowError("prompt does not end with a user turn")


def as_messages(row: dict, key: str, role: str) -> list[Message]:
    """``row[key]`` as messages: a string becomes one ``role`` message, a list is converted.

    Raises:
        BadRowError: Missing field, or neither a string nor a message list.
    """
    value = row.get(key)
    if value is None:
        raise BadRowError("missing field", repr(key))
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return to_messages(value, "role", "content", OPENAI_ROLES)
    raise BadRowError("non-string content", f"field {key!r} is {type(value).__name__}")


def hh_split(row: dict) -> Split:
    """HH-RLHF row -> ``(prompt, chosen, rejected)``."""
    chosen = parse_hh_transcript(text_field(row, "chosen"))
    rejected = parse_hh_transcript(text_field(row, "rejected"))
    prompt, chosen_turns, rejected_turns = split_shared_prompt(chosen, rejected)
    if len(chosen_turns) != 1 or len(rejected_turns) != 1:
        raise BadRowError("transcripts diverge before the last assistant turn")
    return prompt, chosen_turns, rejected_turns


def trl_split(row: dict) -> Split:
    """TRL standard row (``prompt`` / ``chosen`` / ``rejected`` strings) -> ``(prompt, chosen, rejected)``.

    A prompt that is an HH-RLHF transcript up to its last ``Assistant:`` (Dahoas/rm-static, Dahoas/full-hh-rlhf:
    ``"\\n\\nHuman: ...\\n\\nAssistant:"``) is split into its turns, as the HH format would.
    """
    prompt = text_field(row, "prompt")
    if prompt.lstrip().startswith("Human:") and prompt.rstrip().endswith("\n\nAssistant:"):
        return hh_split({side: prompt + text_field(row, side) for side in ("chosen", "rejected")})
    return (
        user(prompt),
        assistant(text_field(row, "chosen")),
        assistant(text_field(row, "rejected")),
    )


def trl_conversational_split(row: dict) -> Split:
    """TRL conversational row, explicit or implicit prompt -> ``(prompt, chosen, rejected)``.

    An explicit prompt is a message list, or a string when the responses are assistant messages only; a string
    prompt beside whole conversations (UltraFeedback) is implied by their shared start.
    """
    chosen = as_messages(row, "chosen", "assistant")
    rejected = as_messages(row, "rejected", "assistant")
    prompt = row.get("prompt")
    if isinstance(prompt, list) or (isinstance(prompt, str) and chosen and chosen[0]["role"] == "assistant"):
        return as_messages(row, "prompt", "user"), chosen, rejected
    return split_shared_prompt(chosen, rejected)


def sharegpt_ranking_split(row: dict) -> Split:
    """LLaMA-Factory ShareGPT ranking row -> ``(prompt, chosen, rejected)``."""
    answers = []
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise BadRowError("missing field", repr(key))
        answers.append([to_message(row[key], *sharegpt_keys(row[key]), SHAREGPT_ROLES)])
    return sharegpt_messages(row), answers[0], answers[1]


def alpaca_ranking_split(row: dict) -> Split:
    """LLaMA-Factory Alpaca ranking row -> ``(prompt, chosen, rejected)``."""
    return alpaca_prompt(row), assistant(text_field(row, "chosen")), assistant(text_field(row, "rejected"))


def shp_score_ratio(score_a: float, score_b: float) -> float:
    """Score ratio of an SHP pair, ``max(score_A, score_B) / min(score_A, score_B)``.

    The SHP card recommends training on pairs with a large score ratio (its first release kept
    only pairs with ratio >= 2, the default minimum here). Scores are net votes and can be 0
    or negative in derived copies, where the plain ratio breaks down, so:

    * ``min > 0``: ``max / min``;
    * ``min <= 0 < max``: ``inf`` (one reply gained votes, the other none: a clear preference);
    * ``max <= 0``: ``1.0`` (neither gained votes: no evidence of a preference).
    """
    high, low = max(score_a, score_b), min(score_a, score_b)
    if low > 0:
        return high / low
    return math.inf if high > 0 else 1.0


def shp_split(row: dict, min_score_ratio: float = 2.0) -> Split:
    """SHP row -> ``(prompt, chosen, rejected)``; chosen is the preferred comment (``labels``).

    Raises:
        BadRowError: ``"invalid label"``, ``"invalid scores"`` or ``"score ratio below minimum"``.
    """
    post = text_field(row, "history")
    reply_a, reply_b = text_field(row, "human_ref_A"), text_field(row, "human_ref_B")
    label = row.get("labels")
    if label not in (0, 1):
        raise BadRowError("invalid label", f"labels must be 0 or 1, got {label!r}")
    scores = (row.get("score_A"), row.get("score_B"))
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise BadRowError("invalid scores", f"score_A={scores[0]!r}, score_B={scores[1]!r}")
    ratio = shp_score_ratio(*scores)
    if ratio < min_score_ratio:
        raise BadRowError("score ratio below minimum", f"{scores[0]} vs {scores[1]}: {ratio:.2f} < {min_score_ratio}")
    chosen, rejected = (reply_a, reply_b) if label == 1 else (reply_b, reply_a)
    return user(post), assistant(chosen), assistant(rejected)


def kto_split(row: dict) -> tuple[list[Message], list[Message], bool]:
    """KTO row -> ``(prompt, completion, desirable)``.

    Accepts ``messages`` + ``label`` (the last message is the completion), the same with LLaMA-Factory's ShareGPT
    ``conversations`` (its default column) and optional ``system``, and TRL's ``prompt`` / ``completion`` /
    ``label`` (strings or message lists).

    Raises:
        BadRowError: ``"invalid label"`` when ``label`` is not true/false, or a bad message.
    """
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRowError("invalid label", f"label must be true or false, got {label!r}")
    if "messages" in row:
        messages = to_messages(row["messages"], "role", "content", OPENAI_ROLES)
        return messages[:-1], messages[-1:], label
    if "conversations" in row:
        messages = sharegpt_messages(row)
        return messages[:-1], messages[-1:], label
    return as_messages(row, "prompt", "user"), as_messages(row, "completion", "assistant"), label


PAIR_FORMATS: dict[str, Callable[[dict], Split]] = {
    "hh": hh_split,
    "trl": trl_split,
    "trl_conversational": trl_conversational_split,
    "sharegpt_ranking": sharegpt_ranking_split,
    "alpaca_ranking": alpaca_ranking_split,
    "shp": shp_split,
}

PREFERENCE_FORMAT_KEYS = {
    "hh": "chosen/rejected HH transcripts",
    "trl": "prompt/chosen/rejected strings",
    "trl_conversational": "chosen/rejected message lists, optional prompt",
    "sharegpt_ranking": "conversations + chosen/rejected {from, value}",
    "alpaca_ranking": "instruction/input/chosen/rejected",
    "shp": "history/human_ref_A/human_ref_B/labels/score_A/score_B",
    "kto": "messages or conversations + label, or prompt/completion/label",
}


def is_unpaired(format: str) -> bool:
    """True for formats that give :class:`UnpairedExample` records (KTO), False for pairs."""
    return format == "kto"


def detect_preference_format(row: dict) -> str:
    """Name the preference format of a row from its keys (and, where keys overlap, value types).

    Raises:
        ValueError: No format or several formats match; the message lists the known formats
            and the row's keys.
    """
    chosen = row.get("chosen")
    matches = [
        name
        for name, matched in (
            ("hh", is_hh_row(row)),
            ("trl", all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected"))),
            ("trl_conversational", isinstance(chosen, list) and isinstance(row.get("rejected"), list)),
            ("sharegpt_ranking", "conversations" in row and isinstance(chosen, dict)),
            ("alpaca_ranking", "instruction" in row and isinstance(chosen, str)),
            ("shp", all(k in row for k in ("history", "human_ref_A", "human_ref_B", "labels"))),
            ("kto", "label" in row and any(k in row for k in ("messages", "conversations", "completion"))),
        )
        if matched
    ]
    if len(matches) != 1:
        raise ValueError(format_detection_error(row, matches, PREFERENCE_FORMAT_KEYS))
    return matches[0]


def preference_parser(format: str, shp_min_score_ratio: float = 2.0) -> Callable:
    """The row parser ``(row, location) -> PreferencePair | UnpairedExample`` of one format.

    Raises:
        ValueError: Unknown format name.
    """
    if is_unpaired(format):
        return _unpaired_example
    if format not in PAIR_FORMATS:
        known = ", ".join([*PAIR_FORMATS, "kto"])
        raise ValueError(f"unknown preference format {format!r}; known formats: {known}")
    split = partial(shp_split, min_score_ratio=shp_min_score_ratio) if format == "shp" else PAIR_FORMATS[format]
    return partial(_preference_pair, split)


def _preference_pair(split: Callable[[dict], Split], row: dict, location: str) -> PreferencePair:
    refuse_tools(row)
    prompt, chosen, rejected = split(row)
    check_prompt(prompt, chosen, rejected)
    if chosen == rejected:
        raise BadRowError("identical chosen and rejected")
    return PreferencePair(prompt, chosen, rejected, location)


def _unpaired_example(row: dict, location: str) -> UnpairedExample:
    refuse_tools(row)
    prompt, completion, desirable = kto_split(row)
    check_prompt(prompt, completion)
    return UnpairedExample(prompt, completion, desirable, location)


def load_preference_records(
    paths: PathLike | Sequence[PathLike],
    format: str = "auto",
    max_samples: int | None = None,
    shp_min_score_ratio: float = 2.0,
) -> tuple[list[PreferencePair] | list[UnpairedExample], ParseReport]:
    """Read preference data files into :class:`PreferencePair` (or, for KTO, :class:`UnpairedExample`) records.

    Args:
        paths: One data file or several (see :func:`~dpo_llama.utils.raw_data.iter_rows`).
        format: A name from :data:`PREFERENCE_FORMAT_KEYS`, or ``"auto"`` to detect it in each
            file from its first row of a known format.
        max_samples: Keep at most this many records in total.
        shp_min_score_ratio: Keep an SHP pair only if :func:`shp_score_ratio` is at least this.

    Returns:
        The records and a :class:`ParseReport` of kept and skipped rows.

    Raises:
        ValueError: Unknown or undetectable format, a file without a usable row, or paired
            and unpaired (KTO) files mixed.
    """

    def detected_parser(first_row: dict) -> Callable:
        return preference_parser(detect_preference_format(first_row), shp_min_score_ratio)

    if format != "auto":
        parser = preference_parser(format, shp_min_score_ratio)
        return read_records(paths, lambda first_row: parser, max_samples)
    records, report = read_records(paths, detected_parser, max_samples)
    if len({type(record) for record in records}) > 1:
        raise ValueError(f"cannot mix paired and unpaired (KTO) preference files: {', '.join(report.files)}")
    return records, report
