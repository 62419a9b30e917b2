"""Tests of dpo_llama.utils.templates: exact token sequences, assistant masks, and transformers as an oracle.

Expected sequences are written out from ``tokenizer.encode`` of the literal text pieces and the special ids, so a
reader sees each template; ``expect`` joins ``(ids, is_assistant_output)`` pieces into ``(ids, mask)``.
"""

import json
from itertools import groupby

import pytest

from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.templates import TEMPLATE_NAMES, render_conversation, render_prompt_and_response, stop_ids
from tests.tokenizer_fixtures import HF_STYLES, LLAMA2_CHAT_TEMPLATE, make_hf_tokenizer, make_sentencepiece

SYSTEM = {"role": "system", "content": "Be brief."}
USER_1 = {"role": "user", "content": "What is the capital of France?"}
ANSWER_1 = {"role": "assistant", "content": "Paris."}
USER_2 = {"role": "user", "content": "And of Italy?"}
ANSWER_2 = {"role": "assistant", "content": "Rome."}
SINGLE_TURN = [SYSTEM, USER_1, ANSWER_1]
MULTI_TURN = [SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2]
PADDED = [{"role": "user", "content": "  What is the capital?  \n"}, {"role": "assistant", "content": " Paris. "},
          {"role": "user", "content": "\tAnd Italy? "}]  # content with surrounding whitespace
CONVERSATIONS = [
    [USER_1, ANSWER_1],
    SINGLE_TURN,
    MULTI_TURN,
    [USER_1, {"role": "assistant", "content": "  Paris, of course.  "}, USER_2, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tokenizer each template is used with: sentencepiece for llama2, the matching HF fixture otherwise."""
    root = tmp_path_factory.mktemp("tokenizers")
    found = {"llama2": load_tokenizer(make_sentencepiece(root / "llama2"))}
    for style in HF_STYLES:
        found[style] = load_tokenizer(make_hf_tokenizer(root / style, style))
    return found


def expect(*pieces):
    """``(ids, mask)`` of ``(ids, is_assistant_output)`` pieces."""
    ids = [token for piece, _ in pieces for token in piece]
    mask = [output for piece, output in pieces for _ in piece]
    return ids, mask


def llama2_pair(tokenizer, prompt_text, answer_text):
    """One Meta turn pair: ``B`` + encode(prompt + answer) + ``E``, the mask True from the answer's first token.

    Meta's ``chat_completion`` encodes the pair as ONE string; the answer's tokens are what follows the tokens
    of the prompt text alone.
    """
    pair = tokenizer.encode(prompt_text + answer_text)
    split = len(tokenizer.encode(prompt_text))
    assert pair[:split] == tokenizer.encode(prompt_text)
    return ([tokenizer.bos_id] + pair[:split], False), (pair[split:] + [tokenizer.eos_id], True)


def test_llama2_single_turn(tokenizers):
    """``<s>[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nWhat is the capital of France? [/INST] Paris. </s>``."""
    tok = tokenizers["llama2"]
    expected = expect(*llama2_pair(tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]",
                                   " Paris. "))
    assert render_conversation(SINGLE_TURN, tok, "llama2") == expected
    assert expected[0][0] == 1 and expected[0][-1] == 2  # BOS / EOS are ids, "[INST]" is text
    assert tok.decode([t for t, m in zip(*expected) if m]) == "Paris. "


def test_llama2_multi_turn_has_one_bos_per_turn_pair(tokenizers):
    """Meta's format: ``<s>[INST] ... [/INST] Paris. </s><s>[INST] And of Italy? [/INST] Rome. </s>``."""
    tok = tokenizers["llama2"]
    expected = expect(
        *llama2_pair(tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]", " Paris. "),
        *llama2_pair(tok, "[INST] And of Italy? [/INST]", " Rome. "),
    )
    assert render_conversation(MULTI_TURN, tok, "llama2") == expected
    ids = expected[0]
    assert ids.count(1) == 2 and ids.count(2) == 2
    assert ids[ids.index(2) + 1] == 1  # the second pair's BOS follows the first pair's EOS


def test_llama3_single_and_multi_turn(tokenizers):
    """``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>...``."""
    tok = tokenizers["llama3"]
    enc = tok.encode
    bot, start, end, eot = (tok.token_id(p) for p in ("<|begin_of_text|>", "<|start_header_id|>",
                                                      "<|end_header_id|>", "<|eot_id|>"))
    first_turn = [
        ([bot, start] + enc("system") + [end] + enc("\n\n") + enc("Be brief.") + [eot], False),
        ([start] + enc("user") + [end] + enc("\n\n") + enc("What is the capital of France?") + [eot], False),
        ([start] + enc("assistant") + [end] + enc("\n\n"), False),
        (enc("Paris.") + [eot], True),
    ]
    assert render_conversation(SINGLE_TURN, tok, "llama3") == expect(*first_turn)
    multi = expect(*first_turn,
                   ([start] + enc("user") + [end] + enc("\n\n") + enc("And of Italy?") + [eot], False),
                   ([start] + enc("assistant") + [end] + enc("\n\n"), False),
                   (enc("Rome.") + [eot], True))
    assert render_conversation(MULTI_TURN, tok, "llama3") == multi


def test_deepseek_single_and_multi_turn(tokenizers):
    """``<｜begin▁of▁sentence｜>Be brief.\\n\\nUser: ...\\n\\nAssistant: Paris.<｜end▁of▁sentence｜>User: ...``."""
    tok = tokenizers["deepseek"]
    enc = tok.encode
    bos, eos = tok.token_id("<｜begin▁of▁sentence｜>"), tok.token_id("<｜end▁of▁sentence｜>")
    first_turn = [
        ([bos] + enc("Be brief.\n\nUser: What is the capital of France?\n\nAssistant:"), False),
        (enc(" Paris.") + [eos], True),
    ]
    assert render_conversation(SINGLE_TURN, tok, "deepseek") == expect(*first_turn)
    multi = expect(*first_turn, (enc("User: And of Italy?\n\nAssistant:"), False), (enc(" Rome.") + [eos], True))
    assert render_conversation(MULTI_TURN, tok, "deepseek") == multi


def test_chatml_single_and_multi_turn(tokenizers):
    """``<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...``."""
    tok = tokenizers["chatml"]
    enc = tok.encode
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    first_turn = [
        ([start] + enc("system\nBe brief.") + [end] + enc("\n"), False),
        ([start] + enc("user\nWhat is the capital of France?") + [end] + enc("\n"), False),
        ([start] + enc("assistant\n"), False),
        (enc("Paris.") + [end], True),
    ]
    assert render_conversation(SINGLE_TURN, tok, "chatml") == expect(*first_turn)
    multi = expect(*first_turn,
                   (enc("\n") + [start] + enc("user\nAnd of Italy?") + [end] + enc("\n"), False),
                   ([start] + enc("assistant\n"), False),
                   (enc("Rome.") + [end], True))
    assert render_conversation(MULTI_TURN, tok, "chatml") == multi


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mask_is_exactly_every_assistant_turn_and_its_end_token(tokenizers, template, messages):
    """The True runs of the mask are the assistant turns, in order, each ending with the turn's end token."""
    tok = tokenizers[template]
    ids, mask = render_conversation(messages, tok, template)
    runs = [[token for token, _ in run] for output, run in groupby(zip(ids, mask), key=lambda pair: pair[1]) if output]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == stop_ids(tok, template)[0]
        assert tok.decode(run).strip() == answer.strip()
    assert mask[0] is False


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_one_bos_and_no_repeated_special_tokens(tokenizers, template, messages):
    """One BOS first (none for ChatML, whose template has none); no BOS/EOS/end-of-turn id twice in a row."""
    tok = tokenizers[template]
    ids, _ = render_conversation(messages, tok, template)
    pairs = sum(m["role"] == "assistant" for m in messages)
    if template == "chatml":
        assert tok.bos_id is None
    else:
        assert ids[0] == tok.bos_id
        assert ids.count(tok.bos_id) == (pairs if template == "llama2" else 1)
    specials = {tok.bos_id, tok.eos_id, *stop_ids(tok, template)}
    assert not any(a == b and a in specials for a, b in zip(ids, ids[1:]))
    closed_turns = len(messages) if template in ("llama3", "chatml") else pairs  # they close every message
    assert sum(token in stop_ids(tok, template) for token in ids) == closed_turns


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("prompt", [[USER_1], [SYSTEM, USER_1], [SYSTEM, USER_1, ANSWER_1, USER_2]])
def test_prompt_and_response_split_the_conversation(tokenizers, template, prompt):
    tok = tokenizers[template]
    prompt_ids, response_ids = render_prompt_and_response(prompt, "Rome, I think.", tok, template)
    ids, mask = render_conversation([*prompt, {"role": "assistant", "content": "Rome, I think."}], tok, template)
    assert prompt_ids + response_ids == ids
    assert mask[len(prompt_ids):] == [True] * len(response_ids) and mask[len(prompt_ids) - 1] is False
    assert prompt_ids == render_conversation(prompt, tok, template, add_generation_prompt=True)[0]
    assert tok.decode(response_ids).strip() == "Rome, I think."  # the first response token is included
    assert response_ids[-1] in stop_ids(tok, template)


def test_generation_prompts(tokenizers):
    """``prompt_ids`` ends with the header that opens the assistant turn."""
    prompt = [SYSTEM, USER_1]
    llama2, llama3, deepseek, chatml = (
        render_conversation(prompt, tokenizers[name], name, add_generation_prompt=True)[0] for name in TEMPLATE_NAMES)
    assert llama2 == [1] + tokenizers["llama2"].encode(
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]")
    tok = tokenizers["llama3"]
    header = [tok.token_id("<|start_header_id|>"), *tok.encode("assistant"), tok.token_id("<|end_header_id|>"),
              *tok.encode("\n\n")]
    assert llama3[-len(header):] == header
    tok = tokenizers["deepseek"]
    assert deepseek[-len(tok.encode("Assistant:")):] == tok.encode("Assistant:")
    tok = tokenizers["chatml"]
    header = [*tok.encode("\n"), tok.token_id("<|im_start|>"), *tok.encode("assistant\n")]
    assert chatml[-len(header):] == header


def test_stop_ids(tokenizers, tmp_path):
    """llama3 stops on <|eot_id|> and <|end_of_text|> (its EOS is <|eot_id|>); ChatML's EOS is <|im_end|>, and a
    ChatML base model whose EOS is <|endoftext|> (Qwen's) stops on both."""
    assert stop_ids(tokenizers["llama2"], "llama2") == [2]
    tok = tokenizers["llama3"]
    assert stop_ids(tok, "llama3") == [tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>")]
    tok = tokenizers["deepseek"]
    assert stop_ids(tok, "deepseek") == [tok.token_id("<｜end▁of▁sentence｜>")]
    tok = tokenizers["chatml"]
    assert stop_ids(tok, "chatml") == [tok.token_id("<|im_end|>")]
    directory = make_hf_tokenizer(tmp_path, "chatml")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(directory)
    assert stop_ids(tok, "chatml") == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]


@pytest.mark.parametrize("style", HF_STYLES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_templates_match_transformers(tokenizers, tmp_path, style, add_generation_prompt):
    """Oracle: transformers' apply_chat_template with the real jinja template of the fixture's config.

    The one deviation: ChatML's official template writes "\\n" after the last message too; ours ends on that
    turn's <|im_end|> (without a generation prompt), so transformers has one more token, the "\\n".
    """
    import transformers
    directory = make_hf_tokenizer(tmp_path, style)
    oracle = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    tok = load_tokenizer(directory)
    for messages in [*CONVERSATIONS, [SYSTEM, USER_1], [USER_1, ANSWER_1, USER_2], PADDED]:
        ours, _ = render_conversation(messages, tok, style, add_generation_prompt=add_generation_prompt)
        reference = oracle.apply_chat_template(messages, tokenize=True,
                                               add_generation_prompt=add_generation_prompt)["input_ids"]
        if style == "chatml" and not add_generation_prompt:
            assert reference[-1:] == tok.encode("\n")
            reference = reference[:-1]
        assert ours == reference


def test_llama2_matches_transformers_and_a_converted_tokenizer_json(tokenizers, tmp_path):
    """Oracle: transformers' Llama tokenizer built from the fixture's tokenizer.model with the real Llama-2-chat
    template and ``legacy=True``, which keeps Meta's "▁[INST]" after "<s>" (``legacy=False`` would drop the "▁").

    Its saved tokenizer.json, read by our HF path, renders the same ids as the sentencepiece model.
    """
    import transformers
    make_sentencepiece(tmp_path / "meta")
    (tmp_path / "meta" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
        "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer",
        "chat_template": LLAMA2_CHAT_TEMPLATE}))
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path / "meta")
    oracle.save_pretrained(tmp_path / "hf")
    sentencepiece_tok, hf_tok = load_tokenizer(tmp_path / "meta" / "tokenizer.model"), load_tokenizer(tmp_path / "hf")
    for messages in [*CONVERSATIONS, [SYSTEM, USER_1], PADDED]:
        ours = render_conversation(messages, sentencepiece_tok, "llama2")
        assert ours[0] == oracle.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert render_conversation(messages, hf_tok, "llama2") == ours


@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    ([{"role": "user", "content": None}], r"message 0 \(user\) content must be a str"),
    (["hello"], "must be a dict"),
    ([USER_1, SYSTEM], "system message may only be the first"),
])
@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_bad_messages_raise(tokenizers, template, messages, match):
    with pytest.raises(ValueError, match=match):
        render_conversation(messages, tokenizers[template], template)


def test_unknown_template_lists_the_names(tokenizers):
    with pytest.raises(ValueError, match="choose one of llama2, llama3, deepseek, chatml"):
        render_conversation([USER_1], tokenizers["llama2"], "vicuna")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        stop_ids(tokenizers["llama2"], "vicuna")


def test_llama2_rejects_orders_it_cannot_express(tokenizers):
    tok = tokenizers["llama2"]
    with pytest.raises(ValueError, match="alternating user/assistant"):
        render_conversation([USER_1, USER_2], tok, "llama2")
    with pytest.raises(ValueError, match="alternating user/assistant"):
        render_conversation([SYSTEM, ANSWER_1], tok, "llama2")
    with pytest.raises(ValueError, match="only open an assistant turn after a user message"):
        render_conversation([USER_1, ANSWER_1], tok, "llama2", add_generation_prompt=True)
    with pytest.raises(ValueError, match="at least one user message"):
        render_conversation([SYSTEM], tok, "llama2")


def test_prompt_must_end_with_a_user_message(tokenizers):
    with pytest.raises(ValueError, match="must end with a user message"):
        render_prompt_and_response([USER_1, ANSWER_1], "Rome.", tokenizers["llama3"], "llama3")


def test_template_needs_its_special_tokens(tokenizers):
    """llama3 / chatml markers must be single ids: a tokenizer without them is refused, not spelled out."""
    with pytest.raises(ValueError, match=r"'<\|start_header_id\|>' is not in the vocabulary"):
        render_conversation(SINGLE_TURN, tokenizers["llama2"], "llama3")
    with pytest.raises(ValueError, match=r"'<\|im_start\|>' is not in the vocabulary"):
        render_conversation(SINGLE_TURN, tokenizers["deepseek"], "chatml")
    with pytest.raises(ValueError, match="deepseek template starts with BOS but the tokenizer defines none"):
        render_conversation(SINGLE_TURN, tokenizers["chatml"], "deepseek")


def test_boundary_inside_a_token_is_refused(tokenizers):
    """ChatML content starting with "\\n": LLaMA-3's regex makes "assistant\\n" + "\\nParis" one "\\n\\n" token."""
    tok = tokenizers["chatml"]
    with pytest.raises(ValueError, match="merge into one token"):
        render_conversation([USER_1, {"role": "assistant", "content": "\nParis."}], tok, "chatml")
