"""Supervised fine-tuning with LoRA (or QLoRA) on a dataset from scripts/build_finetune_datasets.py.

    python dpo_llama/run_sft_lora.py --pretrain-ckpt-dir checkpoints/llama-2-7b --train-data-dir datasets/sft \\
        --quant-4bit true --quant-lora-4bit true --max-train-steps 2000

The loss is the NLL of assistant tokens only, averaged over the real target tokens of each optimizer step
(gradient accumulation equals one large batch). Checkpoints (adapter + optimizer + scheduler + RNG + data
position) go to --ckpt-dir/step-XXXXXX; --resume continues the latest one exactly. Logs: TensorBoard events,
metrics.jsonl and PNG plots under --log-dir/--run-name. With no arguments it trains the embedded demo.
Every config field is a flag; see --help.
"""

from __future__ import annotations

import sys
from functools import partial

from dpo_llama.configs.sft_lora import SFTLoRAConfig
from dpo_llama.models.checkpoint import checkpoint_fingerprint
from dpo_llama.models.lora import base_info
from dpo_llama.utils.dataset_io import check_dataset_kind, read_dataset
from dpo_llama.utils.finetune import (adapter_callbacks, check_data_fits_model, input_fingerprints,
                                      load_policy, run_main, trainable_summary, with_running_experts_backend)
from dpo_llama.utils.sft import add_perplexity, batch_tokens, collate_sft, sft_loss, target_tokens
from dpo_llama.utils.trainer import check_run_directories, resolve_device, train

PLOTS = (("loss", ("train/loss", "val/loss")), ("validation perplexity", ("val/perplexity",)))


def example_length(example: dict) -> int:
    return len(example["tokens"])


def run(cfg: SFTLoRAConfig):
    """Trains and returns the trainer's result (history, last checkpoint)."""
    device = resolve_device(cfg.device)
    check_run_directories(cfg)
    train_set, val_set, meta = read_dataset(cfg.train_data_dir)
    check_dataset_kind(meta, "sft", cfg.train_data_dir)
    tokenizer = check_data_fits_model(meta, train_set + val_set, example_length, cfg.pretrain_ckpt_dir,
                                      cfg.train_data_dir)
    model = load_policy(cfg, device)
    cfg = with_running_experts_backend(cfg, model)
    print(f"SFT on {len(train_set)} examples ({len(val_set)} validation), {trainable_summary(model)}")
    base_sha256 = checkpoint_fingerprint(cfg.pretrain_ckpt_dir)  # once: the adapter's record and the resume check
    save_trainable, load_trainable = adapter_callbacks(model, base_info(cfg.pretrain_ckpt_dir, base_sha256))
    return train(cfg, model, train_set, partial(collate_sft, pad_id=tokenizer.pad_id),
                 partial(sft_loss, aux_loss_weight=cfg.aux_loss_weight), target_tokens,
                 save_trainable=save_trainable, load_trainable=load_trainable, val_set=val_set or None,
                 val_postprocess=add_perplexity, batch_tokens=batch_tokens,
                 example_length=example_length,
                 input_fingerprints=input_fingerprints(cfg, base_sha256, device), plots=PLOTS)


def main(argv=None) -> int:
    return run_main(SFTLoRAConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
