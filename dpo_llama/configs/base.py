"""Training fields shared by every fine-tuning script (SFT, DPO and relatives).

Script configs subclass :class:`TrainConfig`, add their model / LoRA / data fields and
override the defaults (for example ``ckpt_dir="./checkpoints/sft"``). A subclass that
defines ``__post_init__`` must call ``super().__post_init__()`` to keep the checks below.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal


def reject_non_finite(config) -> None:
    """Raises ``ValueError`` naming the first float field (or float in a tuple field) that is NaN or infinite:
    such values pass every ``<`` / ``>`` check, and would train nothing or fail many steps later."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{f.name} must be finite, got {value}")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing settings read by ``dpo_llama.utils.trainer.train``."""

    seed: int = field(default=42, metadata={"help": "Seed for python, numpy and torch RNGs and the data order."})
    max_train_steps: int = field(default=1000, metadata={"help": "Number of optimizer steps to train for."})
    micro_batch_size: int = field(default=2, metadata={"help": "Examples per forward/backward pass."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Micro-batches per optimizer step; the loss is weighted over all of them."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate reached after warmup."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine floor: the lr decays to min_lr_ratio * learning_rate at the last step."}
    )
    warmup_steps: int = field(default=100, metadata={"help": "Steps of linear warmup from 0 to learning_rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW decoupled weight decay, applied to matrices only (not biases/norms)."}
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW (beta1, beta2)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this value; 0 = off."})
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = field(
        default="adamw", metadata={"help": "torch AdamW, or bitsandbytes 8-bit (paged) AdamW."}
    )
    log_interval: int = field(default=10, metadata={"help": "Print a summary line every this many steps."})
    val_interval: int = field(
        default=200, metadata={"help": "Validate every this many steps (0 = only at the end)."}
    )
    val_batches: int = field(default=0, metadata={"help": "Micro-batches per validation (0 = the whole set)."})
    ckpt_interval: int = field(
        default=500, metadata={"help": "Save a checkpoint every this many steps (0 = only at the end)."}
    )
    ckpt_dir: str = field(default="./checkpoints/train", metadata={"help": "Directory of step-XXXXXX checkpoints."})
    log_dir: str = field(
        default="./logs", metadata={"help": "TensorBoard/metrics root; a run writes to log_dir/run_name."}
    )
    run_name: str = field(default="train", metadata={"help": "Name of this run's log sub-directory."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from the latest checkpoint in ckpt_dir (if there is one)."}
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "Device for the batches; auto = cuda when available."}
    )
    mixed_precision: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)."})
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch examples of similar length together to cut padding."}
    )

    def __post_init__(self) -> None:
        """Reject values the trainer cannot use, naming the field."""
        reject_non_finite(self)
        for name in ("ckpt_dir", "log_dir", "run_name"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        positive = ("max_train_steps", "micro_batch_size", "gradient_accumulation_steps", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "val_interval", "val_batches", "ckpt_interval")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two values in [0, 1), got {self.adam_betas}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
