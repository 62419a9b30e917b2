"""Settings of ``dpo_llama/run_dpo_lora.py``; the defaults train the embedded demo.

Every field is a flag: ``python dpo_llama/run_dpo_lora.py --loss-type ipo --beta 0.5 --max-train-steps 100``.
"""

from dataclasses import dataclass, field
from typing import Literal, Optional

from dpo_llama.configs import demo
from dpo_llama.configs.finetune import FinetuneConfig
from dpo_llama.utils.losses import LOSS_TYPES

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"]


@dataclass
class DPOLoRAConfig(FinetuneConfig):
    """Preference optimisation with LoRA against reference log-probs precomputed in the dataset."""

    pretrain_ckpt_dir: str = field(default=demo.SFT_MERGED,
                                   metadata={"help": "Starting weights: the SFT model the dataset's reference is."})
    train_data_dir: str = field(default=demo.PREFERENCE_DATASET,
                                metadata={"help": "Dataset from scripts/build_preference_datasets.py."})
    init_lora_dir: str | None = field(
        default=None, metadata={"help": "Continue this adapter (or the latest step of a run's ckpt_dir); it must "
                                        "be the one the dataset's reference was built with (--lora there). Its own "
                                        "LoRA and 4-bit settings apply: flags contradicting them are refused."})
    loss_type: LossType = field(default="sigmoid", metadata={
        "help": "sigmoid = DPO (cDPO with label_smoothing), robust = rDPO, ipo, hinge (RSO), simpo and orpo "
                "(reference-free), kto (unpaired data)."})
    beta: float = field(default=0.1, metadata={
        "help": "Inverse temperature β of the reward β·log(π/π_ref); for simpo the reward scale (the paper: 2 to 10), "
                "for orpo the weight λ of the odds-ratio term (0.1 to 1)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label-noise ε of cDPO (sigmoid) and rDPO (robust)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin γ."})
    sft_weight: float = field(default=0.0, metadata={
        "help": "Weight of the chosen responses' NLL (RPO's α); orpo uses 1 (its objective's NLL) when 0."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of desirable examples."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of undesirable examples."})
    allow_reference_mismatch: bool = field(
        default=False, metadata={"help": "Train even if the dataset's reference does not match the starting policy."})
    reference_check_tolerance: Optional[float] = field(
        default=None, metadata={"help": "Largest |policy - reference| log-prob difference per scored token of a "
                                        "sequence accepted at step 0; none: 1e-3 when the policy computes in fp32, "
                                        "3e-2 in bf16/fp16 (weights, 4-bit compute or autocast), whose results "
                                        "depend on the padded length (up to about 1e-2 per token on short "
                                        "sequences on CPU)."})
    ckpt_dir: str = field(default=demo.DPO_CKPT, metadata={"help": "Directory of step-XXXXXX checkpoints."})
    run_name: str = field(default="demo-dpo", metadata={"help": "Name of this run's log sub-directory."})
    max_train_steps: int = field(default=300, metadata={"help": "Number of optimizer steps."})
    micro_batch_size: int = field(default=16, metadata={"help": "Pairs per forward/backward pass (2x sequences)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    val_interval: int = field(default=50, metadata={"help": "Validate every this many steps (0 = only at the end)."})
    log_interval: int = field(default=25, metadata={"help": "Print a summary line every this many steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing is used by loss_type sigmoid and robust only, not {self.loss_type!r}")
        if min(self.sft_weight, self.simpo_gamma) < 0:
            raise ValueError(f"sft_weight and simpo_gamma must be >= 0, got {self.sft_weight} and {self.simpo_gamma}")
        if self.simpo_gamma != type(self).simpo_gamma and self.loss_type != "simpo":
            raise ValueError(f"simpo_gamma is used by loss_type simpo only, not {self.loss_type!r}")
        kto_weights = (self.desirable_weight, self.undesirable_weight)
        if kto_weights != (type(self).desirable_weight, type(self).undesirable_weight) and self.loss_type != "kto":
            raise ValueError(f"desirable_weight and undesirable_weight are used by loss_type kto only, not "
                             f"{self.loss_type!r}")
        if self.sft_weight and self.loss_type == "kto":
            raise ValueError("sft_weight (the chosen responses' NLL) is not used by loss_type 'kto'")
        if min(self.desirable_weight, self.undesirable_weight) < 0 or not (self.desirable_weight
                                                                             or self.undesirable_weight):
            raise ValueError("desirable_weight and undesirable_weight must be >= 0, not both 0, got "
                             f"{self.desirable_weight} and {self.undesirable_weight}")
        if self.reference_check_tolerance is not None and self.reference_check_tolerance < 0:
            raise ValueError(f"reference_check_tolerance must be >= 0, got {self.reference_check_tolerance}")
        if self.loss_type not in (*LOSS_TYPES, "kto"):
            raise ValueError(f"loss_type must be one of {(*LOSS_TYPES, 'kto')}, got {self.loss_type!r}")
