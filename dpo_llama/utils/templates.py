"""Chat templates: a conversation -> token ids + a mask that is True exactly on what the assistant writes.

    ids, mask = render_conversation(messages, tokenizer, "llama3")          # SFT: loss where mask is True
    prompt_ids, response_ids = render_prompt_and_response(prompt, answer, tokenizer, "llama3")   # DPO
    generate(model, prompt_ids, max_new_tokens=256, stop_ids=stop_ids(tokenizer, "llama3"))

``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}``; a system message may only come
first. The mask is True on the content of every assistant turn plus the token that ends it (EOS, ``<|eot_id|>``,
``<|im_end|>``), because the model must learn to stop; it is False on BOS, system, user and role headers.

The templates (``B`` = BOS id, ``E`` = EOS id, ``<|...|>`` = one special id; ``*...*`` marks masked-True text):

* ``llama2`` (Meta's ``chat_completion`` reference code and the Llama-2-chat Hub ``chat_template``):
  ``B "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" *" {answer} "* *E*``, then
  ``B "[INST] {user} [/INST]" *" {answer} "* *E*`` for every later turn pair; the user text (system block
  included) and the answer are ``.strip()``-ed.
  Like Meta's code, each ``[INST]`` turn pair starts with its own BOS and is encoded as one sentencepiece string
  (so it starts with ``▁[INST]``). A single-turn conversation thus has exactly one BOS; a multi-turn one has one
  BOS per turn pair, each right after the previous pair's EOS, never two adjacent. The generation prompt is the
  last ``B "[INST] {user} [/INST]"``. ``[INST]`` and ``<<SYS>>`` are plain text, not special tokens. A LLaMA-2
  ``tokenizer.json`` gives the same ids (``▁[INST]`` after ``<s>``, as ``transformers`` renders with a
  ``legacy=True`` tokenizer; with ``legacy=False`` it drops that ``▁``, which Meta's code does not).
* ``llama3`` (Meta-Llama-3-8B-Instruct's ``chat_template``; Meta's ``ChatFormat`` gives the same ids):
  ``<|begin_of_text|>`` then per message ``<|start_header_id|>{role}<|end_header_id|>"\\n\\n{content}"<|eot_id|>``
  with ``content.strip()``; assistant content and its ``<|eot_id|>`` are masked True. Generation prompt:
  ``<|start_header_id|>assistant<|end_header_id|>"\\n\\n"``. (Llama 3.1+ Hub templates also insert a default
  "Cutting Knowledge Date" system header; this template does not.)
* ``deepseek`` (DeepSeek-V2(-Lite)-Chat and deepseek-moe-16b-chat ``chat_template``):
  ``B "{system}\\n\\n" "User: {user}\\n\\n" "Assistant:" *" {answer}"* *E*`` ..., content not stripped. The split
  is after ``"Assistant:"``, the generation prompt, so the space before the answer belongs to the response (in
  byte-level BPE it is part of the answer's first token anyway). DeepSeek advises against system prompts for
  these models; the template still renders one as its ``chat_template`` does.
* ``chatml`` (the plain ChatML template of the HF docs / OpenHermes-2.5; no BOS, none is in the template):
  ``<|im_start|>"{role}\\n{content}"<|im_end|>"\\n"`` per message; generation prompt
  ``<|im_start|>"assistant\\n"``. One documented deviation: the official template ends every message with
  ``"\\n"``, also the last; here the ``"\\n"`` is written only before a following ``<|im_start|>``, so a
  conversation ends on the assistant's ``<|im_end|>`` and ``prompt_ids + response_ids`` is the whole sequence.

Encoding: special tokens are inserted as ids (``tokenizer.token_id``), never spelled as text. The text between two
special ids is encoded as one string, exactly as the official templates (``transformers`` encodes the rendered
string, and the ``tokenizers`` library splits it at special tokens first) and Meta's llama2 code (one ``encode``
per turn pair) do. The mask boundary inside such a text run (``"... [/INST]" | " {answer} "``,
``"\\n\\n" | "{content}"``, ``"Assistant:" | " {answer}"``, ``"assistant\\n" | "{content}"``) is found by encoding
the text before it and checking that its ids are a prefix of the run's ids, so the mask never changes the
tokenization. If the two sides merge into one token (e.g. ChatML content starting with ``"\\n"`` under a LLaMA-3
style pre-tokenizer), a ValueError says so; strip the content's leading whitespace.

Text that spells a special token (``"<|eot_id|>"``) inside a message becomes that token with a ``tokenizer.json``,
as with ``transformers``; clean such text from datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from dpo_llama.configs import demo
from dpo_llama.models.tokenizer import Tokenizer, load_tokenizer

TEMPLATE_NAMES = ("llama2", "llama3", "deepseek", "chatml")
ROLES = ("system", "user", "assistant")

LLAMA2_SYSTEM = "<<SYS>>\n{system}\n<</SYS>>\n\n"

Segment = tuple[str | int, bool]  # (text or special token id, is assistant output)


def render_conversation(messages: Sequence[dict], tokenizer: Tokenizer, template: str,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and a mask that is True exactly on assistant output.

    Args:
        messages: ``{"role": ..., "content": str}`` dicts; an optional system message first.
        tokenizer: the model's tokenizer.
        template: one of ``TEMPLATE_NAMES``.
        add_generation_prompt: end with the header that opens an assistant turn (what ``generate`` is fed).

    Returns:
        ``(ids, mask)`` of equal length; ``mask[i]`` is True where ``ids[i]`` is assistant content or the token
        that ends an assistant turn.

    Raises:
        ValueError: unknown template, unknown role, non-string content, a system message that is not first, an
            order the template cannot express, or a tokenizer that lacks the template's special tokens.
    """
    check_messages(messages)
    if template == "llama2":
        segments = llama2_segments(messages, tokenizer, add_generation_prompt)
    elif template == "llama3":
        segments = llama3_segments(messages, tokenizer, add_generation_prompt)
    elif template == "deepseek":
        segments = deepseek_segments(messages, tokenizer, add_generation_prompt)
    elif template == "chatml":
        segments = chatml_segments(messages, tokenizer, add_generation_prompt)
    else:
        raise unknown_template(template)
    return encode_segments(segments, tokenizer)


def render_prompt_and_response(prompt_messages: Sequence[dict], response: str, tokenizer: Tokenizer,
                               template: str) -> tuple[list[int], list[int]]:
    """Prompt ids (ending with the generation prompt) and the ids of one assistant response, for DPO.

    ``prompt_ids + response_ids`` is ``render_conversation(prompt_messages + [assistant response]).ids``, split
    where that conversation's last run of masked-True tokens starts: ``response_ids`` is the response from its
    first token through its end-of-turn token, and ``prompt_ids`` equals
    ``render_conversation(prompt_messages, add_generation_prompt=True).ids`` (the text run is encoded once and
    split only where the tokenization allows, see the module docstring), so it is also what ``generate`` gets.

    Raises:
        ValueError: if the prompt does not end with a user message, or as ``render_conversation`` does.
    """
    check_messages(prompt_messages)
    if prompt_messages[-1]["role"] != "user":
        raise ValueError("prompt_messages must end with a user message")
    messages = [*prompt_messages, {"role": "assistant", "content": response}]
    ids, mask = render_conversation(messages, tokenizer, template)
    split = len(mask)
    while mask[split - 1]:  # mask[0] is always False: BOS or a role header
        split -= 1
    return ids[:split], ids[split:]


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Ids that end an assistant turn (generation stops on any of them): the turn's end token and EOS.

    llama3 also stops on ``<|end_of_text|>`` when the vocabulary has it, as Meta's generation code does.
    """
    if template in ("llama2", "deepseek"):
        ids = [tokenizer.eos_id]
    elif template == "llama3":
        ids = [tokenizer.token_id("<|eot_id|>"), tokenizer.eos_id, *optional_id(tokenizer, "<|end_of_text|>")]
    elif template == "chatml":
        ids = [tokenizer.token_id("<|im_end|>"), tokenizer.eos_id]
    else:
        raise unknown_template(template)
    return list(dict.fromkeys(ids))


def unknown_template(template: str) -> ValueError:
    """The error for a template name that is not in ``TEMPLATE_NAMES``."""
    return ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def template_or_demo_default(template: str | None, tokenizer: Tokenizer) -> str:
    """``template``, or the demo's (llama2) when none is given and ``tokenizer`` is the demo's.

    Raises:
        ValueError: No template for another tokenizer: the chat format is the model's own, and a wrong one
            would build a dataset without any error.
    """
    if template is not None:
        return template
    if tokenizer.fingerprint() != load_tokenizer(demo.TOKENIZER).fingerprint():
        raise ValueError(f"pass --template ({', '.join(TEMPLATE_NAMES)}), the chat format of this tokenizer's model: "
                         f"the default {demo.TEMPLATE!r} is only assumed for the demo's tokenizer")
    return demo.TEMPLATE


def check_messages(messages: Sequence[dict]) -> None:
    """Raise a ValueError unless ``messages`` is a non-empty list of well-formed messages, system only first."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} ({role}) content must be a str, "
                             f"got {type(message.get('content')).__name__}")
        if role == "system" and index > 0:
            raise ValueError(f"message {index}: a system message may only be the first message")


def bos(tokenizer: Tokenizer, template: str) -> int:
    """The BOS id, which ``template`` requires."""
    if tokenizer.bos_id is None:
        raise ValueError(f"the {template} template starts with BOS but the tokenizer defines none")
    return tokenizer.bos_id


def optional_id(tokenizer: Tokenizer, piece: str) -> list[int]:
    """``[id]`` of ``piece`` if the vocabulary has it, else ``[]``."""
    try:
        return [tokenizer.token_id(piece)]
    except ValueError:
        return []


def llama2_turns(messages: Sequence[dict]) -> list[str]:
    """User / assistant contents in order, the system prompt folded into the first user turn as Meta does."""
    has_system = messages[0]["role"] == "system"
    turns = list(messages[1:] if has_system else messages)
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"llama2 needs roles alternating user/assistant/... (after an optional system "
                             f"message); message {index + has_system} is {message['role']!r}")
    if not turns:
        raise ValueError("llama2 needs at least one user message (its system prompt goes into the first one)")
    contents = [message["content"] for message in turns]
    if has_system:
        contents[0] = LLAMA2_SYSTEM.format(system=messages[0]["content"]) + contents[0]
    return contents


def llama2_segments(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool) -> list[Segment]:
    """``B "[INST] {user} [/INST]" *" {answer} " E*`` per turn pair, as Meta's ``chat_completion``."""
    turns = llama2_turns(messages)
    if add_generation_prompt and len(turns) % 2 == 0:
        raise ValueError("llama2 can only open an assistant turn after a user message")
    segments: list[Segment] = []
    for index in range(0, len(turns), 2):
        segments += [(bos(tokenizer, "llama2"), False), (f"[INST] {turns[index].strip()} [/INST]", False)]
        if index + 1 < len(turns):
            segments += [(f" {turns[index + 1].strip()} ", True), (tokenizer.eos_id, True)]
    return segments


def llama3_segments(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool) -> list[Segment]:
    """``<|begin_of_text|>`` + ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` per message."""
    start, end, eot = (tokenizer.token_id(piece) for piece in ("<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"))
    segments: list[Segment] = [(bos(tokenizer, "llama3"), False)]
    for message in messages:
        output = message["role"] == "assistant"
        segments += [(start, False), (message["role"], False), (end, False), ("\n\n", False),
                     (message["content"].strip(), output), (eot, output)]
    if add_generation_prompt:
        segments += [(start, False), ("assistant", False), (end, False), ("\n\n", False)]
    return segments


def deepseek_segments(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool) -> list[Segment]:
    """``B "{system}\\n\\n" "User: {user}\\n\\n" "Assistant:" " {answer}" E`` ..."""
    segments: list[Segment] = [(bos(tokenizer, "deepseek"), False)]
    for message in messages:
        if message["role"] == "system":
            segments.append((message["content"] + "\n\n", False))
        elif message["role"] == "user":
            segments.append((f"User: {message['content']}\n\n", False))
        else:
            segments += [("Assistant:", False), (" " + message["content"], True), (tokenizer.eos_id, True)]
    if add_generation_prompt:
        segments.append(("Assistant:", False))
    return segments


def chatml_segments(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool) -> list[Segment]:
    """``<|im_start|>{role}\\n{content}<|im_end|>`` per message, joined by ``"\\n"``."""
    start, end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
    segments: list[Segment] = []
    for index, message in enumerate(messages):
        output = message["role"] == "assistant"
        if index > 0:
            segments.append(("\n", False))
        segments += [(start, False), (message["role"] + "\n", False), (message["content"], output), (end, output)]
    if add_generation_prompt:
        segments += [("\n", False), (start, False), ("assistant\n", False)]
    return segments


def encode_segments(segments: Sequence[Segment], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and mask of segments: special ids as they are, each run of text between them encoded as one string."""
    ids: list[int] = []
    mask: list[bool] = []
    for is_text, group in groupby(segments, key=lambda segment: isinstance(segment[0], str)):
        run = list(group)
        if is_text:
            run_ids, run_mask = encode_text_run(run, tokenizer)
        else:
            run_ids, run_mask = [piece for piece, _ in run], [output for _, output in run]
        ids += run_ids
        mask += run_mask
    return ids, mask


def encode_text_run(parts: Sequence[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Encode the concatenated text once; give each token the mask flag of the part it comes from.

    Raises:
        ValueError: if a token spans a boundary between masked and unmasked text.
    """
    text = "".join(part for part, _ in parts)
    ids = tokenizer.encode(text)
    mask: list[bool] = []
    prefix = ""
    for part, output in merge_equal_flags(parts):
        prefix += part
        prefix_ids = ids if prefix == text else tokenizer.encode(prefix)
        if ids[:len(prefix_ids)] != prefix_ids:
            raise ValueError(f"{prefix[-20:]!r} and the following {text[len(prefix):][:20]!r} merge into one token, "
                             "so the assistant mask cannot keep the official tokenization; strip leading "
                             "whitespace from the message content")
        mask += [output] * (len(prefix_ids) - len(mask))
    return ids, mask


def merge_equal_flags(parts: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring parts with the same mask flag, so that only real boundaries are checked."""
    merged: list[tuple[str, bool]] = []
    for part, output in parts:
        if merged and merged[-1][1] == output:
            merged[-1] = (merged[-1][0] + part, output)
        else:
            merged.append((part, output))
    return merged
