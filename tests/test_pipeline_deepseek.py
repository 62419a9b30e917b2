"""SFT and DPO of a tiny DeepSeek-V2 (MLA attention, one dense + one MoE layer of 8 routed experts) with the
existing scripts, flags only: LoRA, and LoRA with 4-bit experts; the router's load-balancing loss is logged
as ``aux_loss`` and is part of the optimised loss.

Tokenizer: the deepseek chat template needs only BOS and EOS (``User: ...\\n\\nAssistant: ...<eos>`` is plain
text), so it works with any tokenizer; these tests use the DeepSeek-V2-Lite-Chat-shaped byte-level BPE
``tokenizer.json`` of tests/tokenizer_fixtures.py, as the real models ship.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpo_llama.models.lora import ADAPTER_FILE, LORA_CONFIG_FILE, load_model_with_lora
from dpo_llama.run_dpo_lora import main as run_dpo
from dpo_llama.run_sft_lora import main as run_sft
from scripts.build_finetune_datasets import main as build_sft
from scripts.build_preference_datasets import main as build_preference
from scripts.convert_lora_checkpoint import main as merge_lora
from tests.pipeline_fixtures import (SMALL_RUN, flags, preference_rows, read_history, series, sft_rows,
                                     tiny_deepseek_v2, write_jsonl)
from tests.tokenizer_fixtures import make_hf_tokenizer

LN2 = math.log(2)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """DeepSeek tokenizer, tiny DeepSeek-V2 base and an SFT dataset (9 train, 3 validation)."""
    root = tmp_path_factory.mktemp("deepseek")
    tokenizer = make_hf_tokenizer(root / "tok", "deepseek")
    base = tiny_deepseek_v2(root / "base", tokenizer)
    assert build_sft(flags(input=write_jsonl(root / "sft.jsonl", sft_rows(12)), tokenizer=tokenizer,
                           template="deepseek", output=root / "sft-data", val_ratio=0.25)) == 0
    return {"root": root, "base": base, "sft_data": root / "sft-data",
            "pairs": write_jsonl(root / "pairs.jsonl", preference_rows(16))}


def run_argv(base: Path, data: Path, out: Path, **overrides) -> list[str]:
    return flags(**{**SMALL_RUN, "pretrain_ckpt_dir": base, "train_data_dir": data, "ckpt_dir": out / "ckpt",
                    "log_dir": out / "logs", "run_name": "run", **overrides})


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "lora-4bit-experts"])
def test_sft_loss_falls_and_logs_the_aux_loss(ws, tmp_path, quant):
    """10 full-batch steps: the SFT loss falls by over a nat (from about ln(vocab) = 6.4); aux_loss > 0 is
    logged every step; with --quant-4bit true the routed experts of the trained model are stored 4-bit."""
    four_bit = dict(quant_4bit=True) if quant else {}
    assert run_sft(run_argv(ws["base"], ws["sft_data"], tmp_path, max_train_steps=10, micro_batch_size=9,
                            learning_rate=4e-2, **four_bit)) == 0
    history = read_history(tmp_path / "logs" / "run")
    loss, aux = series(history, "train/loss"), series(history, "train/aux_loss")
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 1.0
    assert len(aux) == 10 and min(aux) > 0
    adapter = tmp_path / "ckpt" / "step-000010"
    assert json.loads((adapter / LORA_CONFIG_FILE).read_text())["lora"]["quant_4bit"] is quant
    experts = load_model_with_lora(ws["base"], None, lora_dir=adapter).moe_layers()[0].experts
    assert (experts.packed is not None and experts.gate_proj is None) is quant


def test_sft_loss_includes_the_aux_loss(ws, tmp_path):
    """Same first step with --aux-loss-weight 1 and 0 (same adapter init, same batch): the logged losses
    differ by exactly the logged aux_loss, i.e. loss = NLL + aux."""
    for weight in (1, 0):
        assert run_sft(run_argv(ws["base"], ws["sft_data"], tmp_path / str(weight), max_train_steps=1,
                                aux_loss_weight=weight)) == 0
    with_aux, without = (read_history(tmp_path / name / "logs" / "run")[1] for name in ("1", "0"))
    assert "train/aux_loss" not in without
    assert with_aux["train/loss"] - without["train/loss"] == pytest.approx(with_aux["train/aux_loss"], abs=1e-6)


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora-4bit-experts"])
def test_dpo_after_sft_merge(ws, tmp_path, quant):
    """SFT adapter -> merged SFT model -> preference data scored by it (nf4-quantized for the 4-bit run) ->
    DPO: the step-0 check passes (ln 2), the first logged loss is ln 2 + aux_loss, and the loss falls."""
    four_bit = dict(quant_4bit=True, quant_lora_4bit=True) if quant else {}
    assert run_sft(run_argv(ws["base"], ws["sft_data"], tmp_path / "sft", **four_bit)) == 0
    sft_model = tmp_path / "sft-merged"
    assert merge_lora(flags(base=ws["base"], lora=tmp_path / "sft" / "ckpt", output=sft_model)) == 0
    data = tmp_path / "pref"
    assert build_preference(flags(input=ws["pairs"], ref_model=sft_model, template="deepseek", output=data,
                                  val_ratio=0.25, quant_4bit="nf4" if quant else "none", device="cpu")) == 0

    assert run_dpo(run_argv(sft_model, data, tmp_path / "dpo", max_train_steps=8, **four_bit)) == 0
    check = json.loads((tmp_path / "dpo" / "logs" / "run" / "reference_check.json").read_text())
    assert check["max_abs_logp_diff"] < 1e-4 and check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-5)
    history = read_history(tmp_path / "dpo" / "logs" / "run")
    first = history[1]
    assert first["train/aux_loss"] > 0
    assert first["train/loss"] == pytest.approx(LN2 + first["train/aux_loss"], abs=1e-5)
    loss = series(history, "train/loss")
    assert np.mean(loss[-2:]) < loss[0] - 0.1


@pytest.mark.parametrize("backend, transposed, routed_lora",
                         [("cpu_kernel", False, False), ("cpu_kernel", True, False), ("cpu_kernel", False, True),
                          ("cpu_kernel_int8", False, True)],
                         ids=["packed", "with-transposed-copies", "lora-on-routed-experts", "int8-with-lora"])
def test_dpo_with_cpu_kernel_experts(ws, tmp_path, backend, transposed, routed_lora):
    """Routed experts in the C++ kernel for both the reference log-probs and DPO (with and without transposed
    weight copies, with LoRA on the routed experts too, and as int8): the step-0 check passes (same kernel,
    same log-probs) and the loss falls; the expert adapters are saved and merge into a plain checkpoint."""
    from dpo_llama.models.cpu_moe import kernel_available
    if not kernel_available():
        pytest.skip("the C++ MoE kernel does not build on this machine")
    data = tmp_path / "pref"
    assert build_preference(flags(input=ws["pairs"], ref_model=ws["base"], template="deepseek", output=data,
                                  val_ratio=0.25, experts_backend=backend, device="cpu")) == 0
    assert json.loads((data / "meta.json").read_text())["reference"]["experts_backend"] == backend
    assert run_dpo(run_argv(ws["base"], data, tmp_path / "dpo", max_train_steps=8, experts_backend=backend,
                            experts_transposed_copy=transposed, lora_moe_routed_experts=routed_lora)) == 0
    check = json.loads((tmp_path / "dpo" / "logs" / "run" / "reference_check.json").read_text())
    assert check["max_abs_logp_diff"] < 1e-4 and check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-5)
    loss = series(read_history(tmp_path / "dpo" / "logs" / "run"), "train/loss")
    assert np.mean(loss[-2:]) < loss[0] - 0.1
    if routed_lora:
        adapter = load_file(tmp_path / "dpo" / "ckpt" / "step-000008" / ADAPTER_FILE)
        assert adapter["layers.1.mlp.experts.lora.up_proj.lora_B"].abs().sum() > 0
        assert merge_lora(flags(base=ws["base"], lora=tmp_path / "dpo" / "ckpt", output=tmp_path / "merged")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (hybrid GPU + CPU path)")
@pytest.mark.parametrize("routed_lora", [False, True], ids=["packed", "lora-on-routed-experts"])
def test_hybrid_dpo_attention_on_cuda_experts_in_the_cpu_kernel(ws, tmp_path, routed_lora):
    """Hybrid GPU + CPU: the model loads onto CUDA (bf16) with its routed experts packed in CPU RAM, where their
    adapters live too; the reference log-probs and 8 DPO steps run so, the step-0 check passes (the same
    kernel and dtype on both sides) and the loss falls."""
    from dpo_llama.models.checkpoint import load_model
    from dpo_llama.models.cpu_moe import kernel_available
    from dpo_llama.models.lora import LoRAConfig
    from dpo_llama.utils.finetune import prepare_model
    if not kernel_available():
        pytest.skip("the C++ MoE kernel does not build on this machine")
    lora = LoRAConfig(lora_r=4, lora_moe_routed_experts=routed_lora)
    model = load_model(ws["base"], "cuda", torch.bfloat16, prepare=lambda m: prepare_model(m, "cpu_kernel", lora))
    experts = model.moe_layers()[0].experts
    assert experts.kernel_packed is not None and experts.gate_proj is None
    assert model.embed_tokens.weight.is_cuda and model.moe_layers()[0].gate.weight.is_cuda
    assert (experts.lora is not None) is routed_lora
    assert all(p.device.type == "cpu" for p in experts.parameters())

    data = tmp_path / "pref"
    assert build_preference(flags(input=ws["pairs"], ref_model=ws["base"], template="deepseek", output=data,
                                  val_ratio=0.25, device="cuda", experts_backend="cpu_kernel")) == 0
    assert run_dpo(run_argv(ws["base"], data, tmp_path / "dpo", max_train_steps=8, device="cuda",
                            experts_backend="cpu_kernel", lora_moe_routed_experts=routed_lora)) == 0
    check = json.loads((tmp_path / "dpo" / "logs" / "run" / "reference_check.json").read_text())
    assert check["max_abs_logp_diff"] < 1e-2 and check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-3)
    loss = series(read_history(tmp_path / "dpo" / "logs" / "run"), "train/loss")
    assert np.mean(loss[-2:]) < loss[0] - 0.1


def test_transposed_copies_need_the_cpu_kernel_backend():
    from dpo_llama.configs.sft_lora import SFTLoRAConfig
    with pytest.raises(ValueError, match="experts_transposed_copy needs experts_backend=cpu_kernel"):
        SFTLoRAConfig(pretrain_ckpt_dir="base", train_data_dir="data", experts_transposed_copy=True)
