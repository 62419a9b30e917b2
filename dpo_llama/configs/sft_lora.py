"""Settings of ``dpo_llama/run_sft_lora.py``; the defaults train the embedded demo.

Every field is a flag: ``python dpo_llama/run_sft_lora.py --max-train-steps 20 --train-data-dir DIR``.
"""

from dataclasses import dataclass, field

from dpo_llama.configs import demo
from dpo_llama.configs.finetune import FinetuneConfig


@dataclass
class SFTLoRAConfig(FinetuneConfig):
    """Supervised fine-tuning with LoRA: loss on assistant tokens only, averaged over the step's target tokens."""

    pretrain_ckpt_dir: str = field(default=str(demo.BASE_MODEL), metadata={"help": "Starting weights (checkpoint)."})
    train_data_dir: str = field(default=demo.SFT_DATASET,
                                metadata={"help": "Dataset from scripts/build_finetune_datasets.py."})
    ckpt_dir: str = field(default=demo.SFT_CKPT, metadata={"help": "Directory of step-XXXXXX checkpoints."})
    run_name: str = field(default="demo-sft", metadata={"help": "Name of this run's log sub-directory."})
    max_train_steps: int = field(default=300, metadata={"help": "Number of optimizer steps."})
    micro_batch_size: int = field(default=16, metadata={"help": "Examples per forward/backward pass."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    val_interval: int = field(default=100, metadata={"help": "Validate every this many steps (0 = only at the end)."})
    log_interval: int = field(default=50, metadata={"help": "Print a summary line every this many steps."})
