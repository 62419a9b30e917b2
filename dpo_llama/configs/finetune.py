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
    """Training (``TrainConfig``) + LoRA / 4-bit (``LoRAConfig``) + what to train on.

    The defaults put rank-16 adapters on every linear layer of attention and MLP (QLoRA's recommendation).
    """

    pretrain_ckpt_dir: str = field(default="", metadata={"help": "Starting weights: a dpo_llama checkpoint directory."})
    train_data_dir: str = field(default="", metadata={"help": "Dataset dir (train/validation.safetensors, meta.json)."})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "Dtype of the frozen weights; auto = bf16 on CUDA, fp32 on CPU."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each block's activations in the backward pass (saves memory)."})
    experts_backend: Literal["torch", "cpu_kernel", "cpu_kernel_int8"] = field(
        default="torch", metadata={"help": "MoE models: routed experts in PyTorch, or in the C++ CPU kernel with "
                                           "bf16 or int8 weights (int8: half the CPU memory; a quantized model)."})
    experts_transposed_copy: bool = field(default=False, metadata={
        "help": "With experts_backend=cpu_kernel: keep transposed copies of the experts too (a faster backward "
                "through them, at twice their CPU memory)."})
    aux_loss_weight: float = field(
        default=1.0, metadata={"help": "MoE models: weight of the router balancing loss (its alpha is in params)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_steps: int = field(default=20, metadata={"help": "Steps of linear warmup from 0 to learning_rate."})
    ckpt_interval: int = field(default=100, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_attn_key: bool = field(default=True, metadata={"help": "LoRA on k_proj (MLA: kv_a_proj_with_mqa)."})
    lora_attn_proj: bool = field(default=True, metadata={"help": "LoRA on o_proj."})
    lora_mlp_gate: bool = field(default=True, metadata={"help": "LoRA on the dense MLP gate_proj."})
    lora_mlp_up: bool = field(default=True, metadata={"help": "LoRA on the dense MLP up_proj."})
    lora_mlp_down: bool = field(default=True, metadata={"help": "LoRA on the dense MLP down_proj."})

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        LoRAConfig.__post_init__(self)
        if not self.pretrain_ckpt_dir or not self.train_data_dir:
            raise ValueError("pretrain_ckpt_dir and train_data_dir must be set")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if self.experts_transposed_copy and self.experts_backend != "cpu_kernel":
            raise ValueError("experts_transposed_copy needs experts_backend=cpu_kernel")
        if self.experts_backend != "torch" and (self.quant_4bit or (self.quant_lora_4bit
                                                                     and self.lora_moe_routed_experts)):
            raise ValueError(f"experts_backend={self.experts_backend} takes no 4-bit experts (quant_4bit, or "
                             "quant_lora_4bit with lora_moe_routed_experts, stores them 4-bit); the kernel's int8 "
                             "experts (cpu_kernel_int8) are its low-memory choice")
