"""One small tokenizer interface over sentencepiece (LLaMA-2) and Hugging Face ``tokenizer.json`` (LLaMA-3, DeepSeek).

    tokenizer = load_tokenizer("checkpoints/llama-2-7b")   # a directory, a tokenizer.model or a tokenizer.json
    ids = tokenizer.encode("Hello", bos=True)               # special tokens only when asked for
    text = tokenizer.decode(ids)

Which file is used:

* ``tokenizer.model``: a sentencepiece model, read with ``sentencepiece``. BOS / EOS are the model's own ids.
  LLaMA-2's model has no pad piece (``pad_id() == -1``), so ``pad_id`` falls back to ``eos_id``; that is safe
  because every pad position is masked out of the loss and the attention.
* ``tokenizer.json``: read with the ``tokenizers`` library (never ``transformers``). BOS / EOS / pad come from the
  ``bos_token`` / ``eos_token`` / ``pad_token`` of the ``tokenizer_config.json`` beside it, or of the
  ``special_tokens_map.json`` beside it where that names them (it overrides the config, as in ``transformers``),
  written either as a string or as ``{"content": ...}`` like the Hub does. A token neither names falls back to
  the first well-known name in the vocabulary (``<s>`` / ``</s>``, ``<|begin_of_text|>`` / ``<|end_of_text|>``,
  ``<｜begin▁of▁sentence｜>`` / ``<｜end▁of▁sentence｜>``); pad falls back to EOS. A tokenizer may have no BOS
  (Qwen-style ChatML): ``bos_id`` is then ``None``.
* a directory: its ``tokenizer.json`` when present, else its ``tokenizer.model``. ``tokenizer.json`` wins because
  it comes with ``tokenizer_config.json`` (the special tokens), because Hugging Face LLaMA-2 repos ship both files
  (their ``tokenizer.json`` is a conversion of the ``tokenizer.model``), and because LLaMA-3's Meta
  ``tokenizer.model`` is a tiktoken file that sentencepiece cannot read.

Round trip: ``decode(encode(text)) == text`` for any text with a byte-level BPE ``tokenizer.json`` and with a
sentencepiece model trained like LLaMA's (identity normalization, ``remove_extra_whitespaces=False``,
``byte_fallback=True``, ``add_dummy_prefix=True``): leading and repeated spaces, newlines, tabs and any unicode
survive, except sentencepiece's own space symbol ``▁`` (U+2581), which comes back as a space (as with Meta's
LLaMA tokenizer). Exception: in a ``tokenizer.json`` text that spells a special token (``"<|eot_id|>"``) becomes
that token, as in ``transformers``, and ``decode`` drops special tokens.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
import tokenizers

from dpo_llama.models.checkpoint import read_json

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class Tokenizer(ABC):
    """Text <-> token ids, plus the special ids and the files that define the tokenizer.

    Attributes:
        bos_id: id of the begin-of-sequence token, or ``None`` when the tokenizer has none.
        eos_id: id of the end-of-sequence token.
        pad_id: id written at pad positions (EOS when the tokenizer defines no pad); always masked.
        vocab_size: number of ids, special tokens included.
        files: the files that define the tokenizer, to copy beside a checkpoint's weights.
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    files: tuple[Path, ...]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS / EOS are added only when asked for.

        Raises:
            ValueError: ``text`` is not valid Unicode (a lone UTF-16 surrogate such as JSON's ``"\\ud83d"``,
                found in scraped data), which neither tokenizer library can encode.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text is not valid Unicode ({error.reason} at character {error.start})") from None
        ids = self._encode_text(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.files[0]} defines no BOS token, so encode(bos=True) is impossible")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def token_id(self, piece: str) -> int:
        """The single id of a (special) token such as ``"<|eot_id|>"``.

        Raises:
            ValueError: if the token is not in the vocabulary or is the unknown token.
        """
        token = self._lookup(piece)
        if token is None:
            raise ValueError(f"token {piece!r} is not in the vocabulary of {self.files[0]}")
        return token

    def fingerprint(self) -> str:
        """sha256 (hex) over the name and bytes of each defining file, in order.

        Two tokenizers with the same fingerprint encode identically; a dataset stores it so that training can
        refuse data tokenized with another tokenizer.
        """
        digest = hashlib.sha256()
        for path in self.files:
            data = path.read_bytes()
            digest.update(f"{path.name}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, chat markers) are dropped."""

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without any special token added."""

    @abstractmethod
    def _lookup(self, piece: str) -> int | None:
        """Id of ``piece``, or ``None`` when it is absent or the unknown token."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (LLaMA-2)."""

    def __init__(self, path: Path):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a sentencepiece model (a LLaMA-3 Meta tokenizer.model is tiktoken: "
                             f"use the Hugging Face tokenizer.json instead): {error}") from error
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path} defines no EOS piece (eos_id is -1)")
        self.files = (path,)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.vocab_size = self._sp.vocab_size()

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _lookup(self, piece: str) -> int | None:
        token = self._sp.piece_to_id(piece)
        return None if self._sp.is_unknown(token) else token


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` with the optional ``tokenizer_config.json`` and ``special_tokens_map.json``
    beside it."""

    def __init__(self, path: Path):
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {error}") from error
        self._tok.no_truncation()  # a file saved with truncation / padding enabled would apply it to every encode
        self._tok.no_padding()
        sources = [path.parent / name for name in ("tokenizer_config.json", "special_tokens_map.json")]
        sources = [source for source in sources if source.is_file()]
        self.files = (path, *sources)
        config, origin = {}, {}
        for source in sources:  # special_tokens_map.json overrides tokenizer_config.json, as in transformers
            for key, value in read_tokenizer_config(source).items():
                config[key], origin[key] = value, source
        self.bos_id = self._special_id(config, "bos_token", BOS_NAMES, origin, null_means_none=True)
        eos_id = self._special_id(config, "eos_token", EOS_NAMES, origin)
        if eos_id is None:
            raise ValueError(f"no EOS token: no tokenizer_config.json or special_tokens_map.json beside {path} names "
                             f"an eos_token, and it has none of {EOS_NAMES}")
        self.eos_id = eos_id
        pad_id = self._special_id(config, "pad_token", (), origin)
        self.pad_id = eos_id if pad_id is None else pad_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        """Drops the tokens flagged special in ``tokenizer.json`` and BOS / EOS / pad even where they are not
        flagged (some ChatML fine-tunes add ``<|im_end|>`` as a plain token and name it the EOS), as
        ``transformers`` does."""
        named = {self.bos_id, self.eos_id, self.pad_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in named], skip_special_tokens=True)

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _lookup(self, piece: str) -> int | None:
        if piece == getattr(self._tok.model, "unk_token", None):
            return None
        return self._tok.token_to_id(piece)

    def _special_id(self, config: dict, key: str, fallbacks: tuple[str, ...], origin: dict[str, Path],
                    null_means_none: bool = False) -> int | None:
        """Id of the token ``config[key]`` names (``origin[key]``: the file that named it); else the first fallback
        name in the vocabulary. With ``null_means_none`` a key that is there but null means the model has no
        such token (Qwen's no-BOS)."""
        if null_means_none and key in config and config[key] is None:
            return None
        name = config_token(config, key, origin.get(key))
        if name is not None:
            token = self._tok.token_to_id(name)
            if token is None:
                raise ValueError(f"{origin[key]}: {key} {name!r} is not in the vocabulary")
            return token
        found = (self._tok.token_to_id(candidate) for candidate in fallbacks)
        return next((token for token in found if token is not None), None)


def read_tokenizer_config(path: Path) -> dict:
    """The parsed ``tokenizer_config.json`` (or ``special_tokens_map.json``), or ``{}`` when the file does not
    exist."""
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def config_token(config: dict, key: str, config_path: Path | None) -> str | None:
    """The token text of ``config[key]``: a string, ``{"content": str}`` as the Hub writes it, or ``None``."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{config_path}: {key} must be a string or {{\"content\": string}}, got {value!r}")
    return value


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.model``, a ``tokenizer.json``, or the one a directory holds (``tokenizer.json`` first).

    Raises:
        FileNotFoundError: if the path does not exist or the directory holds neither file.
        ValueError: if the file cannot be read as the tokenizer its name says.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        path = tokenizer_file_in(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def tokenizer_file_in(directory: Path) -> Path:
    """``tokenizer.json`` of ``directory`` if present, else its ``tokenizer.model``."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds neither tokenizer.json nor tokenizer.model")
