"""What the SFT and DPO run scripts share: loading the policy, checking the data, saving adapters."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dpo_llama.models.checkpoint import DTYPES, expected_shapes, load_model, read_params
from dpo_llama.models.lora import (LoRAConfig, apply_lora, as_lora_config, check_adapter_base, load_lora,
                                   read_lora_config, save_lora, widen_trained_norms)
from dpo_llama.models.tokenizer import Tokenizer, load_tokenizer
from dpo_llama.utils.cli import parse_config
from dpo_llama.utils.dataset_io import dataset_fingerprint
from dpo_llama.utils.trainer import NonFiniteLossError, TrainingInterrupted, set_seed


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA and fp32 on CPU (bf16 matmuls are slower than fp32 on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` (the names of ``DTYPES``)."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def check_data_fits_model(meta: dict, examples: Sequence[dict], example_length: Callable[[dict], int],
                          ckpt_dir: str, data_dir: str) -> Tokenizer:
    """Loads the checkpoint's tokenizer, refusing, before the model loads: a tokenizer with more ids than the
    model's embeddings, a dataset tokenized with another tokenizer, and a dataset holding a sequence longer than
    the model takes (its forward would stop at the first step that draws it, possibly hours in)."""
    params, tokenizer = read_params(ckpt_dir), load_tokenizer(ckpt_dir)  # params first: it says what ckpt_dir is
    if tokenizer.vocab_size > params.vocab_size:
        raise ValueError(f"the tokenizer in {ckpt_dir} has {tokenizer.vocab_size} ids but the model only "
                         f"{params.vocab_size} embeddings: the checkpoint pairs another model's tokenizer")
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the one in {ckpt_dir} "
                         "(tokenizer fingerprints differ): rebuild the dataset with this model's tokenizer")
    longest = max(map(example_length, examples), default=0)
    if longest > params.max_seq_len:
        raise ValueError(f"{data_dir} holds a sequence of {longest} tokens; the model in {ckpt_dir} takes at most "
                         f"{params.max_seq_len}: rebuild the dataset with --max-seq-len {params.max_seq_len} or less")
    return tokenizer


def load_policy(cfg, device: torch.device, lora_dir: str | Path | None = None,
                base_sha256: str | None = None) -> nn.Module:
    """The model to train: checkpoint + LoRA (+ 4-bit) per ``cfg``, optionally continuing a saved adapter.

    With ``lora_dir`` the adapter's own LoRA and 4-bit settings are used (its rank and targets must match its
    tensors, and its reference data were scored with its quantization); a note is printed, and a LoRA flag set to
    another value than both its default and the adapter's is refused rather than ignored. With
    ``experts_backend="cpu_kernel"`` a DeepSeek model's routed experts stay in CPU RAM (hybrid GPU + CPU when
    ``device`` is CUDA). Fresh
    LoRA A matrices are drawn after seeding with ``cfg.seed``, so a run's starting point depends on its
    flags only.
    """
    set_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    lora_cfg = as_lora_config(cfg)
    if lora_dir is not None:
        check_adapter_base(lora_dir, cfg.pretrain_ckpt_dir, base_sha256)
        lora_cfg, _ = read_lora_config(lora_dir)
        refuse_other_lora_flags(cfg, lora_cfg, lora_dir)
        print(f"continuing the adapter {lora_dir} with its own LoRA settings (rank {lora_cfg.lora_r})",
              file=sys.stderr)
    def prepare(m: nn.Module) -> None:
        refuse_aux_loss_weight_without_routers(cfg, m)
        prepare_model(m, cfg.experts_backend, lora_cfg, cfg.experts_transposed_copy)

    model = load_model(cfg.pretrain_ckpt_dir, device, dtype, prepare=prepare)
    widen_trained_norms(model)
    if lora_dir is not None:
        load_lora(model, lora_dir)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def refuse_other_lora_flags(cfg, adapter_cfg: LoRAConfig, lora_dir: str | Path) -> None:
    """Refuses LoRA / 4-bit flags that a continued adapter would silently override (see :func:`load_policy`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    given = [f.name for f in dataclasses.fields(LoRAConfig)
             if getattr(cfg, f.name) not in (defaults[f.name], getattr(adapter_cfg, f.name))]
    if given:
        raise ValueError(f"{lora_dir} is continued with its own LoRA and 4-bit settings, which these flags contradict: "
                         + ", ".join(f"{name}={getattr(cfg, name)!r} (adapter: {getattr(adapter_cfg, name)!r})"
                                     for name in given) + "; drop them")


def refuse_aux_loss_weight_without_routers(cfg, model: nn.Module) -> None:
    """Refuses an ``aux_loss_weight`` other than its default on a model without routers (LLaMA), as
    ``experts_backend`` is refused there, rather than ignoring it."""
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "aux_loss_weight")
    if cfg.aux_loss_weight != default and not hasattr(model, "aux_loss"):
        raise ValueError(f"aux_loss_weight={cfg.aux_loss_weight} weighs the router balancing loss of a MoE model; "
                         f"this is a {model.args.model_type}, which has none")


def with_lora_settings(cfg, lora_cfg: LoRAConfig):
    """``cfg`` with the LoRA and 4-bit settings the model actually has (a continued adapter's own): the run's
    config.json records them, the step-0 tolerance and a resume read them."""
    values = {f.name: getattr(lora_cfg, f.name) for f in dataclasses.fields(LoRAConfig)}
    return cfg if all(getattr(cfg, name) == value for name, value in values.items()) else dataclasses.replace(
        cfg, **values)


def prepare_model(model: nn.Module, experts_backend: str, lora_cfg: LoRAConfig | None = None,
                  transposed_copy: bool = False) -> None:
    """On the meta-device model, before weights stream in: LoRA / 4-bit layers, then the MoE experts backend
    (with ``"cpu_kernel"`` the frozen experts are packed into CPU RAM as they load, never reaching the GPU;
    ``transposed_copy`` packs transposed copies too, for a faster backward)."""
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
    if hasattr(model, "set_experts_backend"):
        model.set_experts_backend(experts_backend, transposed_copy)
    elif experts_backend != "torch":
        raise ValueError(f"experts_backend={experts_backend!r} needs a MoE model; this is a {model.args.model_type}")


def adapter_callbacks(model: nn.Module, base_info: dict) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    """``save_trainable`` / ``load_trainable`` for the trainer: the LoRA adapter (and trained norms)."""
    cfg = model.lora_config
    return (lambda out_dir: save_lora(model, out_dir, cfg, base_info)), (lambda ckpt: load_lora(model, ckpt))


def with_running_experts_backend(cfg, model: nn.Module):
    """``cfg`` with the MoE experts backend the model actually runs (the kernel backends fall back to ``"torch"``
    where the kernel cannot load): checkpoints record it, and a resume compares it."""
    running = getattr(model.args, "experts_backend", None)
    if running in (None, cfg.experts_backend):
        return cfg
    return dataclasses.replace(cfg, experts_backend=running,
                               experts_transposed_copy=cfg.experts_transposed_copy and running == "cpu_kernel")


def input_fingerprints(cfg, base_sha256: str, device: torch.device) -> dict[str, str]:
    """What a resume must find unchanged: the base weights and the dataset in the run's directories, and the
    dtype the weights load in (``--dtype auto`` is bf16 on CUDA and fp32 on the CPU)."""
    return {"base weights (pretrain_ckpt_dir)": base_sha256,
            "dataset (train_data_dir)": dataset_fingerprint(cfg.train_data_dir),
            "weights dtype (dtype)": dtype_name(resolve_dtype(cfg.dtype, device))}


def trainable_summary(model: nn.Module) -> str:
    """``"trainable 1,234 of 5,678 parameters (21.7%)"``: the total counts the checkpoint's weights by their shapes
    (4-bit and CPU-kernel experts are not ``parameters()``) plus the parameters added to it (the adapters)."""
    base = expected_shapes(model.args)
    added = sum(p.numel() for name, p in model.named_parameters() if name not in base)
    total = sum(shape.numel() for shape in base.values()) + added
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def run_main(config_cls: type, run: Callable, argv: list[str] | None, description: str) -> int:
    """Body of a run script's ``main``: parse flags into ``config_cls``, ``run(cfg)``, report; exit status 0/1.

    Expected failures (bad paths or data, a refused reference, a checkpoint folder in use, a NaN loss) print
    one ``error:`` line instead of a traceback; an interrupted run (saved after its last step if it was training)
    exits with 130.
    """
    cfg = parse_config(config_cls, argv, description=description)
    try:
        result = run(cfg)
    except (FileNotFoundError, FileExistsError, ValueError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupt:
        print(interrupt, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the trainer's own handler was installed (loading) or after it was removed
        print(f"interrupted; checkpoints saved so far, if any, are in {cfg.ckpt_dir}", file=sys.stderr)
        return 130
    print(f"done: {result.step} steps; adapter checkpoint {result.last_checkpoint}; "
          f"logs and plots in {cfg.log_dir}/{cfg.run_name}")
    return 0
