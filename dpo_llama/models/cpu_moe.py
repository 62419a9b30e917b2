"""CPU kernel for the routed experts of one Mixture-of-Experts layer (SwiGLU experts, top-k routing).

For tokens ``x[T, H]``, expert ids ``topk_ids[T, k]`` and routing weights ``topk_weights[T, k]``::

    y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = topk_ids[t, j]

with ``gate_proj, up_proj: [E, I, H]`` and ``down_proj: [E, H, I]`` (nn.Linear layout). The experts are
frozen: the backward returns gradients for ``x`` and for the routing weights,
``dL/dw[t, j] = <dy[t], expert_e(x[t])>``, never for the expert weights.

LoRA on routed experts: the packed base weights stay frozen, and PyTorch computes the adapters around the
kernel through two hooks of ``cpu_moe``. A pair's ``gate_up_delta = [Δg | Δu]`` (e.g. ``s B A x[t]`` of the
gate and up adapters of expert ``e``) enters before the SiLU, ``g = W_g x + Δg``, ``u = W_u x + Δu``,
``h = silu(g) * u``; ``return_hidden=True`` also returns every pair's ``h``, so that a down-projection
adapter adds ``sum_j w[t, j] * s B_e A_e h[t, j]`` to ``y``. In the backward, with ``v = W_d^T dy``, the
kernel takes ``dh = w v + grad_h`` (``grad_h`` = the gradient reaching ``h`` through the adapter) and returns
``dL/dΔg = dh * u * silu'(g)`` and ``dL/dΔu = dh * silu(g)``; its routing-weight gradient stays ``<v, h>``
(the adapter's share comes from autograd). The hook tensors hold one row per pair in the order of a stable
sort of the flat pairs (``t * k + j``) by expert id, the order in which the kernel and the adapters' per-expert
products group them, so no permutation is needed on either side. ``moe.py`` uses this for LoRA on the routed
experts.

The C++ kernel (``dpo_llama/csrc/moe_kernel.cpp``) sorts the (token, slot) pairs by expert, runs each
expert's rows as one block through a fused gate+up product (SiLU * up epilogue) and the down product,
and sums each token's slots in fp32 in a fixed order (bitwise deterministic). It is compiled on first
use with generic flags; the instruction set is picked at run time (``available_isas()``):

* ``amx``: Intel AMX tiles (bf16 TDPBF16PS, int8 TDPBUSD), checked by running a tile instruction in a
  forked child first;
* ``avx512``: two forward products for bf16 weights, fp32 FMA on weights widened on the fly (fp32
  activations) and ``vdpbf16ps`` (activations rounded to bf16 as on AMX; CPUs with AVX512_BF16). The
  first use times both on a small product (a few ms, once per process) and keeps the faster one
  (``avx512_bf16_kernel()``); ``DPO_LLAMA_MOE_AVX512_BF16=fma|dpbf16`` forces one. The backward
  follows: fp32 FMA on widened bf16 weights, or ``vdpbf16ps`` on bf16 operands (as on AMX) against
  32-column strips of the weights rewritten with their pairs along the other dimension; VNNI for the
  int8 forward, and for its backward the same as bf16 weights' on int8 weights widened to bf16;
* ``avx2``: intrinsics products with 256-bit vectors: fp32 FMA on weights widened on the fly, and for
  the int8 forward exact integer sums (``vpmaddubsw`` on signed activations, no VNNI needed); the rest
  is the plain C++ compiled for AVX2+FMA;
* ``portable``: the plain C++ compiled for the build's baseline.

``DPO_LLAMA_MOE_ISA=amx|avx512|avx2|portable`` forces one (an error if this CPU cannot run it).

Weights are packed once (``PackedExperts.from_weights``) in panels of 32 output channels, with bf16
pairs (or int8 quads) of the input dimension adjacent: one layout serves AMX tiles and 512-bit loads.
``int8`` stores per-output-channel scales and quantizes activations per token at run time.

Memory trade-off of the backward: the forward saves the gate and up outputs of every (token, slot)
pair, in bf16 on AMX (whose backward operands are bf16) and fp32 elsewhere (``4 * I`` or ``8 * I`` bytes
per pair, e.g. 33.8 or 67.6 KB per token for DeepSeek-V2-Lite, k = 6, I = 1408), instead of recomputing
them (which would cost two thirds of a forward). The expert output needed for
``dL/dw`` is not saved: ``<dy, W_down h> = <W_down^T dy, h>`` reuses the ``W_down^T dy`` product that
the input gradient needs anyway. The transposed products run on the same packed weights (AMX rewrites
them 32 columns at a time into a per-thread scratch buffer, int8 widened to bf16), so no
second copy of the weights is kept by default; ``from_weights(..., transposed_copy=True)`` (bf16 only)
packs ``W^T`` as well, and the backward then runs as fast as the forward products (for twice the weight
memory). Buffers of 2 MB or more (temporaries, saved gate/up outputs, y, grad_x, and through ``empty_cached``
the expert adapters' delta and dL/dh) come from a cache of huge-page blocks on the C++ side that reuses freed
blocks across calls, a block serving requests down to half its size, for the life of the process. Beyond twice the
most bytes alive at once (a few hundred MB at 2048 tokens for DeepSeek-V2-Lite shapes, plus every layer's saved
gate/up outputs awaiting their backward), a request that needs a new block first unmaps the free blocks too small
for it, so token counts that keep rising cannot pile them up. Fresh memory would cost a page fault per 4 KB.

Example::

    packed = PackedExperts.from_weights(gate_proj, up_proj, down_proj, weight_dtype="bf16")
    y = cpu_moe(x, topk_ids, topk_weights, packed)   # differentiable in x and topk_weights
    y, h = cpu_moe(x, topk_ids, topk_weights, packed, gate_up_delta=delta, return_hidden=True)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from dpo_llama.models.llama import refuse_second_derivative

__all__ = [
    "PackedExperts",
    "available_isas",
    "avx512_bf16_kernel",
    "cpu_moe",
    "kernel_available",
    "kernel_error",
    "load_extension",
    "selected_isa",
]

_CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
_ISA_ENV = "DPO_LLAMA_MOE_ISA"
_ISAS = ("amx", "avx512", "avx2", "portable")
_WEIGHT_DTYPES = ("bf16", "int8")
_PANEL = 32  # output channels per packed panel
_PAD = 64  # H and I are zero-padded to a multiple of this (AMX int8 tiles cover 64 inputs)
# Generic flags only: the AMX/AVX-512/AVX2 code carries per-function target attributes.
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
# torch takes its build lock (``<build dir>/lock``) on every JIT load, built or not; a process killed
# while holding it leaves it behind, and every later load waits for it forever. A build takes about
# 30 s, so a lock this old is left over.
_STALE_LOCK_S = 600


def load_extension(verbose: bool = True) -> ModuleType:
    """Import the C++ kernel: the ahead-of-time build if ``pip install`` made one, else build it now.

    ``DPO_LLAMA_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles it at install time (``setup.py``);
    otherwise it is compiled on first use and cached under ``TORCH_EXTENSIONS_DIR``. Both builds are named
    after a hash of the sources (``_extension_name``), so a build of other sources is never loaded.

    Args:
        verbose: Print a one-line notice when the kernel has to be compiled.

    Returns:
        The compiled extension module (the same object on every call).

    Raises:
        RuntimeError: No C++ compiler, or the build failed.
    """
    if verbose and _compile.cache_info().currsize == 0 and not _is_built():
        print("compiling the MoE CPU kernel (first use, ~30 s)...", flush=True)
    return _compile()


def _clear_stale_lock(lock: Path) -> None:
    """Remove torch's build lock if an interrupted load left it (older than ``_STALE_LOCK_S``); else say
    what the load is waiting for, since torch waits on the lock silently."""
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > _STALE_LOCK_S:
            lock.unlink()
            print(f"removed {lock}, left {age / 60:.0f} min ago by an interrupted build or load", file=sys.stderr)
        else:
            print(f"waiting for {lock} (another process building or loading the MoE kernel; if there is none,"
                  " delete it)", file=sys.stderr)


@functools.cache
def _extension_name() -> str:
    """``dpo_llama_moe_kernel_<hash>``, the hash over every source and header file and the flags.

    torch's build cache hashes only the ``.cpp`` sources, so an edited header would otherwise load a stale build.
    """
    digest = hashlib.sha256(repr((_CFLAGS, _LDFLAGS)).encode())
    for path in sorted(_CSRC_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return f"dpo_llama_moe_kernel_{digest.hexdigest()[:12]}"


def _prebuilt_module() -> str:
    """Where ``setup.py`` puts the ahead-of-time build: ``dpo_llama.<extension name>``."""
    return f"dpo_llama.{_extension_name()}"


def build_spec() -> dict:
    """What both builds compile: the extension name, sources, include directories and flags (``setup.py`` uses it)."""
    return {
        "name": _extension_name(),
        "sources": [str(_CSRC_DIR / "moe_kernel.cpp")],
        "include_dirs": [str(_CSRC_DIR)],
        "cflags": list(_CFLAGS),  # fresh lists: torch appends to them
        "ldflags": list(_LDFLAGS),
    }


def _is_built() -> bool:
    if importlib.util.find_spec(_prebuilt_module()) is not None:
        return True
    return any(Path(_build_directory()).glob("*.so"))


def _build_directory() -> str:
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(_extension_name(), verbose=False)


@functools.cache
def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    if importlib.util.find_spec(_prebuilt_module()) is not None:
        return importlib.import_module(_prebuilt_module())
    spec = build_spec()
    _clear_stale_lock(Path(_build_directory()) / "lock")
    try:
        return cpp_extension.load(
            name=spec["name"],
            sources=spec["sources"],
            extra_include_paths=spec["include_dirs"],
            extra_cflags=spec["cflags"],
            extra_ldflags=spec["ldflags"],
            verbose=False,
        )
    except (OSError, ImportError, RuntimeError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"could not build the MoE CPU kernel from {_CSRC_DIR}: {error}") from error


@functools.cache
def kernel_error() -> str | None:
    """Why the C++ kernel cannot be used on this machine (its build's error), or None when it builds and loads.
    Remembered: a failed build is not tried again in this process."""
    try:
        load_extension()
    except RuntimeError as error:
        return str(error)
    return None


def kernel_available() -> bool:
    """Whether the C++ kernel builds and loads on this machine."""
    return kernel_error() is None


@functools.cache
def available_isas() -> list[str]:
    """Instruction sets this CPU runs, best first (always ends with ``"portable"``)."""
    return list(load_extension().available_isas())


def selected_isa() -> str:
    """The instruction set ``cpu_moe`` uses now: ``$DPO_LLAMA_MOE_ISA`` if set, else the best available.

    Raises:
        ValueError: ``DPO_LLAMA_MOE_ISA`` names no known instruction set.
        RuntimeError: ``DPO_LLAMA_MOE_ISA`` names one this CPU cannot run.
    """
    forced = os.environ.get(_ISA_ENV, "").strip().lower()
    isas = available_isas()
    if not forced:
        return isas[0]
    if forced not in _ISAS:
        raise ValueError(f"{_ISA_ENV}={forced!r}: expected one of {', '.join(_ISAS)}")
    if forced not in isas:
        raise RuntimeError(f"{_ISA_ENV}={forced!r}, but this CPU only runs {', '.join(isas)}")
    return forced


def avx512_bf16_kernel() -> str:
    """The products the ``avx512`` path runs now: ``"fma"`` or ``"dpbf16"``.

    ``"dpbf16"`` runs ``vdpbf16ps`` in the bf16 weights' forward and in both weight types' backward (on bf16
    operands); ``"fma"`` runs fp32 FMA there.

    ``$DPO_LLAMA_MOE_AVX512_BF16`` if set (read at every call, here and at every ``cpu_moe`` forward, whose
    backward runs the same products), else the faster
    of the two on a micro-benchmark the C++ side runs once per process; ``"fma"`` where the CPU has no
    AVX512_BF16.

    Raises:
        ValueError: ``DPO_LLAMA_MOE_AVX512_BF16`` is neither ``fma`` nor ``dpbf16``.
        RuntimeError: ``DPO_LLAMA_MOE_AVX512_BF16=dpbf16`` on a CPU without AVX512_BF16.
    """
    return load_extension().avx512_bf16_kernel()


def empty_cached(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized CPU tensor from the kernel's cache of huge-page blocks (``torch.empty`` below 2 MB).

    The kernel takes its own per-call buffers from this cache (see the module docstring); the adapters around
    it (``moe.GroupedLoRA``) take theirs too: a fresh ``[pairs, 2 I]`` float32 tensor (138 MB at 2048 tokens
    of DeepSeek-V2-Lite) would cost a page fault per 4 KB at every step. The block returns to the cache when
    the tensor is freed.
    """
    return load_extension().empty_cached(list(shape), dtype)


# ----------------------------------------------------------------------------------- weight packing


def _pad_to(weights: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad ``[E, N, K]`` to ``[E, rows, cols]``."""
    return F.pad(weights, (0, cols - weights.shape[2], 0, rows - weights.shape[1]))


def _interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[E, I, H]`` twice -> ``[E, 2I, H]`` with 32-row panels alternating gate, up, gate, up, ..."""
    experts, inter, hidden = gate.shape
    panels = (gate.reshape(experts, inter // _PANEL, _PANEL, hidden),
              up.reshape(experts, inter // _PANEL, _PANEL, hidden))
    return torch.stack(panels, dim=2).reshape(experts, 2 * inter, hidden)


def _empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` whose memory is advised to transparent huge pages before its first write.

    Every kernel call streams all packed weights from DRAM, with prefetches that walk the page tables:
    2 MB pages instead of 4 KB ones made that stream about a tenth faster. A large fresh allocation is
    not touched yet, so its 2 MB-aligned interior gets huge pages as it is filled (no copy later). Where
    ``madvise`` is missing or refused (not Linux, huge pages disabled) the memory keeps small pages.
    """
    out = torch.empty(shape, dtype=dtype)
    huge, madv_hugepage = 1 << 21, 14  # MADV_HUGEPAGE in Linux's <sys/mman.h>
    begin = -(-out.data_ptr() // huge) * huge
    end = (out.data_ptr() + out.numel() * out.element_size()) // huge * huge
    if end > begin and sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), madv_hugepage)
    return out


def _to_panels(weights: torch.Tensor, group: int) -> torch.Tensor:
    """``[E, N, K]`` -> ``[E, N/32, K/group, 32, group]``: panels of 32 rows, ``group`` inputs adjacent."""
    experts, rows, cols = weights.shape
    blocked = weights.reshape(experts, rows // _PANEL, _PANEL, cols // group, group).permute(0, 1, 3, 2, 4)
    return _empty_on_huge_pages(tuple(blocked.shape), blocked.dtype).copy_(blocked)


def _quantize_int8(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``W[n, :] ~ scale[n] * q[n, :]``, ``q`` in [-127, 127].

    Returns:
        ``(q [E, N, K] int8, scale [E, N] float32, colsum [E, N] int32)`` where ``colsum[n] = sum_k q[n, k]``
        (the kernel feeds activations as ``u8 = q_x + 128`` and subtracts ``128 * colsum``).
    """
    q = torch.empty(weights.shape, dtype=torch.int8)
    scale = torch.empty(weights.shape[:2], dtype=torch.float32)
    for e in range(weights.shape[0]):  # one expert at a time bounds the fp32 temporaries
        w = weights[e].float()
        amax = w.abs().amax(dim=1)
        scale[e] = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[e] = torch.round(w / scale[e, :, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale, q.sum(dim=2, dtype=torch.int32)


def _pack(weights: torch.Tensor, weight_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack one projection ``[E, N, K]`` (already padded) into ``(panels, scale, colsum)``."""
    if weight_dtype == "bf16":
        empty = torch.empty(0)
        return _to_panels(weights.to(torch.bfloat16), group=2), empty, empty.int()
    q, scale, colsum = _quantize_int8(weights)
    return _to_panels(q, group=4), scale, colsum


@dataclass(frozen=True)
class PackedExperts:
    """The experts of one MoE layer, packed once for the kernel.

    Attributes:
        gate_up: gate and up projections, interleaved per 32-row panel, packed ``[E, 2I'/32, H'/g, 32, g]``
            (``I'``, ``H'`` padded to a multiple of 64; ``g = 2`` for bf16, 4 for int8).
        gate_up_scale: int8 per-channel scales ``[E, 2I']`` (empty for bf16).
        gate_up_colsum: int8 per-channel sums of the quantized weights ``[E, 2I']`` (empty for bf16).
        down: down projection packed ``[E, H'/32, I'/g, 32, g]``.
        down_scale: int8 scales ``[E, H']`` (empty for bf16).
        down_colsum: int8 sums ``[E, H']`` (empty for bf16).
        num_experts: E.
        hidden_size: H.
        intermediate_size: I.
        weight_dtype: ``"bf16"`` or ``"int8"``.
        gate_up_t: optional transposed copy of ``gate_up`` for the backward, ``[E, H'/32, 2I'/2, 32, 2]``
            (empty unless packed with ``transposed_copy=True``).
        down_t: optional transposed copy of ``down``, ``[E, I'/32, H'/2, 32, 2]`` (empty unless requested).
    """

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    gate_up_colsum: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor
    down_colsum: torch.Tensor
    num_experts: int
    hidden_size: int
    intermediate_size: int
    weight_dtype: str
    gate_up_t: torch.Tensor
    down_t: torch.Tensor

    @classmethod
    def from_weights(
        cls,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        weight_dtype: str = "bf16",
        transposed_copy: bool = False,
    ) -> PackedExperts:
        """Pack stacked expert weights (any float dtype, any device; copied to CPU).

        Args:
            gate_proj: ``[E, I, H]``.
            up_proj: ``[E, I, H]``.
            down_proj: ``[E, H, I]``.
            weight_dtype: ``"bf16"`` (weights rounded to bfloat16) or ``"int8"`` (per-channel symmetric).
            transposed_copy: Also pack ``W^T`` of every projection (bf16 only), so that the backward's
                products ``dy W_down`` and ``[dg | du] W_gate_up`` run as forward products instead of
                rewriting the packed weights on the fly: a faster backward for twice the weight memory
                (another 1.1 GB per DeepSeek-V2-Lite layer).

        Raises:
            ValueError: Unknown ``weight_dtype``, ``transposed_copy`` with int8, or inconsistent shapes.
        """
        if weight_dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype={weight_dtype!r}: expected one of {', '.join(_WEIGHT_DTYPES)}")
        if transposed_copy and weight_dtype != "bf16":
            raise ValueError(f"transposed_copy needs weight_dtype='bf16', got {weight_dtype!r}")
        if gate_proj.dim() != 3 or up_proj.shape != gate_proj.shape:
            raise ValueError(f"gate_proj/up_proj must both be [E, I, H], got {tuple(gate_proj.shape)}, "
                             f"{tuple(up_proj.shape)}")
        experts, inter, hidden = gate_proj.shape
        if tuple(down_proj.shape) != (experts, hidden, inter):
            raise ValueError(f"down_proj must be [E, H, I] = {(experts, hidden, inter)}, got {tuple(down_proj.shape)}")
        if not (gate_proj.is_floating_point() and up_proj.is_floating_point() and down_proj.is_floating_point()):
            raise ValueError("expert weights must be floating point")
        hidden_pad, inter_pad = -(-hidden // _PAD) * _PAD, -(-inter // _PAD) * _PAD
        empty = torch.empty(0, dtype=torch.bfloat16)
        with torch.no_grad():
            gate = _pad_to(gate_proj.detach().cpu(), inter_pad, hidden_pad)
            up = _pad_to(up_proj.detach().cpu(), inter_pad, hidden_pad)
            gate_up_rows = _interleave_gate_up(gate, up)
            del gate, up
            gate_up = _pack(gate_up_rows, weight_dtype)
            gate_up_t = _pack(gate_up_rows.transpose(1, 2), "bf16")[0] if transposed_copy else empty
            del gate_up_rows
            down_rows = _pad_to(down_proj.detach().cpu(), hidden_pad, inter_pad)
            down = _pack(down_rows, weight_dtype)
            down_t = _pack(down_rows.transpose(1, 2), "bf16")[0] if transposed_copy else empty
        return cls(*gate_up, *down, experts, hidden, inter, weight_dtype, gate_up_t, down_t)

    @property
    def padded_intermediate_size(self) -> int:
        """``I'``: the intermediate size ``I`` rounded up to a multiple of 64, as the kernel computes it."""
        return self.gate_up.shape[1] * _PANEL // 2

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """The six tensors in the order the C++ functions take them."""
        return (self.gate_up, self.gate_up_scale, self.gate_up_colsum, self.down, self.down_scale, self.down_colsum)

    def transposed_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The transposed copies ``(gate_up_t, down_t)`` for the C++ backward (empty tensors if not packed)."""
        return (self.gate_up_t, self.down_t)


# ----------------------------------------------------------------------------------- autograd


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CUDA tensors -> CPU through pinned buffers (async copies, one stream sync); CPU ones unchanged."""
    on_cuda = [t for t in tensors if t.is_cuda]
    if not on_cuda:
        return tensors
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) if t.is_cuda else t
            for t in tensors]
    torch.cuda.current_stream(on_cuda[0].device).synchronize()
    return host


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU result -> ``device`` (through pinned memory and an async copy for CUDA)."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _kernel_rows(rows: torch.Tensor) -> torch.Tensor:
    """``x`` or ``grad_y`` as the kernel takes it: contiguous float32 or bfloat16 (bf16 rows are not widened)."""
    return rows.contiguous() if rows.dtype == torch.bfloat16 else rows.float().contiguous()


def _padded_pairs(rows: torch.Tensor, blocks: int, inter_pad: int) -> torch.Tensor:
    """Per-pair rows ``[P, blocks * I]`` as the kernel takes them: contiguous float32 ``[P, blocks * I']``.

    Each block of ``I`` columns (gate and up of a delta, or the one block of ``grad_h``) is zero-padded to ``I'``.
    Contiguous float32 rows with ``I = I'`` are passed on as they are (a copy of a large fresh tensor would cost
    about as much as the kernel's work on it).
    """
    split = rows.reshape(rows.shape[0], blocks, rows.shape[1] // blocks).float()
    if split.shape[2] < inter_pad:
        split = F.pad(split, (0, inter_pad - split.shape[2]))
    return split.reshape(rows.shape[0], blocks * inter_pad).contiguous()


def _unpadded_pairs(rows: torch.Tensor, blocks: int, inter: int) -> torch.Tensor:
    """The inverse of ``_padded_pairs``: kernel rows ``[P, blocks * I']`` -> ``[P, blocks * I]`` (a view of
    ``rows`` where the narrowing allows it)."""
    split = rows.view(rows.shape[0], blocks, rows.shape[1] // blocks)[:, :, :inter]
    return split.reshape(rows.shape[0], blocks * inter)


class _CpuMoeFunction(torch.autograd.Function):
    """Autograd wrapper: forward/backward run in C++ on CPU.

    Gradients for x, topk_weights and the optional gate/up delta; the optional output h is differentiable
    (its gradient is added to dL/dh inside the kernel's backward). The backward is not differentiable: with
    ``create_graph=True`` it raises instead of returning gradients that silently lack a second derivative.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up_delta: torch.Tensor | None,
        packed: PackedExperts,
        isa: str,
        return_hidden: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ext = load_extension()
        delta_given = gate_up_delta is not None
        x_host, ids_host, weights_host, *delta_host = _to_host(
            [x, topk_ids, topk_weights, *([gate_up_delta] if delta_given else [])])
        ids = ids_host.long().contiguous()
        weights32 = weights_host.float().contiguous()
        inter_pad = packed.padded_intermediate_size
        delta = _padded_pairs(delta_host[0], 2, inter_pad) if delta_given else torch.empty(0)
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        y, gate_up_out, h = ext.moe_forward(_kernel_rows(x_host), ids, weights32, *packed.kernel_args(), isa, save,
                                            delta, return_hidden)
        if save:
            ctx.save_for_backward(ids, weights32, gate_up_out)
        ctx.packed, ctx.isa = packed, isa
        ctx.x_dtype, ctx.weights_dtype, ctx.device = x.dtype, topk_weights.dtype, x.device
        ctx.weights_device = topk_weights.device
        if delta_given:
            ctx.delta_dtype, ctx.delta_device = gate_up_delta.dtype, gate_up_delta.device
        y = _to_device(y.to(x.dtype), x.device)
        if not return_hidden:
            return y
        return y, _to_device(_unpadded_pairs(h, 1, packed.intermediate_size), x.device)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor | None, grad_h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        refuse_second_derivative("cpu_moe")  # create_graph=True: the C++ backward returns gradients without a graph
        ids, weights32, gate_up_out = ctx.saved_tensors
        packed = ctx.packed
        if grad_y is None:  # only h reached the loss
            grad_y = torch.zeros(ids.shape[0], packed.hidden_size)
        grad_host, *grad_h_host = _to_host([grad_y, *([] if grad_h is None else [grad_h])])
        inter_pad = packed.padded_intermediate_size
        grad_h_rows = _padded_pairs(grad_h_host[0], 1, inter_pad) if grad_h_host else torch.empty(0)
        grad_x, grad_w, grad_delta = load_extension().moe_backward(
            _kernel_rows(grad_host),
            ids,
            weights32,
            gate_up_out,
            *packed.kernel_args(),
            *packed.transposed_args(),
            ctx.isa,
            grad_h_rows,
            ctx.needs_input_grad[3],
        )
        grad_x = _to_device(grad_x.to(ctx.x_dtype), ctx.device) if ctx.needs_input_grad[0] else None
        grad_w = _to_device(grad_w.to(ctx.weights_dtype), ctx.weights_device) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[3]:
            grad_delta = _unpadded_pairs(grad_delta, 2, packed.intermediate_size)
            grad_delta = _to_device(grad_delta.to(ctx.delta_dtype), ctx.delta_device)
        return grad_x, None, grad_w, grad_delta, None, None, None


def _check_inputs(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    packed: PackedExperts,
    gate_up_delta: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or x.shape[1] != packed.hidden_size:
        raise ValueError(f"x must be [T, {packed.hidden_size}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.is_floating_point():
        raise ValueError(f"topk_ids must be an integer [T, k] tensor with T = {x.shape[0]}, "
                         f"got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= packed.num_experts):
        raise ValueError(f"topk_ids must lie in [0, {packed.num_experts})")
    if gate_up_delta is None:
        return
    expected = (topk_ids.numel(), 2 * packed.intermediate_size)
    if tuple(gate_up_delta.shape) != expected or not gate_up_delta.is_floating_point():
        raise ValueError(f"gate_up_delta must be a float [T k, 2I] = {expected} tensor (gate columns, then up), "
                         f"got {tuple(gate_up_delta.shape)} {gate_up_delta.dtype}")
    if gate_up_delta.device != x.device:
        raise ValueError(f"gate_up_delta must be on x's device {x.device}, got {gate_up_delta.device}")


def cpu_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    packed: PackedExperts,
    gate_up_delta: torch.Tensor | None = None,
    return_hidden: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed-expert output ``y[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])``.

    With ``e = topk_ids[t, j]`` each expert computes ``g = W_g,e x[t] + dg``, ``u = W_u,e x[t] + du``,
    ``h = silu(g) * u`` and ``expert_e(x[t]) = W_d,e h``, where ``[dg | du]`` is the pair's row of
    ``gate_up_delta`` (zero if not given). Differentiable in ``x``, ``topk_weights``, ``gate_up_delta`` and the
    returned ``h`` (experts are frozen). CUDA inputs are copied to the CPU through pinned buffers and the results
    are copied back to their devices, in the backward too.

    Args:
        x: ``[T, H]`` float tensor (bfloat16 reaches the kernel as it is, other dtypes as float32).
        topk_ids: ``[T, k]`` integer expert ids in ``[0, E)``.
        topk_weights: ``[T, k]`` routing weights (any float dtype).
        packed: The layer's experts from ``PackedExperts.from_weights``.
        gate_up_delta: Optional ``[T k, 2I]`` float tensor on ``x.device``: ``[dg | du]`` of every (token, slot)
            pair (gate columns first), rows in the order of ``topk_ids.flatten().argsort(stable=True)`` (the
            pairs grouped by expert); added to the gate and up outputs before the SiLU. Its gradient is
            ``[dL/dg | dL/du]`` in its dtype.
        return_hidden: Also return ``h``, e.g. for a LoRA on the down projection.

    Returns:
        ``y`` ``[T, H]`` with ``x.dtype`` on ``x.device``; with ``return_hidden``, ``(y, h)`` where ``h`` is
        ``[T k, I]`` float32 on ``x.device``, rows in the order of ``gate_up_delta``.

    Raises:
        ValueError: Shapes, dtypes, devices or expert ids do not fit ``packed``.
    """
    _check_inputs(x, topk_ids, topk_weights, packed, gate_up_delta)
    return _CpuMoeFunction.apply(x, topk_ids, topk_weights, gate_up_delta, packed, _kernel_name(), return_hidden)


def _kernel_name() -> str:
    """The kernels a call runs: :func:`selected_isa`, for ``avx512`` with its products (``"avx512:dpbf16"``), named
    once at the forward so that the backward runs the products the forward saved its operands for."""
    isa = selected_isa()
    return f"{isa}:{avx512_bf16_kernel()}" if isa == "avx512" else isa
