"""Preference datasets: tokenized pairs with reference log-probs computed once, and their fingerprint.

A paired example holds the prompt once and both continuations::

    {"prompt": int32[P], "prompt_mask": bool[P], "chosen": int32[C], "chosen_mask": bool[C],
     "rejected": int32[R], "rejected_mask": bool[R], "ref_chosen_logps": float32, "ref_rejected_logps": float32}

The sequences the model sees are ``prompt + chosen`` and ``prompt + rejected``; the masks (concatenated the
same way) mark the scored tokens. By default only the final assistant turn of each continuation is scored;
with ``score_all_assistant_turns`` every assistant token of the whole trajectory is (M-DPO, Xiong et al. 2024,
"Building Math Agents with Multi-Turn Iterative Preference Learning"), prompt history included — identical
in both trajectories, those tokens cancel in summed log-ratios (the sigmoid, robust and hinge losses, the only
ones that take such data) and count in the NLL term.

An unpaired (KTO) example holds ``prompt``, ``completion`` (+ masks), ``desirable`` and ``kl_completion``
(+ mask): the completion of another example which, appended to this prompt, gives the mismatched pair used
to estimate the KL term (Ethayarajh et al. 2024); ``ref_logps`` and ``ref_kl_logps`` are its reference
log-probs.

Truncation to ``max_seq_len`` (prompt + the longer continuation): first the prompt is cut to its last
``max(min(max_prompt_len, max_seq_len - 1), max_seq_len - longest continuation)`` tokens (its first token is
kept when it is BOS); then continuations are cut to their first ``max_seq_len - prompt`` tokens. A pair whose
continuations are identical, or one with no scored token left, is dropped and counted.

Reference log-probs are the summed log-probs of the scored tokens (float32; the token counts come from the
masks), computed under ``torch.inference_mode`` in length-sorted batches and saved chunk by chunk, so an
interrupted precompute resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpo_llama.models.checkpoint import checkpoint_fingerprint, read_json
from dpo_llama.models.lora import adapter_fingerprint
from dpo_llama.models.quant import quantization_summary
from dpo_llama.models.tokenizer import Tokenizer
from dpo_llama.utils.dataset_io import load_arrays, save_arrays, write_json
from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.preference_formats import PreferencePair, UnpairedExample
from dpo_llama.utils.raw_data import ParseReport
from dpo_llama.utils.sft import pad_sequences
from dpo_llama.utils.templates import render_conversation

TokenSequence = tuple[np.ndarray, np.ndarray]  # (token ids, score mask) of one full sequence


# Reasons this module drops an example for (counted as they are; other errors count as "template error").
RETOKENIZED = "the prompt tokenizes differently once the response follows it"
IDENTICAL = "identical responses after truncation"
EMPTY = "empty response after truncation"


def last_turn_only(mask: list[bool]) -> list[bool]:
    """Keeps only the last run of True values (the final assistant turn)."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


def render_continuation(prompt: list[dict], continuation: list[dict], prompt_ids: list[int], tokenizer: Tokenizer,
                        template: str, score_all: bool) -> tuple[list[int], list[bool], list[bool]]:
    """Token ids and score mask of a continuation after ``prompt_ids``, plus the prompt's own mask."""
    ids, mask = render_conversation(prompt + continuation, tokenizer, template)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(RETOKENIZED)
    cont_mask = mask[len(prompt_ids):]
    if not score_all:
        return ids[len(prompt_ids):], last_turn_only(cont_mask), [False] * len(prompt_ids)
    return ids[len(prompt_ids):], cont_mask, mask[:len(prompt_ids)]


def truncate_prompt(ids: list[int], mask: list[bool], keep: int, bos_id: int | None) -> tuple[list, list]:
    """Keeps the last ``keep`` prompt tokens, preserving a leading BOS.

    The first kept token is never scored, since no position precedes it: a cut without BOS (chatml) can start
    inside an earlier assistant turn that ``score_all`` scores.
    """
    if len(ids) <= keep:
        return ids, mask
    if ids and ids[0] == bos_id and keep > 0:
        return ids[:1] + ids[len(ids) - keep + 1:], mask[:1] + mask[len(mask) - keep + 1:]
    return ids[len(ids) - keep:], [False] * min(keep, 1) + mask[len(mask) - keep + 1:]


def fit_lengths(prompt: tuple[list, list], continuations: list[tuple[list, list]], max_seq_len: int,
                max_prompt_len: int, bos_id: int | None) -> tuple[tuple[list, list], list[tuple[list, list]]]:
    """Applies the module's truncation rule to a prompt and its continuations."""
    longest = max(len(ids) for ids, _ in continuations)
    prompt_floor = min(max_prompt_len, max_seq_len - 1)  # leave room for at least one response token
    if len(prompt[0]) + longest > max_seq_len:
        prompt = truncate_prompt(*prompt, max(prompt_floor, max_seq_len - longest), bos_id)
    room = max_seq_len - len(prompt[0])
    return prompt, [(ids[:room], mask[:room]) for ids, mask in continuations]


def int32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def boolean(values) -> np.ndarray:
    return np.asarray(values, dtype=np.bool_)


def tokenize_pair(pair: PreferencePair, tokenizer: Tokenizer, template: str, max_seq_len: int,
                  max_prompt_len: int, score_all: bool) -> dict:
    """One paired example (see the module docstring).

    Raises:
        ValueError: the pair cannot be rendered, or is unusable after truncation (message = drop reason).
    """
    prompt_ids = render_conversation(pair.prompt, tokenizer, template, add_generation_prompt=True)[0]
    chosen_ids, chosen_mask, prompt_mask = render_continuation(pair.prompt, pair.chosen, prompt_ids, tokenizer,
                                                               template, score_all)
    rejected_ids, rejected_mask, _ = render_continuation(pair.prompt, pair.rejected, prompt_ids, tokenizer,
                                                         template, score_all)
    (prompt_ids, prompt_mask), [(chosen_ids, chosen_mask), (rejected_ids, rejected_mask)] = fit_lengths(
        (prompt_ids, prompt_mask), [(chosen_ids, chosen_mask), (rejected_ids, rejected_mask)], max_seq_len,
        max_prompt_len, tokenizer.bos_id)
    if chosen_ids == rejected_ids:
        raise ValueError(IDENTICAL)
    if not any(chosen_mask) or not any(rejected_mask):
        raise ValueError(EMPTY)
    return {"prompt": int32(prompt_ids), "prompt_mask": boolean(prompt_mask), "chosen": int32(chosen_ids),
            "chosen_mask": boolean(chosen_mask), "rejected": int32(rejected_ids),
            "rejected_mask": boolean(rejected_mask)}


def tokenize_unpaired(example: UnpairedExample, tokenizer: Tokenizer, template: str, max_seq_len: int,
                      max_prompt_len: int, score_all: bool) -> dict:
    """One KTO example without its ``kl_index`` (see ``add_kl_pairs``)."""
    prompt_ids = render_conversation(example.prompt, tokenizer, template, add_generation_prompt=True)[0]
    ids, mask, prompt_mask = render_continuation(example.prompt, example.completion, prompt_ids, tokenizer,
                                                 template, score_all)
    (prompt_ids, prompt_mask), [(ids, mask)] = fit_lengths((prompt_ids, prompt_mask), [(ids, mask)],
                                                           max_seq_len, max_prompt_len, tokenizer.bos_id)
    if not any(mask):
        raise ValueError(EMPTY)
    return {"prompt": int32(prompt_ids), "prompt_mask": boolean(prompt_mask), "completion": int32(ids),
            "completion_mask": boolean(mask), "desirable": bool(example.desirable)}


def tokenize_records(records: Sequence, tokenizer: Tokenizer, template: str, max_seq_len: int,
                     max_prompt_len: int, score_all: bool, report: ParseReport) -> list[dict]:
    """Tokenizes pairs or unpaired examples, moving unusable records to ``report``'s skipped counts."""
    tokenize = tokenize_unpaired if records and isinstance(records[0], UnpairedExample) else tokenize_pair
    examples = []
    for record in tqdm(records, desc="tokenizing", unit="ex", disable=None):
        try:
            examples.append(tokenize(record, tokenizer, template, max_seq_len, max_prompt_len, score_all))
        except ValueError as err:  # this module's own reasons are short and stable; others carry row text
            reason = str(err)
            own = reason in (RETOKENIZED, IDENTICAL, EMPTY)
            report.drop(record.source, *((reason,) if own else ("template error", reason)))
    return examples


def add_kl_pairs(examples: list[dict], spare: dict | None = None) -> None:
    """Gives every KTO example the completion of its neighbour ``(i + 1) mod n`` as its mismatched completion.

    As in TRL, the KL reference point z0 is estimated from prompts paired with completions written for other
    prompts; shifting by one guarantees a different example whenever there are two or more. A lone example
    takes the completion of ``spare`` (an example of the other split) if given.
    """
    for i, example in enumerate(examples):
        other = spare if len(examples) == 1 and spare is not None else examples[(i + 1) % len(examples)]
        example["kl_completion"], example["kl_completion_mask"] = other["completion"], other["completion_mask"]


def is_unpaired_dataset(examples: Sequence[dict]) -> bool:
    return bool(examples) and "completion" in examples[0]


def paired_sequences(example: dict) -> list[TokenSequence]:
    """``prompt + chosen`` and ``prompt + rejected`` with their score masks."""
    return [(np.concatenate([example["prompt"], example[side]]),
             np.concatenate([example["prompt_mask"], example[f"{side}_mask"]])) for side in ("chosen", "rejected")]


def completion_sequence(example: dict) -> TokenSequence:
    """``prompt + completion`` of a KTO example with its score mask."""
    return (np.concatenate([example["prompt"], example["completion"]]),
            np.concatenate([example["prompt_mask"], example["completion_mask"]]))


def kl_sequence(example: dict, max_seq_len: int) -> TokenSequence:
    """This prompt followed by the mismatched completion, cut to ``max_seq_len``; only the completion is scored."""
    room = max(max_seq_len - len(example["prompt"]), 1)
    return (np.concatenate([example["prompt"], example["kl_completion"][:room]]),
            np.concatenate([np.zeros_like(example["prompt_mask"]), example["kl_completion_mask"][:room]]))


def all_sequences(examples: Sequence[dict], max_seq_len: int) -> list[TokenSequence]:
    """Every sequence whose reference log-prob is stored, two per example, in example order."""
    if is_unpaired_dataset(examples):
        return [s for e in examples for s in (completion_sequence(e), kl_sequence(e, max_seq_len))]
    return [s for e in examples for s in paired_sequences(e)]


def store_reference(examples: list[dict], logps: np.ndarray) -> None:
    """Writes the two reference log-probs of every example (see ``all_sequences`` for the order)."""
    keys = ("ref_logps", "ref_kl_logps") if is_unpaired_dataset(examples) else ("ref_chosen_logps",
                                                                                "ref_rejected_logps")
    for i, example in enumerate(examples):
        example[keys[0]], example[keys[1]] = np.float32(logps[2 * i]), np.float32(logps[2 * i + 1])


def length_sorted_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Groups indices, longest first, into batches of at most ``max_batch_size`` sequences whose padded size
    ``batch_size x longest`` stays within ``max_batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1 > max_batch_size or
                        (len(current) + 1) * lengths[current[0]] > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def sequences_digest(sequences: Sequence[TokenSequence]) -> str:
    """SHA-256 of the token ids and masks, to tell whether a cached precompute belongs to this data."""
    digest = hashlib.sha256()
    for ids, mask in sequences:
        digest.update(len(ids).to_bytes(8, "little"))  # so that no two different lists hash alike
        digest.update(ids.tobytes())
        digest.update(mask.tobytes())
    return digest.hexdigest()


def read_manifest(path: Path) -> Any:
    """A cache manifest's key, or None when it does not read back (the cache is then discarded)."""
    try:
        return read_json(path)
    except ValueError:
        return None


class PrecomputeCache:
    """Chunks of finished reference log-probs in ``cache_dir``, valid only for one (data, model, batching) key.

    ``manifest.json`` records the key; a cache whose key differs (or whose manifest does not read back) is
    discarded. Each chunk ``chunk-000012.safetensors`` holds ``indices`` (int64) and ``logps`` (float32) and is
    written atomically.
    """

    def __init__(self, cache_dir: Path, key: dict):
        self.dir = cache_dir
        manifest = cache_dir / "manifest.json"
        if cache_dir.exists() and (not manifest.is_file() or read_manifest(manifest) != key):
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(manifest, key)

    def load(self, logps: np.ndarray, done: np.ndarray) -> int:
        """Fills ``logps``/``done`` from saved chunks; returns the number of chunks found."""
        chunks = sorted(self.dir.glob("chunk-*.safetensors"))
        for path in chunks:
            chunk = load_arrays(path)[0]
            logps[chunk["indices"]] = chunk["logps"]
            done[chunk["indices"]] = True
        return len(chunks)

    def save(self, number: int, indices: list[int], values: list[float]) -> None:
        save_arrays({"indices": np.asarray(indices, dtype=np.int64), "logps": np.asarray(values, dtype=np.float32)},
                    self.dir / f"chunk-{number:06d}.safetensors")


@torch.inference_mode()
def batch_logps(model, sequences: Sequence[TokenSequence], pad_id: int, device) -> np.ndarray:
    """Summed scored log-probs of right-padded sequences in one forward pass."""
    tokens = pad_sequences([ids for ids, _ in sequences], pad_id, torch.long).to(device)
    mask = pad_sequences([mask for _, mask in sequences], False, torch.bool).to(device)
    return sequence_logps(model, tokens, mask)[0].cpu().numpy()


def compute_reference_logps(model, sequences: Sequence[TokenSequence], pad_id: int, device, cache_dir: Path,
                            cache_key: dict, max_batch_tokens: int = 8192, max_batch_size: int = 64,
                            chunk_batches: int = 16, on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
    """Reference log-probs of every sequence, resumable through ``cache_dir`` (see ``PrecomputeCache``).

    Args:
        model: The reference model (eval mode).
        sequences: ``(ids, mask)`` pairs.
        pad_id: Padding id (padding is never scored).
        device: Where batches go.
        cache_dir: Folder for finished chunks; removed by the caller once the dataset is written.
        cache_key: Identifies the data, model and batching; a cache with another key is discarded.
        max_batch_tokens / max_batch_size: Batch limits (padded tokens / sequences).
        chunk_batches: Batches per saved chunk.
        on_chunk: Called with the chunk number after each save (tests use it to simulate a crash).

    Returns:
        float32 ``[len(sequences)]``.
    """
    batches = length_sorted_batches([len(ids) for ids, _ in sequences], max_batch_tokens, max_batch_size)
    cache = PrecomputeCache(cache_dir, {**cache_key, "data": sequences_digest(sequences),
                                        "max_batch_tokens": max_batch_tokens, "max_batch_size": max_batch_size})
    logps, done = np.zeros(len(sequences), dtype=np.float32), np.zeros(len(sequences), dtype=np.bool_)
    chunk_number = cache.load(logps, done)
    todo = [batch for batch in batches if not done[batch].all()]
    pending_idx, pending_val = [], []
    progress = tqdm(total=len(sequences), initial=int(done.sum()), desc="reference log-probs", unit="seq", disable=None)
    with progress as bar:
        for n, batch in enumerate(todo, 1):
            values = batch_logps(model, [sequences[i] for i in batch], pad_id, device)
            logps[batch] = values
            pending_idx += batch
            pending_val += values.tolist()
            bar.update(len(batch))
            if n % chunk_batches == 0 or n == len(todo):
                cache.save(chunk_number, pending_idx, pending_val)
                pending_idx, pending_val = [], []
                if on_chunk is not None:
                    on_chunk(chunk_number)
                chunk_number += 1
    return logps


def reference_fingerprint(weights_sha256: str, lora_sha256: str | None, quant: dict | None, dtype: str,
                          experts_backend: str | None, tokenizer_fingerprint: str, template: str,
                          autocast: str | None = None) -> dict:
    """What the reference log-probs depend on, plus a digest of it all under ``"digest"``.

    A policy may train on the dataset only if it starts from the same weights and adapter, with the same
    quantization, dtype, autocast (``"bf16"`` under CUDA mixed precision, else None) and MoE experts backend
    (the C++ kernel computes in bf16), tokenizer and template: otherwise "policy = reference" at step 0 is false
    and the DPO log-ratios are biased from the first step.
    """
    parts = {"weights_sha256": weights_sha256, "lora_sha256": lora_sha256, "quant": quant, "dtype": dtype,
             "autocast": autocast, "experts_backend": experts_backend,
             "tokenizer_fingerprint": tokenizer_fingerprint, "template": template}
    return {**parts, "digest": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()}


def fingerprint_mismatches(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between a dataset's recorded reference and ``actual`` (a
    ``reference_fingerprint``); only the fingerprinted parts count, not e.g. the paths recorded beside them."""
    return [f"{key}: dataset has {expected.get(key)!r}, policy has {actual[key]!r}"
            for key in sorted(actual) if key != "digest" and expected.get(key) != actual[key]]


def model_fingerprint(model, ckpt_dir: str | Path, lora_dir: str | Path | None, dtype: str, tokenizer: Tokenizer,
                      template: str, weights_sha256: str | None = None, autocast: str | None = None) -> dict:
    """``reference_fingerprint`` of a loaded model: its checkpoint (``weights_sha256`` if the caller already
    hashed it), adapter, actual 4-bit layout, dtype and autocast."""
    return reference_fingerprint(weights_sha256 or checkpoint_fingerprint(ckpt_dir),
                                 adapter_fingerprint(lora_dir) if lora_dir else None,
                                 quantization_summary(model), dtype, getattr(model.args, "experts_backend", None),
                                 tokenizer.fingerprint(), template, autocast)
