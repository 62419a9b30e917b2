"""Fields shared by the LoRA fine-tuning stages (SFT and DPO): the model to start from, the data, the dtype.

Every field is a command-line flag of the run scripts (``--pretrain-ckpt-dir DIR`` or
``--pretrain_ckpt_dir DIR``); ``--help`` lists them with their defaults.
"""

from dataclasses import dataclass, field
from typing import Literal

from dpo_llama.configs.base import TrainConfig
from dpo_llama.models.lora import LoRAConfig


@dataclass
class FinetuneConfig(TrainConfig, LoRAConfig):
    """Training (``TrainConfig``) + LoRA / 4-bit (``LoRAConfig``) + what to train on."""

    pretrain_ckpt_dir: str = field(default="", metadata={"help": "Starting weights: a dpo_llama checkpoint directory."})
    train_data_dir: str = field(default="", metadata={"help": "Dataset dir (train.pkl, validation.pkl, meta.json)."})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "Dtype of the frozen weights; auto = bf16 on CUDA, fp32 on CPU."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each block's activations in the backward pass (saves memory)."})
    experts_backend: Literal["torch", "cpu_kernel"] = field(
        default="torch", metadata={"help": "MoE models: routed experts in PyTorch, or in the C++ CPU kernel."})
    aux_loss_weight: float = field(
        default=1.0, metadata={"help": "MoE models: weight of the router balancing loss (its alpha is in params)."})

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        LoRAConfig.__post_init__(self)
        if not self.pretrain_ckpt_dir or not self.train_data_dir:
            raise ValueError("pretrain_ckpt_dir and train_data_dir must be set")
