"""dpo_llama.models.checkpoint: what an interrupted save leaves, and weights stored twice."""

import pytest
import torch
from safetensors.torch import save_file

from dpo_llama.models import checkpoint
from dpo_llama.models.checkpoint import iter_safetensors, save_model
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset


def test_an_interrupted_save_leaves_no_temporary_shard(tmp_path, monkeypatch):
    """Ctrl-C while the last (here the only) shard is written: its temporary file is removed too."""
    real_save = checkpoint.save_file

    def write_then_interrupt(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(Transformer(get_preset("tiny")), tmp_path)
    assert list(tmp_path.glob(".shard-*")) == []


def test_a_weight_stored_in_two_files_is_refused(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.full((2,), 42.0)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="'a' is stored in both one.safetensors and two.safetensors"):
        list(iter_safetensors([tmp_path / "one.safetensors", tmp_path / "two.safetensors"]))


def test_truncated_weights_or_invalid_json_name_the_file(tmp_path):
    """A truncated safetensors file and a params.json that is not JSON each raise a ValueError naming the file,
    instead of the safetensors / json exception without one."""
    save_model(Transformer(get_preset("tiny")), tmp_path / "ckpt")
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        checkpoint.load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "params.json").write_text('{"dim": 64,')
    with pytest.raises(ValueError, match=r"params\.json is not valid JSON"):
        checkpoint.read_params(tmp_path / "ckpt")


def test_a_save_interrupted_after_its_weights_reads_as_no_checkpoint(tmp_path, monkeypatch):
    """Saving B over A, killed once B's weights are in place: the directory has no params.json (A's would
    describe B's weights wrongly), so loading it fails instead of loading a model that is neither."""
    save_model(Transformer(get_preset("tiny")), tmp_path / "ckpt")
    real_copy = checkpoint.shutil.copy2

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "copy2", die)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(KeyboardInterrupt):
        save_model(Transformer(get_preset("tiny", rope_theta=5e5)), tmp_path / "ckpt", [tmp_path / "tokenizer.model"])
    monkeypatch.setattr(checkpoint.shutil, "copy2", real_copy)
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        checkpoint.load_model(tmp_path / "ckpt")
