"""dpo_llama.utils.dataset_io: the split, the examples' safetensors files and the dataset directory's write order."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from dpo_llama.utils import dataset_io
from dpo_llama.utils.dataset_io import (META_FILE, TRAIN_FILE, VAL_FILE, dataset_fingerprint, load_examples,
                                        read_dataset, save_examples, split_train_val, write_dataset)


def test_split_holds_out_at_least_one_and_keeps_one_for_training():
    assert [len(part) for part in split_train_val(list(range(10)), 0.25, seed=0)] == [8, 2]
    assert [len(part) for part in split_train_val(list(range(10)), 0.01, seed=0)] == [9, 1]
    assert [len(part) for part in split_train_val(list(range(2)), 0.9, seed=0)] == [1, 1]
    assert split_train_val(list(range(10)), 0.3, seed=4) == split_train_val(list(range(10)), 0.3, seed=4)


def kto_examples() -> list[dict]:
    """Arrays of other lengths (one empty) and dtypes, float32 / bool / int numbers, as the builders write."""
    rng = np.random.default_rng(0)
    return [{"prompt": rng.integers(0, 500, n).astype(np.int32), "prompt_mask": np.zeros(n, dtype=bool),
             "completion": rng.integers(0, 500, m).astype(np.int32), "completion_mask": np.ones(m, dtype=bool),
             "desirable": bool(i % 2), "ref_logps": np.float32(-1.5 * i), "count": i}
            for i, (n, m) in enumerate([(3, 2), (7, 0), (1, 5)])]


def test_examples_round_trip_by_column(tmp_path):
    """Every array comes back with its values and dtype, every number with its value; an empty split too."""
    examples = kto_examples()
    save_examples(examples, tmp_path / "train.safetensors")
    loaded = load_examples(tmp_path / "train.safetensors")
    assert [list(e) for e in loaded] == [list(e) for e in examples]
    for got, want in zip(loaded, examples):
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                assert got[key].dtype == value.dtype and np.array_equal(got[key], value)
            else:
                assert got[key] == value
    assert loaded[1]["ref_logps"].dtype == np.float32 and bool(loaded[1]["desirable"]) is True
    save_examples([], tmp_path / "empty.safetensors")
    assert load_examples(tmp_path / "empty.safetensors") == []
    save_examples(examples, tmp_path / "again.safetensors")  # same bytes: a resume compares their hash
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "train.safetensors").read_bytes()


def test_a_dataset_directory_round_trips_each_split_and_its_fingerprint_covers_every_file(tmp_path):
    """write_dataset then read_dataset gives back train (2 examples), validation (1) and meta as written; rewriting
    any one of the three files changes the dataset's fingerprint."""
    examples = kto_examples()
    write_dataset(tmp_path, examples[:2], examples[2:], {"kind": "kto"})
    train, validation, meta = read_dataset(tmp_path)
    assert [int(e["count"]) for e in train] == [0, 1] and [int(e["count"]) for e in validation] == [2]
    assert meta == {"kind": "kto"}
    before = dataset_fingerprint(tmp_path)
    save_examples(examples[:1], tmp_path / VAL_FILE)
    after_val = dataset_fingerprint(tmp_path)
    save_examples(examples[1:], tmp_path / TRAIN_FILE)
    after_train = dataset_fingerprint(tmp_path)
    (tmp_path / META_FILE).write_text('{"kind": "other"}')
    assert len({before, after_val, after_train, dataset_fingerprint(tmp_path)}) == 4


def test_examples_that_cannot_be_stored_by_column_are_refused(tmp_path):
    examples = kto_examples()
    del examples[2]["count"]
    with pytest.raises(ValueError, match="every example must have the keys"):
        save_examples(examples, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="'tokens': every example must hold a 1-D array"):
        save_examples([{"tokens": np.zeros(2)}, {"tokens": np.zeros((2, 2))}], tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="'name': every example must hold a number or a 1-D array"):
        save_examples([{"name": "x"}], tmp_path / "c.safetensors")


def test_unreadable_or_old_pickle_datasets_are_one_clear_error(tmp_path):
    """A truncated split names its file; a directory written by an older version (train.pkl) asks for a rebuild
    and is never unpickled (a pickle can run code)."""
    write_dataset(tmp_path / "d", kto_examples(), kto_examples()[:1], {"kind": "preference"})
    data = (tmp_path / "d" / TRAIN_FILE).read_bytes()
    (tmp_path / "d" / TRAIN_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"train\.safetensors is not a readable safetensors file"):
        read_dataset(tmp_path / "d")
    old = tmp_path / "old"
    old.mkdir()
    (old / META_FILE).write_text('{"kind": "sft"}')
    (old / "train.pkl").write_bytes(pickle.dumps([{"tokens": np.arange(3)}]))
    with pytest.raises(ValueError, match=r"old pickle format \(train\.pkl\): rebuild it"):
        read_dataset(old)


def test_a_rebuild_interrupted_after_its_first_file_reads_as_no_dataset(tmp_path, monkeypatch):
    """The old meta goes before the new splits come: new train data under the old meta (and its reference
    fingerprint) can never be read back."""
    write_dataset(tmp_path, [{"a": 1}], [{"a": 2}], {"version": "old"})
    assert read_dataset(tmp_path)[2] == {"version": "old"}
    real_save = dataset_io.save_examples

    def save_then_die(examples, path):
        if path.name != dataset_io.TRAIN_FILE:
            raise KeyboardInterrupt
        real_save(examples, path)

    monkeypatch.setattr(dataset_io, "save_examples", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, [{"a": 3}], [{"a": 4}], {"version": "new"})
    assert not (tmp_path / META_FILE).exists()
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path)


def test_meta_json_is_utf8_whatever_the_locale(tmp_path):
    """Under an ASCII locale (LC_ALL=C, no UTF-8 mode) a non-ASCII path in meta.json still writes and reads back."""
    path = tmp_path / "meta.json"
    code = ("import sys; from dpo_llama.utils.dataset_io import read_json, write_json; name = 'caf\\u00e9.jsonl'; "
            "write_json(sys.argv[1], {'input': name}); print(read_json(sys.argv[1])['input'] == name)")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
