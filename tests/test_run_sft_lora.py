"""dpo_llama/run_sft_lora.py driven only by command-line overrides, on a tiny LLaMA with a real tokenizer.

The data are built by scripts/build_finetune_datasets.py from OpenAI-style ``messages`` rows; the model is a
random 2-layer, dim-64 LLaMA, so the assistant answers are learnable within a few dozen LoRA steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_llama.configs.sft_lora import SFTLoRAConfig
from dpo_llama.models.checkpoint import load_model, save_model
from dpo_llama.models.llama import Transformer
from dpo_llama.models.lora import (ADAPTER_FILE, LORA_CONFIG_FILE, LoRAConfig, apply_lora, find_adapter,
                                   load_model_with_lora)
from dpo_llama.models.presets import get_preset
from dpo_llama.run_sft_lora import main as run_sft
from dpo_llama.utils.dataset_io import META_FILE, TRAIN_FILE, load_examples
from dpo_llama.utils.finetune import input_fingerprints, run_main, trainable_summary, with_running_experts_backend
from dpo_llama.utils.trainer import STATE_FILE, TrainingInterrupted
from scripts.build_finetune_datasets import main as build_sft
from scripts.convert_lora_checkpoint import main as merge_lora
from tests.pipeline_fixtures import (SMALL_RUN, Killed, die_after_the_next_checkpoint, flags, read_history, series,
                                     sft_rows, tiny_llama, write_jsonl)
from tests.tokenizer_fixtures import make_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a tiny base checkpoint and an SFT dataset of 12 conversations (9 train, 3 validation)."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = make_sentencepiece(root / "tok")
    base = tiny_llama(root / "base", tokenizer)
    rows = write_jsonl(root / "sft.jsonl", sft_rows(12))
    assert build_sft(flags(input=rows, tokenizer=tokenizer, template="llama2", output=root / "data",
                           val_ratio=0.25)) == 0
    return {"root": root, "tokenizer": tokenizer, "base": base, "rows": rows, "data": root / "data"}


def sft_argv(ws: dict, out: Path, **overrides) -> list[str]:
    """Flags of a small run on the workspace data writing to ``out``; ``overrides`` win."""
    return flags(**{**SMALL_RUN, "pretrain_ckpt_dir": ws["base"], "train_data_dir": ws["data"],
                    "ckpt_dir": out / "ckpt", "log_dir": out / "logs", "run_name": "run", **overrides})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_loss_falls_and_every_log_is_written(workspace, tmp_path):
    """25 full-batch steps: the train loss (all 9 examples each step) and the validation loss fall by over a nat
    (from about ln(vocab) = 6); TensorBoard
    holds train/ and val/ scalars, metrics.jsonl every step, the PNG plots and the final adapter exist."""
    out = tmp_path / "run"
    assert run_sft(sft_argv(workspace, out, max_train_steps=25, micro_batch_size=9, val_interval=5)) == 0
    history = read_history(out / "logs" / "run")
    train_loss, val_loss = series(history, "train/loss"), series(history, "val/loss")
    assert len(train_loss) == 25 and len(val_loss) == 5
    assert np.mean(train_loss[-3:]) < np.mean(train_loss[:3]) - 1.0
    assert val_loss[-1] < val_loss[0] - 1.0
    assert series(history, "val/perplexity")[-1] == pytest.approx(np.exp(val_loss[-1]))

    run_dir = out / "logs" / "run"
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "validation_perplexity.png").stat().st_size > 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/perplexity"} <= set(tags)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_loss)
    assert json.loads((run_dir / "config.json").read_text())["max_train_steps"] == 25
    final = out / "ckpt" / "step-000025"
    assert {ADAPTER_FILE, LORA_CONFIG_FILE, STATE_FILE} <= {p.name for p in final.iterdir()}


def test_accumulating_four_single_examples_equals_a_batch_of_four(workspace, tmp_path):
    """Four examples with different numbers of target tokens. micro-batch 4 x 1 and micro-batch 1 x 4 see the
    same examples each step and average over the same N target tokens, so the losses, the gradient norms and
    the trained adapters agree (to float rounding). adam_eps = 1 makes AdamW's update ≈ lr·g, linear in the
    gradient (with a tiny eps the first update is ≈ lr·sign(g), which hides the gradient's scale and
    amplifies rounding noise in near-zero components)."""
    data = tmp_path / "four"
    rows = write_jsonl(tmp_path / "four.jsonl", sft_rows(4, seed=5))
    assert build_sft(flags(input=rows, tokenizer=workspace["tokenizer"], template="llama2", output=data,
                           val_ratio=0.0)) == 0
    targets = [int(e["mask"][1:].sum()) for e in load_examples(data / TRAIN_FILE)]
    assert len(set(targets)) > 1

    runs = {"batch": dict(micro_batch_size=4, gradient_accumulation_steps=1),
            "accumulated": dict(micro_batch_size=1, gradient_accumulation_steps=4)}
    for name, shape in runs.items():
        assert run_sft(sft_argv(workspace, tmp_path / name, train_data_dir=data, max_train_steps=2, adam_eps=1.0,
                                learning_rate=0.5, **shape)) == 0
    batch, accumulated = (read_history(tmp_path / name / "logs" / "run") for name in runs)
    for tag in ("train/loss", "train/grad_norm"):
        assert series(accumulated, tag) == pytest.approx(series(batch, tag), rel=1e-5)
    adapters = [load_file(str(tmp_path / name / "ckpt" / "step-000002" / ADAPTER_FILE)) for name in runs]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-6, rtol=1e-5)


def test_the_seed_flag_alone_decides_the_adapter_init(workspace, tmp_path):
    """Fresh LoRA A matrices are drawn after seeding with --seed: whatever ran before in the process, the
    same flags give the same adapter, and another seed another one."""
    adapters = {}
    for name, seed in (("first", 1), ("again", 1), ("other", 2)):
        torch.rand(100)  # whatever an earlier stage did with the global RNG
        assert run_sft(sft_argv(workspace, tmp_path / name, max_train_steps=1, seed=seed)) == 0
        adapters[name] = load_file(str(tmp_path / name / "ckpt" / "step-000001" / ADAPTER_FILE))
    key = "layers.0.self_attn.q_proj.lora_A"
    assert torch.equal(adapters["first"][key], adapters["again"][key])
    assert not torch.equal(adapters["first"][key], adapters["other"][key])


TRAIN_TAGS = ("train/loss", "train/lr", "train/grad_norm")


def assert_same_history(resumed: dict, uninterrupted: dict) -> None:
    assert sorted(resumed) == sorted(uninterrupted)
    for tag in (*TRAIN_TAGS, "val/loss"):
        assert series(resumed, tag) == pytest.approx(series(uninterrupted, tag), rel=1e-6)


def test_killed_run_resumes_with_the_same_losses(workspace, tmp_path, monkeypatch):
    """Warmup + cosine over 8 steps, checkpoints every 3. A run killed (Ctrl-C) right after its step-3
    checkpoint, restarted with the same flags plus --resume true, logs exactly the uninterrupted history."""
    run = dict(max_train_steps=8, warmup_steps=2, ckpt_interval=3, val_interval=4, micro_batch_size=3)
    assert run_sft(sft_argv(workspace, tmp_path / "whole", **run)) == 0

    die_after_the_next_checkpoint(monkeypatch)
    with pytest.raises(Killed, match="step-000003"):
        run_sft(sft_argv(workspace, tmp_path / "killed", **run))
    monkeypatch.undo()
    assert run_sft(sft_argv(workspace, tmp_path / "killed", resume=True, **run)) == 0
    assert_same_history(read_history(tmp_path / "killed" / "logs" / "run"),
                        read_history(tmp_path / "whole" / "logs" / "run"))


def test_the_config_records_the_experts_backend_that_runs():
    """A kernel backend that fell back to torch (no compiler, say) is recorded as torch: a resume where the kernel
    loads would otherwise switch the experts' math unnoticed. Models without the setting keep the config's."""
    cfg = SFTLoRAConfig(experts_backend="cpu_kernel_int8")
    fell_back = SimpleNamespace(args=SimpleNamespace(experts_backend="torch"))
    assert with_running_experts_backend(cfg, fell_back).experts_backend == "torch"
    with_copies = SFTLoRAConfig(experts_backend="cpu_kernel", experts_transposed_copy=True)
    assert not with_running_experts_backend(with_copies, fell_back).experts_transposed_copy  # torch has no copies
    assert with_running_experts_backend(cfg, SimpleNamespace(args=SimpleNamespace())) is cfg


def test_resume_compares_the_dtype_auto_resolved_to(workspace):
    """--dtype auto is bf16 on CUDA and fp32 on the CPU: a resume on the other device would change the precision
    unnoticed (the config says auto either way), so the resolved dtype is one of the run's input fingerprints."""
    cfg = SFTLoRAConfig(train_data_dir=str(workspace["data"]))
    on_cpu, on_cuda = (input_fingerprints(cfg, "w", torch.device(name)) for name in ("cpu", "cuda"))
    assert on_cpu["weights dtype (dtype)"] == "fp32" and on_cuda["weights dtype (dtype)"] == "bf16"


def test_resume_on_a_rebuilt_dataset_or_changed_base_is_refused(workspace, tmp_path, capsys):
    """The same --train-data-dir rebuilt from other rows, or other weights at the same --pretrain-ckpt-dir:
    --resume refuses rather than continue its sampler's position in other data or its adapter on another base."""
    data, base = tmp_path / "data", tmp_path / "base"
    assert build_sft(flags(input=workspace["rows"], tokenizer=workspace["tokenizer"], template="llama2",
                           output=data, val_ratio=0.25)) == 0
    tiny_llama(base, workspace["tokenizer"])
    argv = dict(train_data_dir=data, pretrain_ckpt_dir=base, max_train_steps=1, ckpt_interval=1)
    assert run_sft(sft_argv(workspace, tmp_path / "run", **argv)) == 0
    assert build_sft(flags(input=workspace["rows"], tokenizer=workspace["tokenizer"], template="llama2",
                           output=data, val_ratio=0.25, max_samples=10)) == 0
    assert run_sft(sft_argv(workspace, tmp_path / "run", **{**argv, "max_train_steps": 2}, resume=True)) == 1
    assert "dataset (train_data_dir): changed" in capsys.readouterr().err
    assert build_sft(flags(input=workspace["rows"], tokenizer=workspace["tokenizer"], template="llama2",
                           output=data, val_ratio=0.25)) == 0
    tiny_llama(base, workspace["tokenizer"], seed=1)
    assert run_sft(sft_argv(workspace, tmp_path / "run", **{**argv, "max_train_steps": 2}, resume=True)) == 1
    err = capsys.readouterr().err
    assert "base weights (pretrain_ckpt_dir): changed" in err and "dataset" not in err


def test_finished_run_extended_with_resume_continues_the_same_sequence(workspace, tmp_path):
    """Constant learning rate (no warmup, min_lr_ratio 1): 4 steps, then --max-train-steps 7 --resume true,
    equals one 7-step run. (With a cosine schedule the two runs would differ by design: the schedule
    depends on max_train_steps.)"""
    constant = dict(min_lr_ratio=1.0, ckpt_interval=2, micro_batch_size=3)
    assert run_sft(sft_argv(workspace, tmp_path / "whole", max_train_steps=7, **constant)) == 0
    assert run_sft(sft_argv(workspace, tmp_path / "parts", max_train_steps=4, **constant)) == 0
    assert run_sft(sft_argv(workspace, tmp_path / "parts", max_train_steps=7, resume=True, **constant)) == 0
    parts, whole = (read_history(tmp_path / name / "logs" / "run") for name in ("parts", "whole"))
    assert sorted(parts) == list(range(1, 8))
    for tag in TRAIN_TAGS:
        assert series(parts, tag) == pytest.approx(series(whole, tag), rel=1e-6)


def test_dataset_of_another_tokenizer_or_stage_is_refused(workspace, tmp_path, capsys):
    """Data tokenized with a different tokenizer.model, or a preference dataset, never reaches training."""
    other = make_sentencepiece(tmp_path / "other", vocab_size=450)
    assert build_sft(flags(input=workspace["rows"], tokenizer=other, template="llama2",
                           output=tmp_path / "other-data")) == 0
    assert run_sft(sft_argv(workspace, tmp_path / "a", train_data_dir=tmp_path / "other-data")) == 1
    err = capsys.readouterr().err
    assert "tokenized with another tokenizer" in err and "rebuild the dataset" in err
    assert not (tmp_path / "a" / "ckpt").exists()

    meta = json.loads((tmp_path / "other-data" / META_FILE).read_text())
    (tmp_path / "other-data" / META_FILE).write_text(json.dumps({**meta, "kind": "preference"}))
    assert run_sft(sft_argv(workspace, tmp_path / "b", train_data_dir=tmp_path / "other-data")) == 1
    assert "holds a 'preference' dataset, but this stage needs 'sft'" in capsys.readouterr().err


def test_a_lora_run_given_as_the_model_is_named_so(workspace, tmp_path, capsys):
    """Its own earlier run's checkpoints as --pretrain-ckpt-dir: the error says to merge them (not that a tokenizer
    is missing)."""
    assert run_sft(sft_argv(workspace, tmp_path / "a")) == 0
    capsys.readouterr()
    assert run_sft(sft_argv(workspace, tmp_path / "b", pretrain_ckpt_dir=tmp_path / "a" / "ckpt")) == 1
    assert "holds a LoRA adapter, not a model: merge it onto its base" in capsys.readouterr().err


def test_an_aux_loss_weight_on_a_model_without_routers_is_refused(workspace, tmp_path, capsys):
    """As --experts-backend is: the LLaMA has no balancing loss for the weight to weigh."""
    assert run_sft(sft_argv(workspace, tmp_path / "a", aux_loss_weight=0.5)) == 1
    assert "aux_loss_weight=0.5 weighs the router balancing loss of a MoE model; this is a llama, which has none" \
        in capsys.readouterr().err
    assert not (tmp_path / "a" / "ckpt").exists()


def test_sequences_longer_than_the_model_and_a_tokenizer_larger_than_its_vocabulary_are_refused_up_front(
        workspace, tmp_path, capsys):
    """A dataset built with a larger --max-seq-len than the model takes (256 positions) would stop training at the
    first step that draws the long row; a checkpoint whose tokenizer has more ids than its embeddings would stop
    with an IndexError. Both are refused before the model loads."""
    long_row = {"messages": [{"role": "user", "content": "Describe the sky."},
                             {"role": "assistant", "content": " ".join(["The sky is blue."] * 60)}]}
    rows = write_jsonl(tmp_path / "long.jsonl", sft_rows(6) + [long_row])
    assert build_sft(flags(input=rows, tokenizer=workspace["tokenizer"], template="llama2", max_seq_len=1024,
                           output=tmp_path / "long-data")) == 0
    assert run_sft(sft_argv(workspace, tmp_path / "a", train_data_dir=tmp_path / "long-data")) == 1
    assert "takes at most 256: rebuild the dataset with --max-seq-len 256 or less" in capsys.readouterr().err

    small = tmp_path / "small-vocab"
    torch.manual_seed(0)
    save_model(Transformer(get_preset("tiny", vocab_size=300)), small, tokenizer_files=[workspace["tokenizer"]])
    assert run_sft(sft_argv(workspace, tmp_path / "b", pretrain_ckpt_dir=small)) == 1
    assert "has 400 ids but the model only 300 embeddings" in capsys.readouterr().err
    assert not (tmp_path / "a" / "ckpt").exists() and not (tmp_path / "b" / "ckpt").exists()


def merged_matches_adapter(base: Path, ckpt_dir: Path, merged: Path, atol: float) -> None:
    """load_model(merged) computes what the trained LoRA model (as training loaded it) computes, and the
    adapter is not a no-op."""
    adapter_dir, _ = find_adapter(ckpt_dir)
    lora_model = load_model_with_lora(base, None, lora_dir=adapter_dir)
    merged_logits = logits(load_model(merged))
    torch.testing.assert_close(merged_logits, logits(lora_model), atol=atol, rtol=0)
    assert (merged_logits - logits(load_model(base))).abs().max() > 1e-3


@pytest.mark.slow
def test_command_line_build_train_merge(workspace, tmp_path):
    """The three scripts as separate processes (one torch thread each), configured only by flags."""
    def run_script(script: str, argv: list[str]) -> None:
        result = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr

    run_script("scripts/build_finetune_datasets.py",
               flags(input=workspace["rows"], tokenizer=workspace["tokenizer"], template="llama2", output="data"))
    run_script("dpo_llama/run_sft_lora.py", flags(**{**SMALL_RUN, "pretrain_ckpt_dir": workspace["base"],
                                                     "train_data_dir": "data", "ckpt_dir": "ckpt",
                                                     "log_dir": "logs", "run_name": "cli"}))
    run_script("scripts/convert_lora_checkpoint.py", flags(base=workspace["base"], lora="ckpt", output="merged"))
    merged_matches_adapter(workspace["base"], tmp_path / "ckpt", tmp_path / "merged", atol=1e-5)


def test_qlora_train_then_merge_matches_the_4bit_model(workspace, tmp_path):
    """QLoRA (every frozen linear 4-bit, fp32 compute): the merged checkpoint holds Ŵ + s·B A, the weights the
    4-bit model computed with, so it reproduces the trained model's logits."""
    qlora = dict(quant_4bit=True, quant_lora_4bit=True, quant_4bit_compute_dtype="fp32")
    assert run_sft(sft_argv(workspace, tmp_path, **qlora)) == 0
    lora_config = json.loads((tmp_path / "ckpt" / "step-000003" / LORA_CONFIG_FILE).read_text())["lora"]
    assert lora_config["quant_4bit"] and lora_config["quant_lora_4bit"]
    assert merge_lora(flags(base=workspace["base"], lora=tmp_path / "ckpt", output=tmp_path / "merged")) == 0
    merged_matches_adapter(workspace["base"], tmp_path / "ckpt", tmp_path / "merged", atol=1e-4)


def test_an_interrupted_run_prints_where_it_saved_and_exits_130(capsys):
    def interrupted(cfg):
        raise TrainingInterrupted(7, Path("ckpt/step-000007"))

    assert run_main(SFTLoRAConfig, interrupted, [], "") == 130
    assert "interrupted after step 7, saved in ckpt/step-000007; continue with --resume true" in capsys.readouterr().err


def test_an_interrupt_while_loading_is_one_line_and_exit_130(capsys):
    """Ctrl-C before the trainer's own handler is installed (a large model loading) is a KeyboardInterrupt."""
    def loading(cfg):
        raise KeyboardInterrupt

    assert run_main(SFTLoRAConfig, loading, ["--pretrain-ckpt-dir", "m", "--train-data-dir", "d"], "") == 130
    expected = "interrupted; checkpoints saved so far, if any, are in ./checkpoints/demo/sft-lora\n"
    assert capsys.readouterr().err == expected


def test_trainable_summary_counts_4bit_weights_by_their_shapes():
    """A 4-bit layer's weight is no parameter (packed bytes): the total still counts it, plus the adapters."""

    model = Transformer(get_preset("tiny"))
    base = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(lora_r=2, quant_4bit=True, quant_lora_4bit=True))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_summary(model) == (f"trainable {adapters:,} of {base + adapters:,} parameters "
                                        f"({100 * adapters / (base + adapters):.2f}%)")


@pytest.mark.parametrize("switches", [{"quant_4bit": True},
                                      {"quant_lora_4bit": True, "lora_moe_routed_experts": True}])
def test_4bit_experts_with_a_kernel_backend_are_refused(switches):
    with pytest.raises(ValueError, match="takes no 4-bit experts"):
        SFTLoRAConfig(experts_backend="cpu_kernel", **switches)
    SFTLoRAConfig(experts_backend="cpu_kernel", quant_lora_4bit=True)  # dense layers 4-bit, experts not


def test_a_negative_aux_loss_weight_is_refused():
    """The balancing loss is added only for a weight > 0: a negative one would act as 0 without a word."""
    with pytest.raises(ValueError, match="aux_loss_weight must be >= 0"):
        SFTLoRAConfig(aux_loss_weight=-1.0)
