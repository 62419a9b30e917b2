"""4-bit frozen weights for QLoRA (Dettmers et al. 2023), hand-written over ``bitsandbytes.functional``.

Blockwise 4-bit quantization. The flattened weight is cut into blocks of ``blocksize`` values; block ``b``
keeps its absmax ``m_b = max_i |w_i|`` and every value as the 4-bit index of the nearest code-book entry:

    q_i = argmin_k |c_k - w_i / m_b|,        ŵ_i = c_{q_i} * m_b

* NF4 ("4-bit NormalFloat"): ``c`` holds 16 quantiles of N(0, 1) scaled to [-1, 1], the best code for
  normally distributed weights; FP4: a float with 1 sign, 2 exponent and 1 mantissa bit.
* Two indices are packed per byte: a ``[out, in]`` weight becomes ``out * in / 2`` uint8 values.
* Double quantization (``double_quant``) stores the absmax values themselves 8-bit (blocks of 256, after
  subtracting their mean): with blocksize 64 the statistics cost 8/64 + 32/(64*256) ≈ 0.127 instead of
  32/64 = 0.5 bits per parameter.

A 4-bit linear layer computes ``y = x Ŵᵀ + b`` in the compute dtype, with ``Ŵ`` dequantized on the fly
(``bitsandbytes.matmul_4bit``; its backward gives ``dL/dx = dL/dy Ŵ``; the 4-bit weight gets no gradient).
On CPU ``matmul_4bit`` is bitsandbytes' default kernel, i.e. dequantize + ``F.linear``: measured on a
2048x2048 weight and 512 tokens it gives identical outputs at the same speed as doing that by hand, so
one code path serves CPU and CUDA.

Quantization happens once, the moment a full-precision weight reaches a layer (``load_tensor`` while a
checkpoint streams in, or ``from_linear``), on the device the weight is on, so no GPU is ever required
and a checkpoint never has to be in memory in full precision. Moving a layer (``.to``, ``.cuda``,
``.cpu``) moves the packed bytes and their quantization state; casting it (``.half()``, ``.to(dtype)``)
leaves them alone; nothing is quantized twice.

Protocol shared with other 4-bit modules (e.g. stacked MoE experts) and with
``scripts/convert_lora_checkpoint.py``: a module that keeps some tensors 4-bit has an attribute
``quant`` (a :class:`Quant4bitConfig`, or None when it keeps everything in full precision) and an
attribute ``quantized_tensors`` naming those tensors; each is quantized whole with
``quantize_4bit(tensor, quant)``, except stacked 3-D tensors (MoE experts ``[E, out, in]``), whose every
expert slice is quantized on its own. See :func:`stored_4bit`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Quant4bitConfig:
    """How weights are stored in 4 bits.

    Attributes:
        quant_type: ``"nf4"`` (NormalFloat, QLoRA's choice) or ``"fp4"``.
        blocksize: Values sharing one absmax scale (bitsandbytes accepts 32 .. 4096, powers of two).
        double_quant: Also quantize the absmax scales to 8 bits (bitsandbytes' ``compress_statistics``).
        compute_dtype: Dtype of the dequantized weight and of the matmul; the result is cast back to the
            input's dtype.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.compute_dtype not in QUANTIZABLE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {QUANTIZABLE_DTYPES}, got {self.compute_dtype}")


class Packed4bit:
    """A 4-bit weight: packed uint8 data plus the bitsandbytes ``QuantState`` needed to dequantize it.

    Attributes:
        data: ``[numel / 2, 1]`` uint8, two 4-bit indices per byte.
        state: ``bitsandbytes.functional.QuantState`` (absmax scales, code book, original shape and dtype).
        compute_dtype: Dtype :meth:`dequantize` returns and matmuls run in.
    """

    def __init__(self, data: torch.Tensor, state: QuantState, compute_dtype: torch.dtype):
        self.data = data
        self.state = state
        self.compute_dtype = compute_dtype

    @property
    def shape(self) -> torch.Size:
        """Shape of the original weight."""
        return self.state.shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the original weight (the one it was quantized from)."""
        return self.state.dtype

    @property
    def device(self) -> torch.device:
        """Device of the packed data (and of the quantization state)."""
        return self.data.device

    def to(self, device: str | torch.device) -> "Packed4bit":
        """Moves the packed data and the quantization state to ``device`` (in place); returns self."""
        self.data = self.data.to(device)
        self.state.to(device)
        return self

    def compute_state(self) -> QuantState:
        """The quantization state with the compute dtype as its dtype: bitsandbytes dequantizes ``Ŵ`` straight into
        that dtype (for the product and for its backward alike), not through the original weight's dtype, which
        would round it there first (bf16 weights computed in fp32)."""
        state = copy.copy(self.state)
        state.dtype = self.compute_dtype
        return state

    def dequantize(self) -> torch.Tensor:
        """The weight ``Ŵ`` (original shape) in the compute dtype, as ``linear_4bit`` multiplies with it."""
        from bitsandbytes.functional import dequantize_4bit
        return dequantize_4bit(self.data, self.compute_state())

    def __repr__(self) -> str:
        return (f"Packed4bit(shape={tuple(self.shape)}, {self.state.quant_type}, blocksize={self.state.blocksize}, "
                f"double_quant={self.state.nested}, device={self.device})")


def quantize_4bit(weight: torch.Tensor, cfg: Quant4bitConfig) -> Packed4bit:
    """Quantizes a full-precision weight (on CPU or CUDA) into a :class:`Packed4bit`.

    Raises:
        ValueError: ``weight`` is not fp32/bf16/fp16 — in particular already-packed uint8 data, which is
            never quantized a second time — or lives on the meta device.
    """
    if weight.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"only fp32/bf16/fp16 weights can be quantized to 4 bits, got {weight.dtype} "
                         "(already-packed 4-bit data is never quantized again)")
    if weight.is_meta:
        raise ValueError("cannot quantize a weight on the meta device (it has no values yet)")
    from bitsandbytes.functional import quantize_4bit as bnb_quantize_4bit
    data, state = bnb_quantize_4bit(weight.detach().contiguous(), blocksize=cfg.blocksize,
                                               compress_statistics=cfg.double_quant, quant_type=cfg.quant_type)
    return Packed4bit(data, state, cfg.compute_dtype)


def linear_4bit(x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Ŵᵀ + b`` computed in ``packed.compute_dtype`` and returned in ``x``'s dtype."""
    compute = packed.compute_dtype
    bias = None if bias is None else bias.to(compute)
    from bitsandbytes import matmul_4bit
    return matmul_4bit(x.to(compute), packed.data.t(), packed.compute_state(), bias=bias).to(x.dtype)


def applied_device(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> torch.device:
    """The device ``nn.Module._apply``'s ``fn`` sends a uint8 tensor on ``device`` to (moves, never casts)."""
    return fn(torch.empty(0, dtype=torch.uint8, device=device)).device


def stored_4bit(module: nn.Module, name: str) -> Quant4bitConfig | None:
    """The 4-bit settings ``module`` stores its tensor ``name`` with, or None (kept full precision)."""
    quant = getattr(module, "quant", None)
    return quant if quant is not None and name in getattr(module, "quantized_tensors", ()) else None


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raises a ValueError naming ``name`` when ``tensor`` does not have the ``expected`` shape."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"shape mismatch for {name}: got {tuple(tensor.shape)}, expected {tuple(expected)}")


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight: ``y = x Ŵᵀ + b`` (see the module docstring).

    Before its weight arrives, ``weight`` is a placeholder Parameter (usually on the meta device, so
    ``load_model`` can report it missing); after, ``weight`` is None and ``packed`` holds the 4-bit data.
    The state dict therefore holds only the (full-precision) bias: save full models from their checkpoint,
    not from a 4-bit copy.
    """

    quantized_tensors = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: Quant4bitConfig,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant = cfg
        self.packed: Packed4bit | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        bias_param = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.bias = None if bias_param is None else nn.Parameter(bias_param, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: Quant4bitConfig) -> "Linear4bit":
        """A 4-bit copy of ``linear``; a weight still on the meta device is quantized when it is loaded."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg, device="meta",
                    dtype=weight.dtype)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if not weight.is_meta:
            layer.load_tensor("weight", weight.detach())
        return layer

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Receives a checkpoint tensor: ``weight`` is quantized on arrival, ``bias`` kept as is."""
        if name == "weight":
            check_shape("weight", tensor, (self.out_features, self.in_features))
            self.packed = quantize_4bit(tensor, self.quant)
            self.weight = None
        elif name == "bias" and self.bias is not None:
            check_shape("bias", tensor, (self.out_features,))
            self.bias = nn.Parameter(tensor, requires_grad=self.bias.requires_grad)
        else:
            raise ValueError(f"unexpected tensor {name!r} for Linear4bit")

    def _apply(self, fn, recurse=True):
        """``nn.Module.to`` / ``.cuda`` / ``.half``: moves the packed weight, never casts or re-quantizes it."""
        super()._apply(fn, recurse)
        if self.packed is not None:
            self.packed.to(applied_device(fn, self.packed.device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise RuntimeError("Linear4bit weight was never loaded")
        return linear_4bit(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant.quant_type}, blocksize={self.quant.blocksize}, double_quant={self.quant.double_quant}")


def replace_linears_4bit(model: nn.Module, cfg: Quant4bitConfig, keep: Callable[[str], bool]) -> list[str]:
    """Swaps every ``nn.Linear`` of ``model`` whose name ``keep(name)`` rejects for a :class:`Linear4bit`.

    Works on a meta-device model (the weights are quantized as they load) and on a loaded one.

    Returns:
        The names of the swapped modules.
    """
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and not keep(name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit.from_linear(getattr(parent, child), cfg))
    return names


def quantization_summary(model: nn.Module) -> dict | None:
    """Which tensors of ``model`` are stored 4-bit and how, or None when nothing is quantized.

    Two models with equal summaries quantize the same tensors with the same settings, so their frozen
    weights agree bit for bit (quantization is deterministic). Used to check that a DPO policy is quantized
    exactly as its precomputed reference was.
    """
    stored = sorted(f"{name}.{tensor}:{module.quant}" for name, module in model.named_modules()
                    if getattr(module, "quant", None) is not None for tensor in module.quantized_tensors)
    if not stored:
        return None
    configs = sorted({entry.rpartition(":")[2] for entry in stored})
    return {"configs": configs, "tensors": len(stored),
            "tensors_sha256": hashlib.sha256("\n".join(stored).encode()).hexdigest()}
