"""scripts/convert_hf_checkpoint.py on DeepSeek checkpoints: expert layouts, config layouts, refusals, streaming.

The HF builders and the per-token reference live in tests/models/test_deepseek.py.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dpo_llama.models.convert_deepseek as convert_deepseek
from dpo_llama.models.checkpoint import iter_safetensors, load_model, weight_files
from dpo_llama.models.convert_deepseek import deepseek_args_from_hf, deepseek_tensors_from_hf
from dpo_llama.models.presets import get_preset
from scripts.convert_hf_checkpoint import main as convert_hf
from tests.model_fixtures import deepseek_moe_config, make_hf_deepseek_v2, random_deepseek_state, write_hf_deepseek

# deepseek-ai/DeepSeek-V2-Lite config.json (original layout, as published) ...
V2_LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
# ... and as transformers 5.x's save_pretrained rewrites it (rope_parameters, head_dim = qk_rope_head_dim).
V2_LITE_NEW = {
    **{k: v for k, v in V2_LITE_HUB.items() if k not in ("rope_scaling", "rope_theta")},
    "head_dim": 64, "mlp_bias": False, "qk_head_dim": 192, "transformers_version": "5.23.0",
    "rope_parameters": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                        "original_max_position_embeddings": 4096, "rope_theta": 10000, "rope_type": "yarn",
                        "type": "yarn"},
}


def state(ckpt_dir) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(weight_files(ckpt_dir)))


def test_real_configs_give_the_presets():
    assert deepseek_args_from_hf(V2_LITE_HUB) == get_preset("deepseek-v2-lite")
    assert deepseek_args_from_hf(V2_LITE_NEW) == get_preset("deepseek-v2-lite")
    assert deepseek_args_from_hf({**V2_LITE_HUB, "norm_topk_prob": True}).norm_topk_prob is True
    moe_16b = deepseek_moe_config(hidden_size=2048, intermediate_size=10944, max_position_embeddings=4096,
                                  moe_intermediate_size=1408, n_routed_experts=64, num_attention_heads=16,
                                  num_experts_per_tok=6, num_hidden_layers=28, num_key_value_heads=16,
                                  vocab_size=102400)
    assert deepseek_args_from_hf(moe_16b) == get_preset("deepseek-moe-16b")


def test_fused_expert_layout_converts_like_per_expert_keys(tmp_path):
    """``save_original_format=False`` writes ``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    torch.manual_seed(0)
    hf_model = make_hf_deepseek_v2(tmp_path / "fused", save_original_format=False)
    hf_model.save_pretrained(tmp_path / "original")
    fused_keys = set(load_file(tmp_path / "fused" / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused_keys
    for name in ("fused", "original"):
        assert convert_hf(["--input", str(tmp_path / name), "--output", str(tmp_path / f"ours_{name}")]) == 0
    from_fused, from_original = state(tmp_path / "ours_fused"), state(tmp_path / "ours_original")
    assert from_fused.keys() == from_original.keys()
    for key in from_fused:
        torch.testing.assert_close(from_fused[key], from_original[key], atol=0, rtol=0)
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours_fused")(tokens), hf_model(tokens).logits,
                                   atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_experts_split_across_shards(tmp_path):
    torch.manual_seed(0)
    hf_model = make_hf_deepseek_v2(tmp_path / "hf")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    expert_files = {f for k, f in index["weight_map"].items() if k.startswith("model.layers.1.mlp.experts.")}
    assert len(expert_files) > 1
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o"), "--dtype", "bf16"]) == 0
    converted = state(tmp_path / "o")
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}
    expected = torch.stack([hf_model.model.layers[1].mlp.experts.down_proj[e] for e in range(8)])
    torch.testing.assert_close(converted["layers.1.mlp.experts.down_proj"], expected.detach().bfloat16())


def test_expert_stacking_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """Every layer's expert reads and its three stacked outputs form one uninterrupted run of events."""
    cfg = deepseek_moe_config(num_hidden_layers=4)
    write_hf_deepseek(tmp_path, cfg, random_deepseek_state(cfg))
    events = []

    class RecordingSafeOpen:
        def __init__(self, path):
            self.inner = safe_open(str(path), framework="pt")

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            events.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(convert_deepseek, "open_safetensors", RecordingSafeOpen)
    for key, _ in deepseek_tensors_from_hf(tmp_path, deepseek_args_from_hf(cfg)):
        events.append(key)
    layers = [int(m.group(1)) for e in events if (m := re.match(r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.", e))]
    runs = [layer for i, layer in enumerate(layers) if i == 0 or layers[i - 1] != layer]
    assert runs == [1, 2, 3]


def write_bad(tmp_path, cfg=None, edit=None):
    cfg = cfg or deepseek_moe_config()
    sd = random_deepseek_state(deepseek_moe_config())
    if edit:
        edit(sd)
    write_hf_deepseek(tmp_path / "hf", cfg, sd)
    return ["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o")]


@pytest.mark.parametrize("field,value,message", [
    ("attention_bias", True, "attention_bias=true is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope scaling 'linear' is not supported"),
    ("scoring_func", "sigmoid", "scoring_func 'sigmoid' is not supported"),
    ("topk_method", "noaux_tc", "topk_method must be one of"),
    ("n_routed_experts", None, "n_routed_experts is missing"),
    ("num_key_value_heads", 2, "num_key_value_heads must equal"),
])
def test_unsupported_config_is_refused(tmp_path, capsys, field, value, message):
    assert convert_hf(write_bad(tmp_path, deepseek_moe_config(**{field: value}))) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("key", ["num_attention_heads", "moe_intermediate_size"])
def test_a_config_without_a_required_key_names_the_file_and_the_key(tmp_path, capsys, key):
    config = deepseek_moe_config()
    del config[key]
    assert convert_hf(write_bad(tmp_path, config)) == 1
    assert capsys.readouterr().err == f'error: {tmp_path / "hf" / "config.json"} lacks the required key "{key}"\n'


def test_unknown_yarn_key_is_refused():
    config = {**V2_LITE_HUB, "rope_scaling": {**V2_LITE_HUB["rope_scaling"], "attention_factor": 1.0}}
    with pytest.raises(ValueError, match="unsupported YaRN keys"):
        deepseek_args_from_hf(config)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.2.mlp.experts.5.up_proj.weight"), "model.layers.2.mlp.experts.5.up_proj"),
    (lambda sd: sd.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(16, 32)}), "experts.8.up_proj"),
    (lambda sd: sd.update({"model.layers.1.mlp.experts.2.gate_proj.weight": torch.zeros(16, 31)}),
     "shape mismatch for model.layers.1.mlp.experts.2.gate_proj.weight"),
    (lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight"), "missing"),
    (lambda sd: sd.update({"model.layers.0.mlp.gate.weight": torch.zeros(8, 32)}), "unexpected weight"),
])
def test_bad_weights_are_refused(tmp_path, capsys, edit, message):
    assert convert_hf(write_bad(tmp_path, edit=edit)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_fused_experts_with_wrong_shape_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    make_hf_deepseek_v2(tmp_path, save_original_format=False)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(8, 32, 64)
    save_file(weights, tmp_path / "model.safetensors")
    assert convert_hf(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "shape mismatch for model.layers.1.mlp.experts.gate_up_proj" in capsys.readouterr().err


def test_a_truncated_weight_file_is_one_clear_error(tmp_path, capsys):
    argv = write_bad(tmp_path)
    path = next((tmp_path / "hf").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:1000])
    assert convert_hf(argv) == 1
    assert f"{path} is not a readable safetensors file" in capsys.readouterr().err
