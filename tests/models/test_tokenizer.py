"""Tests of dpo_llama.models.tokenizer on tiny tokenizers trained in tmp_path (tests/tokenizer_fixtures.py)."""

import json
import shutil

import pytest

from dpo_llama.models.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.tokenizer_fixtures import HF_STYLES, make_hf_tokenizer, make_sentencepiece

ROUND_TRIP_TEXTS = [
    "Hello world!",
    " leading space",
    "   three leading spaces and  two inside",
    "trailing spaces  ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttab\tseparated\r\nwindows newline",
    "café naïve über Москва 東京 😀 ünïcödé never seen in training: ξψζ 한국어",
    "",
]


@pytest.fixture
def sentencepiece_tokenizer(tmp_path):
    return load_tokenizer(make_sentencepiece(tmp_path))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_sentencepiece_round_trip_is_exact(sentencepiece_tokenizer, text):
    """identity normalization + no whitespace removal + byte fallback + dummy prefix: decode(encode(t)) == t."""
    ids = sentencepiece_tokenizer.encode(text)
    assert sentencepiece_tokenizer.decode(ids) == text
    assert 0 not in ids  # never <unk>: unseen characters become UTF-8 byte pieces


@pytest.mark.parametrize("style", HF_STYLES)
def test_hf_round_trip_is_exact(tmp_path, style):
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, style))
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sentencepiece_special_ids(sentencepiece_tokenizer):
    """LLaMA layout: <unk>=0, <s>=1, </s>=2; no pad piece (-1), so pad falls back to EOS."""
    tokenizer = sentencepiece_tokenizer
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert tokenizer.vocab_size == 400
    assert tokenizer.token_id("<s>") == 1 and tokenizer.token_id("</s>") == 2
    with pytest.raises(ValueError, match="<unk>"):
        tokenizer.token_id("<unk>")
    with pytest.raises(ValueError, match="eot_id"):
        tokenizer.token_id("<|eot_id|>")


def test_encode_adds_specials_only_when_asked(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    plain = tokenizer.encode("Hello world")
    assert 1 not in plain and 2 not in plain
    assert tokenizer.encode("Hello world", bos=True) == [1] + plain
    assert tokenizer.encode("Hello world", eos=True) == plain + [2]
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1] + plain + [2]


def test_sentencepiece_user_defined_symbols_are_single_tokens(tmp_path):
    tokenizer = load_tokenizer(make_sentencepiece(tmp_path, user_defined_symbols=("<|im_start|>", "<|im_end|>")))
    start, end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert ids[1] == start and ids[-1] == end  # ids[0] is the dummy-prefix "▁"


@pytest.mark.parametrize("style, bos, eos, pad", [
    ("llama3", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),          # strings, no pad_token -> EOS
    ("deepseek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),  # {"content": ...}
    ("chatml", None, "<|im_end|>", "<|endoftext|>"),                     # bos_token null, pad named
])
def test_hf_special_ids_come_from_tokenizer_config(tmp_path, style, bos, eos, pad):
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, style))
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.bos_id == (None if bos is None else tokenizer.token_id(bos))
    assert tokenizer.eos_id == tokenizer.token_id(eos)
    assert tokenizer.pad_id == tokenizer.token_id(pad)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tokenizer.vocab_size == len(saved["model"]["vocab"]) + len(saved["added_tokens"])  # specials count


def test_hf_without_config_falls_back_to_well_known_names(tmp_path):
    """Without tokenizer_config.json LLaMA-3 gets <|begin_of_text|> / <|end_of_text|> by name; pad = EOS."""
    make_hf_tokenizer(tmp_path, "llama3")
    (tmp_path / "tokenizer_config.json").unlink()
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.bos_id == tokenizer.token_id("<|begin_of_text|>")
    assert tokenizer.eos_id == tokenizer.pad_id == tokenizer.token_id("<|end_of_text|>")
    assert tokenizer.files == (tmp_path / "tokenizer.json",)


def test_hf_encode_never_adds_specials(tmp_path):
    """The fixture's tokenizer.json has a BOS-adding post-processor, like LLaMA-3's; encode must not use it."""
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, "llama3"))
    ids = tokenizer.encode("Hello world")
    assert tokenizer.bos_id not in ids
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [tokenizer.bos_id] + ids + [tokenizer.eos_id]


def test_hf_special_token_text_is_one_id_and_decode_drops_it(tmp_path):
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, "llama3"))
    eot = tokenizer.token_id("<|eot_id|>")
    assert tokenizer.encode("<|eot_id|>") == [eot]
    assert tokenizer.decode(tokenizer.encode("Hi") + [eot]) == "Hi"


def test_hf_tokenizer_saved_with_truncation_or_padding_encodes_whole_text(tmp_path):
    """tokenizers' save() writes enabled truncation / padding into tokenizer.json; transformers ignores them and
    so do we: encode gives every token of the text and no padding."""
    import tokenizers
    text = "The quick brown fox jumps over the lazy dog, again and again."
    plain = load_tokenizer(make_hf_tokenizer(tmp_path / "plain", "llama3")).encode(text)
    for name, enable in (("cut", lambda t: t.enable_truncation(max_length=4)),
                         ("padded", lambda t: t.enable_padding(length=64, pad_id=0, pad_token="!"))):
        path = make_hf_tokenizer(tmp_path / name, "llama3") / "tokenizer.json"
        raw = tokenizers.Tokenizer.from_file(str(path))
        enable(raw)
        raw.save(str(path))
        assert load_tokenizer(path.parent).encode(text) == plain and len(plain) > 4


def chatml_with_a_plain_token(tmp_path, plain: str):
    """The ChatML fixture's tokenizer.json with ``plain`` added as a plain token, not a special one (as some
    fine-tunes add theirs)."""
    path = make_hf_tokenizer(tmp_path, "chatml") / "tokenizer.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    for token in content["added_tokens"]:
        token["special"] = token["content"] != plain and token["special"]
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_hf_decode_drops_an_eos_that_tokenizer_json_does_not_flag_special(tmp_path):
    """An EOS added as a plain token (some ChatML fine-tunes) is still dropped by decode, as transformers does."""
    import tokenizers
    path = chatml_with_a_plain_token(tmp_path, "<|im_end|>")
    tokenizer = load_tokenizer(path.parent)
    assert not tokenizers.Tokenizer.from_file(str(path)).decode([tokenizer.eos_id], skip_special_tokens=True) == ""
    assert tokenizer.decode(tokenizer.encode("Paris.") + [tokenizer.eos_id]) == "Paris."


def test_hf_decode_drops_a_pad_that_tokenizer_json_does_not_flag_special(tmp_path):
    """ChatML's pad <|endoftext|> added as a plain token: decode still drops it, like the EOS above."""
    tokenizer = load_tokenizer(chatml_with_a_plain_token(tmp_path, "<|endoftext|>").parent)
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>") != tokenizer.eos_id
    assert tokenizer.decode(tokenizer.encode("Paris.") + [tokenizer.pad_id] * 2) == "Paris."


def test_the_unknown_token_is_no_token_id(tmp_path):
    """token_id names real tokens only: a word-level tokenizer.json's unk_token "<unk>" has an id in the
    vocabulary, but asking for it means the piece is unknown, so it is refused like any missing piece."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"<unk>": 0, "sky": 1, "</s>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.token_id("sky") == 1 and tokenizer.eos_id == 2
    with pytest.raises(ValueError, match="'<unk>' is not in the vocabulary"):
        tokenizer.token_id("<unk>")


def test_a_sentencepiece_model_without_bos_has_none(tmp_path):
    """bos_id -1 in the model (no BOS piece): bos_id is None and encode(bos=True) is refused."""
    import io

    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the sky is blue", "the grass is green"] * 8), model_writer=model, vocab_size=40,
        model_type="bpe", unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    assert tokenizer.bos_id is None and tokenizer.eos_id == 1
    with pytest.raises(ValueError, match="no BOS"):
        tokenizer.encode("the sky", bos=True)


def test_chatml_tokenizer_without_bos_refuses_bos(tmp_path):
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path, "chatml"))
    with pytest.raises(ValueError, match="no BOS"):
        tokenizer.encode("Hi", bos=True)


def test_config_with_a_null_bos_means_no_bos(tmp_path):
    """``"bos_token": null`` (as Qwen writes it) says the model has no BOS: no well-known name is guessed."""
    make_hf_tokenizer(tmp_path, "llama3")
    config_path = tmp_path / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "bos_token": None}))
    assert load_tokenizer(tmp_path).bos_id is None
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "eos_token": None}))
    assert load_tokenizer(tmp_path).eos_id == load_tokenizer(tmp_path).token_id("<|end_of_text|>")  # EOS: by name


def test_special_tokens_map_overrides_the_config_as_in_transformers(tmp_path):
    """tokenizer_config.json names EOS <|eot_id|> and no pad; special_tokens_map.json names EOS <|end_of_text|>
    and pad <|end_header_id|>: the map wins for both (transformers' AutoTokenizer agrees), BOS stays the config's,
    and the map is one of the files a checkpoint copies and the fingerprint covers."""
    make_hf_tokenizer(tmp_path, "llama3")
    before = load_tokenizer(tmp_path)
    special_map = tmp_path / "special_tokens_map.json"
    special_map.write_text(json.dumps({"eos_token": {"content": "<|end_of_text|>", "normalized": False},
                                       "pad_token": "<|end_header_id|>"}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_id == tokenizer.token_id("<|end_of_text|>") != before.eos_id
    assert tokenizer.pad_id == tokenizer.token_id("<|end_header_id|>") and tokenizer.bos_id == before.bos_id
    assert tokenizer.files[-1] == special_map and tokenizer.fingerprint() != before.fingerprint()
    import transformers
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (oracle.eos_token_id, oracle.pad_token_id, oracle.bos_token_id) == \
        (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id)
    special_map.write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(ValueError, match=r"special_tokens_map.json: eos_token '<\|not_there\|>'"):
        load_tokenizer(tmp_path)


def test_config_naming_a_missing_token_is_an_error(tmp_path):
    make_hf_tokenizer(tmp_path, "llama3")
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = {"content": "<|not_there|>"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|not_there\|>'"):
        load_tokenizer(tmp_path)


def test_files_name_what_a_checkpoint_must_copy(tmp_path):
    sentencepiece_path = make_sentencepiece(tmp_path / "sp")
    assert load_tokenizer(sentencepiece_path).files == (sentencepiece_path,)
    hf_dir = make_hf_tokenizer(tmp_path / "hf", "deepseek")
    assert load_tokenizer(hf_dir).files == (hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json")


def test_directory_prefers_tokenizer_json(tmp_path):
    make_hf_tokenizer(tmp_path, "llama3")
    make_sentencepiece(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    (tmp_path / "tokenizer.json").unlink()
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_fingerprint_follows_file_bytes(tmp_path):
    """Same bytes elsewhere -> same fingerprint; any changed byte in any defining file -> another one."""
    make_hf_tokenizer(tmp_path / "a", "llama3")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = load_tokenizer(tmp_path / "a").fingerprint()
    assert len(first) == 64 and load_tokenizer(tmp_path / "b").fingerprint() == first

    config_path = tmp_path / "b" / "tokenizer_config.json"
    config_path.write_text(config_path.read_text().replace('"model_max_length": 4096', '"model_max_length": 4097'))
    assert load_tokenizer(tmp_path / "b").fingerprint() != first

    model_path = make_sentencepiece(tmp_path / "sp")
    before = load_tokenizer(model_path).fingerprint()
    make_sentencepiece(tmp_path / "sp", vocab_size=380)
    assert load_tokenizer(model_path).fingerprint() != before


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model is not a sentencepiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match="tokenizer.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_malformed_tokenizer_config_is_an_error(tmp_path):
    make_hf_tokenizer(tmp_path, "llama3")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": 5}')
    with pytest.raises(ValueError, match="bos_token must be a string"):
        load_tokenizer(tmp_path)
