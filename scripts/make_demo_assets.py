"""Regenerate the embedded demo's assets (dpo_llama/assets/demo) from a seed.

    python scripts/make_demo_assets.py                                  # all assets, a few minutes on a CPU
    python scripts/make_demo_assets.py --output /tmp/demo --pretrain-steps 100   # a quick look elsewhere

The task and its story are in ``dpo_llama/utils/demo_task.py``. This script writes, into --output:

* ``pretrain.txt``: the pretraining corpus, one plain-text sum per line (``"47 + 38 = 85"``, ...), every
  problem except the held-out ones;
* ``sft.jsonl``: the sloppy annotator's demonstrations, OpenAI / TRL ``messages`` rows;
* ``preference_train.jsonl`` / ``preference_test.jsonl``: checker-labelled pairs, TRL conversational rows
  (``prompt`` / ``chosen`` / ``rejected`` message lists); the test split is held out;
* ``eval.jsonl``: held-out prompts with their correct sums (``prompt`` messages + ``answer``);
* ``base/``: a tiny LLaMA pretrained on ``pretrain.txt`` (our checkpoint format: ``params.json`` +
  ``model.safetensors``), with the sentencepiece ``tokenizer.model`` trained on the same corpus beside it.

Everything follows from --seed: the data files are identical on every machine, the weights are identical on
the same machine and thread count (float sums may round differently elsewhere). The script ends by measuring
the base model's plain-text accuracy on the held-out sums (``"47 + 38 ="`` -> ``"85"``).
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch
from tqdm.auto import tqdm

from dpo_llama.configs.demo import ASSETS
from dpo_llama.models.checkpoint import DTYPES, load_model, save_model
from dpo_llama.models.generation import generate
from dpo_llama.models.llama import ModelArgs, Transformer
from dpo_llama.models.tokenizer import Tokenizer, load_tokenizer
from dpo_llama.utils import demo_task
from dpo_llama.utils.cli import HelpFormatter, at_least, check_output_directory, probability
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.trainer import lr_factor


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", default=str(ASSETS), help="assets directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the splits and the weights")
    data = parser.add_argument_group("data")
    data.add_argument("--sft-size", type=at_least(1), default=2000, help="SFT demonstrations")
    data.add_argument("--preference-train-size", type=at_least(1), default=2000, help="training preference pairs")
    data.add_argument("--preference-test-size", type=at_least(1), default=300, help="held-out preference pairs")
    data.add_argument("--eval-size", type=at_least(1), default=400, help="held-out evaluation prompts")
    data.add_argument("--error-rate", type=probability, default=0.8,
                      help="chance that the sloppy annotator forgets a carry (SFT data)")
    data.add_argument("--vocab-size", type=at_least(1), default=320, help="sentencepiece vocabulary size")
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=at_least(1), default=128, help="width of the residual stream")
    model.add_argument("--n-layers", type=at_least(1), default=4, help="transformer blocks")
    model.add_argument("--n-heads", type=at_least(1), default=4, help="query heads")
    model.add_argument("--n-kv-heads", type=at_least(1), default=2, help="key/value heads")
    model.add_argument("--hidden-dim", type=at_least(1), default=384, help="SwiGLU inner width")
    model.add_argument("--max-seq-len", type=at_least(1), default=128, help="longest sequence")
    model.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype the weights are saved in")
    train = parser.add_argument_group("pretraining")
    train.add_argument("--pretrain-steps", type=at_least(1), default=2000, help="optimizer steps")
    train.add_argument("--batch-size", type=at_least(1), default=64, help="lines per step")
    train.add_argument("--lr", type=at_least(0.0, float), default=3e-3, help="peak learning rate (AdamW)")
    train.add_argument("--warmup-steps", type=at_least(0), default=100, help="linear warmup steps")
    args = parser.parse_args(argv)
    check_head_counts(parser, args)
    return args


def check_head_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses (``parser.error``) a --dim / --n-heads / --n-kv-heads combination the model cannot be built with."""
    if args.dim % args.n_heads:
        parser.error(f"--dim {args.dim} must be a multiple of --n-heads {args.n_heads}")
    if args.dim // args.n_heads % 2:
        parser.error(f"the head width --dim / --n-heads = {args.dim // args.n_heads} must be even (rotary "
                     "embeddings turn pairs of dimensions)")
    if args.n_heads % args.n_kv_heads:
        parser.error(f"--n-heads {args.n_heads} must be a multiple of --n-kv-heads {args.n_kv_heads}")


def write_data(out_dir: Path, splits: dict[str, list[demo_task.Problem]], args: argparse.Namespace) -> Path:
    """Writes the corpus and the JSON Lines files; returns the corpus path."""
    corpus = out_dir / "pretrain.txt"
    line_rng = random.Random(args.seed)
    corpus.write_text("".join(demo_task.pretraining_line(p, line_rng) + "\n" for p in splits["pretrain"]),
                      encoding="utf-8")
    annotator_rng = random.Random(args.seed + 1)
    demo_task.write_jsonl(out_dir / "sft.jsonl", (
        demo_task.sft_row(p, demo_task.sloppy_answer(p, args.error_rate, annotator_rng)) for p in splits["sft"]))
    checker_rng = random.Random(args.seed + 2)
    for name in ("preference_train", "preference_test"):
        demo_task.write_jsonl(out_dir / f"{name}.jsonl", (
            demo_task.preference_row(p, demo_task.rejected_answer(p, checker_rng)) for p in splits[name]))
    demo_task.write_jsonl(out_dir / "eval.jsonl", map(demo_task.eval_row, splits["eval"]))
    return corpus


def train_tokenizer(corpus: Path, model_path: Path, vocab_size: int) -> None:
    """Trains a LLaMA-style sentencepiece BPE model on the lines of ``corpus`` and writes it to ``model_path``.

    As LLaMA's: digits split into single tokens, unknown characters as UTF-8 byte tokens, no text normalization,
    ``unk=0, bos=1, eos=2`` and no pad piece. The lines are fed from memory so that no file path (which would
    differ between runs) is recorded in the model.
    """
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus.read_text(encoding="utf-8").splitlines()), model_writer=model,
            vocab_size=vocab_size, model_type="bpe", split_digits=True, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    except RuntimeError as error:
        reason = str(error).rsplit("] ", 1)[-1].split(" Increase vocab_size")[0]
        raise ValueError(f"--vocab-size {vocab_size} does not fit the corpus (sentencepiece: {reason})") from error
    model_path.write_bytes(model.getvalue())


def pretrain(model: Transformer, docs: list[list[int]], pad_id: int, args: argparse.Namespace) -> float:
    """Next-token training on ``docs`` (``BOS line EOS``), shuffled every epoch; returns the last loss.

    AdamW with linear warmup and cosine decay to 10% (``trainer.lr_factor``), gradient norm clipped to 1. The
    loss is the mean negative log-likelihood of every token after BOS.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    model.train()
    progress = tqdm(range(1, args.pretrain_steps + 1), desc="pretraining", unit="step", disable=None)
    for step in progress:
        if len(order) < args.batch_size:
            order += torch.randperm(len(docs), generator=generator).tolist()
        batch, order = [docs[i] for i in order[:args.batch_size]], order[args.batch_size:]
        tokens, mask = pad_batch(batch, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.warmup_steps, args.pretrain_steps, 0.1)
        sums, counts = sequence_logps(model, tokens, mask)
        loss = -sums.sum() / counts.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def pad_batch(docs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens ``[B, T]`` and the mask of scored tokens (every real token but the first)."""
    length = max(map(len, docs))
    tokens = torch.tensor([doc + [pad_id] * (length - len(doc)) for doc in docs])
    mask = torch.tensor([[0 < i < len(doc) for i in range(length)] for doc in docs])
    return tokens, mask


def plain_text_accuracy(model: Transformer, tokenizer: Tokenizer, problems: list[demo_task.Problem]) -> float:
    """Share of ``problems`` whose greedy continuation of ``"a + b ="`` is the correct sum."""
    correct = 0.0
    for problem in tqdm(problems, desc="checking the base model", unit="sum", disable=None):
        prompt = tokenizer.encode(f"{problem.a} + {problem.b} =", bos=True)
        answer = tokenizer.decode(generate(model, prompt, 6, stop_ids=[tokenizer.eos_id]))
        correct += demo_task.reward(problem, "= " + answer)
    return correct / len(problems)


def make_base_model(corpus: Path, base_dir: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """Trains the tokenizer and pretrains the model on ``corpus``, saves both in ``base_dir``.

    Returns:
        The last pretraining loss and ``save_model``'s summary.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.model"
        train_tokenizer(corpus, tokenizer_path, args.vocab_size)
        tokenizer = load_tokenizer(tokenizer_path)
        docs = [tokenizer.encode(line, bos=True, eos=True) for line in corpus.read_text(encoding="utf-8").splitlines()]
        longest = max(map(len, docs))
        if longest > args.max_seq_len:
            raise ValueError(f"--max-seq-len {args.max_seq_len} is shorter than the longest pretraining line "
                             f"({longest} tokens with BOS and EOS)")
        torch.manual_seed(args.seed)
        model = Transformer(ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                      n_kv_heads=args.n_kv_heads, hidden_dim=args.hidden_dim,
                                      vocab_size=tokenizer.vocab_size, max_seq_len=args.max_seq_len))
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"vocabulary {tokenizer.vocab_size}")
        loss = pretrain(model, docs, tokenizer.pad_id, args)
        return loss, save_model(model, base_dir, [tokenizer_path], dtype=DTYPES[args.dtype])


def publish(staging: Path, out_dir: Path) -> None:
    """Moves every file and folder of ``staging`` into ``out_dir``, replacing those of the same name (others, such
    as the assets' README, stay). Everything is made in ``staging`` first, so that a run that fails or is
    interrupted leaves the old assets as they were, never new data beside an old model pretrained on other
    held-out problems."""
    out_dir.mkdir(exist_ok=True)
    for item in sorted(staging.iterdir()):
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    sizes = {"sft": args.sft_size, "preference_train": args.preference_train_size,
             "preference_test": args.preference_test_size, "eval": args.eval_size}
    try:
        check_output_directory(args.output)
        splits = demo_task.split_problems(args.seed, sizes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-partial-") as tmp:
        staging = Path(tmp)
        corpus = write_data(staging, splits, args)
        print(f"made {', '.join(f'{len(splits[n])} {n}' for n in ('pretrain', *sizes))} problems")
        try:
            loss, summary = make_base_model(corpus, staging / "base", args)
        except ValueError as error:
            print(f"error: {error}; nothing was written to {out_dir}", file=sys.stderr)
            return 1
        print(f"final pretraining loss {loss:.3f}, {summary['num_params']:,} parameters")
        base = load_model(staging / "base", dtype=torch.float32)
        accuracy = plain_text_accuracy(base, load_tokenizer(staging / "base"), splits["eval"])
        publish(staging, out_dir)
    print(f"wrote {out_dir}: {', '.join(sorted(item.name for item in out_dir.iterdir()))}")
    print(f"base model plain-text accuracy on the {len(splits['eval'])} held-out eval sums: {accuracy:.3f}")
    print(f"done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
