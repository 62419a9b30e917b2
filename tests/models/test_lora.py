"""LoRA layers, targeting, trainability, adapters on/off, merging and the adapter file format."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dpo_llama.models.checkpoint import save_model
from dpo_llama.models.llama import Transformer
from dpo_llama.models.lora import (ADAPTER_FILE, LORA_CONFIG_FILE, LoRAConfig, LoRALinear, adapter_fingerprint,
                                   apply_lora, disable_adapters, find_adapter, load_lora, load_model_with_lora,
                                   lora_layers, lora_state_dict, lora_targets, merge_lora, read_lora_config,
                                   save_lora, unmerge_lora)
from dpo_llama.models.presets import get_preset

TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
ALL_SWITCHES = dict(lora_attn_query=True, lora_attn_key=True, lora_attn_value=True, lora_attn_proj=True,
                    lora_mlp_gate=True, lora_mlp_up=True, lora_mlp_down=True, lora_head=True)


def tiny_model(**overrides) -> Transformer:
    return Transformer(get_preset("tiny", **overrides)).eval()


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B = 0 at init makes every adapter a no-op; give B random values so the adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def lora_copy(base: Transformer, cfg: LoRAConfig, randomize: bool = True) -> Transformer:
    model = apply_lora(copy.deepcopy(base), cfg)
    if randomize:
        randomize_adapters(model)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_fresh_adapters_leave_the_output_unchanged():
    """B = 0 at init, so s·B A x = 0 and the output is the base output exactly."""
    base = tiny_model()
    model = lora_copy(base, LoRAConfig(lora_r=4, **ALL_SWITCHES), randomize=False)
    assert torch.equal(logits(model), logits(base))


def test_merged_equals_unmerged_and_unmerge_restores_weights():
    base = tiny_model()
    model = lora_copy(base, LoRAConfig(lora_r=4, lora_alpha=8.0, **ALL_SWITCHES))
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(base), atol=1e-3)
    merge_lora(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_disabled_adapters_give_the_base_model():
    base = tiny_model()
    model = lora_copy(base, LoRAConfig(lora_r=4, **ALL_SWITCHES))
    adapted = logits(model)
    with disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
    torch.testing.assert_close(logits(model), adapted, atol=0, rtol=0)
    merge_lora(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    assert all(layer.adapter_enabled for _, layer in lora_layers(model))


@pytest.mark.parametrize("train_norms", [False, True])
def test_only_lora_parameters_train(train_norms):
    model = lora_copy(tiny_model(), LoRAConfig(lora_r=4, train_norms=train_norms, **ALL_SWITCHES)).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name, _ in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}
    norms = {name for name, _ in model.named_parameters() if name.endswith("norm.weight")}
    assert len(lora) == 2 * (7 * 2 + 1)
    assert trainable == (lora | norms if train_norms else lora)
    model(TOKENS).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def adapted_linear(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> tuple[nn.Linear, LoRALinear]:
    """A linear layer and a LoRA copy of it (r 4, s = 2) with random B."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=False).to(dtype)
    layer = LoRALinear.from_linear(copy.deepcopy(linear), r=4, scaling=2.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return linear, layer


def test_lora_dropout_drops_the_adapters_input_in_training_only():
    """p = 0.5: in training y = W x + s B A (m ⊙ x / (1 − p)), the mask m drawn by the dropout (drawn again
    here from the same seed); in eval y = W x + s B A x."""
    linear, layer = adapted_linear(dropout=0.5)
    x = torch.randn(6, 16)

    def expected(adapter_input):
        return linear(x) + 2.0 * adapter_input @ layer.lora_A.T @ layer.lora_B.T

    with torch.no_grad():
        torch.manual_seed(5)
        trained = layer.train()(x)
        torch.manual_seed(5)
        dropped = nn.functional.dropout(x, 0.5, training=True)
        assert not torch.equal(dropped, x)
        torch.testing.assert_close(trained, expected(dropped))
        torch.testing.assert_close(layer.eval()(x), expected(x))


def test_merged_and_disabled_layer_is_the_base_in_training_too():
    """Merged, then disabled, with dropout 0.5 and in training mode: x (W + sBA)ᵀ − s B A x without dropout,
    i.e. the base output up to rounding."""
    linear, layer = adapted_linear(dropout=0.5)
    x = torch.randn(6, 16)
    layer.merge()
    with torch.no_grad(), disable_adapters(layer):
        torch.testing.assert_close(layer.train()(x), linear(x), atol=1e-6, rtol=1e-5)


def test_a_bf16_layer_returns_bf16():
    """The float32 adapters' update is cast to the base output's dtype, so a bf16 model stays bf16 (B = 0 at
    first: the output is the base's exactly)."""
    linear, layer = adapted_linear(dtype=torch.bfloat16)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16
        layer.lora_B.zero_()
        assert torch.equal(layer(x), linear(x))


def test_apply_lora_on_a_loaded_bf16_model_widens_the_trained_norms():
    """train_norms on an already loaded bf16 model (convert_lora_checkpoint.py's path): the norm weights become
    trainable float32 parameters, as when the checkpoint streams in."""
    model = apply_lora(tiny_model().to(torch.bfloat16), LoRAConfig(lora_r=4, train_norms=True))
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    assert norms and all(p.dtype == torch.float32 and p.requires_grad for p in norms)


def test_find_adapter_takes_the_numerically_highest_step(tmp_path):
    """step-10 is after step-9 (and after the zero-padded step-000002), though "step-9" sorts last as text."""
    for step in ("step-9", "step-10", "step-000002"):
        (tmp_path / step).mkdir()
        (tmp_path / step / LORA_CONFIG_FILE).write_text("{}")
    path, note = find_adapter(tmp_path)
    assert path == tmp_path / "step-10" and note.startswith("highest of 3 step checkpoint(s)")


def test_nested_disable_adapters_restores_the_outer_state():
    """An inner disable_adapters block (a reference computed inside a disabled one) leaves the adapters disabled
    for the rest of the outer block, LoRA layers and routed experts alike; after it they are enabled again."""
    model = apply_lora(tiny_deepseek(), LoRAConfig(**ROUTED, lora_attn_query=True))
    modules = [layer for _, layer in lora_layers(model)] + [layer.experts for layer in model.moe_layers()]
    with disable_adapters(model):
        with disable_adapters(model):
            pass
        assert modules and not any(module.adapter_enabled for module in modules)
    assert all(module.adapter_enabled for module in modules)


def test_scaling_alpha_over_r_or_explicit():
    """One layer with in = 2, out = 1, r = 1, W = 0, A = [[1, 2]], B = [[3]] and x = [1, 1]:

    B A x = 3 · (1·1 + 2·1) = 9, so y = s · 9 with s = alpha / r = 16 / 1 = 16 -> 144 when lora_alpha = 16,
    and s = lora_scaling (1.0 by default, 0.5 here) otherwise.
    """
    assert LoRAConfig(lora_r=8, lora_alpha=16.0).scaling == 2.0
    assert LoRAConfig(lora_r=8).scaling == 1.0
    for cfg, expected in [(LoRAConfig(lora_r=1, lora_alpha=16.0), 144.0), (LoRAConfig(lora_r=1), 9.0),
                          (LoRAConfig(lora_r=1, lora_scaling=0.5), 4.5)]:
        layer = LoRALinear(2, 1, bias=False, r=cfg.lora_r, scaling=cfg.scaling)
        with torch.no_grad():
            layer.weight.zero_()
            layer.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
            layer.lora_B.copy_(torch.tensor([[3.0]]))
        assert layer(torch.ones(1, 2)).item() == expected


def test_layer_matches_peft():
    """PEFT's LoRA layer is the oracle: same W, A, B, alpha and r give the same output."""
    from peft import LoraConfig, inject_adapter_in_model

    linear = nn.Linear(8, 6, bias=True)
    ours = LoRALinear.from_linear(copy.deepcopy(linear), r=2, scaling=6.0 / 2)
    net = nn.Sequential()
    net.add_module("proj", linear)
    peft_net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]), net)
    with torch.no_grad():
        ours.lora_B.normal_()
        peft_net.proj.lora_A["default"].weight.copy_(ours.lora_A)
        peft_net.proj.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), peft_net(x), atol=1e-6, rtol=0)


def test_kaiming_init_of_a_and_zero_b():
    """A ~ U(-b, b) with b = 1/sqrt(in) (Kaiming-uniform, a = √5, as nn.Linear); B = 0."""
    layer = LoRALinear(256, 32, bias=False, r=16, scaling=1.0)
    bound = 1 / 256**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(layer.lora_B, torch.zeros(32, 16))
    assert layer.lora_A.dtype == torch.float32


class FakeMoEBlock(nn.Module):
    """The Linear names of a DeepSeek block (MLA with q_lora_rank, MoE with router and shared experts)."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(8, 8, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(8, 4, bias=False)
        self.mlp.shared_experts = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp.shared_experts, name, nn.Linear(8, 8, bias=False))


class FakeMoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([FakeMoEBlock()])
        self.layers.append(nn.Module())
        self.layers[1].mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.layers[1].mlp, name, nn.Linear(8, 8, bias=False))
        self.lm_head = nn.Linear(8, 16, bias=False)


NO_TARGETS = dict(lora_attn_query=False, lora_attn_value=False)


@pytest.mark.parametrize("switch, expected", [
    ("lora_attn_query", ["layers.0.self_attn.q_a_proj", "layers.0.self_attn.q_b_proj"]),
    ("lora_attn_key", ["layers.0.self_attn.kv_a_proj_with_mqa"]),
    ("lora_attn_value", ["layers.0.self_attn.kv_b_proj"]),
    ("lora_attn_proj", ["layers.0.self_attn.o_proj"]),
    ("lora_mlp_gate", ["layers.1.mlp.gate_proj"]),
    ("lora_mlp_down", ["layers.1.mlp.down_proj"]),
    ("lora_moe_shared_experts", [f"layers.0.mlp.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")]),
    ("lora_head", ["lm_head"]),
])
def test_mla_and_moe_targets(switch, expected):
    """Each switch selects its own modules: dense-MLP switches skip shared experts, the router is never hit."""
    assert lora_targets(FakeMoEModel(), LoRAConfig(**{**NO_TARGETS, switch: True})) == expected


def test_router_and_head_stay_full_precision_under_4bit():
    from dpo_llama.models.quant import Linear4bit

    model = apply_lora(FakeMoEModel(), LoRAConfig(lora_head=True, quant_4bit=True, quant_lora_4bit=True))
    assert type(model.layers[0].mlp.gate) is nn.Linear
    assert model.lm_head.quant is None and model.layers[0].self_attn.q_a_proj.quant is not None
    assert isinstance(model.layers[0].self_attn.o_proj, Linear4bit)
    assert isinstance(model.layers[1].mlp.up_proj, Linear4bit)


def test_apply_twice_or_with_no_target_is_refused():
    model = apply_lora(tiny_model(), LoRAConfig(lora_r=2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig(lora_r=2))
    with pytest.raises(ValueError, match="no layer of this Transformer matches"):
        apply_lora(tiny_model(tie_word_embeddings=True), LoRAConfig(**NO_TARGETS, lora_head=True))


@pytest.mark.parametrize("field, value", [("lora_r", 0), ("lora_dropout", 1.0), ("lora_alpha", 0.0),
                                          ("quant_4bit_type", "int4"), ("quant_4bit_blocksize", 48),
                                          ("quant_4bit_compute_dtype", "int8")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field.removeprefix("quant_4bit_")):
        LoRAConfig(**{field: value})


def test_save_and_load_round_trip(tmp_path):
    base = tiny_model()
    cfg = LoRAConfig(lora_r=4, lora_alpha=8.0, train_norms=True, **ALL_SWITCHES)
    model = lora_copy(base, cfg)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    save_lora(model, tmp_path, cfg, {"ckpt_dir": "somewhere", "fingerprint": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE, LORA_CONFIG_FILE]
    saved_cfg, saved_base = read_lora_config(tmp_path)
    assert saved_cfg == cfg and saved_base["model_type"] == "llama"
    assert saved_base["params"] == base.args.to_dict() and saved_base["info"]["fingerprint"] == "abc"
    assert saved_base["weight_dtype"] == "float32"
    assert "norm.weight" in lora_state_dict(model) and "layers.0.self_attn.q_proj.weight" not in lora_state_dict(model)

    fresh = apply_lora(copy.deepcopy(base), cfg)
    load_lora(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_load_model_with_lora_from_a_checkpoint(tmp_path):
    """Meta-device load (prepare = apply_lora) plus the saved adapter equals the in-memory LoRA model."""
    base = tiny_model()
    save_model(base, tmp_path / "base")
    cfg = LoRAConfig(lora_r=4, lora_mlp_up=True)
    model = lora_copy(base, cfg)
    save_lora(model, tmp_path / "adapter", cfg, {})
    loaded = load_model_with_lora(tmp_path / "base", lora_dir=tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(lora_state_dict(model))


def make_adapter(tmp_path, cfg: LoRAConfig):
    base = tiny_model()
    save_lora(lora_copy(base, cfg), tmp_path, cfg, {})
    return base


@pytest.mark.parametrize("other, message", [
    (LoRAConfig(lora_r=8), "shape mismatch for layers.0.self_attn.q_proj.lora_A"),
    (LoRAConfig(lora_r=4, lora_attn_key=True), "lacks 4 tensors"),
    (LoRAConfig(lora_r=4, lora_attn_value=False), "has 4 tensors the model lacks"),
    (LoRAConfig(lora_r=4, lora_scaling=2.0), "scaling 1"),
])
def test_mismatched_adapter_is_refused(tmp_path, other, message):
    base = make_adapter(tmp_path, LoRAConfig(lora_r=4))
    with pytest.raises(ValueError, match=message):
        load_lora(apply_lora(base, other), tmp_path)


def test_adapter_for_another_model_type_or_missing_is_refused(tmp_path):
    base = make_adapter(tmp_path, LoRAConfig(lora_r=4))
    content = json.loads((tmp_path / LORA_CONFIG_FILE).read_text())
    content["base"]["model_type"] = "deepseek"
    (tmp_path / LORA_CONFIG_FILE).write_text(json.dumps(content))
    model = apply_lora(base, LoRAConfig(lora_r=4))
    with pytest.raises(ValueError, match="adapter is for model_type 'deepseek'"):
        load_lora(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="lora_config.json not found"):
        load_lora(model, tmp_path / "nowhere")


def test_truncated_adapter_file_is_refused(tmp_path):
    base = make_adapter(tmp_path, LoRAConfig(lora_r=4))
    (tmp_path / ADAPTER_FILE).write_bytes((tmp_path / ADAPTER_FILE).read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter.safetensors is not a readable safetensors file"):
        load_lora(apply_lora(base, LoRAConfig(lora_r=4)), tmp_path)


def test_script_config_with_more_fields_saves_only_the_lora_fields(tmp_path):
    @dataclass
    class ScriptConfig(LoRAConfig):
        learning_rate: float = 1e-4

    cfg = ScriptConfig(lora_r=2, learning_rate=3e-4)
    model = apply_lora(tiny_model(), cfg)
    assert type(model.lora_config) is LoRAConfig
    save_lora(model, tmp_path, cfg, {})
    assert "learning_rate" not in json.loads((tmp_path / LORA_CONFIG_FILE).read_text())["lora"]
    assert read_lora_config(tmp_path)[0] == LoRAConfig(lora_r=2)


def test_loading_an_adapter_before_the_base_weights_is_refused(tmp_path):
    make_adapter(tmp_path, LoRAConfig(lora_r=4))
    with torch.device("meta"):
        meta_model = tiny_model()
    with pytest.raises(ValueError, match="not loaded yet"):
        load_lora(apply_lora(meta_model, LoRAConfig(lora_r=4)), tmp_path)


ROUTED = dict(lora_r=4, lora_alpha=8.0, lora_moe_routed_experts=True)


def tiny_deepseek():
    from dpo_llama.models.deepseek import DeepseekTransformer
    return DeepseekTransformer(get_preset("tiny-deepseek-v2")).eval()


def randomize_expert_adapters(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            for adapters in moe.experts.lora.values():
                adapters.lora_B.copy_(torch.randn(adapters.lora_B.shape, generator=gen) * 0.1)


def test_routed_expert_adapters_train_save_load_merge_and_disable(tmp_path):
    """lora_moe_routed_experts: stacked adapters on every MoE layer's experts (keys mlp.experts.lora.<proj>.lora_A
    / lora_B), trainable alongside the attention adapters; they save and load, merge and unmerge, and are
    switched off by disable_adapters."""
    base = tiny_deepseek()
    cfg = LoRAConfig(**ROUTED)
    model = apply_lora(copy.deepcopy(base), cfg)
    assert torch.equal(logits(model), logits(base))
    randomize_adapters(model)
    randomize_expert_adapters(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(base), atol=1e-3)
    keys = set(lora_state_dict(model))
    n_moe = len(model.moe_layers())
    expert_keys = {k for k in keys if ".mlp.experts.lora." in k}
    assert len(expert_keys) == n_moe * 3 * 2 and "layers.1.mlp.experts.lora.down_proj.lora_B" in expert_keys
    assert {n for n, p in model.named_parameters() if p.requires_grad} == keys

    save_lora(model, tmp_path, cfg, {})
    assert read_lora_config(tmp_path)[1]["weight_dtype"] == "float32"
    fresh = load_lora(apply_lora(copy.deepcopy(base), cfg), tmp_path)
    assert torch.equal(logits(fresh), adapted)

    with disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_routed_expert_adapters_alone_and_on_a_model_without_experts():
    """Only the routed experts adapted: the base dtype comes from the embeddings; the switch on a dense LLaMA
    is refused."""
    cfg = LoRAConfig(**ROUTED, lora_attn_query=False, lora_attn_value=False)
    model = apply_lora(tiny_deepseek().to(torch.bfloat16), cfg)
    assert not list(lora_layers(model)) and model.moe_layers()[0].experts.lora is not None
    from dpo_llama.models.lora import base_weight_dtype
    assert base_weight_dtype(model) == torch.bfloat16
    with pytest.raises(ValueError, match="this Transformer has no routed MoE experts"):
        apply_lora(tiny_model(), LoRAConfig(**ROUTED))


def test_shared_expert_switch_on_a_model_without_them_warns(capsys):
    """lora_moe_shared_experts on a dense LLaMA, beside switches that do match, is not dropped silently: it warns
    (an error would refuse adapters saved by earlier versions with the switch set)."""
    model = apply_lora(tiny_model(), LoRAConfig(lora_moe_shared_experts=True))
    assert "lora_moe_shared_experts: this Transformer has no shared MoE experts" in capsys.readouterr().err
    assert not any(".shared_experts." in name for name, _ in lora_layers(model))
    model = apply_lora(tiny_deepseek(), LoRAConfig(lora_moe_shared_experts=True))
    assert any(".shared_experts." in name for name, _ in lora_layers(model)) and capsys.readouterr().err == ""


def test_adapter_fingerprint_hashes_the_settings_as_saved(tmp_path):
    """sha256(json({"lora": saved lora section, "model_type"}, sorted keys) + adapter.safetensors bytes): an adapter
    saved by an earlier version (with train_bias) keeps the fingerprint its reference datasets recorded, though
    its settings now read back without that key."""
    import hashlib
    model = apply_lora(tiny_model(), LoRAConfig(lora_r=4))
    save_lora(model, tmp_path, LoRAConfig(lora_r=4), {})
    content = json.loads((tmp_path / LORA_CONFIG_FILE).read_text())
    content["lora"]["train_bias"] = False
    (tmp_path / LORA_CONFIG_FILE).write_text(json.dumps(content))
    expected = hashlib.sha256(json.dumps({"lora": content["lora"], "model_type": content["base"]["model_type"]},
                                         sort_keys=True).encode())
    expected.update((tmp_path / ADAPTER_FILE).read_bytes())
    assert adapter_fingerprint(tmp_path) == expected.hexdigest()
    assert read_lora_config(tmp_path)[0] == LoRAConfig(lora_r=4)


def test_adapter_config_of_an_earlier_version_with_train_bias_loads():
    """Earlier versions saved a train_bias switch; no supported model has biases, so it is dropped on reading."""
    saved = {**LoRAConfig(lora_r=4).to_dict(), "train_bias": True}
    assert LoRAConfig.from_dict(saved) == LoRAConfig(lora_r=4)
    with pytest.raises(ValueError, match=r"unknown LoRA config keys: \['train_biases'\]"):
        LoRAConfig.from_dict({**LoRAConfig().to_dict(), "train_biases": True})


def test_expert_adapters_created_while_loading_start_as_a_no_op(tmp_path):
    """Adapters created while the checkpoint streams into a meta-device model: B = 0 and A random, so the
    loaded model computes the base model's logits."""
    base = tiny_deepseek()
    save_model(base, tmp_path / "base")
    loaded = load_model_with_lora(tmp_path / "base", LoRAConfig(**ROUTED)).eval()
    adapters = [a for layer in loaded.moe_layers() for a in layer.experts.lora.values()]
    assert adapters and all(not a.lora_B.any() and a.lora_A.abs().sum() > 0 for a in adapters)
    torch.testing.assert_close(logits(loaded), logits(base))


def test_routed_expert_adapters_load_from_a_checkpoint_and_go_4bit(tmp_path):
    """Meta-device load: the adapters are created where the expert weights arrive; quant_lora_4bit stores the
    adapted experts 4-bit."""
    base = tiny_deepseek()
    save_model(base, tmp_path / "base")
    cfg = LoRAConfig(**ROUTED, quant_lora_4bit=True, quant_4bit_compute_dtype="fp32")
    loaded = load_model_with_lora(tmp_path / "base", cfg)
    experts = loaded.moe_layers()[0].experts
    assert experts.quant is not None and experts.gate_proj is None
    assert all(p.device.type == "cpu" for p in experts.lora.parameters())
    with torch.no_grad():
        for adapters in experts.lora.values():
            adapters.lora_B.normal_(0, 0.1)
    loaded(TOKENS).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.lora.parameters())


def test_lora_update_matches_autograd_and_keeps_x_in_its_dtype():
    """LoRAUpdate = s * F.linear(F.linear(x.float(), A), B): the same output and gradients as autograd's (bitwise,
    bf16 input [2, 3, 16], float32 adapters), keeping the bf16 x rather than a float32 copy; two adapters reading
    the same x keep it once. Float64 gradients against finite differences."""
    import torch.nn.functional as F

    from dpo_llama.models.lora import LoRAUpdate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=gen).bfloat16()
    a, b = torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen)
    grad = torch.randn(2, 3, 8, generator=gen)
    results = []
    for fn in (lambda *t: LoRAUpdate.apply(*t, 0.5), lambda xx, aa, bb: 0.5 * F.linear(F.linear(xx.float(), aa), bb)):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(*leaves)
        y.backward(grad)
        results.append((y, *(t.grad for t in leaves), {(t.dtype, t.numel()) for t in saved}))
    for ours, reference in zip(results[0][:4], results[1][:4]):
        assert torch.equal(ours, reference)
    assert (torch.bfloat16, x.numel()) in results[0][4] and (torch.float32, x.numel()) not in results[0][4]
    assert (torch.float32, x.numel()) in results[1][4]

    shared = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LoRAUpdate.apply(shared, a, b, 1.0) + LoRAUpdate.apply(shared, a, b, 2.0)
    assert len({t.data_ptr() for t in saved if t.shape == x.shape}) == 1

    x64, a64, b64 = (torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
                     for shape in ((3, 5), (2, 5), (4, 2)))
    assert torch.autograd.gradcheck(lambda *t: LoRAUpdate.apply(*t, 1.5), (x64, a64, b64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast)")
def test_lora_update_under_cuda_autocast_matches_autograd():
    """The trainer's mixed precision on CUDA (bf16 autocast, float32 adapters): LoRAUpdate's backward runs in the
    forward's autocast state, so output and gradients match autograd on the plain operations under the same
    autocast (to bf16 rounding: the products are bf16 on both sides, the GEMM calls may differ)."""
    import torch.nn.functional as F

    from dpo_llama.models.lora import LoRAUpdate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=gen).bfloat16().cuda()
    a, b = torch.randn(8, 64, generator=gen).cuda(), torch.randn(32, 8, generator=gen).cuda()
    grad = torch.randn(2, 3, 32, generator=gen).bfloat16().cuda()
    results = []
    for fn in (lambda *t: LoRAUpdate.apply(*t, 0.5), lambda xx, aa, bb: 0.5 * F.linear(F.linear(xx.float(), aa), bb)):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(*leaves)
        y.backward(grad)
        results.append((y, *(t.grad for t in leaves)))
    assert [t.dtype for t in results[0]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-2, rtol=1e-2)


def test_quant_4bit_that_quantizes_nothing_warns(capsys):
    """Every frozen linear adapted: quant_4bit alone leaves nothing to store 4-bit (QLoRA needs quant_lora_4bit)."""
    every_linear = dict(lora_r=2, lora_attn_key=True, lora_attn_proj=True, lora_mlp_gate=True, lora_mlp_up=True,
                        lora_mlp_down=True)
    apply_lora(Transformer(get_preset("tiny")), LoRAConfig(**every_linear, quant_4bit=True))
    assert "warning: quant_4bit: every frozen linear layer is adapted" in capsys.readouterr().err
    apply_lora(Transformer(get_preset("tiny")), LoRAConfig(lora_r=2, quant_4bit=True))  # MLP layers quantized
    assert "warning" not in capsys.readouterr().err


def test_lora_head_on_tied_embeddings_warns(capsys):
    apply_lora(Transformer(get_preset("tiny", tie_word_embeddings=True)), LoRAConfig(lora_r=2, lora_head=True))
    assert "warning: lora_head: this Transformer ties lm_head to the embeddings" in capsys.readouterr().err


def test_load_model_with_lora_takes_a_runs_checkpoint_folder(tmp_path):
    """As the scripts' --lora and --init-lora-dir: a folder of step-XXXXXX checkpoints means its latest."""
    base = Transformer(get_preset("tiny"))
    save_model(base, tmp_path / "base")
    adapted = load_model_with_lora(tmp_path / "base", LoRAConfig(lora_r=2))
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B.fill_(0.01)
    save_lora(adapted, tmp_path / "run" / "step-000002", adapted.lora_config, {"ckpt_dir": str(tmp_path / "base")})
    loaded = load_model_with_lora(tmp_path / "base", lora_dir=tmp_path / "run")
    assert all(torch.equal(layer.lora_B, torch.full_like(layer.lora_B, 0.01)) for _, layer in lora_layers(loaded))
