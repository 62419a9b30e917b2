"""Tokenized datasets on disk: ``train.safetensors``, ``validation.safetensors`` and ``meta.json`` in one directory.

A split is a list of examples, dicts of 1-D numpy arrays (int32 token ids, bool masks) and numbers (float32
log-probs, bool labels), every example with the same keys. It is stored by column in a safetensors file: a key
holding arrays becomes their concatenation ``key`` plus ``key.offsets`` (``offsets[i]:offsets[i+1]`` is example
i's array), a key holding numbers one array of them. safetensors files hold only tensors and a JSON header, so
loading a dataset from elsewhere cannot run code (the ancestor's pickles could, and so could a pickle allow-list:
numpy's own array and dtype reconstruction accepts forged object pointers). ``meta.json`` says how the data was
built: inputs, template, tokenizer fingerprint, counts, token statistics and how many rows were dropped and why.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dpo_llama.models.checkpoint import files_sha256, read_json, write_atomically

TRAIN_FILE = "train.safetensors"
VAL_FILE = "validation.safetensors"
META_FILE = "meta.json"
OFFSETS = ".offsets"
FORMAT = "dpo_llama examples v1"


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
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes numpy arrays to a safetensors file atomically (:func:`write_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata))


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and the metadata of a safetensors file; a ``ValueError`` naming the file if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): rebuild it") from None


def save_examples(examples: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Stores a split by column (see the module docstring).

    Raises:
        ValueError: the examples do not all have the same keys, or a value is neither a 1-D array nor a number.
    """
    keys = list(examples[0]) if examples else []
    if any(list(example) != keys for example in examples):
        raise ValueError(f"every example must have the keys {keys}")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        values = [example[key] for example in examples]
        if isinstance(values[0], np.ndarray):
            if any(not isinstance(v, np.ndarray) or v.ndim != 1 for v in values):
                raise ValueError(f"{key!r}: every example must hold a 1-D array")
            arrays[key] = np.concatenate(values)
            arrays[key + OFFSETS] = np.cumsum([0] + [len(v) for v in values], dtype=np.int64)
        else:
            arrays[key] = np.asarray(values)
            if arrays[key].ndim != 1 or arrays[key].dtype.kind not in "biuf":
                raise ValueError(f"{key!r}: every example must hold a number or a 1-D array")
    # one metadata entry: safetensors writes several in a varying order, and the file's hash must not vary
    save_arrays(arrays, path, {FORMAT: json.dumps({"examples": len(examples), "keys": keys})})


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a split written by :func:`save_examples` (arrays are views into one buffer per column)."""
    arrays, metadata = load_arrays(path)
    if FORMAT not in metadata:
        raise ValueError(f"{path} is not a dpo_llama dataset file (no {FORMAT!r} metadata)")
    layout = json.loads(metadata[FORMAT])
    columns = {}
    for key in layout["keys"]:
        if key + OFFSETS in arrays:
            offsets = arrays[key + OFFSETS]
            columns[key] = np.split(arrays[key], offsets[1:-1])
        else:
            columns[key] = list(arrays[key])
    return [{key: column[i] for key, column in columns.items()} for i in range(layout["examples"])]


def write_dataset(out_dir: str | os.PathLike, train: list[dict], validation: list[dict], meta: dict) -> None:
    """Writes the three files of a dataset directory, meta last and an older meta removed first: a directory with
    a meta is complete, and a rebuild interrupted half-way is read as no dataset, never as new data under an old
    meta (whose reference fingerprint would no longer describe the log-probs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    save_examples(train, out_dir / TRAIN_FILE)
    save_examples(validation, out_dir / VAL_FILE)
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
    """Loads ``(train, validation, meta)`` of a dataset directory.

    Raises:
        ValueError: the directory holds a dataset written by an older version (``train.pkl``): rebuild it.
    """
    meta = read_meta(data_dir)
    if (Path(data_dir) / "train.pkl").is_file() and not (Path(data_dir) / TRAIN_FILE).is_file():
        raise ValueError(f"{data_dir} holds a dataset in the old pickle format (train.pkl): rebuild it with "
                         "scripts/build_*_datasets.py")
    return load_examples(Path(data_dir) / TRAIN_FILE), load_examples(Path(data_dir) / VAL_FILE), meta


def check_dataset_kind(meta: dict, kind: str, data_dir: str | os.PathLike) -> None:
    """Refuses a dataset built for another stage (e.g. SFT data given to the DPO trainer)."""
    if meta.get("kind") != kind:
        raise ValueError(f"{data_dir} holds a {meta.get('kind')!r} dataset, but this stage needs {kind!r}")
