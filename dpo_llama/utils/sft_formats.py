"""Supervised fine-tuning (SFT) data formats, normalised into :class:`Conversation` records.

A record is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``:
an optional leading system message, then user and assistant turns alternating, starting with
a user turn and ending with an assistant turn. Nothing is tokenized here; a later step renders
records with a chat template. Message text is kept exactly as in the file, except in HH-RLHF
transcripts, where the whitespace around the ``Human:`` / ``Assistant:`` markers is syntax.

Formats (``format=`` name: the keys of one row):

* ``"alpaca"``: ``instruction``, optional ``input``, ``output``, optional ``system`` and
  ``history`` (``[[question, answer], ...]``, LLaMA-Factory). The user turn is
  ``instruction + "\\n" + input`` (LLaMA-Factory's joining; an empty part is left out).
* ``"sharegpt"``: ``conversations`` = ``[{"from": ..., "value": ...}]`` with ``from`` in
  ``human``/``gpt``/``system`` (``user``/``assistant`` also accepted), and an optional
  ``system`` key (LLaMA-Factory), overridden by a leading ``system`` turn. LLaMA-Factory's
  tool-use turns (``function_call``, ``observation``) are skipped as ``"unknown role"``.
* ``"messages"``: ``messages`` = ``[{"role": ..., "content": ...}]`` (OpenAI / TRL). An assistant message with
  OpenAI's ``"weight": 0`` is kept as context and not trained on (``"train": False`` on the message).
* ``"hh"``: Anthropic HH-RLHF; the ``chosen`` transcript is used as a conversation.
* ``"dolly"``: databricks-dolly-15k, ``instruction``, ``context``, ``response`` (``category``
  is ignored). The user turn is ``instruction + "\\n\\n" + context`` when there is a context.

Rows that cannot be used are skipped and counted (see :class:`~dpo_llama.utils.raw_data.ParseReport`):
missing fields, non-string content, unknown roles, empty messages ("empty response" for the
final assistant turn), a system message after the start, roles that do not alternate, no
assistant turn (or only weight-0 ones), a conversation that does not end with an assistant turn, rows that
declare tools (``tools`` / ``functions``: no template here renders a tool list, and the turns refer to it), and
KTO rows (a ``label`` of true / false / null: unpaired preference data, for build_preference_datasets.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dpo_llama.utils.raw_data import BadRowError, ParseReport, PathLike, read_records, text_field

Message = dict[str, str | bool]  # role, content; and "train": False on a context-only assistant turn

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# A new turn starts only at "\n\nHuman:" or "\n\nAssistant:"; "Human:" inside a line is text.
HH_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Conversation:
    """One SFT example.

    Attributes:
        messages: System (optional), then alternating user / assistant messages, ending with
            an assistant message.
        source: Where the row came from, ``"path:line"`` or ``"path:[index]"``.
    """

    messages: list[Message]
    source: str


def to_message(raw: object, role_key: str, content_key: str, role_names: dict[str, str]) -> Message:
    """Convert one raw message (e.g. ``{"from": "gpt", "value": ...}``) to ``{"role", "content"}``.

    Raises:
        BadRowError: ``"malformed message"``, ``"unknown role"`` or ``"non-string content"``.
    """
    if not isinstance(raw, dict) or role_key not in raw or content_key not in raw:
        raise BadRowError("malformed message", f"expected an object with {role_key!r} and {content_key!r}")
    name = raw[role_key]
    role = role_names.get(name) if isinstance(name, str) else None
    if role is None:
        raise BadRowError("unknown role", repr(name))
    content = text_parts(raw[content_key])
    if not isinstance(content, str):
        raise BadRowError("non-string content", f"{role} message content is {type(content).__name__}")
    return {"role": role, "content": content}


def text_parts(content: object) -> object:
    """OpenAI's content as a list of parts, all ``{"type": "text", "text": ...}``, joined into one string; any other
    value is returned as it is (so images or audio stay "non-string content")."""
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "".join(part["text"] for part in content)
    return content


def to_messages(raw: object, role_key: str, content_key: str, role_names: dict[str, str]) -> list[Message]:
    """Convert a raw message list; an empty system message is dropped (it means "no system prompt").

    Raises:
        BadRowError: The value is not a list, or one message is bad (see :func:`to_message`).
    """
    if not isinstance(raw, list):
        raise BadRowError("malformed message", f"expected a list of messages, got {type(raw).__name__}")
    messages = [to_message(item, role_key, content_key, role_names) for item in raw]
    return [m for m in messages if m["role"] != "system" or m["content"].strip()]


def system_prompt(text: str) -> list[Message]:
    """``[system message]``, or ``[]`` when ``text`` is empty."""
    return [{"role": "system", "content": text}] if text.strip() else []


def check_conversation(messages: list[Message]) -> list[Message]:
    """Check the shape every record must have, and return ``messages`` unchanged.

    Shape: an optional system message first, then ``user, assistant, user, ..., assistant``,
    no empty user or assistant message.

    Raises:
        BadRowError: Naming the first problem found.
    """
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] == "system":
            raise BadRowError("misplaced system message", f"turn {index}")
        if message["role"] != expected:
            raise BadRowError("roles do not alternate", f"turn {index} is {message['role']}, expected {expected}")
    if not any(m["role"] == "assistant" for m in body):
        raise BadRowError("no assistant turn")
    if body[-1]["role"] != "assistant":
        raise BadRowError("does not end with an assistant turn")
    for index, message in enumerate(body):
        if not message["content"].strip():
            last = index == len(body) - 1
            raise BadRowError("empty response" if last else "empty message", f"{message['role']} turn {index}")
    return messages


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into messages.

    Decisions, from the quirks of the real files:

    * Turns start only at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``. The text sometimes has
      ``"Human:"`` inside a turn (an assistant reply imitating the human); it stays text.
    * A missing leading ``"\\n\\n"`` (stripped copies of the data) is accepted.
    * Turn text is stripped: the space after the marker and trailing spaces are not content.
    * Consecutive turns of the same speaker (a few real rows have ``Assistant:`` twice in a
      row) are merged into one message, joined by ``"\\n\\n"`` as in the transcript.
    * An empty final ``Assistant:`` turn is kept here and rejected later as ``"empty response"``.

    Raises:
        BadRowError: ``"not an HH transcript"`` if there is no marker or text before the first one.
    """
    pieces = HH_TURN_MARKER.split("\n\n" + text.lstrip())
    if len(pieces) < 3 or pieces[0].strip():
        raise BadRowError("not an HH transcript", "expected '\\n\\nHuman: ... \\n\\nAssistant: ...'")
    messages: list[Message] = []
    for speaker, turn in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = turn.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(part for part in (messages[-1]["content"], content) if part)
        else:
            messages.append({"role": role, "content": content})
    return messages


def is_hh_row(row: dict) -> bool:
    """True for an HH-RLHF row: ``chosen`` and ``rejected`` transcripts and no separate prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    return (
        isinstance(chosen, str)
        and isinstance(rejected, str)
        and "prompt" not in row
        and "instruction" not in row
        and HH_TURN_MARKER.search("\n\n" + chosen.lstrip()) is not None
    )


def alpaca_prompt(row: dict) -> list[Message]:
    """System, history and user turn of an Alpaca / LLaMA-Factory row (everything but the answer).

    Raises:
        BadRowError: Missing ``instruction``, non-string fields or a malformed ``history``.
    """
    messages = system_prompt(text_field(row, "system", required=False))
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise BadRowError("malformed history", "expected [[question, answer], ...]")
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise BadRowError("malformed history", "expected [[question, answer], ...]")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    query = (text_field(row, "instruction"), text_field(row, "input", required=False))
    messages.append({"role": "user", "content": "\n".join(part for part in query if part)})
    return messages


def refuse_tools(row: dict) -> None:
    """Raises ``BadRowError("tools not supported")`` for a row that declares tools (``tools``, or OpenAI's older
    ``functions``): its turns refer to a tool list that no chat template here renders. The SFT and preference
    row parsers call it first, whatever the format."""
    for key in ("tools", "functions"):
        if row.get(key):
            raise BadRowError("tools not supported", f"a non-empty {key!r} field")


def refuse_kto_label(row: dict) -> None:
    """Raises ``BadRowError("KTO row")`` for an unpaired preference row (``label`` true / false / null): its
    undesirable completions are no demonstrations. The SFT row parsers call it after :func:`refuse_tools`, whatever
    the format (LLaMA-Factory's KTO rows are ShareGPT ``conversations`` by default)."""
    if "label" in row and (row["label"] is None or isinstance(row["label"], bool)):
        raise BadRowError("KTO row", "a 'label' of true/false/null: build it with build_preference_datasets.py")


def sharegpt_keys(raw: object) -> tuple[str, str]:
    """The role and content keys of ShareGPT messages (one message or a list): ``from``/``value``, or
    ``role``/``content`` when the (first) message has those instead (LLaMA-Factory's other tag set)."""
    first = raw[0] if isinstance(raw, list) and raw else raw
    if isinstance(first, dict) and "from" not in first and "role" in first:
        return "role", "content"
    return "from", "value"


def sharegpt_messages(row: dict) -> list[Message]:
    """Messages of a ShareGPT row: ``conversations`` plus the optional ``system`` key.

    Raises:
        BadRowError: Missing ``conversations`` or a bad message.
    """
    if "conversations" not in row:
        raise BadRowError("missing field", "'conversations'")
    messages = to_messages(row["conversations"], *sharegpt_keys(row["conversations"]), SHAREGPT_ROLES)
    if messages and messages[0]["role"] == "system":
        return messages
    return system_prompt(text_field(row, "system", required=False)) + messages


def alpaca_conversation(row: dict) -> list[Message]:
    """Alpaca row -> messages."""
    return alpaca_prompt(row) + [{"role": "assistant", "content": text_field(row, "output")}]


def messages_conversation(row: dict) -> list[Message]:
    """OpenAI / TRL ``messages`` row -> messages; an assistant message of ``"weight": 0`` gets ``"train": False``.

    Raises:
        BadRowError: Missing ``messages``, a bad message, a weight other than 0 or 1, only weight-0 assistant
            messages.
    """
    if "messages" not in row:
        raise BadRowError("missing field", "'messages'")
    messages = to_messages(row["messages"], "role", "content", OPENAI_ROLES)
    weights = [1 if item.get("weight") is None else item["weight"]  # Parquet fills a missing weight with null
               for item in row["messages"] if OPENAI_ROLES[item["role"]] == "assistant"]
    if any(weight not in (0, 1) for weight in weights):
        raise BadRowError("invalid weight", "an assistant message's weight must be 0 or 1")
    if weights and not any(weights):
        raise BadRowError("no trained assistant turn", "every assistant message has weight 0")
    for message, weight in zip((m for m in messages if m["role"] == "assistant"), weights):
        if weight == 0:
            message["train"] = False
    return messages


def hh_conversation(row: dict) -> list[Message]:
    """HH-RLHF row -> the messages of its ``chosen`` transcript."""
    return parse_hh_transcript(text_field(row, "chosen"))


def dolly_conversation(row: dict) -> list[Message]:
    """databricks-dolly-15k row -> messages."""
    instruction = text_field(row, "instruction")
    context = text_field(row, "context", required=False)
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": text_field(row, "response")}]


SFT_FORMATS: dict[str, Callable[[dict], list[Message]]] = {
    "alpaca": alpaca_conversation,
    "sharegpt": sharegpt_messages,
    "messages": messages_conversation,
    "hh": hh_conversation,
    "dolly": dolly_conversation,
}

SFT_FORMAT_KEYS = {
    "alpaca": "instruction/input/output",
    "sharegpt": "conversations",
    "messages": "messages",
    "hh": "chosen/rejected transcripts",
    "dolly": "instruction/context/response",
}


def detect_sft_format(row: dict) -> str:
    """Name the SFT format of a row from its keys.

    Raises:
        ValueError: No format or several formats match; the message lists the known formats
            and the row's keys.
    """
    matches = [
        name
        for name, matched in (
            ("alpaca", "instruction" in row and "output" in row),
            ("sharegpt", "conversations" in row),
            ("messages", "messages" in row),
            ("hh", is_hh_row(row)),
            ("dolly", "instruction" in row and "response" in row),
        )
        if matched
    ]
    if len(matches) != 1:
        raise ValueError(format_detection_error(row, matches, SFT_FORMAT_KEYS))
    return matches[0]


def format_detection_error(row: dict, matches: list[str], known: dict[str, str]) -> str:
    """Error text for a row whose format could not be detected (``matches``: the candidates)."""
    problem = "is ambiguous between formats " + ", ".join(matches) if matches else "matches no known format"
    formats = "; ".join(f"{name} ({keys})" for name, keys in known.items())
    return (f"row with keys {sorted(row)} {problem}. Known formats: {formats}. "
            "Pass --format (format= in Python) explicitly.")


def sft_parser(format: str) -> Callable[[dict, str], Conversation]:
    """The row parser ``(row, location) -> Conversation`` of one SFT format.

    Raises:
        ValueError: Unknown format name.
    """
    if format not in SFT_FORMATS:
        raise ValueError(f"unknown SFT format {format!r}; known formats: {', '.join(SFT_FORMATS)}")
    to_conversation = SFT_FORMATS[format]

    def parse(row: dict, location: str) -> Conversation:
        refuse_tools(row)
        refuse_kto_label(row)
        return Conversation(check_conversation(to_conversation(row)), location)

    return parse


def load_sft_records(
    paths: PathLike | Sequence[PathLike],
    format: str = "auto",
    max_samples: int | None = None,
) -> tuple[list[Conversation], ParseReport]:
    """Read SFT data files into :class:`Conversation` records.

    Args:
        paths: One data file or several (see :func:`~dpo_llama.utils.raw_data.iter_rows`).
        format: A name from :data:`SFT_FORMATS`, or ``"auto"`` to detect it in each file from
            its first row of a known format.
        max_samples: Keep at most this many records in total.

    Returns:
        The records and a :class:`ParseReport` of kept and skipped rows.

    Raises:
        ValueError: Unknown format, undetectable format, or a file without a usable row.
    """
    if format == "auto":
        return read_records(paths, lambda first_row: sft_parser(detect_sft_format(first_row)), max_samples)
    parser = sft_parser(format)
    return read_records(paths, lambda first_row: parser, max_samples)
