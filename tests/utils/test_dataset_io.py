"""dpo_llama.utils.dataset_io: the split and the dataset directory's write order."""

import pytest

from dpo_llama.utils import dataset_io
from dpo_llama.utils.dataset_io import META_FILE, read_dataset, split_train_val, write_dataset


def test_split_holds_out_at_least_one_and_keeps_one_for_training():
    assert [len(part) for part in split_train_val(list(range(10)), 0.25, seed=0)] == [8, 2]
    assert [len(part) for part in split_train_val(list(range(10)), 0.01, seed=0)] == [9, 1]
    assert [len(part) for part in split_train_val(list(range(2)), 0.9, seed=0)] == [1, 1]
    assert split_train_val(list(range(10)), 0.3, seed=4) == split_train_val(list(range(10)), 0.3, seed=4)


def test_a_rebuild_interrupted_after_its_first_file_reads_as_no_dataset(tmp_path, monkeypatch):
    """The old meta goes before the new pickles come: new train data under the old meta (and its reference
    fingerprint) can never be read back."""
    write_dataset(tmp_path, [{"a": 1}], [{"a": 2}], {"version": "old"})
    assert read_dataset(tmp_path)[2] == {"version": "old"}
    real_save = dataset_io.save_pickle

    def save_then_die(obj, path):
        if path.name != dataset_io.TRAIN_FILE:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(dataset_io, "save_pickle", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, [{"a": 3}], [{"a": 4}], {"version": "new"})
    assert not (tmp_path / META_FILE).exists()
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path)
