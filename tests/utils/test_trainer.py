"""Tests for dpo_llama.utils.trainer with toy models and synthetic token-regression data.

Each example has a different number of "target tokens" (rows of x); the loss of a batch is
the SUM of squared errors over its unpadded tokens and its weight is the token count, like
SFT's token-level cross-entropy.
"""

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dpo_llama.configs.base import TrainConfig
from dpo_llama.utils.cli import config_to_dict
from dpo_llama.utils.trainer import (
    BatchSampler,
    NonFiniteLossError,
    TrainingInterrupted,
    autocast_name,
    build_optimizer,
    check_run_directories,
    evaluate,
    latest_checkpoint,
    load_trainer_state,
    lr_factor,
    resolve_device,
    resume_mismatches,
    rng_state,
    set_rng_state,
    train,
)

DIM = 3


class ToyModel(nn.Module):
    """x [B, T, DIM] -> prediction [B, T]; optional dropout so that RNG state matters."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def make_dataset(token_counts: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Examples {x: float32 [T, DIM], y: float32 [T]} with y a fixed linear function of x."""
    rng = np.random.default_rng(seed)
    examples = []
    for count in token_counts:
        x = rng.normal(size=(count, DIM)).astype(np.float32)
        examples.append({"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], dtype=np.float32))})
    return examples


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; mask marks real tokens."""
    length = max(len(ex["y"]) for ex in examples)
    x = torch.zeros(len(examples), length, DIM)
    y = torch.zeros(len(examples), length)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, ex in enumerate(examples):
        count = len(ex["y"])
        x[row, :count] = torch.from_numpy(ex["x"])
        y[row, :count] = torch.from_numpy(ex["y"])
        mask[row, :count] = True
    return {"x": x, "y": y, "mask": mask}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of squared errors over real tokens, plus the sum of absolute errors as a metric."""
    error = (model(batch["x"]) - batch["y"]) * batch["mask"]
    return error.pow(2).sum(), {"abs_err": error.abs().sum()}


def batch_weight(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["mask"].sum())


def make_cfg(tmp_path, **overrides) -> TrainConfig:
    """A small CPU config writing under tmp_path; periodic validation/checkpoints off."""
    values = dict(
        max_train_steps=5, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, log_interval=1000, val_interval=0,
        ckpt_interval=0, ckpt_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"),
        run_name="toy", device="cpu", seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run(cfg: TrainConfig, model: nn.Module, data, loss=loss_fn, **kwargs):
    """train() with the toy callables and weights.pt save/load."""

    def save_trainable(directory):
        torch.save(model.state_dict(), directory / "weights.pt")

    def load_trainable(directory):
        model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))

    return train(cfg, model, data, collate, loss, batch_weight,
                 save_trainable=save_trainable, load_trainable=load_trainable, **kwargs)


def losses(history: list[dict], tag: str = "train/loss") -> list[float]:
    return [record[tag] for record in history if tag in record]


def adam_first_step(param: torch.Tensor, grad: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """AdamW's first update without weight decay.

    m = (1 - b1) g and v = (1 - b2) g^2, and the bias corrections divide by (1 - b1) and
    (1 - b2), so the update is  p - lr * g / (|g| + eps).  With eps comparable to |g| the
    update depends on the gradient's scale, not only its sign.
    """
    return param - lr * grad / (grad.abs() + eps)


def reference_grads(model: nn.Module, examples, per_example_mean: bool = False) -> list[torch.Tensor]:
    """Gradients of the token-weighted mean loss over all examples in one batch.

    With per_example_mean=True: the gradient of the mean over examples of each example's
    token-mean loss, i.e. the classic buggy accumulation that divides by N per micro-batch.
    """
    model.zero_grad()
    if per_example_mean:
        total = sum(loss_fn(model, collate([ex]))[0] / len(ex["y"]) for ex in examples) / len(examples)
    else:
        batch = collate(examples)
        total = loss_fn(model, batch)[0] / batch_weight(batch)
    total.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_loss_falls(tmp_path):
    cfg = make_cfg(tmp_path, max_train_steps=40, learning_rate=3e-2)
    result = run(cfg, ToyModel(), make_dataset([1, 2, 3, 4, 5] * 4))
    train_losses = losses(result.history)
    assert len(train_losses) == 40
    assert np.mean(train_losses[-5:]) < 0.3 * np.mean(train_losses[:5])


def test_accumulation_equals_one_batch_with_token_weights(tmp_path):
    """4 micro-batches of 1 example == 1 batch of 4 examples, after ONE optimizer step.

    Token counts 1, 6, 2, 9 differ, so the right gradient is that of
    sum_i L_i / (1 + 6 + 2 + 9), not the mean of the per-example means. Both runs must match
    adam_first_step(p, g_ref) (and each other) to 1e-6; the per-example-mean update differs
    by far more, so the test would catch the classic bug.
    """
    data = make_dataset([1, 6, 2, 9], seed=1)
    common = dict(max_train_steps=1, learning_rate=0.1, adam_eps=1.0, weight_decay=0.0)
    accumulated, one_batch = ToyModel(seed=3), ToyModel(seed=3)
    result_acc = run(make_cfg(tmp_path / "a", micro_batch_size=1, gradient_accumulation_steps=4, **common),
                     accumulated, data)
    result_one = run(make_cfg(tmp_path / "b", micro_batch_size=4, gradient_accumulation_steps=1, **common),
                     one_batch, data)

    reference = ToyModel(seed=3)
    before = [p.detach().clone() for p in reference.parameters()]
    expected = [adam_first_step(p, g, 0.1, 1.0) for p, g in zip(before, reference_grads(reference, data))]
    buggy = [adam_first_step(p, g, 0.1, 1.0)
             for p, g in zip(before, reference_grads(reference, data, per_example_mean=True))]
    for p_acc, p_one, p_ref, p_bug in zip(accumulated.parameters(), one_batch.parameters(), expected, buggy):
        torch.testing.assert_close(p_acc.detach(), p_one.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(p_acc.detach(), p_ref, atol=1e-6, rtol=0)
    assert max((e - b).abs().max().item() for e, b in zip(expected, buggy)) > 1e-3
    assert result_acc.history[0]["train/loss"] == pytest.approx(result_one.history[0]["train/loss"], rel=1e-6)


def test_accumulation_equals_one_batch_over_several_epochs(tmp_path):
    """10 examples, 7 steps of 4 (two epoch boundaries, each epoch ending in a step of 2): 2 x 2 and 1 x 4 give the
    same losses at every step (before, the step crossing an epoch took examples of both epochs)."""
    data = make_dataset([1, 6, 2, 9, 3, 5, 4, 7, 8, 2], seed=1)
    common = dict(max_train_steps=7, learning_rate=0.05)
    histories = [run(make_cfg(tmp_path / str(micro), micro_batch_size=micro, gradient_accumulation_steps=4 // micro,
                              **common), ToyModel(seed=3), data).history for micro in (2, 4)]
    assert losses(histories[0]) == pytest.approx(losses(histories[1]), rel=1e-5)


def test_prepare_step_sees_all_micro_batches_before_their_forward_passes(tmp_path):
    """prepare_step gets each step's N = 3 micro-batches, in training mode, before any of their losses; what it
    adds to them (here the step's token count) reaches loss_fn. Validation (4 examples, at the end) hands it
    groups of N micro-batches too, in eval mode: 3, then the 1 left. With 4 training examples the second step is the
    epoch's last example alone: one micro-batch."""
    calls = []

    def prepare_step(model, batches):
        calls.append((len(batches), model.training))
        for batch in batches:
            batch["step_tokens"] = sum(int(b["mask"].sum()) for b in batches)

    def checked_loss(model, batch):
        assert batch["step_tokens"] >= batch["mask"].sum()
        return loss_fn(model, batch)

    run(make_cfg(tmp_path, max_train_steps=2, micro_batch_size=1, gradient_accumulation_steps=3), ToyModel(seed=0),
        make_dataset([1, 2, 3, 4]), loss=checked_loss, prepare_step=prepare_step,
        val_set=make_dataset([1, 2, 3, 4], seed=5))
    assert calls == [(3, True), (1, True), (3, False), (1, False)]


def test_lr_schedule_follows_warmup_cosine_formula(tmp_path):
    """lr = 0.5, W = 3, T = 10, r = 0.1.

    Warmup: steps 1, 2, 3 -> 0.5/3, 1.0/3, 0.5.
    Step 4: p = 1/7, cos(pi/7) = 0.9009689 -> 0.5 * (0.1 + 0.45 * 1.9009689) = 0.4777180.
    Step 6: p = 3/7, cos(3pi/7) = 0.2225209 -> 0.5 * (0.1 + 0.45 * 1.2225209) = 0.3250672.
    Step 10: p = 1 -> 0.5 * 0.1 = 0.05 (the floor).
    """
    cfg = make_cfg(tmp_path, max_train_steps=10, learning_rate=0.5, warmup_steps=3, min_lr_ratio=0.1)
    lrs = losses(run(cfg, ToyModel(), make_dataset([2] * 8)).history, "train/lr")
    expected = {1: 0.5 / 3, 2: 1.0 / 3, 3: 0.5, 4: 0.4777180, 6: 0.3250672, 10: 0.05}
    for step, lr in expected.items():
        assert lrs[step - 1] == pytest.approx(lr, abs=1e-6)
    assert lr_factor(11, 3, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(1, 0, 10, 0.1) == 1.0 and lr_factor(10, 0, 10, 0.1) == pytest.approx(0.1)  # no warmup: peak first
    assert lr_factor(1, 0, 1, 0.2) == 1.0  # a one-step run trains at the peak
    assert lr_factor(4, 3, 3, 0.1) == pytest.approx(0.1)  # warmup as long as the run: the scheduler's last call


def test_a_run_whose_warmup_is_the_whole_run_finishes(tmp_path):
    result = run(make_cfg(tmp_path, max_train_steps=3, warmup_steps=3), ToyModel(), make_dataset([2] * 4))
    assert [record["step"] for record in result.history] == [1, 2, 3]


def test_grad_clipping_scales_the_gradient(tmp_path):
    """With grad_clip c < ||g||, AdamW sees g * c / (||g|| + 1e-6) (torch's clip coefficient).

    The logged grad_norm is the norm BEFORE clipping.
    """
    data = make_dataset([3, 4], seed=2)
    model = ToyModel(seed=4)
    cfg = make_cfg(tmp_path, max_train_steps=1, micro_batch_size=2, gradient_accumulation_steps=1,
                   learning_rate=0.1, adam_eps=0.01, grad_clip=0.05, weight_decay=0.0)
    reference = ToyModel(seed=4)
    grads = reference_grads(reference, data)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > 0.05
    clipped = [g * 0.05 / (norm + 1e-6) for g in grads]
    expected = [adam_first_step(p.detach(), g, 0.1, 0.01) for p, g in zip(reference.parameters(), clipped)]

    result = run(cfg, model, data)

    assert result.history[0]["train/grad_norm"] == pytest.approx(norm, rel=1e-5)
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach(), want, atol=1e-6, rtol=0)


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    """Run 6 steps; separately run, crash during step 4, resume to 6: identical losses.

    The model has dropout (torch RNG), data crosses epoch boundaries (10 examples, 4 per
    step) and validation runs every 2 steps; the resumed model starts from a different init
    so everything must come from the step-3 checkpoint.
    """
    data, val = make_dataset([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], seed=5), make_dataset([2, 3, 4], seed=6)
    settings = dict(max_train_steps=6, ckpt_interval=3, val_interval=2, warmup_steps=2, min_lr_ratio=0.1)
    full_model = ToyModel(dropout=0.5, seed=7)
    full = run(make_cfg(tmp_path / "full", **settings), full_model, data, val_set=val)

    class Crash(Exception):
        pass

    calls = {"train": 0}

    def crashing_loss(model, batch):
        if model.training:
            calls["train"] += 1
            if calls["train"] > 3 * 2:
                raise Crash
        return loss_fn(model, batch)

    with pytest.raises(Crash):
        run(make_cfg(tmp_path / "cut", **settings), ToyModel(dropout=0.5, seed=7), data, crashing_loss, val_set=val)
    assert latest_checkpoint(tmp_path / "cut" / "ckpt").name == "step-000003"
    (tmp_path / "empty" / "ckpt" / "step-000005").mkdir(parents=True)  # no trainer_state.pt: no checkpoint
    assert latest_checkpoint(tmp_path / "empty" / "ckpt") is None
    resumed_model = ToyModel(dropout=0.5, seed=99)
    resumed = run(make_cfg(tmp_path / "cut", resume=True, **settings), resumed_model, data, val_set=val)

    assert resumed.step == 6
    assert losses(resumed.history) == losses(full.history)
    assert losses(resumed.history, "val/loss") == losses(full.history, "val/loss")
    assert len(losses(full.history, "val/loss")) == 3
    for p_full, p_resumed in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p_full, p_resumed)
    jsonl = (tmp_path / "cut" / "logs" / "toy" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in jsonl if "train/loss" in line] == [1, 2, 3, 4, 5, 6]


def signal_at_call(signum: int, calls: int, times: int = 1):
    """A training loss that sends ``signum`` to this process ``times`` times during its ``calls``-th call."""
    count = {"calls": 0}

    def loss(model, batch):
        count["calls"] += 1
        if count["calls"] == calls:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return loss_fn(model, batch)

    return loss


def test_an_interrupt_finishes_the_step_saves_it_and_the_resume_matches(tmp_path):
    """SIGINT during step 4's second micro-batch (no periodic checkpoints): the step completes, is saved with the
    plots, and TrainingInterrupted names it; the handlers are restored; resuming gives the uninterrupted losses
    and weights."""
    data = make_dataset([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], seed=5)
    settings = dict(max_train_steps=6, warmup_steps=2, min_lr_ratio=0.1)
    full_model = ToyModel(dropout=0.5, seed=7)
    full = run(make_cfg(tmp_path / "full", **settings), full_model, data)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupted = signal_at_call(signal.SIGINT, 2 + 2 + 1 + 2)  # steps of 4, 4, 2 examples: step 4's 2nd batch
    with pytest.raises(TrainingInterrupted, match="after step 4") as stopped:
        run(make_cfg(tmp_path / "cut", **settings), ToyModel(dropout=0.5, seed=7), data, interrupted)
    assert stopped.value.checkpoint == latest_checkpoint(tmp_path / "cut" / "ckpt") == (
        tmp_path / "cut" / "ckpt" / "step-000004")
    assert (tmp_path / "cut" / "logs" / "toy" / "loss.png").is_file()
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    resumed_model = ToyModel(dropout=0.5, seed=99)
    resumed = run(make_cfg(tmp_path / "cut", resume=True, **settings), resumed_model, data)
    assert losses(resumed.history) == losses(full.history)
    for p_full, p_resumed in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p_full, p_resumed)


def test_sigterm_stops_like_an_interrupt_and_a_second_one_at_once(tmp_path):
    """SIGTERM (a scheduler's stop) is handled as Ctrl-C; two signals in a row raise KeyboardInterrupt in the
    step, leaving the last periodic checkpoint (step 2)."""
    data = make_dataset([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], seed=5)
    with pytest.raises(TrainingInterrupted, match="after step 3"):
        run(make_cfg(tmp_path / "term"), ToyModel(), data, signal_at_call(signal.SIGTERM, 5))
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path / "twice", ckpt_interval=2), ToyModel(), data, signal_at_call(signal.SIGINT, 7, times=2))
    assert latest_checkpoint(tmp_path / "twice" / "ckpt").name == "step-000002"


def test_resume_applies_new_optimizer_settings_and_refuses_other_changes(tmp_path):
    """A resumed run may change the schedule and optimizer hyperparameters (they apply from the resumed step on,
    as the saved config.json says); a different batch size or seed would mix two runs and is refused, naming
    each difference."""
    data = make_dataset([1, 2, 3, 4, 5, 6], seed=5)
    run(make_cfg(tmp_path, max_train_steps=2, ckpt_interval=2), ToyModel(seed=7), data)
    changed = dict(learning_rate=1e-4, adam_betas=(0.5, 0.6), adam_eps=1e-3, weight_decay=0.1, max_train_steps=3)
    model = ToyModel(seed=7)
    resumed = run(make_cfg(tmp_path, resume=True, **changed), model, data)
    assert resumed.history[-1]["train/lr"] == pytest.approx(1e-4)
    state = load_trainer_state(tmp_path / "ckpt" / "step-000003")["optimizer"]["param_groups"][0]
    assert state["betas"] == (0.5, 0.6) and state["eps"] == 1e-3 and state["weight_decay"] == 0.1
    with pytest.raises(ValueError, match=r"other settings(.|\n)*micro_batch_size: 2 -> 3\n  seed: 0 -> 4"):
        run(make_cfg(tmp_path, resume=True, max_train_steps=4, micro_batch_size=3, seed=4), ToyModel(), data)


def test_resume_refuses_changed_loss_lora_and_input_settings():
    """Only the settings in RESUME_ADJUSTABLE may change on a resume: the loss, LoRA and the model it starts from
    may not, nor may a data or weights directory (compared resolved, as the checkpoint records them)."""
    saved = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "lora_r": 16,
             "pretrain_ckpt_dir": str(Path("base").resolve()), "train_data_dir": str(Path("data").resolve())}
    changed = {"beta": 0.2, "loss_type": "ipo", "label_smoothing": 0.1, "lora_r": 8, "pretrain_ckpt_dir": "other",
               "train_data_dir": "data-copy"}
    assert [line.split(":")[0] for line in resume_mismatches(saved, changed)] == sorted(saved)
    assert resume_mismatches(saved, {"pretrain_ckpt_dir": "base", "train_data_dir": "data"}) == []
    assert resume_mismatches({"dtype": "fp32"}, {"dtype": "auto"}) == []  # its resolved value is an input fingerprint


def test_a_checkpoint_records_its_directories_resolved(tmp_path, monkeypatch):
    """ckpt_dir and log_dir given relative: the checkpoint's config.json holds them absolute, so a resume started
    from another working directory still compares the same directories."""
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tmp_path, max_train_steps=1, ckpt_dir="ckpt", log_dir="logs")
    run(cfg, ToyModel(), make_dataset([2]))
    saved = json.loads((tmp_path / "ckpt" / "step-000001" / "config.json").read_text())
    assert (saved["ckpt_dir"], saved["log_dir"]) == (str(tmp_path / "ckpt"), str(tmp_path / "logs"))


def test_resume_refuses_another_experts_backend():
    """The kernel packs the experts in bf16 (or int8): another backend computes other experts."""
    saved = {"experts_backend": "torch", "seed": 0}
    assert resume_mismatches(saved, {"experts_backend": "torch", "seed": 0}) == []
    assert resume_mismatches(saved, {"experts_backend": "cpu_kernel", "seed": 0}) == [
        "experts_backend: 'torch' -> 'cpu_kernel'"]


def test_resume_refuses_changed_inputs(tmp_path):
    """Input fingerprints are recorded in every checkpoint: the same directories holding other data or weights
    are refused by name (and not skipped as an unreadable checkpoint); the same fingerprints resume."""
    data = make_dataset([1, 2, 3, 4, 5, 6], seed=5)
    inputs = {"dataset (train_data_dir)": "d1", "base weights (pretrain_ckpt_dir)": "w1"}
    run(make_cfg(tmp_path, max_train_steps=2, ckpt_interval=1), ToyModel(seed=7), data, input_fingerprints=inputs)
    changed = {**inputs, "dataset (train_data_dir)": "d2"}
    with pytest.raises(ValueError, match=r"step-000002 was trained with other settings(.|\n)*dataset \(train_data_dir\): "
                                         r"changed\n"):
        run(make_cfg(tmp_path, max_train_steps=3, resume=True), ToyModel(), data, input_fingerprints=changed)
    resumed = run(make_cfg(tmp_path, max_train_steps=3, resume=True), ToyModel(), data, input_fingerprints=inputs)
    assert resumed.step == 3


def test_resume_of_a_checkpoint_without_input_fingerprints_warns(tmp_path, capsys):
    """A checkpoint written before input fingerprints existed resumes, with a warning that names what is not
    verified."""
    data = make_dataset([1, 2, 3, 4], seed=5)
    run(make_cfg(tmp_path, max_train_steps=1, ckpt_interval=1), ToyModel(seed=7), data)
    state_path = tmp_path / "ckpt" / "step-000001" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["input_fingerprints"]
    torch.save(state, state_path)
    inputs = {"dataset (train_data_dir)": "d1"}
    assert run(make_cfg(tmp_path, max_train_steps=2, resume=True), ToyModel(), data, input_fingerprints=inputs).step == 2
    assert "written before checkpoints recorded their inputs; whether dataset (train_data_dir) changed since is " \
        "not checked" in capsys.readouterr().out


def test_resume_from_another_directory_with_its_own_relative_paths(tmp_path, monkeypatch):
    """A checkpoint records its directories resolved: resuming from elsewhere with a relative spelling of the same
    ckpt_dir is the same run; a torn config.json in the newest checkpoint falls back like a torn state."""
    data = make_dataset([1, 2, 3, 4, 5, 6], seed=5)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    run(make_cfg(tmp_path, max_train_steps=3, ckpt_interval=1, ckpt_dir="run/ckpt"), ToyModel(seed=7), data)
    torn = tmp_path / "run" / "ckpt" / "step-000003" / "config.json"
    torn.write_text(torn.read_text()[:50])
    monkeypatch.chdir(tmp_path / "sub")
    resumed = run(make_cfg(tmp_path, max_train_steps=4, resume=True, ckpt_dir="../run/ckpt"), ToyModel(seed=9), data)
    assert resumed.step == 4 and resumed.history[0]["step"] == 1


def test_an_empty_state_file_is_named_as_the_reason_of_the_fallback(tmp_path, capsys):
    data = make_dataset([1, 2, 3, 4], seed=5)
    run(make_cfg(tmp_path, max_train_steps=2, ckpt_interval=1), ToyModel(seed=7), data)
    (tmp_path / "ckpt" / "step-000002" / "trainer_state.pt").write_bytes(b"")
    run(make_cfg(tmp_path, resume=True, max_train_steps=2, ckpt_interval=1), ToyModel(seed=9), data)
    assert "step-000002 does not read back (EOFError); trying the one before it" in capsys.readouterr().out


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize(("field", "blocker", "flag"), [("ckpt_dir", "ckpt", "--ckpt-dir"),
                                                       ("ckpt_dir", "f", "--ckpt-dir"),
                                                       ("log_dir", "logs", "--log-dir/--run-name")])
def test_a_file_where_a_run_directory_goes_is_refused_before_training(tmp_path, resume, field, blocker, flag):
    """A checkpoint or log directory that is (or lies under) a file would fail at the first save, after the
    training time was spent: refused up front, resuming or not."""
    (tmp_path / blocker).write_text("")
    cfg = make_cfg(tmp_path, resume=resume, **{field: str(tmp_path / blocker / "sub") if blocker == "f"
                                              else str(tmp_path / blocker)})
    with pytest.raises(ValueError, match=f"{flag} .*{blocker} is a file, not a directory"):
        check_run_directories(cfg)


def test_resume_falls_back_over_an_unreadable_checkpoint(tmp_path, capsys):
    """A torn trainer_state.pt in the newest checkpoint (a crash before the data reached the disk) is reported and
    the one before it resumed; saving that step again replaces the torn directory."""
    data = make_dataset([1, 2, 3, 4, 5, 6], seed=5)
    full = run(make_cfg(tmp_path / "full", max_train_steps=4), ToyModel(seed=7), data)
    run(make_cfg(tmp_path, max_train_steps=4, ckpt_interval=2), ToyModel(seed=7), data)
    torn = tmp_path / "ckpt" / "step-000004" / "trainer_state.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    resumed = run(make_cfg(tmp_path, resume=True, max_train_steps=4, ckpt_interval=2), ToyModel(seed=9), data)
    assert "step-000004 does not read back" in capsys.readouterr().out
    assert losses(resumed.history) == losses(full.history)
    assert load_trainer_state(tmp_path / "ckpt" / "step-000004")["step"] == 4


def loss_failing_from(step: int, corrupt):
    """loss_fn whose loss goes through ``corrupt(model, loss_sum)`` from optimizer step ``step`` on (2 micro-batches
    per step, as make_cfg sets)."""
    calls = {"train": 0}

    def failing(model_, batch):
        calls["train"] += 1
        loss_sum, metrics = loss_fn(model_, batch)
        return (corrupt(model_, loss_sum) if calls["train"] > (step - 1) * 2 else loss_sum), metrics

    return failing


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, max_train_steps=8, ckpt_interval=2)
    model = ToyModel(seed=8)
    nan_at_step_5 = loss_failing_from(5, lambda model_, loss_sum: loss_sum * math.nan)
    with pytest.raises(NonFiniteLossError, match=r"step 5: the loss is nan.*step-000004") as error:
        run(cfg, model, make_dataset([2, 3, 4]), nan_at_step_5)

    ckpt_dir = tmp_path / "ckpt"
    assert error.value.step == 5
    assert error.value.last_checkpoint == ckpt_dir / "step-000004"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-000002", "step-000004"]
    assert load_trainer_state(ckpt_dir / "step-000004")["step"] == 4
    saved = torch.load(ckpt_dir / "step-000004" / "weights.pt", weights_only=True)
    for name, param in model.state_dict().items():  # the NaN step did not touch the weights
        assert torch.equal(param, saved[name])


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path):
    """From step 3 the loss gains sqrt(s − s.detach()) with s = the parameters' sum: its value is 0 (the loss
    stays finite) but its gradient 1/(2·sqrt(0)) is inf. The step stops before AdamW sees it; the weights stay
    finite and as saved at step 2."""
    cfg = make_cfg(tmp_path, max_train_steps=4, ckpt_interval=2)
    model = ToyModel(seed=8)

    def inf_gradient(model_, loss_sum):
        total = sum(p.sum() for p in model_.parameters())
        return loss_sum + torch.sqrt(total - total.detach())

    inf_gradient_from_step_3 = loss_failing_from(3, inf_gradient)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the gradient norm is (inf|nan).*step-000002"):
        run(cfg, model, make_dataset([2, 3, 4]), inf_gradient_from_step_3)
    saved = torch.load(tmp_path / "ckpt" / "step-000002" / "weights.pt", weights_only=True)
    for name, param in model.state_dict().items():
        assert torch.isfinite(param).all() and torch.equal(param, saved[name])


def test_checkpoint_layout_and_refusal_to_overwrite(tmp_path):
    cfg = make_cfg(tmp_path, max_train_steps=5, ckpt_interval=2)
    result = run(cfg, ToyModel(), make_dataset([2, 3, 4]))

    ckpt_dir = tmp_path / "ckpt"
    names = ["step-000002", "step-000004", "step-000005"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == names
    for name in names:
        assert sorted(p.name for p in (ckpt_dir / name).iterdir()) == ["config.json", "trainer_state.pt", "weights.pt"]
    assert result.last_checkpoint == latest_checkpoint(ckpt_dir) == ckpt_dir / "step-000005"
    assert json.loads((ckpt_dir / "step-000005" / "config.json").read_text()) == config_to_dict(cfg)
    state = load_trainer_state(ckpt_dir / "step-000004")
    assert set(state) == {"step", "optimizer", "scheduler", "sampler", "rng", "history", "input_fingerprints"}
    assert state["step"] == 4 and [r["step"] for r in state["history"]] == [1, 2, 3, 4]
    assert state["sampler"] == {"epoch": 3, "position": 1, "num_examples": 3, "accumulation": 2}  # 1 step/epoch
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, ToyModel(), make_dataset([2, 3, 4]))
    with pytest.raises(FileExistsError, match="already holds a run's logs"):  # same logs, fresh checkpoint folder
        run(dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "other")), ToyModel(), make_dataset([2, 3, 4]))
    with pytest.raises(ValueError, match="beyond --max-train-steps 4"):
        run(dataclasses.replace(cfg, resume=True, max_train_steps=4), ToyModel(), make_dataset([2, 3, 4]))


def test_logs_tensorboard_jsonl_and_plots(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, max_train_steps=4, val_interval=2)
    result = run(cfg, ToyModel(), make_dataset([2, 3, 4, 5]), val_set=make_dataset([3, 3]),
                 val_postprocess=lambda m: {**m, "ppl": math.exp(m["loss"])},
                 batch_tokens=batch_weight,
                 plots=[("loss", ["train/loss", "val/loss"]), ("Abs error", ["train/abs_err"])])

    run_dir = tmp_path / "logs" / "toy"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/abs_err", "train/tokens_per_sec",
            "val/loss", "val/abs_err", "val/ppl"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]
    assert result.history[1]["val/ppl"] == pytest.approx(math.exp(result.history[1]["val/loss"]))
    for png in ("loss.png", "abs_error.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "config.json").read_text())["max_train_steps"] == 4


def test_evaluate_weights_batches_by_units():
    """Two val batches with 1 and 3 tokens: loss = (L_1 + L_2) / 4, not the mean of means."""
    model = ToyModel(seed=9)
    data = make_dataset([1, 3], seed=10)
    metrics = evaluate(model, data, collate, loss_fn, batch_weight, batch_size=1)
    per_example = [loss_fn(model, collate([ex]))[0].item() for ex in data]
    assert metrics["loss"] == pytest.approx(sum(per_example) / 4, rel=1e-6)
    only_first = evaluate(model, data, collate, loss_fn, batch_weight, batch_size=1, max_batches=1)
    assert only_first["loss"] == pytest.approx(per_example[0], rel=1e-6)


def test_evaluate_hands_prepare_step_groups_of_micro_batches():
    """5 validation micro-batches in groups of 2: prepare_step sees 2, 2, 1 of them (the last group is what is
    left), in eval mode, before their losses; with max_batches = 3 it sees 2, 1."""
    calls = []

    def prepare_step(model, batches):
        calls.append((len(batches), model.training))
        for batch in batches:
            batch["group"] = len(batches)

    def checked_loss(model, batch):
        assert "group" in batch
        return loss_fn(model, batch)

    model = ToyModel(seed=9).train()
    data = make_dataset([1, 2, 3, 4, 5], seed=10)
    metrics = evaluate(model, data, collate, checked_loss, batch_weight, batch_size=1, prepare_step=prepare_step,
                       group_size=2)
    plain = evaluate(model, data, collate, loss_fn, batch_weight, batch_size=1)
    assert calls == [(2, False), (2, False), (1, False)] and model.training
    assert metrics["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    calls.clear()
    evaluate(model, data, collate, checked_loss, batch_weight, batch_size=1, max_batches=3,
             prepare_step=prepare_step, group_size=2)
    assert calls == [(2, False), (1, False)]


def test_sampler_is_deterministic_resumable_and_covers_each_epoch():
    sampler = BatchSampler(10, 3, seed=1)
    stream = [sampler.next_step() for _ in range(8)]  # 4 steps of one micro-batch (3, 3, 3, 1) per epoch
    assert all(len(step) == 1 for step in stream)
    assert sorted(i for step in stream[:4] for i in step[0]) == list(range(10))
    assert stream[:4] != stream[4:]
    resumed = BatchSampler(10, 3, seed=1)
    fresh_copy = BatchSampler(10, 3, seed=1)
    for _ in range(5):
        fresh_copy.next_step()
    resumed.load_state_dict(fresh_copy.state_dict())
    assert [resumed.next_step() for _ in range(3)] == stream[5:8]


def test_accumulated_steps_hold_the_examples_of_one_large_batch_across_epochs():
    """10 examples, steps of 4: micro-batches of 2 x 2 per step hold exactly the examples of one batch of 4, the
    epoch's last step included (2 examples: one micro-batch), so N x B trains as one batch of N x B."""
    large = BatchSampler(10, 4, seed=1)
    small = BatchSampler(10, 2, seed=1, accumulation=2)
    for _ in range(7):  # over two epochs of 3 steps
        one, two = large.next_step(), small.next_step()
        assert [i for batch in two for i in batch] == one[0] and all(len(batch) <= 2 for batch in two)
    assert small.state_dict() == {"epoch": 2, "position": 1, "num_examples": 10, "accumulation": 2}
    with pytest.raises(ValueError, match="counts steps of 1 micro-batches, this run takes 2"):
        BatchSampler(10, 2, seed=1, accumulation=2).load_state_dict({"epoch": 0, "position": 1, "num_examples": 10})


def test_sampler_refuses_a_position_saved_over_other_data():
    """A position saved over 10 examples does not fit 7 (a dataset rebuilt under the same path); a position past
    the epoch's steps (recorded before the example count was) is refused too."""
    saved = BatchSampler(10, 3, seed=1).state_dict()
    with pytest.raises(ValueError, match="10 examples, step 0.*7 examples: the data changed"):
        BatchSampler(7, 3, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="the data changed"):
        BatchSampler(4, 3, seed=1).load_state_dict({"epoch": 0, "position": 3})


def test_sampler_groups_by_length():
    """Lengths equal to the index: sorted within one window, each micro-batch is 4 consecutive lengths, and a
    step's two micro-batches are the 8 consecutive lengths of one step-sized cut."""
    sampler = BatchSampler(40, 4, seed=2, lengths=list(range(40)))
    batches = [sampler.next_step()[0] for _ in range(10)]
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    assert all(max(batch) - min(batch) == 3 for batch in batches)
    assert batches != sorted(batches, key=max, reverse=True)  # batch order is shuffled
    steps = [BatchSampler(40, 4, seed=2, lengths=list(range(40)), accumulation=2).next_step()]
    assert all(max(sum(step, [])) - min(sum(step, [])) == 7 for step in steps)


def test_optimizer_trains_only_trainable_params_with_decay_on_matrices(tmp_path):
    model = ToyModel()
    model.net[0].requires_grad_(False)
    optimizer = build_optimizer(make_cfg(tmp_path, weight_decay=0.1), model)
    decayed, plain = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([1, 8])] and decayed["weight_decay"] == 0.1
    assert [p.shape for p in plain["params"]] == [torch.Size([1])] and plain["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"]


def test_8bit_optimizer_is_bitsandbytes_with_a_warning_off_cuda(tmp_path, capsys):
    import bitsandbytes as bnb
    build_optimizer(make_cfg(tmp_path), ToyModel())
    assert "warning" not in capsys.readouterr().out
    optimizer = build_optimizer(make_cfg(tmp_path, optimizer="adamw_8bit"), ToyModel())
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert "--optimizer adamw_8bit on parameters off CUDA" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA parameters")
def test_adamw_is_fused_on_cuda(tmp_path):
    optimizer = build_optimizer(make_cfg(tmp_path), ToyModel().cuda())
    assert optimizer.defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA parameters")
def test_a_cpu_checkpoint_resumes_on_cuda(tmp_path):
    """--device may change on a resume: the CPU run's foreach AdamW state (step counters on the CPU) continues in
    the fused AdamW of a CUDA run, which needs its step counters on the GPU."""
    data = make_dataset([1, 2, 3, 4, 5, 6], seed=5)
    run(make_cfg(tmp_path, max_train_steps=2, ckpt_interval=2), ToyModel(seed=7), data)
    model = ToyModel(seed=7).cuda()
    resumed = run(make_cfg(tmp_path, resume=True, max_train_steps=3, device="cuda"), model, data)
    assert resumed.step == 3 and all(p.is_cuda for p in model.parameters())


def test_cuda_rng_state_is_the_current_gpus_only(monkeypatch):
    """A checkpoint keeps the current GPU's RNG state only, so a resume on a machine with fewer GPUs works; an
    older checkpoint with one state per GPU restores the current GPU's (CUDA faked: CI has no GPU)."""
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[0])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    state = rng_state()
    assert [int(t[0]) for t in state["cuda"]] == [0]
    set_rng_state(state)
    set_rng_state({**state, "cuda": [states[1], states[0]]})  # written on 2 GPUs; this machine's current is 0
    assert restored == [0, 1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert rng_state()["cuda"] == []  # a CPU run on a GPU host records none and starts no CUDA


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    import random

    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


def test_autocast_applies_on_cuda_only():
    """Mixed precision autocasts to bf16 on CUDA; on the CPU the model keeps its dtype (no autocast to record)."""
    assert autocast_name(torch.device("cuda"), True) == "bf16" and autocast_name("cuda:1", True) == "bf16"
    assert autocast_name("cuda", False) is None and autocast_name("cpu", True) is None


def test_resolve_device_refuses_unknown_names_and_cuda_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            resolve_device("cuda:0")
