"""dpo_llama.models.checkpoint: what an interrupted save leaves, weights stored twice, shards and fingerprints."""

import json

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


def test_params_the_model_cannot_be_built_with_name_the_file(tmp_path):
    save_model(Transformer(get_preset("tiny")), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_kv_heads": 3}))
    with pytest.raises(ValueError) as error:
        checkpoint.read_params(tmp_path / "ckpt")
    assert str(error.value) == f"{path}: n_heads=4 must be a multiple of n_kv_heads=3"


@pytest.mark.parametrize(("layout", "message"), [
    ([], "model checkpoint directory not found: "),
    (["run"], r"run/params\.json not found: is .*run a dpo_llama checkpoint directory\?"),
    (["run/lora_config.json"], ("run holds a LoRA adapter, not a model: merge it onto its base with "
                                r"scripts/convert_lora_checkpoint\.py")),
    (["run/step-000002/lora_config.json"], "run holds a LoRA adapter, not a model"),
])
def test_a_directory_that_is_no_model_says_what_it_is(tmp_path, layout, message):
    """A misspelt model path, or a LoRA run given where a model goes, is named as such (not as a missing tokenizer,
    which is what the run scripts looked for first before)."""
    for path in layout:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".json"):
            (tmp_path / path).write_text("{}")
        else:
            (tmp_path / path).mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        checkpoint.read_params(tmp_path / "run")


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


def test_shards_respect_the_limit_and_are_numbered_from_one(tmp_path):
    """Tensors of 400, 400, 400 and 1200 bytes with a 1000-byte limit: greedy shards [a, b], [c], [d] (a shard
    only closes when the next tensor would overflow it; a lone tensor over the limit gets its own), named
    model-00001..3-of-00003, with an index naming each tensor's shard and the 2400-byte total."""
    writer = checkpoint.ShardedWriter(tmp_path, max_shard_bytes=1000)
    for key, n in (("a", 100), ("b", 100), ("c", 100), ("d", 300)):
        writer.add(key, torch.zeros(n))
    files = writer.close()
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [f.name for f in files] == [*names, checkpoint.INDEX_FILE]
    index = json.loads((tmp_path / checkpoint.INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 2400},
                     "weight_map": {"a": names[0], "b": names[0], "c": names[1], "d": names[2]}}


def test_the_fingerprint_covers_params_every_shard_and_whole_files(tmp_path):
    """Another rope_theta in params.json, a changed tensor in the last of several shards, and a changed last
    byte of a file read in 4-byte chunks each change the fingerprint."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    checkpoint.save_checkpoint(tmp_path / "a", model.args, model.state_dict().items(), max_shard_bytes=50_000)
    shards = checkpoint.weight_files(tmp_path / "a")
    assert len(shards) > 2
    base = checkpoint.checkpoint_fingerprint(tmp_path / "a")
    text = (tmp_path / "a" / "params.json").read_text()
    (tmp_path / "a" / "params.json").write_text(json.dumps({**json.loads(text), "rope_theta": 5e5}))
    assert checkpoint.checkpoint_fingerprint(tmp_path / "a") != base
    (tmp_path / "a" / "params.json").write_text(text)
    assert checkpoint.checkpoint_fingerprint(tmp_path / "a") == base
    last = dict(iter_safetensors([shards[-1]]))
    save_file({key: value + 1 for key, value in last.items()}, shards[-1], metadata={"format": "pt"})
    assert checkpoint.checkpoint_fingerprint(tmp_path / "a") != base
    data = bytearray(shards[0].read_bytes())
    before = checkpoint.files_sha256([shards[0]], chunk_bytes=4)
    data[-1] ^= 1
    shards[0].write_bytes(bytes(data))
    assert checkpoint.files_sha256([shards[0]], chunk_bytes=4) != before


def test_weights_that_disagree_with_params_are_refused(tmp_path):
    """params.json says hidden_dim 100 while the MLP weights were saved with the preset's width: loading names
    the first tensor of the wrong shape."""
    save_model(Transformer(get_preset("tiny")), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "hidden_dim": 100}))
    with pytest.raises(ValueError, match=r"shape mismatch for layers\.0\.mlp"):
        checkpoint.load_model(tmp_path)


def test_an_interrupted_atomic_write_leaves_the_file_and_no_temporary(tmp_path):
    """The writer fails half-way: the old file is intact and no temporary file remains beside it."""
    path = tmp_path / "params.json"
    path.write_text("old")

    def write_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomically(path, write_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["params.json"]
    checkpoint.write_atomically(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["params.json"]
