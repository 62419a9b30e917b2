"""scripts/convert_hf_checkpoint.py and scripts/convert_meta_checkpoint.py on files in the real formats."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_llama.models.checkpoint import (INDEX_FILE, TOKENIZER_FILES, iter_safetensors, load_model, read_params,
                                        weight_files)
from dpo_llama.models.convert_hf import llama_args_from_hf, rope_settings
from dpo_llama.models.convert_meta import meta_args, meta_hidden_dim
from scripts.convert_hf_checkpoint import main as convert_hf
from scripts.convert_meta_checkpoint import main as convert_meta
from tests.model_fixtures import TINY_HF_LLAMA, make_hf_llama, write_meta_checkpoint


def state(ckpt_dir) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(weight_files(ckpt_dir)))


def test_sharded_hf_checkpoint_converts_and_matches_logits(tmp_path):
    hf_dir, out = tmp_path / "hf", tmp_path / "ours"
    hf_model = make_hf_llama(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert convert_hf(["--input", str(hf_dir), "--output", str(out), "--max-shard-gb", "0.0001"]) == 0
    assert (out / INDEX_FILE).is_file() and len(weight_files(out)) > 1
    tokens = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_a_reused_output_directory_loads_only_the_new_checkpoint(tmp_path, capsys):
    """Converting again into the same --output replaces the earlier checkpoint: a stale index would win over a new
    single file (and an old tokenizer.json over a new tokenizer.model), so they are removed; the tokenizer files
    present (here tokenizer.model and special_tokens_map.json) are copied, and a model without a tokenizer leaves
    none. Converting into --input itself is refused."""
    hf_dir, out = tmp_path / "hf", tmp_path / "ours"
    make_hf_llama(hf_dir)
    assert convert_hf(["--input", str(hf_dir), "--output", str(out), "--max-shard-gb", "0.0001"]) == 0
    assert len(weight_files(out)) > 1
    (hf_dir / "tokenizer.model").write_bytes(b"sentencepiece model")
    (hf_dir / "special_tokens_map.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    assert convert_hf(["--input", str(hf_dir), "--output", str(out), "--dtype", "bf16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "params.json", "special_tokens_map.json",
                                                     "tokenizer.model"]
    assert load_model(out).embed_tokens.weight.dtype == torch.bfloat16
    assert convert_hf(["--input", str(hf_dir), "--output", str(out), "--max-shard-gb", "0.0001"]) == 0
    assert not (out / "model.safetensors").exists() and len(weight_files(out)) > 1
    make_hf_llama(tmp_path / "no-tokenizer")
    capsys.readouterr()
    assert convert_hf(["--input", str(tmp_path / "no-tokenizer"), "--output", str(out)]) == 0
    assert "holds no tokenizer" in capsys.readouterr().err  # said now, not by the next script
    assert not {p.name for p in out.iterdir()} & set(TOKENIZER_FILES)  # the earlier model's tokenizer is gone too
    assert convert_hf(["--input", str(hf_dir), "--output", str(hf_dir)]) == 1
    assert "must differ from --input" in capsys.readouterr().err


@pytest.mark.parametrize("embedding_split_dim", [1, 0])
def test_meta_two_shard_checkpoint_equals_hf_conversion(tmp_path, embedding_split_dim):
    """LLaMA-2 splits the embedding along its columns, LLaMA-3 along its rows; with ``vocab_size: -1`` in
    params.json the vocabulary is all the rows either way."""
    hf_model = make_hf_llama(tmp_path / "hf")
    write_meta_checkpoint(hf_model, tmp_path / "meta", n_shards=2, embedding_split_dim=embedding_split_dim)
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "from_hf")]) == 0
    assert convert_meta(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "from_meta"),
                         "--max-seq-len", str(TINY_HF_LLAMA["max_position_embeddings"])]) == 0
    assert read_params(tmp_path / "from_meta") == read_params(tmp_path / "from_hf")
    from_hf, from_meta = state(tmp_path / "from_hf"), state(tmp_path / "from_meta")
    assert from_hf.keys() == from_meta.keys()
    for key in from_hf:
        torch.testing.assert_close(from_meta[key], from_hf[key], atol=0, rtol=0)


def test_dtype_cast(tmp_path):
    make_hf_llama(tmp_path / "hf")
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o"), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in state(tmp_path / "o").values()} == {torch.bfloat16}


HUB_LAYOUT = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}}
NEW_LAYOUT = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}}


def test_both_rope_config_layouts_give_the_same_args():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "intermediate_size": 192}
    assert llama_args_from_hf({**base, **HUB_LAYOUT}) == llama_args_from_hf({**base, **NEW_LAYOUT})
    assert rope_settings({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}) == (1e4, None)


def test_missing_or_malformed_config_is_refused(tmp_path, capsys):
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "config.json not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n')
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'config.json'} is not valid JSON (")


def test_a_config_without_a_required_key_names_the_file_and_the_key(tmp_path, capsys):
    make_hf_llama(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["num_attention_heads"]
    path.write_text(json.dumps(config))
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == f'error: {path} lacks the required key "num_attention_heads"\n'


def test_an_output_that_is_a_file_is_one_error_line(tmp_path, capsys):
    make_hf_llama(tmp_path / "hf")
    (tmp_path / "taken").write_text("")
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "taken")]) == 1
    taken = tmp_path / "taken"
    assert capsys.readouterr().err == f"error: --output {taken}: {taken} is a file, not a directory\n"


def test_unsupported_model_type_is_refused(tmp_path, capsys):
    make_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err


def test_unknown_key_and_wrong_shape_are_refused(tmp_path, capsys):
    make_hf_llama(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "unexpected" in capsys.readouterr().err
    weights["model.norm.weight"] = torch.zeros(65)
    save_file(weights, tmp_path / "model.safetensors")
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o2")]) == 1
    assert "shape mismatch for norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "model.safetensors").exists()


def test_missing_weight_is_refused(tmp_path, capsys):
    make_hf_llama(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "missing" in capsys.readouterr().err


def test_meta_bad_inputs_are_refused(tmp_path, capsys):
    assert convert_meta(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "params.json not found" in capsys.readouterr().err
    hf_model = make_hf_llama(tmp_path / "hf")
    write_meta_checkpoint(hf_model, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**params, "moe": True}))
    assert convert_meta(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "o")]) == 1
    assert "unknown keys in Meta params.json" in capsys.readouterr().err
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    shard = (tmp_path / "meta" / "consolidated.01.pth").read_bytes()
    (tmp_path / "meta" / "consolidated.01.pth").write_bytes(shard[:len(shard) // 2])
    assert convert_meta(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "o")]) == 1
    assert "consolidated.01.pth is not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_a_head_count_the_model_cannot_be_built_with_is_one_error_naming_the_file(tmp_path, capsys):
    """Meta's params.json and HF's config.json with 3 heads for a width of 64: the converters name the file and
    the fields before writing anything, where before the first reshape failed."""
    write_meta_checkpoint(make_hf_llama(tmp_path / "hf"), tmp_path / "meta")
    params_path = tmp_path / "meta" / "params.json"
    params_path.write_text(json.dumps({**json.loads(params_path.read_text()), "n_heads": 3, "n_kv_heads": 3}))
    assert convert_meta(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (f"error: {params_path}: dim=64 must be a multiple of n_heads=3 "
                                       "(or head_dim given)\n")
    config_path = tmp_path / "hf" / "config.json"
    config = {key: value for key, value in json.loads(config_path.read_text()).items() if key != "head_dim"}
    config_path.write_text(json.dumps({**config, "num_attention_heads": 3, "num_key_value_heads": 3}))
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (f"error: {config_path}: head_dim=21 must be a positive even integer "
                                       "(rotary embeddings turn pairs of dimensions)\n")
    config_path.write_text(json.dumps({**config, "num_attention_heads": 3, "num_key_value_heads": 3,
                                       "head_dim": 16}))
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == ("error: shape mismatch for layers.0.self_attn.k_proj.weight: (32, 64), "
                                       "expected 48 rows (3 heads of head_dim 16)\n")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_missing_meta_shard_is_named_or_suspected(tmp_path, capsys):
    """A gap in the shard numbers names the missing files; a missing last shard shows as pieces that add up to
    less than params.json implies."""
    meta = tmp_path / "meta"
    write_meta_checkpoint(make_hf_llama(tmp_path / "hf"), meta, n_shards=3)
    (meta / "consolidated.01.pth").unlink()
    assert convert_meta(["--input", str(meta), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (f"error: {meta} lacks shard(s) consolidated.01.pth: the shards must be "
                                       "numbered 00 to 02 without gaps\n")
    (meta / "consolidated.02.pth").unlink()
    assert convert_meta(["--input", str(meta), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "the 1 shard(s) found merge to" in err and "is a consolidated.NN.pth shard missing?" in err


def test_a_misspelt_tokenizer_is_refused_before_anything_is_written(tmp_path, capsys):
    write_meta_checkpoint(make_hf_llama(tmp_path / "hf"), tmp_path / "meta")
    argv = ["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "o"), "--tokenizer", "nosuch.model"]
    assert convert_meta(argv) == 1
    assert capsys.readouterr().err == "error: tokenizer file(s) not found: nosuch.model\n"
    assert not (tmp_path / "o").exists()


def test_meta_shards_with_different_norms_are_refused(tmp_path, capsys):
    """A weight every shard holds whole must be one weight: two different copies are refused, not one dropped."""
    write_meta_checkpoint(make_hf_llama(tmp_path / "hf"), tmp_path / "meta", n_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    assert convert_meta(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "o")]) == 1
    assert "norm.weight: the shards hold different full-size copies" in capsys.readouterr().err


def test_hf_config_without_rms_norm_eps_takes_the_hf_default():
    """transformers' LlamaConfig defaults rms_norm_eps to 1e-6; a config.json without the key means that."""
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
              "intermediate_size": 192}
    assert llama_args_from_hf(config).norm_eps == 1e-6


def test_an_explicit_head_dim_converts_and_matches_logits(tmp_path):
    """head_dim 32 with 4 heads of a 64-wide model (q / o project to 128): taken from config.json, not 64 / 4."""
    hf_model = make_hf_llama(tmp_path / "hf", head_dim=32)
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_rope_scaling_other_than_llama3_is_refused():
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
              "intermediate_size": 192, "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported for llama"):
        llama_args_from_hf(config)


def test_meta_params_give_the_published_shapes_and_defaults():
    """SwiGLU widths: LLaMA-2-7B 11008 (4096, multiple 256), LLaMA-3-8B 14336 (multiplier 1.3, multiple 1024),
    LLaMA-2-70B 28672 (8192, 1.3, 4096). Context defaults: 4096 for rope_theta 1e4, 8192 for LLaMA-3's 5e5, 131072
    with scaled rope, whose factor is rope_scaling_factor when given (LLaMA-3.2: 32), else 8; norm_eps 1e-5."""
    assert meta_hidden_dim(4096, 256, None) == 11008
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672
    base = {"dim": 64, "n_layers": 2, "n_heads": 4}
    assert meta_args(base, 300).max_seq_len == 4096 and meta_args(base, 300).norm_eps == 1e-5
    assert meta_args({**base, "rope_theta": 5e5}, 300).max_seq_len == 8192
    scaled = meta_args({**base, "rope_theta": 5e5, "use_scaled_rope": True}, 300)
    assert scaled.max_seq_len == 131072 and scaled.rope_scaling["factor"] == 8.0
    assert meta_args({**base, "use_scaled_rope": True, "rope_scaling_factor": 32.0}, 300).rope_scaling["factor"] == 32


@pytest.mark.parametrize("script", ["convert_hf_checkpoint.py", "convert_meta_checkpoint.py"])
def test_scripts_have_help(script):
    repo = Path(__file__).resolve().parents[2]  # whatever directory pytest started in
    result = subprocess.run([sys.executable, str(repo / "scripts" / script), "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0 and "--input" in result.stdout
