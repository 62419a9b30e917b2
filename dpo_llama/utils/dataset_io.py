"""Tokenized datasets on disk: ``train.pkl``, ``validation.pkl`` and ``meta.json`` in one directory.

Each ``.pkl`` is a list of dicts of numpy arrays (int32 token ids, bool masks, float32 log-probs) and plain
numbers, written atomically and read back through the allow-list unpickler of ``safe_pickle`` (a pickle from
elsewhere cannot run code). ``meta.json`` says how the data was built: inputs, template, tokenizer
fingerprint, counts, token statistics and how many rows were dropped and why.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpo_llama.models.checkpoint import files_sha256, read_json
from dpo_llama.utils.safe_pickle import load_pickle, save_pickle

TRAIN_FILE = "train.pkl"
VAL_FILE = "validation.pkl"
META_FILE = "meta.json"


def check_val_ratio(val_ratio: float) -> None:
    """Raises ``ValueError`` unless ``0 <= val_ratio < 1``."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")


def split_train_val(items: list, val_ratio: float, seed: int) -> tuple[list, list]:
    """Shuffles ``items`` with ``seed`` and holds out ``round(val_ratio * n)`` of them: at least 1 if the ratio is
    positive, at most ``n - 1`` (training keeps at least one)."""
    check_val_ratio(val_ratio)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_ratio * len(items))), len(items) - 1) if val_ratio > 0 and len(items) > 1 else 0
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Min / mean / max / total of a list of lengths (all 0 when empty)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "max": 0, "total": 0}
    arr = np.asarray(lengths)
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 2), "max": int(arr.max()), "total": int(arr.sum())}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def write_dataset(out_dir: str | os.PathLike, train: list[dict], validation: list[dict], meta: dict) -> None:
    """Writes the three files of a dataset directory, meta last and an older meta removed first: a directory with
    a meta is complete, and a rebuild interrupted half-way is read as no dataset, never as new data under an old
    meta (whose reference fingerprint would no longer describe the log-probs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    save_pickle(train, out_dir / TRAIN_FILE)
    save_pickle(validation, out_dir / VAL_FILE)
    write_json(out_dir / META_FILE, meta)


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Reads ``meta.json`` of a dataset directory."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the dataset first (scripts/build_*_datasets.py)")
    return read_json(path)


def dataset_fingerprint(data_dir: str | os.PathLike) -> str:
    """SHA-256 of a dataset's three files: a run resumed on a rebuilt dataset would continue its sampler's
    position in other data."""
    return files_sha256([Path(data_dir) / name for name in (META_FILE, TRAIN_FILE, VAL_FILE)])


def read_dataset(data_dir: str | os.PathLike) -> tuple[list[dict], list[dict], dict]:
    """Loads ``(train, validation, meta)`` of a dataset directory through the allow-list unpickler."""
    meta = read_meta(data_dir)
    return load_pickle(Path(data_dir) / TRAIN_FILE), load_pickle(Path(data_dir) / VAL_FILE), meta


def check_dataset_kind(meta: dict, kind: str, data_dir: str | os.PathLike) -> None:
    """Refuses a dataset built for another stage (e.g. SFT data given to the DPO trainer)."""
    if meta.get("kind") != kind:
        raise ValueError(f"{data_dir} holds a {meta.get('kind')!r} dataset, but this stage needs {kind!r}")
