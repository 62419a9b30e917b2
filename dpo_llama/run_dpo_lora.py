"""Preference optimisation (DPO and relatives) with LoRA / QLoRA against precomputed reference log-probs.

    python dpo_llama/run_dpo_lora.py --pretrain-ckpt-dir checkpoints/llama-2-7b-sft --train-data-dir datasets/hh \\
        --loss-type sigmoid --beta 0.1 --max-train-steps 1000

Only the policy is run during training: the reference log-probs were computed once by
scripts/build_preference_datasets.py. Before the first step the run verifies that the policy starts where that
reference was computed (same weights, adapter, quantization, dtype, autocast, tokenizer, template: the dataset's
fingerprint) and then measures it on the first batch, under the training's autocast: policy log-probs must equal
the stored ones, so the DPO loss is ln 2 with zero rewards (written to <log-dir>/<run-name>/reference_check.json;
KTO: its completions' and KL completions' log-probs). A mismatch is refused
unless --allow-reference-mismatch. Losses: --loss-type sigmoid | robust | ipo | hinge | simpo | orpo | kto
(see dpo_llama/utils/losses.py for each formula and paper), plus --sft-weight for an NLL term (RPO).
Checkpoints, --resume, logs and plots work as in run_sft_lora.py. With no arguments it trains the demo.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from dpo_llama.configs.dpo_lora import DPOLoRAConfig
from dpo_llama.models.checkpoint import checkpoint_fingerprint
from dpo_llama.models.lora import base_info, find_adapter
from dpo_llama.utils.dataset_io import check_dataset_kind, read_dataset, write_json
from dpo_llama.utils.dpo import (PLOTS, add_step_kl_logps, batch_tokens, collate_pairs, collate_unpaired,
                                 example_length, kto_loss, num_units, paired_loss, reference_check)
from dpo_llama.utils.finetune import (adapter_callbacks, check_data_fits_model, dtype_name,
                                      input_fingerprints, load_policy, resolve_dtype, run_main, trainable_summary,
                                      with_lora_settings, with_running_experts_backend)
from dpo_llama.utils.losses import AVERAGED_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
from dpo_llama.utils.preference_data import fingerprint_mismatches, model_fingerprint
from dpo_llama.utils.trainer import (autocast_context, autocast_name, check_run_directories, latest_checkpoint,
                                     resolve_device, to_device, train)


def check_data(cfg: DPOLoRAConfig, meta: dict) -> None:
    """Refuses data that cannot serve this loss: unpaired vs paired, a scored prompt history where it would not
    cancel, or no reference where one is needed."""
    check_dataset_kind(meta, "preference", cfg.train_data_dir)
    if meta["unpaired"] != (cfg.loss_type == "kto"):
        kind = "unpaired (KTO)" if meta["unpaired"] else "paired"
        raise ValueError(f"{cfg.train_data_dir} holds {kind} data; loss_type {cfg.loss_type!r} needs "
                         f"{'unpaired' if cfg.loss_type == 'kto' else 'paired'} data")
    if meta.get("score_all_assistant_turns") and cfg.loss_type in (*AVERAGED_LOSS_TYPES, "kto"):
        raise ValueError(f"{cfg.train_data_dir} was built with --score-all-assistant-turns: its prompt history is "
                         f"scored, the same tokens in both responses, which cancel only in the summed log-ratios of "
                         f"sigmoid, robust and hinge; loss_type {cfg.loss_type!r} would train them too (it averages "
                         f"per token, or compares with a KL estimate that leaves them out): rebuild without the flag")
    if meta.get("score_all_assistant_turns") and cfg.sft_weight > 0:
        raise ValueError(f"{cfg.train_data_dir} was built with --score-all-assistant-turns: --sft-weight adds the NLL "
                         f"of the chosen log-probs, which on this data score the prompt history too, so it would train "
                         f"the earlier assistant turns: rebuild without the flag, or set --sft-weight 0")
    if meta["reference"] is None and cfg.loss_type not in REFERENCE_FREE_LOSS_TYPES:
        raise ValueError(f"{cfg.train_data_dir} was built with --no-reference; loss_type {cfg.loss_type!r} needs "
                         f"reference log-probs (reference-free: {', '.join(REFERENCE_FREE_LOSS_TYPES)})")


def refuse_or_warn(cfg: DPOLoRAConfig, problem: str) -> None:
    """Raises, or only warns with --allow-reference-mismatch."""
    if not cfg.allow_reference_mismatch:
        raise ValueError(f"{problem}\n(pass --allow-reference-mismatch to train anyway)")
    print(f"warning: {problem}", file=sys.stderr)


def verify_fingerprint(cfg: DPOLoRAConfig, meta: dict, model, tokenizer, lora_dir, device,
                       base_sha256: str) -> None:
    """The policy's starting point must be the dataset's reference (see the module docstring)."""
    if not uses_reference(cfg, meta):
        return
    policy = model_fingerprint(model, cfg.pretrain_ckpt_dir, lora_dir, dtype_name(resolve_dtype(cfg.dtype, device)),
                               tokenizer, meta["template"], base_sha256, autocast_name(device, cfg.mixed_precision))
    differences = fingerprint_mismatches(meta["reference"], policy)
    if any(difference.startswith(("weights_sha256:", "lora_sha256:")) for difference in differences):
        recorded = meta["reference"]
        adapter = (f" with the adapter {recorded['lora']}: pass them as --pretrain-ckpt-dir and --init-lora-dir"
                   if recorded.get("lora") else " with no adapter: pass it as --pretrain-ckpt-dir")
        differences.append(f"(the dataset was built against {recorded.get('ckpt_dir')}{adapter}, or rebuild the "
                           "dataset against this policy)")
    if any(difference.startswith("quant:") for difference in differences):
        differences.append("(the builder's --quant-4bit stores every frozen linear layer 4-bit, as --quant-4bit true "
                           "--quant-lora-4bit true do here; with --lora it takes the adapter's own 4-bit settings)")
    if differences:
        refuse_or_warn(cfg, "the dataset's reference log-probs were not computed with this starting policy:\n  "
                       + "\n  ".join(differences))


def uses_reference(cfg: DPOLoRAConfig, meta: dict) -> bool:
    """Whether the loss reads the dataset's reference log-probs (simpo and orpo never do)."""
    return meta["reference"] is not None and cfg.loss_type not in REFERENCE_FREE_LOSS_TYPES


def measure_reference(cfg: DPOLoRAConfig, model, train_set, collate, device) -> None:
    """Step-0 check on the first micro-batch, under the training's autocast: policy log-probs = stored reference
    log-probs (pairs: DPO loss = ln 2)."""
    batch = to_device(collate(train_set[:cfg.micro_batch_size]), device)
    with autocast_context(device, cfg.mixed_precision):
        result = reference_check(model, batch, cfg)
    write_json(Path(cfg.log_dir) / cfg.run_name / "reference_check.json", result)
    units = f"{result['pairs']} pairs" if "pairs" in result else f"{result['examples']} examples"
    loss = f", DPO loss {result['sigmoid_loss']:.6f} (ln 2 = {result['ln2']:.6f})" if "pairs" in result else ""
    print(f"reference check on {units}: max |policy - reference| log-prob {result['max_abs_logp_diff']:.2e} "
          f"({result['max_abs_logp_diff_per_token']:.2e} per token){loss}, "
          f"mean |reward| {result['mean_abs_reward']:.2e}")
    tolerance = reference_tolerance(cfg, device)
    if result["max_abs_logp_diff_per_token"] > tolerance:
        refuse_or_warn(cfg, f"policy and reference log-probs differ by {result['max_abs_logp_diff_per_token']:.3g} "
                            f"per token (> --reference-check-tolerance {tolerance:g}) before training")


def reference_tolerance(cfg: DPOLoRAConfig, device) -> float:
    """``--reference-check-tolerance``, or by default 1e-3 per token for a policy computing in fp32 and 3e-2 in
    bf16 / fp16 (weights, 4-bit compute dtype or autocast), whose results depend slightly on the padded length."""
    if cfg.reference_check_tolerance is not None:
        return cfg.reference_check_tolerance
    four_bit_fp32 = not (cfg.quant_4bit or cfg.quant_lora_4bit) or cfg.quant_4bit_compute_dtype == "fp32"
    fp32 = (resolve_dtype(cfg.dtype, device) == torch.float32 and four_bit_fp32
            and autocast_name(device, cfg.mixed_precision) is None)
    return 1e-3 if fp32 else 3e-2


def run(cfg: DPOLoRAConfig):
    """Checks, trains, and returns the trainer's result."""
    device = resolve_device(cfg.device)
    check_run_directories(cfg)
    train_set, val_set, meta = read_dataset(cfg.train_data_dir)
    check_data(cfg, meta)
    tokenizer = check_data_fits_model(meta, train_set + val_set, example_length, cfg.pretrain_ckpt_dir,
                                      cfg.train_data_dir)
    lora_dir = find_adapter(cfg.init_lora_dir)[0] if cfg.init_lora_dir else None
    base_sha256 = checkpoint_fingerprint(cfg.pretrain_ckpt_dir)  # once: the adapter check, fingerprint and record
    model = load_policy(cfg, device, lora_dir, base_sha256)
    cfg = with_running_experts_backend(with_lora_settings(cfg, model.lora_config), model)
    verify_fingerprint(cfg, meta, model, tokenizer, lora_dir, device, base_sha256)
    prepare_step = None
    if cfg.loss_type == "kto":
        collate = partial(collate_unpaired, pad_id=tokenizer.pad_id, max_seq_len=meta["max_seq_len"])
        loss_fn, prepare_step = partial(kto_loss, cfg=cfg), add_step_kl_logps
    else:
        collate, loss_fn = partial(collate_pairs, pad_id=tokenizer.pad_id), partial(paired_loss, cfg=cfg)
    resuming = cfg.resume and latest_checkpoint(cfg.ckpt_dir) is not None
    if uses_reference(cfg, meta) and not resuming:
        measure_reference(cfg, model, train_set, collate, device)
    print(f"{cfg.loss_type} on {len(train_set)} examples ({len(val_set)} validation), {trainable_summary(model)}")
    save_trainable, load_trainable = adapter_callbacks(model, base_info(cfg.pretrain_ckpt_dir, base_sha256,
                                                                        train_data_dir=cfg.train_data_dir))
    return train(cfg, model, train_set, collate, loss_fn, num_units, save_trainable=save_trainable,
                 load_trainable=load_trainable, val_set=val_set or None, batch_tokens=batch_tokens,
                 example_length=example_length, prepare_step=prepare_step,
                 input_fingerprints=input_fingerprints(cfg, base_sha256, device), plots=PLOTS)


def main(argv=None) -> int:
    return run_main(DPOLoRAConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
