"""Tests for dpo_llama.utils.safe_pickle: atomic saving and allow-list loading."""

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest

from dpo_llama.utils.safe_pickle import UnsafePickleError, load_pickle, save_pickle


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious dataset file would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def realistic_dataset():
    """Shaped like the tokenized SFT/DPO pickles: lists of dicts of arrays and plain values."""
    return [
        {
            "prompt_ids": np.array([1, 15043, 29892], dtype=np.int32),
            "chosen_ids": np.arange(7, dtype=np.int32),
            "loss_mask": np.array([False, True, True]),
            "ref_logps": np.array([-1.5, -0.25], dtype=np.float32),
            "ref_logp_sum": np.float32(-1.75),
            "scores": np.linspace(0, 1, 6, dtype=np.float64).reshape(2, 3)[:, ::2],  # non-contiguous
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
            "bytes": np.frombuffer(b"\x00\xff", dtype=np.uint8),
            "half": np.array([0.5], dtype=np.float16),
            "empty": np.zeros((0, 4), dtype=np.int32),
            "source": "hh-rlhf",
            "id": 3,
            "weight": 0.5,
            "tags": ("a", None, True),
            "raw": b"\x00bytes",
            "nested": {"lengths": [3, 7], "labels": {"ok": [np.int32(1)]}},
        },
        {"prompt_ids": np.array([1], dtype=np.int32), "source": "", "id": -1, "weight": float("inf")},
    ]


def assert_same(actual, expected):
    assert type(actual) is type(expected)
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    else:
        assert actual == expected


def test_round_trip_of_realistic_data(tmp_path):
    data = realistic_dataset()
    save_pickle(data, tmp_path / "data" / "train.pkl")
    assert_same(load_pickle(tmp_path / "data" / "train.pkl"), data)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_loads_python3_pickle_protocols(tmp_path, protocol):
    """Protocols 3 (Python 3.0-3.7 default), 4 (3.8+ default) and 5 (save_pickle's)."""
    data = realistic_dataset()
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
    assert_same(load_pickle(tmp_path / "d.pkl"), data)


def test_loads_numpy_1x_module_names(tmp_path):
    """Protocol-3 pickles name globals as text lines, so numpy 2's ``numpy._core`` can be
    rewritten to numpy 1's ``numpy.core`` to fake a file written by numpy 1.x."""
    data = {"ids": np.arange(4, dtype=np.int32), "logp": np.float32(-2.5)}
    raw = pickle.dumps(data, protocol=3)
    assert b"numpy._core.multiarray" in raw
    (tmp_path / "old.pkl").write_bytes(raw.replace(b"numpy._core", b"numpy.core"))
    assert_same(load_pickle(tmp_path / "old.pkl"), data)


@pytest.mark.parametrize(
    ("make_payload", "refused"),
    [
        (lambda marker: Payload(os.system, f"touch {marker}"), "system"),
        (lambda marker: Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (lambda marker: Payload(builtins.exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
        (lambda marker: Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        (lambda marker: Payload(np.save, str(marker), np.zeros(1)), "numpy.save"),
        (lambda marker: [{"ids": np.arange(3)}, {"x": Payload(os.system, f"touch {marker}")}], "system"),
    ],
    ids=["os.system", "eval", "exec", "subprocess", "numpy.save", "nested-in-data"],
)
def test_refuses_malicious_pickles(tmp_path, make_payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(make_payload(marker)))
    with pytest.raises(UnsafePickleError, match=refused) as error:
        load_pickle(path)
    assert str(path) in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "pwned.npy").exists()


def test_refuses_handwritten_protocol_0_exploit(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(UnsafePickleError, match=r"'os\.system'"):
        load_pickle(path)
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "train.pkl"
    save_pickle({"v": 1}, path)
    save_pickle({"v": 2}, path)
    assert load_pickle(path) == {"v": 2}
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_pickle({"v": lambda: 3}, path)  # fails mid-write: the old file must survive
    assert load_pickle(path) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["train.pkl"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_pickle(tmp_path / "missing.pkl")


def test_truncated_or_empty_pickle_is_a_value_error_naming_the_file(tmp_path):
    """A dataset pickle cut short (or empty) raises one ValueError that names it (the run scripts print it as
    one error line); a refused global is a ValueError too."""
    save_pickle([{"tokens": np.arange(100, dtype=np.int32)}] * 20, tmp_path / "train.pkl")
    data = (tmp_path / "train.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pkl").write_bytes(b"")
    for name in ("cut.pkl", "empty.pkl"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable dataset pickle"):
            load_pickle(tmp_path / name)
    assert issubclass(UnsafePickleError, ValueError)
