"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), optionally on 4-bit bases
(QLoRA, Dettmers et al. 2023; see ``quant.py``).

A targeted linear layer ``y = x Wᵀ + b`` becomes

    y = x Wᵀ + b + s · B A dropout(x),        A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zeros)

with ``W`` frozen and only ``A``, ``B`` trained. ``B = 0`` at init, so training starts from the base model
exactly. The scaling is ``s = lora_alpha / r`` when ``lora_alpha`` is set (Hu et al.), else the explicit
``lora_scaling`` (1.0 by default, as DPO-LLaMA). Adapters are kept in float32 whatever the base dtype.

Which layers get an adapter (one switch each; ``layers.N.`` prefixes omitted):

==========================  =====================================================================
switch                      LLaMA / DeepSeek (MLA) module
==========================  =====================================================================
lora_attn_query             ``self_attn.q_proj``; MLA: ``q_proj``, or ``q_a_proj`` + ``q_b_proj``
lora_attn_key               ``self_attn.k_proj``; MLA: ``kv_a_proj_with_mqa`` (compressed kv latent
                            + the shared rotary key)
lora_attn_value             ``self_attn.v_proj``; MLA: ``kv_b_proj`` (up-projects k_nope and v)
lora_attn_proj              ``self_attn.o_proj``
lora_mlp_gate / _up / _down dense MLP ``mlp.gate_proj`` / ``mlp.up_proj`` / ``mlp.down_proj`` only
lora_moe_shared_experts     ``mlp.shared_experts.{gate,up,down}_proj``
lora_moe_routed_experts     ``mlp.experts``: per expert, adapters on its gate, up and down projections,
                            stacked ``mlp.experts.lora.{gate,up,down}_proj.lora_A [E, r, in]`` /
                            ``lora_B [E, out, r]`` (``moe.ExpertAdapters``; both experts backends)
lora_head                   ``lm_head`` (absent with tied embeddings, so no effect there)
==========================  =====================================================================

The MoE router ``mlp.gate`` is never adapted nor quantized. The routed experts (most of a MoE model's weights)
are stored 4-bit by ``quant_4bit``, with or without adapters (``quant_lora_4bit`` alone also stores adapted
experts 4-bit), as the reference builder's ``--quant-4bit`` stores them, so that policy and reference match.

4-bit: ``quant_4bit`` turns every other frozen ``nn.Linear`` into a :class:`~dpo_llama.models.quant.Linear4bit`
and ``quant_lora_4bit`` stores the frozen base inside LoRA layers 4-bit. ``lm_head`` (its logits decide
every loss) and the embeddings always stay in full precision.

Checkpoint keys: a LoRA layer at ``<path>`` keeps its frozen base at ``<path>.weight`` (so base checkpoints
load unchanged, 4-bit layers quantizing on arrival) and adds ``<path>.lora_A`` / ``<path>.lora_B``.
``save_lora`` writes ``adapter.safetensors`` (adapters + trained norms) and ``lora_config.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dpo_llama.models.checkpoint import (DTYPES, LORA_CONFIG_FILE, checkpoint_fingerprint, load_model,
                                        open_safetensors, read_json, weight_files, write_atomically)
from dpo_llama.models.llama import refuse_second_derivative
from dpo_llama.models.quant import (Packed4bit, Quant4bitConfig, applied_device, check_shape, linear_4bit,
                                    quantization_summary, quantize_4bit, replace_linears_4bit)

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_DTYPE = torch.float32
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "lora_attn_query": ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj"),
    "lora_attn_key": ("self_attn.k_proj", "self_attn.kv_a_proj_with_mqa"),
    "lora_attn_value": ("self_attn.v_proj", "self_attn.kv_b_proj"),
    "lora_attn_proj": ("self_attn.o_proj",),
    "lora_mlp_gate": ("mlp.gate_proj",),
    "lora_mlp_up": ("mlp.up_proj",),
    "lora_mlp_down": ("mlp.down_proj",),
    "lora_moe_shared_experts": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                "mlp.shared_experts.down_proj"),
    "lora_head": ("lm_head",),
}
FULL_PRECISION = ("lm_head", "mlp.gate")


@dataclass
class LoRAConfig:
    """LoRA and 4-bit settings (every field is a command-line flag of the training scripts)."""

    lora_r: int = field(default=64, metadata={"help": "LoRA rank r of the adapters A [r, in] and B [out, r]."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "When set, scaling = lora_alpha / lora_r (Hu et al.); none: lora_scaling."})
    lora_scaling: float = field(
        default=1.0, metadata={"help": "Explicit scaling s of the update s * B A x, used when lora_alpha is none."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input (training only)."})
    lora_attn_query: bool = field(
        default=True, metadata={"help": "LoRA on the query projection (MLA: q_proj or q_a_proj + q_b_proj)."})
    lora_attn_key: bool = field(
        default=False, metadata={"help": "LoRA on the key projection (MLA: kv_a_proj_with_mqa)."})
    lora_attn_value: bool = field(
        default=True, metadata={"help": "LoRA on the value projection (MLA: kv_b_proj)."})
    lora_attn_proj: bool = field(default=False, metadata={"help": "LoRA on the attention output o_proj."})
    lora_mlp_gate: bool = field(default=False, metadata={"help": "LoRA on the dense MLP gate_proj."})
    lora_mlp_up: bool = field(default=False, metadata={"help": "LoRA on the dense MLP up_proj."})
    lora_mlp_down: bool = field(default=False, metadata={"help": "LoRA on the dense MLP down_proj."})
    lora_moe_shared_experts: bool = field(
        default=False, metadata={"help": "LoRA on the MoE shared experts' gate/up/down projections."})
    lora_moe_routed_experts: bool = field(
        default=False, metadata={"help": "LoRA on every routed MoE expert's gate/up/down projections, one adapter per "
                                         "expert: E times the parameters of a dense MLP's adapters per layer (DeepSeek-"
                                         "V2-Lite, r=8: 5.3M per layer), so consider a small lora_r."})
    lora_head: bool = field(default=False, metadata={"help": "LoRA on the output head lm_head (not when tied)."})
    train_norms: bool = field(default=False, metadata={"help": "Also train (and save) every RMSNorm weight."})
    quant_4bit: bool = field(
        default=False, metadata={"help": "Store the frozen non-LoRA linears and all routed MoE experts 4-bit "
                                          "(lm_head, embeddings stay full)."})
    quant_lora_4bit: bool = field(
        default=False, metadata={"help": "Store the frozen base weight inside LoRA layers 4-bit (QLoRA)."})
    quant_4bit_double: bool = field(
        default=True, metadata={"help": "Double quantization: also store the 4-bit absmax scales 8-bit."})
    quant_4bit_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    quant_4bit_blocksize: int = field(default=64, metadata={"help": "Values per 4-bit absmax block."})
    quant_4bit_compute_dtype: Literal["bf16", "fp32", "fp16"] = field(
        default="bf16", metadata={"help": "Dtype 4-bit weights are dequantized to for the matmul."})

    def __post_init__(self) -> None:
        """Rejects values LoRA cannot use, naming the field."""
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0 (or none), got {self.lora_alpha}")
        if self.lora_scaling <= 0:
            raise ValueError(f"lora_scaling must be > 0, got {self.lora_scaling}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.quant_4bit_compute_dtype not in DTYPES:
            raise ValueError(f"quant_4bit_compute_dtype must be one of {list(DTYPES)}, "
                             f"got {self.quant_4bit_compute_dtype!r}")
        self.quant_config()  # raises on a bad quant_4bit_type or quant_4bit_blocksize

    @property
    def scaling(self) -> float:
        """``s = lora_alpha / lora_r`` when ``lora_alpha`` is set, else ``lora_scaling``."""
        return self.lora_alpha / self.lora_r if self.lora_alpha is not None else self.lora_scaling

    def quant_config(self) -> Quant4bitConfig:
        """The 4-bit settings these fields describe."""
        return Quant4bitConfig(quant_type=self.quant_4bit_type, blocksize=self.quant_4bit_blocksize,
                               double_quant=self.quant_4bit_double,
                               compute_dtype=DTYPES[self.quant_4bit_compute_dtype])

    def to_dict(self) -> dict[str, Any]:
        """The LoRA fields only (also of a subclass that adds training fields), JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(LoRAConfig)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoRAConfig":
        """Builds a config from ``to_dict()`` output, refusing unknown keys. ``train_bias``, which adapters saved by
        earlier versions carry, is dropped: no supported model has biases, so it never trained anything."""
        values = {key: value for key, value in values.items() if key != "train_bias"}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LoRA config keys: {unknown}")
        return cls(**values)


def as_lora_config(cfg: Any) -> LoRAConfig:
    """A plain :class:`LoRAConfig` from the LoRA fields of ``cfg`` (any object having them, e.g. a script config)."""
    return LoRAConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoRAConfig)})


class LoRAUpdate(torch.autograd.Function):
    """The adapter's update ``y = s · B A x`` in the adapters' dtype, keeping ``x`` in its own dtype for the backward.

    With ``x`` widened to the adapters' dtype for the products, ``t = x Aᵀ`` and ``g = s · dL/dy``::

        y = s · t Bᵀ,   dL/dB = gᵀ t,   dL/dt = g B,   dL/dA = (dL/dt)ᵀ x,   dL/dx = (dL/dt) A

    The same products as autograd on ``s * F.linear(F.linear(x.float(), A), B)``, which would keep the float32
    copy of ``x`` for ``dL/dA``: twice the bytes of a bfloat16 ``x``, and one copy per adapter where several read
    the same ``x`` (the query and value projections). Here ``x`` is widened again in the backward.

    Under CUDA autocast (the trainer's mixed precision) the backward runs in the forward's autocast state, so its
    products are cast as autograd's would be (``custom_fwd`` / ``custom_bwd``).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        t = F.linear(x.to(lora_a.dtype), lora_a)
        ctx.scaling = scaling
        ctx.save_for_backward(x, t, lora_a, lora_b)
        return scaling * F.linear(t, lora_b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y: torch.Tensor):
        refuse_second_derivative("LoRA")
        x, t, lora_a, lora_b = ctx.saved_tensors
        g = (grad_y * ctx.scaling).reshape(-1, grad_y.shape[-1])
        t = t.reshape(-1, t.shape[-1])
        grad_t = g @ lora_b
        grad_a = grad_t.t() @ x.reshape(-1, x.shape[-1]).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.t() @ t if ctx.needs_input_grad[2] else None
        grad_x = (grad_t @ lora_a).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None


class LoRALinear(nn.Module):
    """``y = x Wᵀ + b + s · B A dropout(x)`` with a frozen (optionally 4-bit) ``W`` and trainable ``A``, ``B``.

    Attributes:
        weight: Frozen base weight ``[out, in]``; None when it is stored 4-bit in ``packed``.
        packed: The 4-bit base (``quant`` set), else None.
        lora_A: ``[r, in]`` float32, Kaiming-uniform (``a = √5``, as ``nn.Linear``).
        lora_B: ``[out, r]`` float32, zeros.
        merged: ``W`` currently holds ``W + s·B A`` (see :meth:`merge`).
        adapter_enabled: When False the layer computes the base ``x Wᵀ + b`` (see :func:`disable_adapters`).

    Built on the meta device (inside ``load_model``'s ``prepare``), the adapters are created on the device
    of the base weight when it arrives through :meth:`load_tensor`.
    """

    quantized_tensors = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int, scaling: float,
                 dropout: float = 0.0, quant: Quant4bitConfig | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.r, self.scaling = in_features, out_features, r, scaling
        self.quant = quant
        self.packed: Packed4bit | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        bias_param = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.bias = None if bias_param is None else nn.Parameter(bias_param, requires_grad=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.adapter_enabled = True
        self.init_adapters(self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, scaling: float, dropout: float = 0.0,
                    quant: Quant4bitConfig | None = None) -> "LoRALinear":
        """Wraps ``linear``'s weight and bias (a meta-device weight is filled in by :meth:`load_tensor`)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, r, scaling, dropout, quant,
                    device="meta", dtype=linear.weight.dtype)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if not linear.weight.is_meta:
            layer.load_tensor("weight", linear.weight.detach())
        return layer

    def init_adapters(self, device: torch.device) -> None:
        """Fresh adapters on ``device``: ``A`` Kaiming-uniform (``a = √5``), ``B = 0``."""
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=ADAPTER_DTYPE))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=ADAPTER_DTYPE))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Receives a base checkpoint tensor; ``weight`` is quantized on arrival when ``quant`` is set."""
        if name == "weight":
            check_shape("weight", tensor, (self.out_features, self.in_features))
            if self.quant is not None:
                self.packed, self.weight = quantize_4bit(tensor, self.quant), None
            else:
                self.weight = nn.Parameter(tensor, requires_grad=False)
            if self.lora_A.is_meta:
                self.init_adapters(tensor.device)
        elif name == "bias" and self.bias is not None:
            check_shape("bias", tensor, (self.out_features,))
            self.bias = nn.Parameter(tensor, requires_grad=self.bias.requires_grad)
        else:
            raise ValueError(f"unexpected tensor {name!r} for LoRALinear (adapters load with load_lora)")

    def _apply(self, fn, recurse=True):
        """``nn.Module.to`` / ``.cuda``: also moves a 4-bit base (never casting or re-quantizing it)."""
        super()._apply(fn, recurse)
        if self.packed is not None:
            self.packed.to(applied_device(fn, self.packed.device))
        return self

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` (``W`` dequantized on the fly when 4-bit)."""
        if self.packed is not None:
            return linear_4bit(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B A x`` in the adapters' dtype (:class:`LoRAUpdate`)."""
        return LoRAUpdate.apply(x, self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merged and disabled: ``x (W + sBA)ᵀ - s B A x`` (equal to the base up to rounding)."""
        y = self.base_forward(x)
        if self.adapter_enabled and not self.merged:
            return y + self.adapter_forward(self.lora_dropout(x)).to(y.dtype)
        if self.merged and not self.adapter_enabled:
            return y - self.adapter_forward(x).to(y.dtype)
        return y

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in float32, shape ``[out, in]``."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self) -> None:
        """``W <- W + s·B A`` (sum in float32, cast back to W's dtype); for fast inference, not training.

        Raises:
            ValueError: the base is 4-bit (merge with ``scripts/convert_lora_checkpoint.py`` instead).
        """
        if self.merged:
            return
        self._add_to_weight(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W - s·B A`` (undoes :meth:`merge` up to W's rounding)."""
        if not self.merged:
            return
        self._add_to_weight(-1.0)
        self.merged = False

    def _add_to_weight(self, sign: float) -> None:
        if self.weight is None:
            raise ValueError("cannot merge LoRA into a 4-bit base weight in place; "
                             "use scripts/convert_lora_checkpoint.py to write a merged checkpoint")
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + sign * self.delta_weight()).to(self.weight.dtype))

    def extra_repr(self) -> str:
        base = "4-bit " + self.quant.quant_type if self.quant is not None else "full precision"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, base={base}, merged={self.merged}")


def matches(name: str, suffix: str) -> bool:
    """``name`` is the module path ``suffix`` or ends with ``.suffix``."""
    return name == suffix or name.endswith("." + suffix)


def lora_switch(name: str) -> str | None:
    """The config switch that targets the linear module ``name``, or None."""
    for switch, suffixes in LORA_TARGETS.items():
        if any(matches(name, suffix) for suffix in suffixes):
            return switch
    return None


def keeps_full_precision(name: str) -> bool:
    """``lm_head`` and the MoE router are never quantized."""
    return any(matches(name, suffix) for suffix in FULL_PRECISION)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every LoRA layer."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def adapted_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with adapters: the LoRA layers and the routed experts given adapters (``add_lora``).
    Each has ``merge()``, ``unmerge()`` and ``adapter_enabled``."""
    return [m for m in model.modules() if isinstance(m, LoRALinear) or getattr(m, "lora", None) is not None]


def routed_experts(model: nn.Module) -> list[nn.Module]:
    """The routed-experts modules of a MoE model (those that can take adapters through ``add_lora``)."""
    return [m for m in model.modules() if hasattr(m, "add_lora")]


def lora_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules the config's switches select."""
    names = []
    for name, module in model.named_modules():
        switch = lora_switch(name)
        if type(module) is nn.Linear and switch is not None and getattr(cfg, switch):
            names.append(name)
    return names


def quantize_frozen_layers(model: nn.Module, quant: Quant4bitConfig) -> None:
    """Stores every frozen ``nn.Linear`` (except ``lm_head`` and the MoE router) and the routed experts of
    MoE layers (modules with a ``quantize_4bit`` method) in 4 bits."""
    replace_linears_4bit(model, quant, keep=keeps_full_precision)
    for module in model.modules():
        if hasattr(module, "quantize_4bit"):
            module.quantize_4bit(quant)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Adds LoRA (and 4-bit storage) to ``model`` in place as ``cfg`` says, then freezes all but the adapters.

    Works on a meta-device model (as ``load_model``'s ``prepare``: base weights are quantized and adapters
    created as the checkpoint streams in) and on a loaded one. Stores ``cfg`` as ``model.lora_config``.

    Returns:
        ``model``.

    Raises:
        ValueError: the model already has LoRA layers, no layer matches the enabled switches, or
            ``lora_moe_routed_experts`` is set on a model without routed experts. (``lora_moe_shared_experts`` on
            a model without shared experts only warns: adapters saved by earlier versions may have it set.)
    """
    if adapted_modules(model):
        raise ValueError("the model already has LoRA layers")
    cfg = as_lora_config(cfg)
    targets = lora_targets(model, cfg)
    experts = routed_experts(model) if cfg.lora_moe_routed_experts else []
    if cfg.lora_moe_routed_experts and not experts:
        raise ValueError(f"lora_moe_routed_experts: this {type(model).__name__} has no routed MoE experts")
    if cfg.lora_head and "lora_head" not in map(lora_switch, targets):
        print(f"warning: lora_head: this {type(model).__name__} ties lm_head to the embeddings (no separate head), "
              "the switch adapts nothing", file=sys.stderr)
    if cfg.lora_moe_shared_experts and "lora_moe_shared_experts" not in map(lora_switch, targets):
        print(f"warning: lora_moe_shared_experts: this {type(model).__name__} has no shared MoE experts, the switch "
              "adapts nothing", file=sys.stderr)
    if not targets and not experts:
        switches = ", ".join(LORA_TARGETS)
        raise ValueError(f"no layer of this {type(model).__name__} matches the enabled LoRA switches ({switches})")
    quant = cfg.quant_config()
    for name in targets:
        lora_quant = quant if cfg.quant_lora_4bit and not keeps_full_precision(name) else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.from_linear(getattr(parent, child), cfg.lora_r, cfg.scaling, cfg.lora_dropout, lora_quant)
        setattr(parent, child, layer)
    for module in experts:
        module.add_lora(cfg.lora_r, cfg.scaling, cfg.lora_dropout)
        if cfg.quant_lora_4bit:
            module.quantize_4bit(quant)
    if cfg.quant_4bit:
        quantize_frozen_layers(model, quant)
        if quantization_summary(model) is None:
            print("warning: quant_4bit: every frozen linear layer is adapted (lm_head and the router stay in full "
                  "precision), so nothing is stored 4-bit; quant_lora_4bit stores the adapted layers' base weights "
                  "4-bit (QLoRA)", file=sys.stderr)
    model.lora_config = cfg
    mark_only_lora_trainable(model, cfg)
    widen_trained_norms(model)
    return model


def is_norm(name: str) -> bool:
    """A parameter of a norm module (its module name ends with ``norm``: ``input_layernorm``, ``norm``, ...)."""
    return name.rpartition(".")[0].endswith("norm")


def is_trainable(name: str, cfg: LoRAConfig) -> bool:
    """Adapters always; norm weights with ``train_norms``."""
    return name.rpartition(".")[2] in ("lora_A", "lora_B") or (cfg.train_norms and is_norm(name))


def mark_only_lora_trainable(model: nn.Module, cfg: LoRAConfig) -> None:
    """Sets ``requires_grad`` on the parameters :func:`is_trainable` selects, clears it everywhere else."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, cfg))


def widen_trained_norms(model: nn.Module) -> None:
    """Norm weights trained with ``train_norms`` become float32, like the adapters: an AdamW step of about the
    learning rate (1e-4) is below half a bf16 ulp of a weight near 1 (2^-7 / 2), so a bf16 norm weight would
    never change. RMSNorm multiplies with the weight in the activations' dtype, so the outputs are unchanged.
    Call once the base weights are loaded (a checkpoint streaming into a meta-device model brings its dtype)."""
    for name, param in model.named_parameters():
        if param.requires_grad and is_norm(name) and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def model_lora_config(model: nn.Module) -> LoRAConfig:
    """The config :func:`apply_lora` stored on ``model``."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA layers: call apply_lora first")
    return cfg


def adapter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Key -> shape of every tensor :func:`lora_state_dict` saves (works on a meta-device model)."""
    cfg = model_lora_config(model)
    return {name: param.shape for name, param in model.named_parameters() if is_trainable(name, cfg)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters plus the norms the model's LoRA config trains, detached on the CPU."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().contiguous() for name in adapter_shapes(model)}


def base_weight_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the frozen base weights in LoRA layers (4-bit ones were quantized from it); with adapters on the
    routed experts only, that of the token embeddings (loaded like every base weight, never quantized)."""
    model_lora_config(model)
    layer = next((layer for _, layer in lora_layers(model)), None)
    if layer is None:
        return model.embed_tokens.weight.dtype
    return layer.packed.dtype if layer.packed is not None else layer.weight.dtype


def save_lora(model: nn.Module, out_dir: str | os.PathLike, cfg: LoRAConfig, base_info: dict[str, Any]) -> None:
    """Writes ``adapter.safetensors`` and ``lora_config.json`` into ``out_dir`` (each file atomically).

    ``lora_config.json`` holds ``{"lora": <LoRA fields>, "base": {"model_type", "params", "weight_dtype",
    "info": base_info}}``; ``weight_dtype`` is the dtype the base weights had in the trained model, so a
    merge can re-quantize them exactly as training did. ``base_info`` is free-form (e.g. the base
    checkpoint path and fingerprint).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    write_atomically(out_dir / ADAPTER_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    base = {"model_type": model.args.model_type, "params": model.args.to_dict(),
            "weight_dtype": str(base_weight_dtype(model)).removeprefix("torch."), "info": base_info}
    content = json.dumps({"lora": as_lora_config(cfg).to_dict(), "base": base}, indent=2)
    write_atomically(out_dir / LORA_CONFIG_FILE, lambda p: p.write_text(content, encoding="utf-8"))


def read_lora_config_file(lora_dir: str | os.PathLike) -> dict[str, Any]:
    """``lora_config.json`` as saved: a dict with the ``lora`` and ``base`` sections."""
    path = Path(lora_dir) / LORA_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {lora_dir} a LoRA adapter directory?")
    content = read_json(path)
    if not isinstance(content, dict) or "lora" not in content or "base" not in content:
        raise ValueError(f"{path} lacks the 'lora' or 'base' section")
    return content


def read_lora_config(lora_dir: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any]]:
    """Reads ``lora_config.json``: returns the LoRA config and the ``base`` dict (model_type, params, ...)."""
    content = read_lora_config_file(lora_dir)
    return LoRAConfig.from_dict(content["lora"]), content["base"]


def find_adapter(path: str | Path) -> tuple[Path, str]:
    """Resolves ``--lora`` to an adapter directory; returns it and a note saying how it was chosen."""
    path = Path(path)
    if (path / LORA_CONFIG_FILE).is_file():
        return path, "adapter directory"
    steps = [p for p in path.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / LORA_CONFIG_FILE).is_file()]
    if not steps:
        raise FileNotFoundError(f"no adapter found in {path}: neither {LORA_CONFIG_FILE} nor step-*/{LORA_CONFIG_FILE}")
    latest = max(steps, key=lambda p: int(p.name.removeprefix("step-")))
    return latest, f"highest of {len(steps)} step checkpoint(s) in {path}"


def adapter_fingerprint(lora_dir: str | os.PathLike) -> str:
    """SHA-256 of an adapter's tensors and LoRA settings as saved (not of free-form base info such as paths), so
    that it does not change when a later version reads the settings differently."""
    content = read_lora_config_file(lora_dir)
    LoRAConfig.from_dict(content["lora"])  # a malformed config is refused as when loading
    digest = hashlib.sha256(json.dumps({"lora": content["lora"], "model_type": content["base"].get("model_type")},
                                       sort_keys=True).encode())
    digest.update((Path(lora_dir) / ADAPTER_FILE).read_bytes())
    return digest.hexdigest()


def read_adapter(lora_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``lora_dir``'s ``adapter.safetensors``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not a readable safetensors file (e.g. truncated).
    """
    path = Path(lora_dir) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def check_adapter(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Refuses missing keys, unexpected keys and wrong shapes, naming ``source``."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors the model expects, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{source} has {len(unexpected)} tensors the model lacks, e.g. {unexpected[:3]}")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise ValueError(f"shape mismatch for {key} in {source}: adapter {tuple(tensors[key].shape)}, "
                             f"model {tuple(shape)}")


def load_lora(model: nn.Module, lora_dir: str | os.PathLike) -> nn.Module:
    """Copies a saved adapter into ``model`` (LoRA already applied, base weights loaded), in place.

    Raises:
        ValueError: the adapter was trained on another model_type or with another scaling, or its keys /
            shapes do not match the model's LoRA layers.
    """
    saved, base = read_lora_config(lora_dir)
    source = Path(lora_dir) / LORA_CONFIG_FILE
    if base.get("model_type") != model.args.model_type:
        raise ValueError(f"{source}: adapter is for model_type {base.get('model_type')!r}, "
                         f"the model is {model.args.model_type!r}")
    if saved.scaling != model_lora_config(model).scaling:
        raise ValueError(f"{source}: adapter was trained with scaling {saved.scaling:g}, "
                         f"the model's LoRA layers use {model_lora_config(model).scaling:g}")
    tensors = read_adapter(lora_dir)
    check_adapter(tensors, adapter_shapes(model), str(Path(lora_dir) / ADAPTER_FILE))
    params = dict(model.named_parameters())
    if any(params[key].is_meta for key in tensors):
        raise ValueError("the model's weights are not loaded yet (meta device): load the base checkpoint first")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
    return model


def merge_lora(model: nn.Module) -> None:
    """Merges every LoRA layer (:meth:`LoRALinear.merge`) and the routed experts' adapters."""
    for module in adapted_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undoes :func:`merge_lora`."""
    for module in adapted_modules(model):
        module.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer computes its base output, so the model is its own reference model.

    Works while merged too: a merged layer then subtracts ``s·B A x`` (equal to the base up to rounding).
    Only the adapters are switched off: norms trained with ``train_norms`` keep
    their trained values, so with those options the block is not the original base model.
    """
    layers = adapted_modules(model)
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapter_enabled = enabled


def base_info(ckpt_dir: str | os.PathLike, weights_sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    """What ``save_lora`` records of the base an adapter trains on: its path and the SHA-256 of its weights
    (``checkpoint_fingerprint``, unless the caller already has it), which :func:`check_adapter_base` compares
    wherever the adapter is loaded."""
    return {"ckpt_dir": str(ckpt_dir), "weights_sha256": weights_sha256 or checkpoint_fingerprint(ckpt_dir),
            **extra}


def check_adapter_base(lora_dir: str | os.PathLike, ckpt_dir: str | os.PathLike,
                       weights_sha256: str | None = None) -> None:
    """Refuses to put an adapter on other base weights than it was trained on: a DPO adapter merged into the
    pretrained base instead of the SFT model it continued, or an SFT adapter loaded onto its own merge, load
    without any shape error. Adapters saved without ``weights_sha256`` are not checked. ``weights_sha256`` is
    ``ckpt_dir``'s fingerprint if the caller already has it (hashing a large base takes seconds per GB).

    Raises:
        ValueError: the recorded base weights differ from ``ckpt_dir``'s, or (said first, as the likelier cause)
            a weight file of ``ckpt_dir`` is not readable safetensors, such as a truncated download.
    """
    info = read_lora_config(lora_dir)[1].get("info") or {}
    recorded = info.get("weights_sha256")
    if recorded and recorded != (weights_sha256 or checkpoint_fingerprint(ckpt_dir)):
        for path in weight_files(ckpt_dir):
            open_safetensors(path)
        raise ValueError(f"the adapter {lora_dir} was trained on other base weights than {ckpt_dir} (its base: "
                         f"{info.get('ckpt_dir')}): load it onto that base")


def load_model_with_lora(ckpt_dir: str | os.PathLike, cfg: LoRAConfig | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         lora_dir: str | os.PathLike | None = None) -> nn.Module:
    """``load_model`` with :func:`apply_lora` as ``prepare`` (4-bit layers quantize as tensors stream in),
    then the adapter of ``lora_dir`` if given.

    Args:
        ckpt_dir: Base checkpoint directory.
        cfg: LoRA settings; None means those saved in ``lora_dir``.
        device, dtype: As for ``load_model``.
        lora_dir: Directory written by :func:`save_lora` (or a run's ``ckpt_dir``: its latest step, as
            :func:`find_adapter` resolves it), or None for fresh adapters.
    """
    if lora_dir is not None:
        lora_dir = find_adapter(lora_dir)[0]
    if cfg is None:
        if lora_dir is None:
            raise ValueError("give a LoRA config, or a lora_dir to read it from")
        cfg, _ = read_lora_config(lora_dir)
    if lora_dir is not None:
        check_adapter_base(lora_dir, ckpt_dir)
    model = load_model(ckpt_dir, device, dtype, prepare=lambda m: apply_lora(m, cfg))
    widen_trained_norms(model)
    if lora_dir is not None:
        load_lora(model, lora_dir)
    return model
