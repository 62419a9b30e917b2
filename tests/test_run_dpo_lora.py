"""dpo_llama/run_dpo_lora.py driven only by command-line overrides: the step-0 check, the fingerprint gate,
learning a preference, every loss type, data refusals and the whole SFT -> DPO -> merge chain.

The preference data are synthetic (tests/pipeline_fixtures.py): chosen answers name colours, rejected ones
name animals, so a tiny random LLaMA with LoRA learns to prefer the chosen answers of unseen prompts.
"""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo_llama.run_dpo_lora as run_dpo_module
import scripts.build_preference_datasets as builder_module
from dpo_llama.models.checkpoint import load_model
from dpo_llama.models.lora import (LoRAConfig, adapter_fingerprint, base_info, find_adapter, load_model_with_lora,
                                   save_lora)
from dpo_llama.run_dpo_lora import main as run_dpo
from dpo_llama.run_sft_lora import main as run_sft
from dpo_llama.utils.dataset_io import META_FILE, TRAIN_FILE, load_examples, save_examples
from scripts.build_finetune_datasets import main as build_sft
from scripts.build_preference_datasets import main as build_preference
from scripts.convert_lora_checkpoint import main as merge_lora
from tests.pipeline_fixtures import (SMALL_RUN, Killed, die_after_the_next_checkpoint, flags, kto_rows,
                                     preference_rows, read_history, series, sft_rows, tiny_llama, write_jsonl)
from tests.tokenizer_fixtures import make_sentencepiece

LN2 = math.log(2)
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer, base checkpoint, pair / KTO files, and a paired dataset (18 train, 6 validation) whose
    reference is the base model."""
    root = tmp_path_factory.mktemp("dpo")
    tokenizer = make_sentencepiece(root / "tok")
    ws = {"root": root, "tokenizer": tokenizer, "base": tiny_llama(root / "base", tokenizer),
          "pairs": write_jsonl(root / "pairs.jsonl", preference_rows(24)),
          "kto": write_jsonl(root / "kto.jsonl", kto_rows(16))}
    ws["data"] = build(ws, root / "data")
    return ws


def build(ws: dict, out: Path, *switches: str, **options) -> Path:
    """Builds a preference dataset (pairs by default, reference = the base model, on the CPU like the runs) and
    returns its directory."""
    argv = [*switches] + flags(**{"input": ws["pairs"], "ref_model": ws["base"], "template": "llama2",
                                  "output": out, "val_ratio": 0.25, "device": "cpu", **options})
    assert build_preference(argv) == 0
    return out


def dpo_argv(ws: dict, out: Path, **overrides) -> list[str]:
    """Flags of a small DPO run on the workspace's dataset writing to ``out``; ``overrides`` win."""
    return flags(**{**SMALL_RUN, "pretrain_ckpt_dir": ws["base"], "train_data_dir": ws["data"],
                    "ckpt_dir": out / "ckpt", "log_dir": out / "logs", "run_name": "run", **overrides})


def reference_check(out: Path) -> dict:
    return json.loads((out / "logs" / "run" / "reference_check.json").read_text())


def test_policy_starts_at_the_reference_ln2_and_zero_rewards(ws, tmp_path):
    """The written check: policy log-probs equal the stored ones, sigmoid loss ln 2, zero rewards; the first
    logged training step (computed before its update) agrees."""
    assert run_dpo(dpo_argv(ws, tmp_path, max_train_steps=1)) == 0
    check = reference_check(tmp_path)
    assert check["max_abs_logp_diff"] < 1e-5 and check["mean_abs_reward"] < 1e-6
    assert check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-6) and check["pairs"] == 4
    first = read_history(tmp_path / "logs" / "run")[1]
    assert first["train/loss"] == pytest.approx(LN2, abs=1e-6)
    for name in ("chosen", "rejected", "margins", "accuracies"):
        assert first[f"train/rewards/{name}"] == pytest.approx(0.0, abs=1e-6)


def test_qlora_policy_passes_against_an_nf4_reference(ws, tmp_path):
    """--quant-4bit nf4 in the builder quantizes what --quant-4bit true --quant-lora-4bit true quantizes in
    training, identically: same fingerprint, log-probs equal at step 0."""
    data = build(ws, tmp_path / "nf4", quant_4bit="nf4")
    qlora = dict(quant_4bit=True, quant_lora_4bit=True, max_train_steps=1)
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data, **qlora)) == 0
    check = reference_check(tmp_path)
    assert check["max_abs_logp_diff"] < 1e-4 and check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-5)


def test_full_precision_reference_is_refused_for_a_qlora_policy(ws, tmp_path, capsys):
    """The dataset's reference was not quantized: refused naming the quant part, unless
    --allow-reference-mismatch, which trains with a warning and still measures the (now nonzero) gap."""
    qlora = dict(quant_4bit=True, quant_lora_4bit=True, quant_4bit_compute_dtype="fp32", max_train_steps=1)
    assert run_dpo(dpo_argv(ws, tmp_path / "refused", **qlora)) == 1
    err = capsys.readouterr().err
    assert "were not computed with this starting policy" in err
    assert "quant: dataset has None, policy has {" in err and "--allow-reference-mismatch" in err
    assert "the builder's --quant-4bit stores every frozen linear layer 4-bit" in err
    assert run_dpo(dpo_argv(ws, tmp_path / "allowed", allow_reference_mismatch=True, **qlora)) == 0
    assert "warning: the dataset's reference log-probs" in capsys.readouterr().err
    assert reference_check(tmp_path / "allowed")["max_abs_logp_diff"] > 1e-4


def edit_meta(data: Path, out: Path, edit) -> Path:
    """A copy of a dataset directory (hard links to the splits) with an edited meta.json."""
    out.mkdir()
    for path in data.iterdir():
        (out / path.name).hardlink_to(path)
    (out / META_FILE).unlink()
    meta = json.loads((data / META_FILE).read_text())
    edit(meta)
    (out / META_FILE).write_text(json.dumps(meta))
    return out


def test_other_weights_dtype_or_template_are_refused(ws, tmp_path, capsys):
    """Each fingerprinted part on its own: another checkpoint (same tokenizer), another dtype, and a dataset
    that says it was rendered with another template than its reference saw."""
    other = tiny_llama(tmp_path / "other", ws["tokenizer"], seed=1)
    chatml = edit_meta(ws["data"], tmp_path / "chatml", lambda meta: meta.update(template="chatml"))
    cases = {"weights_sha256: dataset has": dict(pretrain_ckpt_dir=other),
             "dtype: dataset has 'fp32', policy has 'bf16'": dict(dtype="bf16"),
             "template: dataset has 'llama2', policy has 'chatml'": dict(train_data_dir=chatml)}
    for message, override in cases.items():
        assert run_dpo(dpo_argv(ws, tmp_path / "run", **override)) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("dataset has") == 1
        assert ("the dataset was built against" in err) == message.startswith("weights_sha256")
    assert not (tmp_path / "run" / "ckpt").exists()


def test_data_tokenized_with_another_tokenizer_is_refused(ws, tmp_path, capsys):
    """--tokenizer other (same size, other pieces) in the builder: the policy checkpoint's tokenizer differs,
    refused before the model is loaded."""
    other = make_sentencepiece(tmp_path / "tok", vocab_size=380)
    data = build(ws, tmp_path / "data", tokenizer=other)
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data)) == 1
    assert "tokenized with another tokenizer" in capsys.readouterr().err


def test_a_policy_continuing_an_adapter_needs_the_reference_built_with_it(ws, tmp_path, capsys):
    """The reference scored with --lora ADAPTER: the policy passes only with --init-lora-dir ADAPTER (then
    it starts exactly at the reference, and its config.json records the adapter's LoRA settings); without it, the
    adapter part of the fingerprint differs. LoRA flags contradicting the adapter are refused."""
    cfg = LoRAConfig(lora_r=2, lora_mlp_up=True)
    model = load_model_with_lora(ws["base"], cfg)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.lora_B.normal_(std=0.1)
    save_lora(model, tmp_path / "adapter", cfg, {"ckpt_dir": str(ws["base"])})
    data = build(ws, tmp_path / "data", lora=tmp_path / "adapter")
    recorded = json.loads((data / META_FILE).read_text())["reference"]
    assert recorded["lora_sha256"] == adapter_fingerprint(tmp_path / "adapter")
    # with --lora the adapter's own 4-bit settings apply (none here): a contradicting --quant-4bit is refused
    argv = flags(input=ws["pairs"], ref_model=ws["base"], template="llama2", output=tmp_path / "data-4bit",
                 device="cpu", lora=tmp_path / "adapter", quant_4bit="nf4")
    assert build_preference(argv) == 1
    assert "--quant-4bit nf4:" in capsys.readouterr().err and not (tmp_path / "data-4bit").exists()

    assert run_dpo(dpo_argv(ws, tmp_path / "fresh", train_data_dir=data, max_train_steps=1)) == 1
    assert "lora_sha256: dataset has" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "continued", train_data_dir=data, init_lora_dir=tmp_path / "adapter",
                            max_train_steps=1, lora_r=2)) == 0  # the adapter's rank (the workspace runs use 4)
    assert reference_check(tmp_path / "continued")["max_abs_logp_diff"] < 1e-5
    recorded = json.loads((tmp_path / "continued" / "logs" / "run" / "config.json").read_text())
    assert (recorded["lora_r"], recorded["lora_mlp_up"], recorded["lora_attn_proj"]) == (2, True, False)
    # a flag the adapter would override is refused, not ignored (its data were scored without 4-bit)
    assert run_dpo(dpo_argv(ws, tmp_path / "q", train_data_dir=data, init_lora_dir=tmp_path / "adapter",
                            lora_r=2, quant_lora_4bit=True, lora_dropout=0.1)) == 1
    assert ("contradict: lora_dropout=0.1 (adapter: 0.0), quant_lora_4bit=True (adapter: False)"
            in capsys.readouterr().err)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, qlora", [("cpu", False), pytest.param("cuda", False, marks=CUDA, id="cuda-lora"),
                                           pytest.param("cuda", True, marks=CUDA, id="cuda-qlora-nf4")])
def test_dpo_learns_the_preference_on_unseen_prompts(ws, tmp_path, device, qlora):
    """40 pairs (30 train, 10 validation), reference log-probs and policy on the same device: the step-0 check
    passes; validation reward accuracy starts at 0 (all rewards are 0 at step 0) and ends at or above 0.8 after
    10 steps; the validation loss falls below ln 2. On CUDA, the usual GPU run: bf16 weights, bf16 autocast,
    float32 adapters, and with QLoRA the base weights nf4 on both sides."""
    data = build(ws, tmp_path / "data", input=write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40, seed=1)),
                 device=device, quant_4bit="nf4" if qlora else "none")
    four_bit = dict(quant_4bit=True, quant_lora_4bit=True) if qlora else {}
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data, max_train_steps=10, micro_batch_size=6,
                            val_interval=5, device=device, **four_bit)) == 0
    check = reference_check(tmp_path)
    assert check["max_abs_logp_diff"] < 1e-2 and check["sigmoid_loss"] == pytest.approx(LN2, abs=1e-3)
    history = read_history(tmp_path / "logs" / "run")
    accuracy, loss = series(history, "val/rewards/accuracies"), series(history, "val/loss")
    assert len(accuracy) == 2 and accuracy[-1] >= 0.8
    assert loss[-1] < LN2 - 0.1 and series(history, "val/rewards/margins")[-1] > 0
    assert (tmp_path / "logs" / "run" / "reward_accuracy.png").is_file()


def test_stored_references_off_by_more_than_the_tolerance_are_refused(ws, tmp_path, capsys):
    """The first pair's stored chosen log-prob moved by 0.5 (its fingerprint unchanged): the step-0 check sees
    0.5 / (its scored tokens) per token, above the fp32 default 1e-3, and refuses; a looser tolerance trains;
    a bf16 policy's default is 3e-2."""
    data = edit_meta(ws["data"], tmp_path / "data", lambda meta: None)
    examples = load_examples(data / TRAIN_FILE)
    examples[0]["ref_chosen_logps"] = examples[0]["ref_chosen_logps"] + np.float32(0.5)
    (data / TRAIN_FILE).unlink()  # a hard link to the workspace's split
    save_examples(examples, data / TRAIN_FILE)
    assert run_dpo(dpo_argv(ws, tmp_path / "a", train_data_dir=data, max_train_steps=1)) == 1
    assert "per token (> --reference-check-tolerance 0.001) before training" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "b", train_data_dir=data, max_train_steps=1,
                            reference_check_tolerance=1.0)) == 0
    check = reference_check(tmp_path / "b")
    assert check["max_abs_logp_diff"] == pytest.approx(0.5, abs=1e-4) and check["max_abs_logp_diff_per_token"] > 1e-3
    from dpo_llama.configs.dpo_lora import DPOLoRAConfig
    from dpo_llama.run_dpo_lora import reference_tolerance
    assert reference_tolerance(DPOLoRAConfig(dtype="bf16"), torch.device("cpu")) == 3e-2
    assert reference_tolerance(DPOLoRAConfig(dtype="fp32"), torch.device("cpu")) == 1e-3
    assert reference_tolerance(DPOLoRAConfig(dtype="fp32"), torch.device("cuda")) == 3e-2  # bf16 autocast
    assert reference_tolerance(DPOLoRAConfig(dtype="fp32", quant_4bit=True), torch.device("cpu")) == 3e-2


def test_kto_policy_starts_at_the_reference(ws, tmp_path):
    """KTO data get the step-0 check too: its completions' and KL completions' log-probs equal the stored ones."""
    data = build(ws, tmp_path / "kto", input=ws["kto"])
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data, loss_type="kto", max_train_steps=1)) == 0
    check = reference_check(tmp_path)
    assert check["max_abs_logp_diff"] < 1e-5 and check["mean_abs_reward"] < 1e-6 and check["examples"] == 4


def test_load_policy_applies_activation_checkpointing_and_widens_bf16_trained_norms(ws):
    """--activation-checkpointing reaches the model; with --dtype bf16 --train-norms the trained norm weights are
    float32 (a bf16 weight near 1 would never move), the frozen weights stay bf16."""
    from dpo_llama.configs.dpo_lora import DPOLoRAConfig
    from dpo_llama.utils.finetune import load_policy

    cfg = DPOLoRAConfig(pretrain_ckpt_dir=str(ws["base"]), train_data_dir=str(ws["data"]), dtype="bf16",
                        train_norms=True, activation_checkpointing=True)
    model = load_policy(cfg, torch.device("cpu"))
    assert model.activation_checkpointing is True
    assert model.norm.weight.dtype == torch.float32 and model.norm.weight.requires_grad
    assert model.embed_tokens.weight.dtype == torch.bfloat16


def test_the_step0_check_refuses_just_above_its_tolerance(ws, tmp_path, capsys):
    """A reference off by d per token (measured once with the check allowed): a tolerance of 0.9 d refuses the
    run, 1.1 d lets it train."""
    data = build(ws, tmp_path / "data")
    examples = load_examples(data / TRAIN_FILE)
    for example in examples:
        example["ref_chosen_logps"] = example["ref_chosen_logps"] - np.float32(0.05)
    save_examples(examples, data / TRAIN_FILE)
    assert run_dpo(dpo_argv(ws, tmp_path / "a", train_data_dir=data, max_train_steps=1,
                            reference_check_tolerance=1e9)) == 0
    d = reference_check(tmp_path / "a")["max_abs_logp_diff_per_token"]
    assert d > 1e-3
    assert run_dpo(dpo_argv(ws, tmp_path / "b", train_data_dir=data, max_train_steps=1,
                            reference_check_tolerance=0.9 * d)) == 1
    assert run_dpo(dpo_argv(ws, tmp_path / "c", train_data_dir=data, max_train_steps=1,
                            reference_check_tolerance=1.1 * d)) == 0


def test_kto_trains_a_split_step_as_one_batch(ws, tmp_path):
    """KTO's z0 over the whole optimizer step: 2 micro-batches of 2 train like 1 batch of 4 (loss, z0 and the
    gradient norm of every step)."""
    data = build(ws, tmp_path / "kto", input=ws["kto"])
    runs = {"one": dict(micro_batch_size=4, gradient_accumulation_steps=1),
            "split": dict(micro_batch_size=2, gradient_accumulation_steps=2)}
    for name, shape in runs.items():
        assert run_dpo(dpo_argv(ws, tmp_path / name, train_data_dir=data, loss_type="kto", learning_rate=0.1,
                                **shape)) == 0
    one, split = (read_history(tmp_path / name / "logs" / "run") for name in runs)
    for metric in ("train/loss", "train/kl", "train/grad_norm"):
        assert series(split, metric) == pytest.approx(series(one, metric), rel=1e-4, abs=1e-6), metric
    assert max(series(one, "train/kl")) > 0


def test_continuing_an_adapter_on_other_base_weights_is_refused(ws, tmp_path, capsys):
    """--init-lora-dir with an adapter trained on base A, --pretrain-ckpt-dir base B (same shapes, other
    weights): refused before training, also for a loss that needs no reference (nothing else would notice)."""
    save_lora(load_model_with_lora(ws["base"], LoRAConfig(lora_r=2)), tmp_path / "adapter", LoRAConfig(lora_r=2),
              base_info(ws["base"]))
    other = tiny_llama(tmp_path / "other", ws["tokenizer"], seed=1)
    no_reference = build(ws, tmp_path / "noref", "--no-reference")
    assert run_dpo(dpo_argv(ws, tmp_path / "run", train_data_dir=no_reference, loss_type="simpo",
                            pretrain_ckpt_dir=other, init_lora_dir=tmp_path / "adapter")) == 1
    assert "was trained on other base weights" in capsys.readouterr().err


def test_dpo_resume_continues_without_remeasuring_the_trained_policy(ws, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed logs the uninterrupted run's losses: the resume
    skips the step-0 check (its trained policy no longer equals the reference), which --resume true on an empty
    checkpoint directory still runs."""
    run = dict(max_train_steps=4, ckpt_interval=2, learning_rate=0.1)
    assert run_dpo(dpo_argv(ws, tmp_path / "whole", **run)) == 0
    die_after_the_next_checkpoint(monkeypatch)
    with pytest.raises(Killed, match="step-000002"):
        run_dpo(dpo_argv(ws, tmp_path / "killed", **run))
    monkeypatch.undo()
    check = tmp_path / "killed" / "logs" / "run" / "reference_check.json"
    check.unlink()
    assert run_dpo(dpo_argv(ws, tmp_path / "killed", resume=True, **run)) == 0
    assert not check.exists()
    killed, whole = (read_history(tmp_path / name / "logs" / "run") for name in ("killed", "whole"))
    assert series(killed, "train/loss") == pytest.approx(series(whole, "train/loss"), rel=1e-6)
    assert run_dpo(dpo_argv(ws, tmp_path / "fresh", resume=True, max_train_steps=1)) == 0
    assert reference_check(tmp_path / "fresh")["max_abs_logp_diff"] < 1e-5


def cpu_autocast_for_cuda(monkeypatch) -> None:
    """CPU bf16 autocast stands in for CUDA's (CI has no GPU) in the builder and the step-0 check. Not in the
    trainer: the adapters' backward follows the forward's autocast on CUDA only (``LoRAUpdate``)."""
    def name(device, enabled):
        return "bf16" if enabled else None

    def context(device, enabled):
        return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()

    for module in (builder_module, run_dpo_module):
        monkeypatch.setattr(module, "autocast_name", name)
        monkeypatch.setattr(module, "autocast_context", context)


def test_reference_and_step0_check_run_under_the_trainings_autocast(ws, tmp_path, monkeypatch, capsys):
    """With autocast standing in: the builder's reference (default --mixed-precision true) is computed and
    recorded under it, a mixed-precision policy measures its step-0 log-probs under it and matches, and a policy
    without it is refused by the fingerprint; allowed anyway, it starts measurably away from the reference."""
    cpu_autocast_for_cuda(monkeypatch)
    data = build(ws, tmp_path / "data")
    assert json.loads((data / META_FILE).read_text())["reference"]["autocast"] == "bf16"
    assert run_dpo(dpo_argv(ws, tmp_path / "on", train_data_dir=data, max_train_steps=1)) == 0
    matched = reference_check(tmp_path / "on")["max_abs_logp_diff"]
    assert run_dpo(dpo_argv(ws, tmp_path / "off", train_data_dir=data, mixed_precision=False)) == 1
    assert "autocast: dataset has 'bf16', policy has None" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "off", train_data_dir=data, mixed_precision=False,
                            allow_reference_mismatch=True, max_train_steps=1)) == 0
    assert reference_check(tmp_path / "off")["max_abs_logp_diff"] > 10 * max(matched, 1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_every_loss_type_trains_with_finite_losses(ws, tmp_path, loss_type):
    """Three steps of each loss (kto on unpaired data, robust with label noise ε = 0.1): finite train and
    validation losses and the loss's metrics are logged."""
    data = build(ws, tmp_path / "kto", input=ws["kto"]) if loss_type == "kto" else ws["data"]
    extra = dict(label_smoothing=0.1) if loss_type == "robust" else {}
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data, loss_type=loss_type, **extra)) == 0
    history = read_history(tmp_path / "logs" / "run")
    losses = series(history, "train/loss") + series(history, "val/loss")
    assert len(losses) == 4 and all(np.isfinite(losses))
    expected = "train/kl" if loss_type == "kto" else "train/rewards/margins"
    assert all(expected in history[step] for step in (1, 2, 3))


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_group_by_length_trains_paired_and_kto_data(ws, tmp_path, loss_type):
    """--group-by-length (a base-config flag) batches examples of similar length for every loss type."""
    data = build(ws, tmp_path / "kto", input=ws["kto"]) if loss_type == "kto" else ws["data"]
    assert run_dpo(dpo_argv(ws, tmp_path, train_data_dir=data, loss_type=loss_type, group_by_length=True)) == 0
    assert all(np.isfinite(series(read_history(tmp_path / "logs" / "run"), "train/loss")))


@pytest.mark.parametrize("flags_, message", [
    ({"loss_type": "ipo", "label_smoothing": 0.2}, "label_smoothing is used by loss_type sigmoid and robust only"),
    ({"label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
    ({"loss_type": "kto", "desirable_weight": -1.0}, "desirable_weight and undesirable_weight must be >= 0"),
    ({"loss_type": "kto", "sft_weight": 1.0}, "sft_weight (the chosen responses' NLL) is not used by loss_type 'kto'"),
    ({"lora_scaling": 0.0}, "lora_scaling must be > 0"),
    ({"beta": 0.0}, "beta must be > 0"),  # a constant ln 2 loss
    ({"loss_type": "simpo", "simpo_gamma": -0.5}, "sft_weight and simpo_gamma must be >= 0"),
    ({"sft_weight": -1.0}, "sft_weight and simpo_gamma must be >= 0"),  # trains the chosen responses away
    ({"simpo_gamma": 1.0}, "simpo_gamma is used by loss_type simpo only"),
    ({"desirable_weight": 1.33}, "desirable_weight and undesirable_weight are used by loss_type kto only"),
    ({"loss_type": "kto", "desirable_weight": 0.0, "undesirable_weight": 0.0}, "not both 0"),
    ({"reference_check_tolerance": -1.0}, "reference_check_tolerance must be >= 0"),
    ({"train_data_dir": ""}, "pretrain_ckpt_dir and train_data_dir must be set"),
])
def test_settings_that_would_train_nothing_or_backwards_are_refused(ws, tmp_path, capsys, flags_, message):
    """Each would run to the end and exit 0 (no signal, an ignored flag, or a loss that trains backwards)."""
    with pytest.raises(SystemExit):
        run_dpo(dpo_argv(ws, tmp_path, **flags_))
    assert message in capsys.readouterr().err


def test_data_that_cannot_serve_the_loss_is_refused(ws, tmp_path, capsys):
    """--no-reference data: refused for sigmoid, trained on by simpo; orpo starts from a model other than the
    dataset's reference (it never reads it). Paired data for kto, KTO data for a paired loss: refused."""
    no_reference = build(ws, tmp_path / "noref", "--no-reference")
    assert run_dpo(dpo_argv(ws, tmp_path / "a", train_data_dir=no_reference)) == 1
    assert "was built with --no-reference; loss_type 'sigmoid' needs reference log-probs" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "b", train_data_dir=no_reference, loss_type="simpo")) == 0
    assert not (tmp_path / "b" / "logs" / "run" / "reference_check.json").exists()

    other_start = tiny_llama(tmp_path / "other-start", ws["tokenizer"], seed=1)
    assert run_dpo(dpo_argv(ws, tmp_path / "e", loss_type="orpo", pretrain_ckpt_dir=other_start)) == 0
    assert not (tmp_path / "e" / "logs" / "run" / "reference_check.json").exists()  # orpo never reads the reference

    kto = build(ws, tmp_path / "kto", input=ws["kto"])
    assert run_dpo(dpo_argv(ws, tmp_path / "c", loss_type="kto")) == 1
    assert "holds paired data; loss_type 'kto' needs unpaired data" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "d", train_data_dir=kto)) == 1
    assert "holds unpaired (KTO) data; loss_type 'sigmoid' needs paired data" in capsys.readouterr().err


def test_a_scored_history_is_refused_where_it_would_not_cancel(ws, tmp_path, capsys):
    """--score-all-assistant-turns data: sigmoid trains (the shared history cancels in its summed log-ratio);
    ipo, which averages per token, is refused before loading the model, and so is sigmoid with an NLL term
    (--sft-weight), whose chosen log-probs would include the history."""
    data = build(ws, tmp_path / "all", "--score-all-assistant-turns")
    assert run_dpo(dpo_argv(ws, tmp_path / "a", train_data_dir=data)) == 0
    assert run_dpo(dpo_argv(ws, tmp_path / "b", train_data_dir=data, loss_type="ipo")) == 1
    assert "was built with --score-all-assistant-turns" in capsys.readouterr().err
    assert run_dpo(dpo_argv(ws, tmp_path / "c", train_data_dir=data, sft_weight=0.5)) == 1
    assert "--sft-weight adds the NLL" in capsys.readouterr().err


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_sft_then_dpo_then_merge_from_flags_only(ws, tmp_path):
    """The whole chain with flags only: SFT data -> SFT LoRA -> merge -> preference data scored by the merged
    SFT model -> DPO LoRA on it (step-0 check passes) -> merge -> load_model reproduces the DPO LoRA model."""
    sft_data = tmp_path / "sft-data"
    assert build_sft(flags(input=write_jsonl(tmp_path / "sft.jsonl", sft_rows(8)), tokenizer=ws["tokenizer"],
                           template="llama2", output=sft_data)) == 0
    assert run_sft(flags(**{**SMALL_RUN, "pretrain_ckpt_dir": ws["base"], "train_data_dir": sft_data,
                            "ckpt_dir": tmp_path / "sft", "log_dir": tmp_path / "logs", "run_name": "sft"})) == 0
    sft_model = tmp_path / "sft-merged"
    assert merge_lora(flags(base=ws["base"], lora=tmp_path / "sft", output=sft_model)) == 0

    data = build(ws, tmp_path / "pref", ref_model=sft_model)
    assert run_dpo(dpo_argv(ws, tmp_path, pretrain_ckpt_dir=sft_model, train_data_dir=data)) == 0
    assert reference_check(tmp_path)["max_abs_logp_diff"] < 1e-5
    dpo_model = tmp_path / "dpo-merged"
    assert merge_lora(flags(base=sft_model, lora=tmp_path / "ckpt", output=dpo_model)) == 0

    trained = load_model_with_lora(sft_model, None, lora_dir=find_adapter(tmp_path / "ckpt")[0])
    merged = logits(load_model(dpo_model))
    torch.testing.assert_close(merged, logits(trained), atol=1e-5, rtol=0)
    assert (merged - logits(load_model(sft_model))).abs().max() > 1e-3
