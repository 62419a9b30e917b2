"""A model-agnostic training loop shared by SFT and DPO.

The task (SFT, DPO, ...) supplies four callables:

- ``collate(examples) -> batch``: builds one micro-batch (CPU tensors) from dataset examples;
- ``loss_fn(model, batch) -> (loss_sum, metric_sums)``: the loss SUMMED over the batch's
  units (target tokens for SFT, preference pairs for DPO) and other sums to report;
- ``batch_weight(batch) -> int``: the number of units in the batch;
- ``save_trainable(dir)`` / ``load_trainable(dir)``: write/read the trainable weights.

Gradient accumulation. One optimizer step uses N = ``gradient_accumulation_steps``
micro-batches b_1..b_N (fewer at an epoch's end: each epoch is cut into steps, then each step into
micro-batches, see ``BatchSampler``) with weights w_i and loss sums L_i. The loop fetches all N first,
computes W = sum_i w_i and back-propagates each L_i / W, so the accumulated gradient is

    grad sum_i L_i / W = grad (mean loss over all W units of the step),

exactly what one batch holding all N micro-batches gives. (Dividing each micro-batch by N,
as the ancestor DPO-LLaMA did, over-weights units in short micro-batches.) Reported metrics
are likewise ``sum_i metric_sum_i / W``. A loss that also depends on a statistic of the whole batch
(KTO's reference point) gets it from an optional ``prepare_step(model, batches)``, which sees all N
micro-batches (on the device) before their forward passes and may add step-wide values to them; validation
hands it the validation micro-batches in groups of N as well.

Each run writes ``<ckpt_dir>/step-000123/`` checkpoints (trainable weights,
``trainer_state.pt``, ``config.json``) and TensorBoard/jsonl/PNG logs to ``<log_dir>/<run_name>/``.
With ``cfg.resume`` the run continues from the latest checkpoint and reproduces exactly the
losses an uninterrupted run would have had: weights, optimizer, scheduler, data position and
all RNG states are restored.
"""

import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dpo_llama.configs.base import TrainConfig
from dpo_llama.utils.cli import config_to_dict, refuse_a_file_in_the_way, save_config
from dpo_llama.utils.metrics import METRICS_FILE, MetricsLogger, PlotSpec

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
DEFAULT_PLOTS: tuple[PlotSpec, ...] = (("loss", ("train/loss", "val/loss")),)
GROUP_WINDOW_STEPS = 50  # length grouping sorts windows of this many optimizer steps
# Settings a resumed run may change: the schedule and optimizer hyperparameters (applied from the resumed step on),
# logging, checkpointing, where and how the same math runs. Any other difference from the checkpoint's
# config.json (data, batching, seed, model and its experts backend, adapters, loss) would mix two runs, and is
# refused.
RESUME_ADJUSTABLE = frozenset({
    "max_train_steps", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "adam_betas", "adam_eps",
    "grad_clip", "log_interval", "val_interval", "val_batches", "ckpt_interval", "ckpt_dir", "log_dir", "run_name",
    "resume", "device", "mixed_precision", "activation_checkpointing", "experts_transposed_copy",
    "allow_reference_mismatch", "reference_check_tolerance",
    "dtype",  # the dtype it resolves to ("auto": bf16 on CUDA, fp32 on the CPU) is compared as an input fingerprint
})

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; training stopped before the optimizer step.

    Attributes:
        step: The step whose loss was not finite.
        last_checkpoint: The newest checkpoint on disk (untouched), or None.
    """

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None) -> None:
        self.step = step
        self.last_checkpoint = last_checkpoint
        saved = last_checkpoint if last_checkpoint is not None else "none (no checkpoint was written yet)"
        super().__init__(
            f"step {step}: {what} is {value}; stopped without stepping the optimizer or saving. "
            f"Last good checkpoint: {saved}"
        )


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a completed step, which was saved.

    Attributes:
        step: The last completed (and saved) optimizer step.
        checkpoint: Its checkpoint directory.
    """

    def __init__(self, step: int, checkpoint: Path) -> None:
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"interrupted after step {step}, saved in {checkpoint}; continue with --resume true")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Turns the first SIGINT / SIGTERM into a request the training loop reads between steps (an optimizer step cut
    in half would leave no consistent state to save); a second one stops at once. Yields ``requested()``. Outside
    the main thread (where signals cannot be handled) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requests = []

    def request(signum, frame) -> None:
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)
        tqdm.write("stopping after this step and saving a checkpoint (interrupt again to stop at once)")

    previous = {signum: signal.signal(signum, request) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requests)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        history: One dict per step: ``{"step": n, "train/loss": ..., "val/loss": ..., ...}``.
        step: The last completed optimizer step.
        last_checkpoint: Directory of the newest checkpoint, or None.
    """

    history: list[dict[str, float]]
    step: int
    last_checkpoint: Path | None


def set_seed(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; a CUDA device without a GPU, or a name torch does not know,
    is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch.cuda.is_available() is False; use --device cpu or auto")
    return device


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (1-indexed).

    With W = warmup_steps, T = max_steps and r = min_lr_ratio:

        step <= W:  step / W                                   (linear warmup)
        step >  W:  r + (1 - r) * (1 + cos(pi * p)) / 2,       p = min(1, (step - S) / (T - S)), S = max(W, 1)

    so the lr peaks at step W (at step 1 without warmup) and reaches r * lr at step T (and stays there after).
    """
    if step <= warmup_steps:
        return step / warmup_steps
    start = max(warmup_steps, 1)
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine schedule; after k scheduler steps the lr is ``lr * lr_factor(k + 1)``."""

    def factor(steps_done: int) -> float:
        return lr_factor(steps_done + 1, cfg.warmup_steps, cfg.max_train_steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameters with ``requires_grad``.

    Matrices (ndim >= 2) get ``cfg.weight_decay``; biases and norm weights get none. torch
    AdamW is fused when every trainable parameter is on CUDA and foreach otherwise;
    ``adamw_8bit`` / ``paged_adamw_8bit`` use bitsandbytes (imported only then), with a warning for parameters
    off CUDA: there they save only host memory and step several times slower than ``adamw``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    options = {"lr": cfg.learning_rate, "betas": tuple(cfg.adam_betas), "eps": cfg.adam_eps}
    if cfg.optimizer == "adamw":
        if all(p.is_cuda for p in params):
            return torch.optim.AdamW(groups, **options, fused=True)
        return torch.optim.AdamW(groups, **options, foreach=True)
    import bitsandbytes as bnb  # heavy import, needed only for the 8-bit optimizers

    optimizer_cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    if cfg.optimizer not in optimizer_cls:
        raise ValueError(f"optimizer must be adamw, adamw_8bit or paged_adamw_8bit, got {cfg.optimizer!r}")
    if not all(p.is_cuda for p in params):
        tqdm.write(f"warning: --optimizer {cfg.optimizer} on parameters off CUDA saves only host memory and steps "
                   "several times slower than --optimizer adamw there")
    return optimizer_cls[cfg.optimizer](groups, **options)


class BatchSampler:
    """A deterministic, resumable stream of optimizer steps, each a list of micro-batches of example indices.

    Epoch e shuffles the examples with ``np.random.default_rng((seed, e))`` and cuts the permutation into steps
    of ``batch_size x accumulation`` examples (the last may be smaller), each cut into micro-batches of
    ``batch_size``. So N micro-batches of B per step see the same examples in the same steps as one batch of
    N x B, also across epoch boundaries. With ``lengths``, each window of ``GROUP_WINDOW_STEPS`` steps is
    sorted by length before cutting, and the steps are then shuffled, so a micro-batch holds examples of
    similar length (less padding). The stream's position (epoch, step index) is its whole state.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                 accumulation: int = 1) -> None:
        if num_examples < 1:
            raise ValueError("the training set is empty")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.lengths = np.asarray(lengths) if lengths is not None else None
        self.epoch = 0
        self.position = 0
        self._steps = self._epoch_steps(0)

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """All steps of one epoch, a pure function of (seed, epoch)."""
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(self.num_examples)
        step_size = self.batch_size * self.accumulation
        if self.lengths is not None:
            window = step_size * GROUP_WINDOW_STEPS
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in chunks])
        steps = [order[i : i + step_size] for i in range(0, len(order), step_size)]
        if self.lengths is not None:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        return [[step[i : i + self.batch_size].tolist() for i in range(0, len(step), self.batch_size)]
                for step in steps]

    def next_step(self) -> list[list[int]]:
        """The next step's micro-batches (``accumulation`` of them, fewer at the end of an epoch), starting a new
        epoch when one runs out."""
        if self.position == len(self._steps):
            self.epoch += 1
            self.position = 0
            self._steps = self._epoch_steps(self.epoch)
        step = self._steps[self.position]
        self.position += 1
        return step

    def state_dict(self) -> dict[str, int]:
        """The position in the stream, and the number of examples and micro-batches per step it runs over."""
        return {"epoch": self.epoch, "position": self.position, "num_examples": self.num_examples,
                "accumulation": self.accumulation}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Jump to a position saved by :meth:`state_dict`.

        Raises:
            ValueError: the position was saved over another number of examples (the data changed), or counts
                steps of another number of micro-batches (a checkpoint of a version that counted micro-batches
                saves none: 1).
        """
        saved = int(state.get("num_examples", self.num_examples))
        accumulation = int(state.get("accumulation", 1))
        steps = self._epoch_steps(int(state["epoch"]))
        if saved != self.num_examples or int(state["position"]) > len(steps):
            raise ValueError(f"the checkpoint's data position ({saved} examples, step {state['position']}) does not "
                             f"fit this training set of {self.num_examples} examples: the data changed")
        if accumulation != self.accumulation:
            raise ValueError(f"the checkpoint's data position counts steps of {accumulation} micro-batches, this run "
                             f"takes {self.accumulation}: resume with the checkpoint's gradient_accumulation_steps")
        self.epoch, self.position, self._steps = int(state["epoch"]), int(state["position"]), steps


def check_run_directories(cfg: TrainConfig) -> None:
    """Refuses to start a fresh run (no ``cfg.resume``) over an earlier run's checkpoints or logs; the run scripts
    call it before loading anything.

    Raises:
        ValueError: ``ckpt_dir`` or ``log_dir/run_name`` is, or lies under, a file (resuming or not).
        FileExistsError: A fresh run's ``ckpt_dir`` holds checkpoints, or its ``log_dir/run_name`` holds a run's
            metrics.jsonl.
    """
    for flag, path in (("--ckpt-dir", cfg.ckpt_dir), ("--log-dir/--run-name", Path(cfg.log_dir) / cfg.run_name)):
        refuse_a_file_in_the_way(flag, path)
    if cfg.resume:
        return
    checkpoints = complete_checkpoints(cfg.ckpt_dir)
    if checkpoints:
        raise FileExistsError(f"{cfg.ckpt_dir} already holds checkpoints (latest {checkpoints[0].name}); pass "
                              "--resume to continue that run, or choose another --ckpt-dir")
    logs = Path(cfg.log_dir) / cfg.run_name / METRICS_FILE
    if logs.is_file():
        raise FileExistsError(f"{logs.parent} already holds a run's logs: choose another --run-name (or delete it), "
                              "or pass --resume to continue that run")


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain values (loadable with ``weights_only=True``): the CPU's and,
    once CUDA is in use, the current GPU's (a resume may see fewer GPUs, and a CPU run needs none)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_has_gauss, "cached_gaussian": np_gauss},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state` (a checkpoint written before they held one GPU's
    state holds one per visible GPU: the current GPU's is restored)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        device = torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda[device] if device < len(cuda) else cuda[0])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    """``<ckpt_dir>/step-000123``."""
    return Path(ckpt_dir) / f"step-{step:06d}"


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The complete checkpoints in ``ckpt_dir``, highest step first.

    Only ``step-<digits>`` directories holding a ``trainer_state.pt`` count, so unfinished
    temporary directories are ignored.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")), reverse=True)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``ckpt_dir``, or None."""
    return next(iter(complete_checkpoints(ckpt_dir)), None)


def resume_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: saved -> current"`` for every setting outside ``RESUME_ADJUSTABLE`` that differs between a
    checkpoint's config and this run's, both as JSON values (settings only one of them has are skipped). A
    checkpoint records its ``*_dir`` paths resolved (:func:`with_absolute_dirs`), and this run's are resolved
    against the current directory; a relative path recorded by an older version is not compared (its working
    directory is unknown)."""
    current = json.loads(json.dumps(current))

    def differ(name: str) -> bool:
        old, new = saved[name], current[name]
        if name.endswith("_dir") and isinstance(old, str) and isinstance(new, str) and old and new:
            return Path(old).is_absolute() and old != str(Path(new).resolve())
        return old != new

    return [f"{name}: {saved[name]!r} -> {current[name]!r}" for name in sorted(saved.keys() & current.keys())
            if name not in RESUME_ADJUSTABLE and differ(name)]


def input_changes(recorded: Mapping[str, str] | None, current: Mapping[str, str], checkpoint: Path) -> list[str]:
    """``"name: changed"`` for every input fingerprint of a checkpoint that this run's differs from. A checkpoint
    written before checkpoints recorded them (``recorded`` None) only gets a warning that they are not verified."""
    if recorded is None:
        if current:
            tqdm.write(f"warning: {checkpoint} was written before checkpoints recorded their inputs; whether "
                       f"{' or '.join(current)} changed since is not checked")
        return []
    return [f"{name}: changed" for name, value in recorded.items() if current.get(name, value) != value]


def fsync_files(directory: Path) -> None:
    """Flushes the regular files of ``directory`` to disk (their rename into place is durable only then)."""
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    """Flushes a directory's entries (a rename in it) to disk where the platform and filesystem allow it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def with_absolute_dirs(cfg: Any) -> Any:
    """``cfg`` with its ``*_dir`` paths resolved, as a checkpoint records them: a resume from another working
    directory compares the same directories, whatever relative spelling each run used."""
    resolved = {f.name: str(Path(getattr(cfg, f.name)).resolve()) for f in dataclasses.fields(cfg)
                if f.name.endswith("_dir") and isinstance(getattr(cfg, f.name), str) and getattr(cfg, f.name)}
    return dataclasses.replace(cfg, **resolved)


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` of a checkpoint (CPU tensors, ``weights_only=True``)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint {checkpoint}")
    return torch.load(path, map_location="cpu", weights_only=True)


def autocast_name(device: torch.device | str, enabled: bool) -> str | None:
    """``"bf16"`` where ``mixed_precision`` autocasts (CUDA), else None. Reference log-probs record it: the
    policy must compute its step-0 log-probs as the reference did."""
    return "bf16" if enabled and torch.device(device).type == "cuda" else None


def autocast_context(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op otherwise (CPU keeps the model's dtype)."""
    if autocast_name(device, enabled):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _add_sums(totals: dict[str, Any], new: Mapping[str, float | torch.Tensor]) -> None:
    """Add detached float values of ``new`` into ``totals`` (tensors stay on their device)."""
    for name, value in new.items():
        value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        totals[name] = totals.get(name, 0.0) + value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], Batch],
    loss_fn: LossFn,
    batch_weight: Callable[[Batch], int],
    *,
    batch_size: int,
    max_batches: int = 0,
    device: torch.device | str = "cpu",
    mixed_precision: bool = False,
    prepare_step: Callable[[nn.Module, list[Batch]], None] | None = None,
    group_size: int = 1,
) -> dict[str, float]:
    """Weighted validation metrics over ``dataset`` in order, in eval mode.

    ``loss = sum_b loss_sum_b / sum_b w_b`` and likewise for every metric, over the first
    ``max_batches`` micro-batches (0 = all). With ``prepare_step``, consecutive micro-batches are handed to it in
    groups of ``group_size`` (a training step's worth), so a loss with a step-wide statistic (KTO's reference
    point) is validated as it trains: the result depends on the step's batch size, not on how it is split.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    num_batches = math.ceil(len(dataset) / batch_size)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    starts = range(0, num_batches * batch_size, batch_size)
    group_size = group_size if prepare_step is not None else 1
    sums: dict[str, Any] = {}
    total_weight = 0

    def batch_at(start: int) -> Batch:
        return to_device(collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]), device)

    for first in range(0, len(starts), group_size):
        batches = [batch_at(start) for start in starts[first:first + group_size]]
        with autocast_context(device, mixed_precision):
            if prepare_step is not None:
                prepare_step(model, batches)
            for batch in batches:
                total_weight += int(batch_weight(batch))
                loss_sum, metric_sums = loss_fn(model, batch)
                _add_sums(sums, {"loss": loss_sum, **metric_sums})
    model.train(was_training)
    if total_weight <= 0:
        raise ValueError("the validation set has no units to average over (batch_weight summed to 0)")
    return {name: float(value) / total_weight for name, value in sums.items()}


def _format_metrics(metrics: Mapping[str, float]) -> str:
    """``"loss 1.234 | lr 1e-04"``, four significant digits."""
    return " | ".join(f"{name} {value:.4g}" for name, value in metrics.items())


class Trainer:
    """The training loop; see the module docstring. :func:`train` is the usual entry point."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_set: Sequence[Any],
        collate: Callable[[list[Any]], Batch],
        loss_fn: LossFn,
        batch_weight: Callable[[Batch], int],
        *,
        save_trainable: Callable[[Path], None],
        load_trainable: Callable[[Path], None],
        val_set: Sequence[Any] | None = None,
        val_postprocess: Callable[[dict[str, float]], dict[str, float]] | None = None,
        batch_tokens: Callable[[Batch], int] | None = None,
        example_length: Callable[[Any], int] | None = None,
        prepare_step: Callable[[nn.Module, list[Batch]], None] | None = None,
        input_fingerprints: Mapping[str, str] | None = None,
    ) -> None:
        if cfg.group_by_length and example_length is None:
            raise ValueError("group_by_length=True needs an example_length callable")
        if cfg.warmup_steps >= cfg.max_train_steps:
            tqdm.write(f"warning: warmup_steps {cfg.warmup_steps} >= max_train_steps {cfg.max_train_steps}: the "
                       "learning rate only warms up and never decays to min_lr_ratio x learning_rate")
        self.cfg = cfg
        self.model = model
        self.train_set = train_set
        self.collate = collate
        self.loss_fn = loss_fn
        self.batch_weight = batch_weight
        self.save_trainable = save_trainable
        self.load_trainable = load_trainable
        self.val_set = val_set
        self.val_postprocess = val_postprocess
        self.batch_tokens = batch_tokens
        self.prepare_step = prepare_step
        self.input_fingerprints = dict(input_fingerprints or {})
        self.device = resolve_device(cfg.device)
        set_seed(cfg.seed)
        self.optimizer = build_optimizer(cfg, model)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(self.optimizer, cfg)
        lengths = [example_length(ex) for ex in train_set] if cfg.group_by_length else None
        self.sampler = BatchSampler(len(train_set), cfg.micro_batch_size, cfg.seed, lengths,
                                    cfg.gradient_accumulation_steps)
        self.step = 0
        self.last_checkpoint: Path | None = None

    def run(self, plots: Sequence[PlotSpec] = DEFAULT_PLOTS) -> TrainResult:
        """Train to ``cfg.max_train_steps`` (resuming first if asked) and write the plots.

        Raises:
            TrainingInterrupted: After an interrupt, once the step in progress is done and saved (plots written).
        """
        check_run_directories(self.cfg)
        history = self._restore()
        cfg = self.cfg
        with (
            MetricsLogger(cfg.log_dir, cfg.run_name, history) as logger,
            tqdm(total=cfg.max_train_steps, initial=self.step, desc=cfg.run_name, disable=None) as progress,
            deferred_interrupts() as interrupted,
        ):
            save_config(cfg, logger.run_dir / CONFIG_FILE)
            while self.step < cfg.max_train_steps:
                self.step += 1
                metrics = self._train_step()
                logger.log(self.step, metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.step % cfg.log_interval == 0:
                    tqdm.write(f"step {self.step}/{cfg.max_train_steps} | {_format_metrics(metrics)}")
                self._maybe_validate(logger)
                if self._due(cfg.ckpt_interval) or interrupted():
                    self.last_checkpoint = self._save_checkpoint(logger.history)
                if interrupted() and self.step < cfg.max_train_steps:
                    logger.save_plots(plots)
                    raise TrainingInterrupted(self.step, self.last_checkpoint)
            logger.save_plots(plots)
            return TrainResult(logger.history, self.step, self.last_checkpoint)

    def _due(self, interval: int) -> bool:
        """True every ``interval`` steps (0 = never) and at the last step."""
        return self.step == self.cfg.max_train_steps or (interval > 0 and self.step % interval == 0)

    def _next_batches(self) -> list[Batch]:
        """Collate the step's micro-batches (``gradient_accumulation_steps``, fewer at the end of an epoch)."""
        return [self.collate([self.train_set[i] for i in indices]) for indices in self.sampler.next_step()]

    def _train_step(self) -> dict[str, float]:
        """One optimizer step over N micro-batches, each back-propagating loss_sum / W."""
        start = time.perf_counter()
        self.model.train()
        batches = self._next_batches()
        weight = sum(int(self.batch_weight(batch)) for batch in batches)
        if weight <= 0:
            raise ValueError(f"step {self.step}: batch_weight summed to {weight}; a step needs at least one unit")
        sums: dict[str, Any] = {}
        batches = [to_device(batch, self.device) for batch in batches]
        if self.prepare_step is not None:
            with autocast_context(self.device, self.cfg.mixed_precision):
                self.prepare_step(self.model, batches)
        for batch in batches:
            with autocast_context(self.device, self.cfg.mixed_precision):
                loss_sum, metric_sums = self.loss_fn(self.model, batch)
            (loss_sum / weight).backward()
            _add_sums(sums, {"loss": loss_sum, **metric_sums})
        metrics = {name: float(value) / weight for name, value in sums.items()}
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(self.step, "the loss", metrics["loss"], self.last_checkpoint)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(self.step, "the gradient norm", grad_norm, self.last_checkpoint)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["grad_norm"] = grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.batch_tokens is not None:
            tokens = sum(int(self.batch_tokens(batch)) for batch in batches)
            metrics["tokens_per_sec"] = tokens / (time.perf_counter() - start)
        return metrics

    def _clip_gradients(self) -> float:
        """Global L2 norm of the gradients before clipping; clips to ``cfg.grad_clip`` if > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.grad_clip, norm)
        return float(norm)

    def _maybe_validate(self, logger: MetricsLogger) -> None:
        """Every ``val_interval`` steps and at the end: log ``val/<name>`` metrics."""
        if self.val_set is None or not self._due(self.cfg.val_interval):
            return
        metrics = evaluate(
            self.model, self.val_set, self.collate, self.loss_fn, self.batch_weight,
            batch_size=self.cfg.micro_batch_size, max_batches=self.cfg.val_batches,
            device=self.device, mixed_precision=self.cfg.mixed_precision,
            prepare_step=self.prepare_step, group_size=self.cfg.gradient_accumulation_steps,
        )
        if self.val_postprocess is not None:
            metrics = self.val_postprocess(metrics)
        logger.log(self.step, metrics, split="val")
        tqdm.write(f"step {self.step}/{self.cfg.max_train_steps} | val | {_format_metrics(metrics)}")

    def _save_checkpoint(self, history: list[dict[str, float]]) -> Path:
        """Write ``step-XXXXXX/`` atomically: build ``.tmp-step-XXXXXX/`` then rename it."""
        final = checkpoint_path(self.cfg.ckpt_dir, self.step)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.save_trainable(tmp)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "history": history,
            "input_fingerprints": self.input_fingerprints,
        }
        torch.save(state, tmp / STATE_FILE)
        save_config(with_absolute_dirs(self.cfg), tmp / CONFIG_FILE)
        fsync_files(tmp)
        fsync_directory(tmp)
        if final.exists():  # incomplete or unreadable (a complete one would have been resumed from)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(final.parent)
        return final

    def _load_newest_readable(self, checkpoints: list[Path]) -> tuple[Path, dict[str, Any]]:
        """Loads the trainable weights of the newest checkpoint that reads back, refusing one whose config differs
        from this run's beyond ``RESUME_ADJUSTABLE`` or whose input fingerprints differ; returns it and its
        trainer state.

        Raises:
            ValueError: the newest readable checkpoint was trained with other settings or inputs, or none reads
                back.
        """
        current = config_to_dict(self.cfg)
        for checkpoint in checkpoints:
            config_path = checkpoint / CONFIG_FILE
            try:
                saved = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
                state = load_trainer_state(checkpoint)
                mismatches = resume_mismatches(saved, current) + input_changes(
                    state.get("input_fingerprints"), self.input_fingerprints, checkpoint)
                if not mismatches:
                    self.load_trainable(checkpoint)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
                reason = str(error) or type(error).__name__  # an empty file's EOFError says nothing
                tqdm.write(f"warning: {checkpoint} does not read back ({reason}); trying the one before it")
                continue
            if mismatches:
                raise ValueError(f"--resume: {checkpoint} was trained with other settings (checkpoint -> this "
                                 "run):\n  " + "\n  ".join(mismatches) + "\nresume with the checkpoint's "
                                 "settings, or start a new run in another --ckpt-dir")
            return checkpoint, state
        raise ValueError(f"--resume: no checkpoint in {self.cfg.ckpt_dir} reads back (see the warnings above)")

    def _restore(self) -> list[dict[str, float]]:
        """Load the latest checkpoint when ``cfg.resume`` (:func:`check_run_directories` has refused a fresh run
        over checkpoints); return its metric history."""
        checkpoints = complete_checkpoints(self.cfg.ckpt_dir)
        if not checkpoints:
            if self.cfg.resume:
                tqdm.write(f"resume: no checkpoint in {self.cfg.ckpt_dir}, starting from step 0")
            return []
        latest, state = self._load_newest_readable(checkpoints)
        if state["step"] > self.cfg.max_train_steps:
            raise ValueError(f"--resume: {latest} is at step {state['step']}, beyond --max-train-steps "
                             f"{self.cfg.max_train_steps}: raise it to continue the run")
        # This run's lr, betas, eps, weight decay and fused flag, even if they changed. The flag must be set before
        # loading: torch puts the step counters on the parameters' device only for a group loaded as fused, which
        # fused AdamW on CUDA needs when it resumes a checkpoint written on the CPU.
        saved = state["optimizer"]
        saved["param_groups"] = [{**group, **{k: v for k, v in fresh.items() if k != "params"}}
                                 for group, fresh in zip(saved["param_groups"], self.optimizer.param_groups)]
        self.optimizer.load_state_dict(saved)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)  # this run's schedule, even if it changed
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = latest
        tqdm.write(f"resumed from {latest} at step {self.step}")
        return state["history"]


def train(
    cfg: TrainConfig,
    model: nn.Module,
    train_set: Sequence[Any],
    collate: Callable[[list[Any]], Batch],
    loss_fn: LossFn,
    batch_weight: Callable[[Batch], int],
    *,
    save_trainable: Callable[[Path], None],
    load_trainable: Callable[[Path], None],
    val_set: Sequence[Any] | None = None,
    val_postprocess: Callable[[dict[str, float]], dict[str, float]] | None = None,
    batch_tokens: Callable[[Batch], int] | None = None,
    example_length: Callable[[Any], int] | None = None,
    prepare_step: Callable[[nn.Module, list[Batch]], None] | None = None,
    input_fingerprints: Mapping[str, str] | None = None,
    plots: Sequence[PlotSpec] = DEFAULT_PLOTS,
) -> TrainResult:
    """Train ``model`` on ``train_set``; see the module docstring for the callables' contracts.

    The caller places the model on its device(s); batches are moved to ``cfg.device``.

    Args:
        cfg: Training settings.
        model: The model; only parameters with ``requires_grad`` are optimised.
        train_set: Indexable examples.
        collate: ``examples -> batch`` (nested dict/list/tuple of CPU tensors).
        loss_fn: ``(model, batch) -> (loss_sum, metric_sums)``; ``"loss"`` is reserved.
        batch_weight: ``batch -> number of units`` summed in ``loss_sum``.
        save_trainable: Writes the trainable weights into a checkpoint directory.
        load_trainable: Reads them back from a checkpoint directory (on resume).
        val_set: Validation examples, evaluated every ``cfg.val_interval`` steps and at the end.
        val_postprocess: ``metrics -> metrics`` applied to validation results (e.g. perplexity).
        batch_tokens: ``batch -> tokens processed``, for the ``tokens_per_sec`` metric.
        example_length: ``example -> length``, required when ``cfg.group_by_length``.
        prepare_step: ``(model, batches)``, called with a step's micro-batches (on the device) before their
            forward passes, and with validation micro-batches in groups of as many; may add step-wide values to
            them (see the module docstring).
        input_fingerprints: ``name -> digest`` of what the config's directories hold (base weights, dataset),
            recorded in every checkpoint: a resume whose inputs changed is refused, like changed settings.
        plots: ``(title, tags)`` specs of the PNG plots written at the end.

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf (the last checkpoint is intact).
        FileExistsError: ``cfg.ckpt_dir`` holds checkpoints and ``cfg.resume`` is False.
    """
    trainer = Trainer(
        cfg, model, train_set, collate, loss_fn, batch_weight,
        save_trainable=save_trainable, load_trainable=load_trainable, val_set=val_set,
        val_postprocess=val_postprocess, batch_tokens=batch_tokens, example_length=example_length,
        prepare_step=prepare_step, input_fingerprints=input_fingerprints,
    )
    return trainer.run(plots)
