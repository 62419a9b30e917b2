"""Builders shared by the SFT / DPO pipeline tests: tiny checkpoints with real tokenizers, data files, flags.

    tokenizer = make_sentencepiece(tmp_path / "tok")                 # tests.tokenizer_fixtures
    base = tiny_llama(tmp_path / "base", tokenizer)                   # tiny LLaMA + tokenizer.model beside it
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(12))
    assert run_sft(flags(pretrain_ckpt_dir=base, train_data_dir=..., **SMALL_RUN)) == 0

Every builder is deterministic (seeded), so tests can compare runs and rebuild the same checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dpo_llama.models.checkpoint import save_model
from dpo_llama.models.deepseek import DeepseekTransformer
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.models.tokenizer import load_tokenizer
from dpo_llama.utils.trainer import Trainer

# A short LoRA run on CPU: no warmup, no intermediate checkpoints or validations, quiet logging.
SMALL_RUN = dict(device="cpu", max_train_steps=3, micro_batch_size=4, gradient_accumulation_steps=1,
                 warmup_steps=0, learning_rate=1e-2, lora_r=4, val_interval=0, ckpt_interval=0, log_interval=1000)

GOOD_WORDS = ("red", "blue", "green", "yellow", "white", "black")
BAD_WORDS = ("cat", "dog", "fox", "owl", "fish", "bird")
SUBJECTS = ("the sky", "a flag", "my car", "the sea", "a house", "the road", "a shirt", "the door", "a cup",
            "the wall", "a book", "the hat", "a boat", "the box", "a bag", "the pen")




def tiny_llama(out_dir: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random 2-layer, dim-64 LLaMA checkpoint whose vocabulary is the tokenizer's, tokenizer copied beside.

    ``tokenizer`` is a ``tokenizer.model`` or a directory holding ``tokenizer.json``.
    """
    torch.manual_seed(seed)
    args = get_preset("tiny", vocab_size=load_tokenizer(tokenizer).vocab_size)
    save_model(Transformer(args), out_dir, tokenizer_files=tokenizer_files(tokenizer))
    return Path(out_dir)


def tiny_deepseek_v2(out_dir: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random tiny DeepSeek-V2 (MLA, one dense + one MoE layer of 8 experts) with the tokenizer beside it."""
    torch.manual_seed(seed)
    args = get_preset("tiny-deepseek-v2", vocab_size=load_tokenizer(tokenizer).vocab_size)
    save_model(DeepseekTransformer(args), out_dir, tokenizer_files=tokenizer_files(tokenizer))
    return Path(out_dir)


def tokenizer_files(path: Path) -> list[Path]:
    """The files that define a tokenizer: a tokenizer.model, or a directory's tokenizer.json (+ config)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [p for p in (path / "tokenizer.json", path / "tokenizer_config.json") if p.is_file()]


def flags(**values) -> list[str]:
    """``flags(max_train_steps=3, resume=True)`` -> ``["--max-train-steps", "3", "--resume", "true"]``."""
    argv = []
    for name, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{name.replace('_', '-')}", text]
    return argv


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes rows as JSON Lines."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def read_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """``metrics.jsonl`` of a run as ``{step: {tag: value}}`` (train and val lines of a step merged)."""
    history: dict[int, dict[str, float]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        history.setdefault(record.pop("step"), {}).update(record)
    return history


def series(history: dict[int, dict[str, float]], tag: str) -> list[float]:
    """The values of one tag in step order."""
    return [history[step][tag] for step in sorted(history) if tag in history[step]]


def sft_rows(count: int, seed: int = 0) -> list[dict]:
    """OpenAI-style ``messages`` rows with short question / answer pairs of varying length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        subject = rng.choice(SUBJECTS)
        colours = " and ".join(rng.sample(GOOD_WORDS, rng.randint(1, 3)))
        rows.append({"messages": [{"role": "user", "content": f"What color is {subject}?"},
                                  {"role": "assistant", "content": f"It is {colours}."}]})
    return rows


def preference_rows(count: int, seed: int = 0) -> list[dict]:
    """TRL ``prompt`` / ``chosen`` / ``rejected`` rows where the chosen answer names colours and the rejected
    one names animals: a rule a model can learn from a few pairs and apply to unseen prompts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        subject = rng.choice(SUBJECTS)
        rows.append({"prompt": f"What color is {subject}?",
                     "chosen": "It is " + " and ".join(rng.sample(GOOD_WORDS, 2)) + ".",
                     "rejected": "It is " + " and ".join(rng.sample(BAD_WORDS, 2)) + "."})
    return rows


def kto_rows(count: int, seed: int = 0) -> list[dict]:
    """TRL unpaired ``prompt`` / ``completion`` / ``label`` rows from :func:`preference_rows`, alternating labels."""
    rows = []
    for index, pair in enumerate(preference_rows(count, seed)):
        desirable = index % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"],
                     "label": desirable})
    return rows


class Killed(BaseException):
    """A process killed outright (SIGKILL, power loss): nothing in the run scripts catches it."""


def die_after_the_next_checkpoint(monkeypatch) -> None:
    """Makes training raise Killed ("killed after step-...") right after it writes a checkpoint: a run killed at
    its most delicate moment, for resume tests (``monkeypatch.undo()`` lets the next run finish)."""
    save = Trainer._save_checkpoint

    def save_then_die(self, history):
        path = save(self, history)
        raise Killed(f"killed after {path.name}")

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
