"""scripts/convert_lora_checkpoint.py: merging full-precision and 4-bit adapters, step folders, refusals."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_llama.configs import demo
from dpo_llama.models.checkpoint import iter_safetensors, load_model, read_params, save_model, weight_files
from dpo_llama.models.llama import Transformer
from dpo_llama.models.lora import (ADAPTER_FILE, LORA_CONFIG_FILE, LoRAConfig, apply_lora, base_info,
                                   load_model_with_lora, lora_layers, merge_lora, save_lora)
from dpo_llama.models.presets import get_preset
from scripts.convert_lora_checkpoint import main as convert_lora
from scripts.convert_lora_checkpoint import parse_args
from tests.tokenizer_fixtures import make_sentencepiece

TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
MLP_AND_ATTN = dict(lora_r=4, lora_alpha=8.0, lora_attn_key=True, lora_mlp_down=True)
QLORA = dict(MLP_AND_ATTN, quant_4bit=True, quant_lora_4bit=True, quant_4bit_compute_dtype="fp32")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.fixture
def base_dir(tmp_path):
    """A tiny random LLaMA checkpoint with a sentencepiece tokenizer.model beside the weights."""
    make_sentencepiece(tmp_path / "tok")
    save_model(Transformer(get_preset("tiny")), tmp_path / "base", [tmp_path / "tok" / "tokenizer.model"])
    return tmp_path / "base"


def train_adapter(base_dir, out_dir, cfg: LoRAConfig, seed: int = 0):
    """A model loaded as training would (4-bit layers quantized on arrival) with random B, saved as an adapter."""
    model = load_model_with_lora(base_dir, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
        if cfg.train_norms:
            model.norm.weight.mul_(1.5)
    save_lora(model, out_dir, cfg, {"ckpt_dir": str(base_dir)})
    return model


def run(base_dir, lora_dir, out_dir, *extra) -> int:
    return convert_lora(["--base", str(base_dir), "--lora", str(lora_dir), "--output", str(out_dir), *extra])


def test_merged_checkpoint_reproduces_the_lora_model(base_dir, tmp_path, capsys):
    """q, k, v and down_proj in 2 layers = 8 merged layers; 2 x 2 block norms + the final norm = 5 trained."""
    cfg = LoRAConfig(**MLP_AND_ATTN, train_norms=True)
    model = train_adapter(base_dir, tmp_path / "adapter", cfg)
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged") == 0
    out = capsys.readouterr().out
    assert "LoRA r=4, scaling=2: 8 layers merged, 5 trained norms copied" in out
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    assert read_params(tmp_path / "merged") == read_params(base_dir)

    in_memory = copy.deepcopy(model)
    merge_lora(in_memory)
    state = dict(iter_safetensors(weight_files(tmp_path / "merged")))
    torch.testing.assert_close(state["layers.1.mlp.down_proj.weight"], in_memory.layers[1].mlp.down_proj.weight,
                               atol=1e-6, rtol=0)


def test_a_base_without_a_tokenizer_merges_with_a_warning(base_dir, tmp_path, capsys):
    train_adapter(base_dir, tmp_path / "adapter", LoRAConfig(**MLP_AND_ATTN))
    (base_dir / "tokenizer.model").unlink()
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged") == 0
    assert capsys.readouterr().err.endswith(f"warning: {base_dir} holds no tokenizer (tokenizer.json / "
                                            f"tokenizer.model): copy the model's tokenizer files into "
                                            f"{tmp_path / 'merged'} before generating with it or building a dataset "
                                            "for it\n")
    assert not list((tmp_path / "merged").glob("tokenizer*"))


def test_bf16_model_trains_float32_norms_and_merges_them(base_dir, tmp_path):
    """With bf16 base weights the trained norms are float32 like the adapters (a bf16 weight near 1 would round
    away AdamW's ~lr steps), are saved so and reload so; the bf16 merge computes what the LoRA model did."""
    cfg = LoRAConfig(**MLP_AND_ATTN, train_norms=True)
    model = load_model_with_lora(base_dir, cfg, dtype=torch.bfloat16)
    assert model.norm.weight.dtype == torch.float32 and model.norm.weight.requires_grad
    assert model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and not model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        model.norm.weight.add_(1e-4)  # one AdamW step's worth: lost in bf16 (ulp 2^-7 near 1)
    save_lora(model, tmp_path / "adapter", cfg, {})
    reloaded = load_model_with_lora(base_dir, dtype=torch.bfloat16, lora_dir=tmp_path / "adapter")
    assert torch.equal(reloaded.norm.weight, model.norm.weight)
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged", "--dtype", "bf16") == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(model), atol=0, rtol=0)


def test_a_bf16_merge_sums_in_float32(tmp_path):
    """A bf16 checkpoint with trained adapters: the merged weight is bf16(float32(W) + s·B A), rounded once (in
    bf16 the update would be rounded before the sum, and the sum again)."""
    save_model(Transformer(get_preset("tiny")).to(torch.bfloat16), tmp_path / "base")
    model = train_adapter(tmp_path / "base", tmp_path / "adapter", LoRAConfig(**MLP_AND_ATTN))
    assert run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged") == 0
    merged = dict(iter_safetensors(weight_files(tmp_path / "merged")))
    layer = model.layers[0].mlp.down_proj
    expected = (layer.weight.float() + layer.scaling * layer.lora_B @ layer.lora_A).bfloat16()
    assert torch.equal(merged["layers.0.mlp.down_proj.weight"], expected)


def test_4bit_adapter_merges_into_the_model_it_trained(base_dir, tmp_path, capsys):
    """The merged weights are Ŵ + s·B A (LoRA layers) and Ŵ (other 4-bit layers), so the plain merged model
    computes what the 4-bit LoRA model computed — and differs from merging into the unquantized W."""
    model = train_adapter(base_dir, tmp_path / "adapter", LoRAConfig(**QLORA))
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged") == 0
    assert "frozen 4-bit layers dequantized" in capsys.readouterr().out
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(model), atol=1e-4, rtol=0)

    full_precision = load_model_with_lora(base_dir, LoRAConfig(**MLP_AND_ATTN), lora_dir=tmp_path / "adapter")
    assert (logits(full_precision) - logits(model)).abs().max() > 1e-3


def test_bf16_4bit_base_is_requantized_from_bf16(base_dir, tmp_path):
    """Training loaded the fp32 checkpoint as bf16 and quantized that; the merge must quantize the same bf16."""
    cfg = LoRAConfig(**{**QLORA, "quant_4bit_compute_dtype": "bf16"})
    model = load_model_with_lora(base_dir, cfg, dtype=torch.bfloat16)
    save_lora(model, tmp_path / "adapter", cfg, {})
    assert json.loads((tmp_path / "adapter" / LORA_CONFIG_FILE).read_text())["base"]["weight_dtype"] == "bfloat16"
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged", "--dtype", "bf16") == 0
    merged = dict(iter_safetensors(weight_files(tmp_path / "merged")))
    packed = model.layers[0].mlp.up_proj.packed
    assert torch.equal(merged["layers.0.mlp.up_proj.weight"], packed.dequantize())
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


def test_training_ckpt_dir_uses_the_highest_step(base_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_adapter(base_dir, run_dir / "step-000010", LoRAConfig(**MLP_AND_ATTN), seed=1)
    latest = train_adapter(base_dir, run_dir / "step-000200", LoRAConfig(**MLP_AND_ATTN), seed=2)
    train_adapter(base_dir, run_dir / ".tmp-step-000300", LoRAConfig(**MLP_AND_ATTN), seed=3)
    (run_dir / "step-000250").mkdir()
    assert run(base_dir, run_dir, tmp_path / "merged") == 0
    assert "step-000200 (highest of 2 step checkpoint(s)" in capsys.readouterr().out
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(latest), atol=1e-5, rtol=0)


def edit_json(path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def edit_adapter(path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


REFUSALS = {
    "model_type": (lambda d: edit_json(d / LORA_CONFIG_FILE, lambda c: c["base"].update(model_type="deepseek")),
                   "adapter is for model_type 'deepseek'"),
    "params": (lambda d: edit_json(d / LORA_CONFIG_FILE, lambda c: c["base"]["params"].update(n_layers=3)),
               "other params (n_layers)"),
    "shape": (lambda d: edit_adapter(d / ADAPTER_FILE, lambda t: t.update({
        "layers.0.self_attn.q_proj.lora_A": torch.zeros(5, 64)})),
              "shape mismatch for layers.0.self_attn.q_proj.lora_A"),
    "missing key": (lambda d: edit_adapter(d / ADAPTER_FILE, lambda t: t.pop("layers.1.mlp.down_proj.lora_B")),
                    "lacks 1 tensors the model expects, e.g. ['layers.1.mlp.down_proj.lora_B']"),
    "no adapter": (lambda d: [p.unlink() for p in d.iterdir()], "no adapter found in"),
    "no weights": (lambda d: (d / ADAPTER_FILE).unlink(), "adapter.safetensors not found"),
    "truncated weights": (lambda d: (d / ADAPTER_FILE).write_bytes((d / ADAPTER_FILE).read_bytes()[:100]),
                          "adapter.safetensors is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_mismatches_are_refused(base_dir, tmp_path, capsys, case):
    spoil, message = REFUSALS[case]
    train_adapter(base_dir, tmp_path / "adapter", LoRAConfig(**MLP_AND_ATTN))
    spoil(tmp_path / "adapter")
    assert run(base_dir, tmp_path / "adapter", tmp_path / "merged") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_other_base_weights_are_refused_and_the_output_keeps_the_trained_dtype(base_dir, tmp_path, capsys):
    """The trainers record the base's SHA-256 (``base_info``): the same adapter on another base of the same shape
    (a DPO adapter merged into the pretrained model instead of its SFT merge) is refused, here and when loaded,
    unless --allow-other-base. The default output dtype is the trained one (float32 on this bf16 base); --dtype
    keep writes the base's bf16."""
    save_model(Transformer(get_preset("tiny")).to(torch.bfloat16), tmp_path / "bf16", [])
    model = load_model_with_lora(tmp_path / "bf16", LoRAConfig(**MLP_AND_ATTN), dtype=torch.float32)
    save_lora(model, tmp_path / "adapter", model.lora_config, base_info(tmp_path / "bf16"))
    assert run(base_dir, tmp_path / "adapter", tmp_path / "a") == 1
    assert "was trained on other base weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="other base weights"):
        load_model_with_lora(base_dir, lora_dir=tmp_path / "adapter")
    assert run(tmp_path / "bf16", tmp_path / "adapter", tmp_path / "trained") == 0
    assert {t.dtype for _, t in iter_safetensors(weight_files(tmp_path / "trained"))} == {torch.float32}
    assert run(tmp_path / "bf16", tmp_path / "adapter", tmp_path / "keep", "--dtype", "keep") == 0
    assert {t.dtype for _, t in iter_safetensors(weight_files(tmp_path / "keep"))} == {torch.bfloat16}
    assert run(base_dir, tmp_path / "adapter", tmp_path / "forced", "--allow-other-base") == 0


def test_a_truncated_base_is_named_as_unreadable_not_as_another_base(base_dir, tmp_path, capsys):
    """A truncated download of the right base hashes differently too: its unreadable file is the error."""
    train_adapter(base_dir, tmp_path / "adapter", LoRAConfig(**MLP_AND_ATTN))
    shutil.copytree(base_dir, tmp_path / "torn")
    weights = tmp_path / "torn" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert run(tmp_path / "torn", tmp_path / "adapter", tmp_path / "merged") == 1
    assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err


def test_output_over_the_base_is_refused(base_dir, tmp_path, capsys):
    train_adapter(base_dir, tmp_path / "adapter", LoRAConfig(**MLP_AND_ATTN))
    assert run(base_dir, tmp_path / "adapter", base_dir) == 1
    assert "must differ from --base" in capsys.readouterr().err


def test_defaults_are_the_demo_and_help(tmp_path, capsys):
    """Without arguments the script merges the demo's SFT adapter; a missing adapter is one clear error."""
    args = parse_args([])
    assert (args.base, args.lora, args.output) == (str(demo.BASE_MODEL), demo.SFT_CKPT, demo.SFT_MERGED)
    assert convert_lora(["--lora", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 1
    assert "no adapter found" in capsys.readouterr().err
    assert convert_lora(["--device", "gpu", "--output", str(tmp_path / "out")]) == 1
    assert "unknown device 'gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_lora(["--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--base", "--lora", "--output", "--dtype", "--device", "step-XXXXXX"))


def test_adapter_for_a_model_without_the_base_layers_is_refused(base_dir, tmp_path, capsys):
    """An adapter with lm_head LoRA against a tied base (no lm_head): params differ, refused before writing."""
    tied = Transformer(get_preset("tiny-tied"))
    save_model(tied, tmp_path / "tied")
    model = apply_lora(Transformer(get_preset("tiny")), LoRAConfig(lora_head=True))
    save_lora(model, tmp_path / "adapter", LoRAConfig(lora_head=True), {})
    assert run(tmp_path / "tied", tmp_path / "adapter", tmp_path / "merged") == 1
    assert "tie_word_embeddings" in capsys.readouterr().err


def test_bf16_4bit_experts_are_requantized_from_bf16(tmp_path):
    """An fp32 DeepSeek checkpoint trained as bf16 with 4-bit experts: the merge quantizes each expert's bf16
    weight as training did, so the merged experts are exactly the ones the trained model dequantized."""
    from dpo_llama.models.deepseek import DeepseekTransformer

    save_model(DeepseekTransformer(get_preset("tiny-deepseek-v2")), tmp_path / "base")
    cfg = LoRAConfig(lora_r=4, lora_moe_routed_experts=True, quant_lora_4bit=True, quant_4bit_compute_dtype="bf16")
    model = load_model_with_lora(tmp_path / "base", cfg, dtype=torch.bfloat16)
    save_lora(model, tmp_path / "adapter", cfg, {})
    assert run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", "--dtype", "bf16") == 0
    merged = dict(iter_safetensors(weight_files(tmp_path / "merged")))
    layer = model.moe_layers()[0]
    key = next(k for k in merged if k.endswith("experts.gate_proj"))
    for e, packed in enumerate(layer.experts.packed["gate_proj"]):
        assert torch.equal(merged[key][e], packed.dequantize()), e


@pytest.mark.parametrize("four_bit", [False, True], ids=["full-precision", "4bit-experts"])
def test_routed_expert_adapters_merge_per_expert(tmp_path, capsys, four_bit):
    """A tiny DeepSeek-V2 with adapters on q, v and every routed expert: each stacked projection merges as
    W'_e = W_e + s·B_e A_e (4-bit experts: Ŵ_e + s·B_e A_e), so the merged model computes the adapted one."""
    from dpo_llama.models.deepseek import DeepseekTransformer

    make_sentencepiece(tmp_path / "tok")
    save_model(DeepseekTransformer(get_preset("tiny-deepseek-v2")), tmp_path / "base",
               [tmp_path / "tok" / "tokenizer.model"])
    quant = dict(quant_lora_4bit=True, quant_4bit_compute_dtype="fp32") if four_bit else {}
    cfg = LoRAConfig(lora_r=4, lora_alpha=8.0, lora_moe_routed_experts=True, **quant)
    model = load_model_with_lora(tmp_path / "base", cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_lora(model, tmp_path / "adapter", cfg, {})
    assert run(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged") == 0
    n_moe = len(model.moe_layers())
    n_linear = len(list(lora_layers(model)))
    assert f"{n_linear + 3 * n_moe} layers merged" in capsys.readouterr().out
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(model), atol=1e-4, rtol=0)
