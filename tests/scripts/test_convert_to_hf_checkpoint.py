"""scripts/convert_to_hf_checkpoint.py: HF -> dpo_llama -> HF gives back the same tensors (LLaMA, DeepSeek-V2 and
DeepSeek-MoE), and transformers loads the export of a trained model with our logits."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DeepseekV2ForCausalLM, LlamaForCausalLM

from dpo_llama.models.checkpoint import save_model, weight_files
from dpo_llama.models.convert_hf import unpermute_rotary
from dpo_llama.models.deepseek import DeepseekTransformer
from dpo_llama.models.export_hf import permute_rotary
from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.models.tokenizer import load_tokenizer
from scripts.convert_hf_checkpoint import main as convert_hf
from scripts.convert_to_hf_checkpoint import main as export_hf
from tests.model_fixtures import (deepseek_moe_config, make_hf_deepseek_v2, make_hf_llama, random_deepseek_state,
                                  write_hf_deepseek)
from tests.tokenizer_fixtures import make_sentencepiece

VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama31_rope_head_dim": dict(num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_state(hf_dir) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_round_trip(tmp_path, *export_args: str) -> dict:
    """Converts ``tmp_path/hf`` to ``ours`` and exports it to ``back``; asserts ``back`` holds the same tensors under the
    same keys and returns its ``config.json``."""
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), *export_args]) == 0
    expected, got = hf_state(tmp_path / "hf"), hf_state(tmp_path / "back")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    return json.loads((tmp_path / "back" / "config.json").read_text())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_gives_back_the_hf_tensors_and_logits(tmp_path, variant):
    """Sharded on the way back too (``--max-shard-gb``): the index names every tensor of HF's save."""
    torch.manual_seed(0)
    original = make_hf_llama(tmp_path / "hf", **VARIANTS[variant])
    assert_round_trip(tmp_path, "--max-shard-gb", "0.0001")
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, original(tokens).logits, atol=1e-5, rtol=0)


def test_an_exported_model_of_ours_computes_our_logits_with_its_token_ids(tmp_path):
    """A model saved by dpo_llama (as the merges write them) with a sentencepiece tokenizer: transformers gives its
    logits, config.json carries the tokenizer's BOS/EOS ids and no pad id (it has no pad: ours is EOS, which as
    transformers' padding_idx would get no gradient), and the tokenizer file is copied; ``--dtype bf16`` writes
    bf16 tensors and says so."""
    torch.manual_seed(0)
    tokenizer = make_sentencepiece(tmp_path / "tok")
    model = Transformer(get_preset("tiny", vocab_size=400)).eval()
    save_model(model, tmp_path / "ours", tokenizer_files=[tokenizer])
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    assert "pad_token_id" not in config
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")  # through the tokenizer_config.json written
    ours = load_tokenizer(tmp_path / "ours")
    for text in ("[INST] What color is the sky? [/INST]", "It is blue.\nAnd green."):
        assert hf_tokenizer(text).input_ids == ours.encode(text, bos=True)
    assert [p.name for p in weight_files(tmp_path / "hf")] == ["model.safetensors"]
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=1e-5, rtol=0)
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in hf_state(tmp_path / "bf16").values()} == {torch.bfloat16}


def test_permute_rotary_inverts_unpermute_rotary():
    weight = torch.arange(8 * 16 * 3, dtype=torch.float32).view(8 * 16, 3)
    assert torch.equal(unpermute_rotary(permute_rotary(weight, 8), 8), weight)
    assert torch.equal(permute_rotary(unpermute_rotary(weight, 8), 8), weight)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
DEEPSEEK_V2_VARIANTS = {
    "q_lora_yarn_groups": dict(q_lora_rank=24, rope_scaling=YARN, topk_method="group_limited_greedy", n_group=4,
                               topk_group=2, routed_scaling_factor=1.5),
    "plain_q_tied": dict(q_lora_rank=None, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", list(DEEPSEEK_V2_VARIANTS))
def test_deepseek_v2_round_trip_gives_back_the_hf_tensors_and_logits(tmp_path, variant):
    """Our stacked experts go back to one tensor per expert, as ``save_pretrained`` wrote them."""
    torch.manual_seed(0)
    original = make_hf_deepseek_v2(tmp_path / "hf", **DEEPSEEK_V2_VARIANTS[variant])
    config = assert_round_trip(tmp_path)
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    reloaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, original(tokens).logits, atol=1e-5, rtol=0)


IGNORED_BY_TRANSFORMERS = {
    "norm_topk_prob": dict(norm_topk_prob=True),
    "moe_layer_freq": dict(n_layers=3, moe_layer_freq=2),
    "mscale": dict(rope_scaling={**get_preset("tiny-deepseek-v2").rope_scaling, "mscale_all_dim": 0.0}),
    "none": {},
}


@pytest.mark.parametrize("name", list(IGNORED_BY_TRANSFORMERS))
def test_a_setting_transformers_ignores_is_warned_about(tmp_path, name):
    """A DeepSeek-V2 setting that transformers' DeepseekV2ForCausalLM does not follow is named in a warning, and
    its logits there do differ from ours; without one there is no warning and they are ours."""
    torch.manual_seed(0)
    model = DeepseekTransformer(get_preset("tiny-deepseek-v2", **IGNORED_BY_TRANSFORMERS[name])).eval()
    save_model(model, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf")]) == 0
    warned = [str(w.message) for w in caught if "DeepseekV2ForCausalLM ignores" in str(w.message)]
    tokens = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        difference = (DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits
                      - model(tokens)).abs().max().item()
    if name == "none":
        assert warned == [] and difference < 1e-4
    else:
        assert len(warned) == 1 and f"ignores {name}" in warned[0].replace("YaRN's ", "") and difference > 1e-3


def test_deepseek_moe_round_trip_gives_back_its_files(tmp_path):
    """deepseek-moe-16b's layout (two bf16 shards, rotate-half q/k rows): the same tensors and the config values that
    define the model."""
    cfg = deepseek_moe_config()
    write_hf_deepseek(tmp_path / "hf", cfg, random_deepseek_state(cfg))
    config = assert_round_trip(tmp_path)
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
                "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux", "vocab_size", "rms_norm_eps",
                "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings"):
        assert config[key] == cfg[key], key


def test_a_deepseek_moe_head_dim_its_config_cannot_hold_is_refused(tmp_path, capsys):
    save_model(DeepseekTransformer(get_preset("tiny-deepseek", head_dim=8)), tmp_path / "ours")
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "out")]) == 1
    assert "head_dim=8 differs from dim / n_heads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_tokenizer_exports_with_a_warning(tmp_path, capsys):
    save_model(Transformer(get_preset("tiny")), tmp_path / "ours")
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err.endswith(f"warning: {tmp_path / 'ours'} holds no tokenizer (tokenizer.json / "
                                            f"tokenizer.model): copy the model's tokenizer files into {tmp_path / 'hf'} "
                                            "before loading it with AutoTokenizer\n")
    assert "bos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_output_over_input_is_refused(tmp_path, capsys):
    save_model(Transformer(get_preset("tiny")), tmp_path / "ours")
    assert export_hf(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "ours")]) == 1
    assert "must differ from --input" in capsys.readouterr().err
