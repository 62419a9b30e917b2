"""Tests of the CPU MoE expert kernel against a float64 PyTorch reference, on every ISA this CPU runs.

The reference is the definition itself, evaluated in float64 with autograd:

    y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]
    dL/dx and dL/dw for L = <y, dy>  (dL/dw[t, j] = <dy[t], expert_e(x[t])>)

Tolerances, as max|got - ref| <= tol * max|ref| per tensor:
* bf16 weights on the fp32 paths (avx512, avx2, portable): the reference uses the same bf16-rounded
  weights, so only fp32 rounding remains: 1e-5.
* bf16 weights on AMX: activations (x, h, dy, dh) and the gate/up outputs saved for the backward
  are rounded to bf16 (relative 2^-9 each): 2e-2.
* bf16 weights on avx512 with its dpbf16 kernel: the same roundings as on AMX: 2e-2.
* int8 weights: the reference uses the dequantized weights scale[n] * q[n, :]; the kernel also
  quantizes activations per token to int8 (relative error up to 1/254 per element): 3e-2.
* bf16 inputs x: output and gradients are bf16 (relative 2^-9) on top of the above: 3e-2.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dpo_llama.models import cpu_moe as moe
from dpo_llama.models.moe import load_cpu_kernel

ISAS = ["amx", "avx512", "avx2", "portable"]
AVX512_BF16_ENV = "DPO_LLAMA_MOE_AVX512_BF16"
AVX512_BF16_KERNELS = ["fma", "dpbf16"]
NO_TENSOR = torch.empty(0)  # an absent optional tensor of the C++ functions
# (experts, hidden, intermediate, tokens, top_k): one token; sizes that are not multiples of the
# 32/64 blocks; top-6; an expert with more rows than two AMX row tiles.
SHAPES = {
    "one_token_top1": (4, 64, 64, 1, 1),
    "odd_sizes_top2": (5, 100, 70, 37, 2),
    "top6": (8, 96, 160, 24, 6),
    "busy_expert_top3": (6, 130, 90, 70, 3),
}


@pytest.fixture(scope="session")
def extension():
    """The compiled kernel, built once per session; skips every test if it cannot be built."""
    try:
        return moe.load_extension(verbose=False)
    except RuntimeError as error:
        pytest.skip(f"MoE CPU kernel unavailable (no compiler or build failed): {error}")


@pytest.fixture
def force_isa(extension, monkeypatch):
    """Force one ISA through DPO_LLAMA_MOE_ISA; skip (with the reason) if this CPU cannot run it."""

    def force(isa: str) -> None:
        if isa not in moe.available_isas():
            pytest.skip(
                f"{isa} path compiled but not runnable here (CPUID / OS tile permission / tile probe); "
                f"available: {moe.available_isas()}"
            )
        monkeypatch.setenv("DPO_LLAMA_MOE_ISA", isa)

    return force


def cpu_has_avx512_bf16() -> bool:
    """Whether Linux lists the avx512_bf16 flag (vdpbf16ps), independently of the kernel's own CPUID check."""
    with contextlib.suppress(OSError):
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    return False


@pytest.fixture
def force_avx512_bf16(force_isa, monkeypatch):
    """Force the avx512 ISA and one of its bf16 forward kernels; skip dpbf16 without AVX512_BF16."""

    def force(kernel: str) -> None:
        force_isa("avx512")
        if kernel == "dpbf16" and not cpu_has_avx512_bf16():
            pytest.skip("dpbf16 kernel compiled but not runnable here: this CPU has no AVX512_BF16 (vdpbf16ps)")
        monkeypatch.setenv(AVX512_BF16_ENV, kernel)

    return force


def make_case(experts: int, hidden: int, inter: int, tokens: int, top_k: int, seed: int = 0):
    """Weights rounded to bf16, tokens, routing with expert 0 in every token and the last expert unused."""
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(experts, inter, hidden, generator=gen) / hidden**0.5).bfloat16().float()
    up = (torch.randn(experts, inter, hidden, generator=gen) / hidden**0.5).bfloat16().float()
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).bfloat16().float()
    x = torch.randn(tokens, hidden, generator=gen)
    others = torch.stack([torch.randperm(experts - 2, generator=gen)[: top_k - 1] + 1 for _ in range(tokens)])
    ids = torch.cat([torch.zeros(tokens, 1, dtype=torch.long), others], dim=1)
    weights = torch.rand(tokens, top_k, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen)
    return (gate, up, down), x, ids, weights, grad


def dequantize_int8(w: torch.Tensor) -> torch.Tensor:
    """The weights int8 packing represents: per output channel scale = max|w| / 127, q = round(w / scale)."""
    scale = w.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-127, 127) * scale


def same(rows: torch.Tensor) -> torch.Tensor:
    return rows


def reference_with_hidden(x, ids, weights, gate, up, down, delta=None, x_operand=same, h_operand=same):
    """Float64 MoE forward with an optional gate/up delta [T, k, 2I] = [dg | du] per pair:
    g = gate x + dg, u = up x + du, h = silu(g) u, y = sum_j w (down h). Returns (y [T, H], h [T, k, I]),
    differentiable in x, weights and delta. ``x_operand`` and ``h_operand`` map x [T, H] and h [T k, I] to
    the values the products read (see ``test_int8_equals_its_quantization``)."""
    x, weights = x.double(), weights.double()
    pair_expert = ids.flatten()
    xs = x_operand(x).repeat_interleave(ids.shape[1], dim=0)
    g = torch.einsum("pih,ph->pi", gate.double()[pair_expert], xs)
    u = torch.einsum("pih,ph->pi", up.double()[pair_expert], xs)
    if delta is not None:
        dg, du = delta.double().flatten(0, 1).chunk(2, dim=1)
        g, u = g + dg, u + du
    h = torch.nn.functional.silu(g) * u
    o = torch.einsum("phi,pi->ph", down.double()[pair_expert], h_operand(h))
    return (o.view(*ids.shape, -1) * weights[..., None]).sum(dim=1), h.view(*ids.shape, -1)


def quantized_like_the_kernel(rows: torch.Tensor) -> torch.Tensor:
    """float32 rows -> the int8 path's operand, dequantized to float64: per row inv = 127 / max|a| and
    q = trunc(a inv +- 0.5) (halves away from zero), in float32 arithmetic as the kernel computes them,
    times the row scale max|a| / 127."""
    amax = rows.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, float32_divide(127, amax), torch.zeros_like(amax))
    scaled = rows * inv
    quantized = torch.trunc(scaled + torch.where(scaled >= 0, 0.5, -0.5))
    return quantized.double() * float32_divide(amax, 127).double()


def float32_divide(a, b) -> torch.Tensor:
    """a / b rounded once to float32, as C++ divides floats (torch divides by a scalar as a product with its
    rounded reciprocal, which differs in the last bit, enough to move a value across a rounding boundary);
    the float64 quotient of two float32 values rounds to the correctly rounded float32 quotient."""
    a, b = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return (a.clone() / b.clone()).float()


def straight_through(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, the identity in the backward: how the kernel differentiates its
    quantization (dL/dx through the dequantized weights at the quantized x; dL/dw = <dy, o>, o from the
    quantized h)."""
    return rows + (value - rows).detach()


def reference(x, ids, weights, gate, up, down):
    """Float64 MoE forward (differentiable in x and weights)."""
    return reference_with_hidden(x, ids, weights, gate, up, down)[0]


def reference_grads(x, ids, weights, grad, experts):
    xr = x.double().requires_grad_()
    wr = weights.double().requires_grad_()
    y = reference(xr, ids, wr, *experts)
    y.backward(grad.double())
    return y.detach(), xr.grad, wr.grad


def run_kernel(x, ids, weights, grad, packed):
    xk = x.clone().requires_grad_()
    wk = weights.clone().requires_grad_()
    y = moe.cpu_moe(xk, ids, wk, packed)
    y.backward(grad.to(y.dtype))
    return y.detach(), xk.grad, wk.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    error = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} * max|ref| {scale:.3g}"


def bf16_operands(isa: str) -> bool:
    """Whether the kernel that runs now rounds its operands to bf16: AMX, and avx512 with its dpbf16 kernel."""
    return isa == "amx" or (isa == "avx512" and moe.avx512_bf16_kernel() == "dpbf16")


def tolerance(isa: str, weight_dtype: str) -> float:
    """The tolerance of the module docstring for the kernel that runs now (avx512: its current bf16 kernel)."""
    if weight_dtype == "int8":
        return 3e-2
    return 2e-2 if bf16_operands(isa) else 1e-5


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64_reference(force_isa, isa, weight_dtype, shape):
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES[shape])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    if weight_dtype == "int8":
        experts = tuple(dequantize_int8(w) for w in experts)
    want = reference_grads(x, ids, weights, grad, experts)
    got = run_kernel(x, ids, weights, grad, packed)
    tol = tolerance(isa, weight_dtype)
    for name, g, w in zip(("y", "grad_x", "grad_weights"), got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, tol, f"{isa}/{weight_dtype}/{shape} {name}")


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("isa", ISAS)
def test_int8_equals_its_quantization(force_isa, isa, shape):
    """int8 weights against a float64 emulation of what the int8 path computes: the dequantized weights,
    x and h quantized per row as the kernel does it (``quantized_like_the_kernel``; h is the kernel's
    own, returned by return_hidden: its float32 SiLU differs from float64's in the last bits, which would
    move a few values across a rounding boundary), straight-through in the backward. Only fp32 rounding
    remains, 1e-5; on AMX (and avx512 with its dpbf16 kernel) the backward's operands and the saved
    gate/up outputs are bf16 (and h is rebuilt from the latter for dL/dw): 2e-2 for the gradients. The float reference test allows 3e-2
    for the quantization itself; this one also pins the integer arithmetic (the +128 offset and the
    column sums, the scales) and dL/dw being the derivative of the quantized forward (it was computed
    from the unquantized h: 1 to 3 % off)."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES[shape])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype="int8")
    got = run_kernel_hooks(x, ids, weights, None, grad, None, packed)
    kernel_h = got[1].flatten(0, 1)
    xr, wr = x.double().requires_grad_(), weights.double().requires_grad_()
    y, _ = reference_with_hidden(
        xr, ids, wr, *(dequantize_int8(w) for w in experts),
        x_operand=lambda rows: straight_through(rows, quantized_like_the_kernel(x)),
        h_operand=lambda rows: straight_through(rows, quantized_like_the_kernel(kernel_h)))
    y.backward(grad.double())
    tol_grads = 2e-2 if bf16_operands(isa) else 1e-5
    want = (y.detach(), xr.grad, wr.grad)
    tols = (1e-5, tol_grads, tol_grads)
    for name, g, w, tol in zip(("y", "grad_x", "grad_weights"), (got[0], got[2], got[3]), want, tols):
        assert_close(g, w, tol, f"{isa}/int8/{shape} {name}")


@pytest.mark.parametrize("isa", ISAS)
def test_int8_sums_at_the_extremes(force_isa, isa):
    """int8 operands at their extremes, where a 16-bit intermediate sum would saturate: x[t] = s and every
    gate/up row = s for a +-1 sign pattern s, so x and the weights quantize to +-127 with equal signs
    (every product 127 * 127, u8 activations 1 and 255); every down row = 1 and h is constant per row, so h
    quantizes to 127 (u8 255). The avx2 forward adds products in pairs in 16 bits (vpmaddubsw), at most
    2 * 127 * 127 = 32258 with signed activations but 2 * 255 * 127 with u8 ones, past 32767. All values are
    exact, so the forward equals the float64 reference up to fp32 rounding: g = u = H, h = silu(H) H,
    y[t] = sum_j w[t, j] I h: 1e-5."""
    force_isa(isa)
    experts, hidden, inter, tokens = 3, 256, 96, 19
    sign = torch.where(torch.arange(hidden) % 3 == 0, -1.0, 1.0)
    gate = sign.expand(experts, inter, hidden).clone()
    down = torch.ones(experts, hidden, inter)
    x = sign.expand(tokens, hidden).clone()
    ids = torch.tensor([[0, 1]] * tokens)
    weights = torch.rand(tokens, 2, generator=torch.Generator().manual_seed(0))
    packed = moe.PackedExperts.from_weights(gate, gate, down, weight_dtype="int8")
    with torch.no_grad():
        got = moe.cpu_moe(x, ids, weights, packed)
    h = torch.nn.functional.silu(torch.tensor(float(hidden), dtype=torch.float64)) * hidden
    want = (weights.double().sum(dim=1) * inter * h)[:, None].expand(tokens, hidden)
    assert_close(got, want, 1e-5, f"{isa}/int8 extremes y")


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_a_nan_or_inf_input_gives_a_nan_output_row(force_isa, isa, weight_dtype):
    """A token holding a NaN or an inf gets a non-finite output, as in float arithmetic (int8 activations used to
    quantize a NaN to 0 and a row with an inf to all zeros: a finite output); the other tokens are unchanged."""
    force_isa(isa)
    experts, x, ids, weights, _ = make_case(8, 64, 48, 5, 2)
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    with torch.no_grad():
        clean = moe.cpu_moe(x, ids, weights, packed)
        for bad in (float("nan"), float("inf")):
            poisoned = x.clone()
            poisoned[1, 3] = bad
            got = moe.cpu_moe(poisoned, ids, weights, packed)
            assert not got[1].isfinite().all(), f"{isa}/{weight_dtype}: {bad} in the input gave a finite output"
            assert torch.equal(got[[0, 2, 3, 4]], clean[[0, 2, 3, 4]])


@pytest.mark.parametrize("shape", ["odd_sizes_top2", "busy_expert_top3"])
@pytest.mark.parametrize("isa", ISAS)
def test_transposed_copy_matches_float64_reference(force_isa, isa, shape):
    """The backward on transposed weight copies (forward products on W^T) computes the same gradients."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES[shape])
    packed = moe.PackedExperts.from_weights(*experts, transposed_copy=True)
    want = reference_grads(x, ids, weights, grad, experts)
    got = run_kernel(x, ids, weights, grad, packed)
    for name, g, w in zip(("y", "grad_x", "grad_weights"), got, want):
        assert_close(g, w, tolerance(isa, "bf16"), f"{isa}/transposed copy/{shape} {name}")


@pytest.mark.parametrize("weights_as", ["bf16", "bf16_transposed_copy", "int8"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("kernel", AVX512_BF16_KERNELS)
def test_avx512_bf16_kernels_match_float64_reference(force_avx512_bf16, kernel, shape, weights_as):
    """Both avx512 kernel choices: fp32 FMA throughout, or vdpbf16ps in the bf16 forward and in both weight
    types' backward (on rewritten strips for experts with 12 rows or more: expert 0 has every token, so both
    branches run), on packed weights or on transposed copies."""
    force_avx512_bf16(kernel)
    assert moe.avx512_bf16_kernel() == kernel
    experts, x, ids, weights, grad = make_case(*SHAPES[shape])
    weight_dtype = weights_as.split("_")[0]
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype,
                                            transposed_copy=weights_as.endswith("copy"))
    if weight_dtype == "int8":
        experts = tuple(dequantize_int8(w) for w in experts)
    want = reference_grads(x, ids, weights, grad, experts)
    got = run_kernel(x, ids, weights, grad, packed)
    for name, g, w in zip(("y", "grad_x", "grad_weights"), got, want):
        assert_close(g, w, tolerance("avx512", weight_dtype), f"avx512-{kernel}/{shape}/{weights_as} {name}")


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
def test_the_backward_runs_the_forwards_avx512_products(force_avx512_bf16, monkeypatch, weight_dtype):
    """The avx512 products are named at the forward: a backward after $DPO_LLAMA_MOE_AVX512_BF16 changed runs the
    forward's (the saved gate/up outputs are in their operand dtype), with the gradients of that forward."""
    force_avx512_bf16("dpbf16")
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    for forward, backward in (("dpbf16", "fma"), ("fma", "dpbf16")):
        monkeypatch.setenv(AVX512_BF16_ENV, forward)
        want = run_kernel(x, ids, weights, grad, packed)
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = moe.cpu_moe(xg, ids, wg, packed)
        monkeypatch.setenv(AVX512_BF16_ENV, backward)
        y.backward(grad)
        for got, expected in zip((y.detach(), xg.grad, wg.grad), want):
            assert torch.equal(got, expected)


def test_an_isa_name_with_products_is_checked(extension):
    experts, x, ids, weights, _ = make_case(*SHAPES["one_token_top1"])
    args = (x, ids.long(), weights.float(), *moe.PackedExperts.from_weights(*experts).kernel_args())
    with pytest.raises(ValueError, match="only avx512 names its products"):
        extension.moe_forward(*args, "avx2:fma", False, NO_TENSOR, False)
    if "avx512" in moe.available_isas():
        with pytest.raises(ValueError, match="expected fma or dpbf16"):
            extension.moe_forward(*args, "avx512:vnni", False, NO_TENSOR, False)


def test_avx512_bf16_automatic_choice(extension, force_isa, monkeypatch):
    """Unforced, the faster kernel of the once-per-process micro-benchmark (fma where dpbf16 cannot run)."""
    force_isa("avx512")
    monkeypatch.delenv(AVX512_BF16_ENV, raising=False)
    timings = extension.avx512_bf16_timings()
    assert set(timings) == ({"fma", "dpbf16"} if cpu_has_avx512_bf16() else {"fma"})
    assert all(0 < seconds < float("inf") for seconds in timings.values())
    chosen = moe.avx512_bf16_kernel()
    assert chosen in AVX512_BF16_KERNELS
    assert chosen == min(timings, key=timings.get)
    assert extension.avx512_bf16_timings() == timings  # measured once per process


def test_peak_probes(extension):
    """The benchmark's instruction-loop peaks: positive where the CPU runs the instruction, an error elsewhere."""
    probes = {"fma": "avx512" in moe.available_isas(), "dpbf16": cpu_has_avx512_bf16()}
    for instruction, runs in probes.items():
        if runs:
            assert 0 < extension.peak_gflops(instruction, 1000) < float("inf")
        else:
            with pytest.raises(RuntimeError, match="peak probe needs"):
                extension.peak_gflops(instruction, 1000)
    with pytest.raises(ValueError, match="unknown instruction 'vnni'"):
        extension.peak_gflops("vnni", 1000)


def test_avx512_bf16_forced_value_validation(force_isa, monkeypatch):
    force_isa("avx512")
    experts, x, ids, weights, _ = make_case(*SHAPES["one_token_top1"])
    packed = moe.PackedExperts.from_weights(*experts)
    monkeypatch.setenv(AVX512_BF16_ENV, "vnni")
    with pytest.raises(ValueError, match=f"{AVX512_BF16_ENV}='vnni': expected fma or dpbf16"):
        moe.avx512_bf16_kernel()
    with pytest.raises(ValueError, match=AVX512_BF16_ENV):
        moe.cpu_moe(x, ids, weights, packed)
    if not cpu_has_avx512_bf16():
        monkeypatch.setenv(AVX512_BF16_ENV, "dpbf16")
        with pytest.raises(RuntimeError, match="no AVX512_BF16"):
            moe.avx512_bf16_kernel()


@pytest.mark.parametrize("isa", ISAS)
def test_silu_of_a_very_negative_gate_is_zero(force_isa, isa):
    """silu(g) = g sigmoid(g) -> 0 as g -> -inf: a gate of -1e37 (diverged training) gives h = 0 and zero
    gradients, not g / e^88 (the exp's clamp)."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    inter = experts[0].shape[1]
    delta = torch.cat([torch.full((ids.numel(), inter), -1e37), torch.zeros(ids.numel(), inter)], 1)
    xg = x.clone().requires_grad_()
    y, h = moe.cpu_moe(xg, ids, weights, packed, gate_up_delta=delta, return_hidden=True)
    y.backward(grad)
    assert h.abs().max() == 0 and y.abs().max() == 0 and xg.grad.abs().max() == 0


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_inputs_keep_dtype(force_isa, isa):
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    x = x.bfloat16()
    want = reference_grads(x, ids, weights, grad, experts)
    got = run_kernel(x, ids, weights, grad, packed)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, g, w in zip(("y", "grad_x", "grad_weights"), got, want):
        assert_close(g, w, 3e-2, f"{isa}/bf16 input {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_float_inputs_run_as_float32(extension, dtype):
    """fp16 (a GPU model without bf16) and fp64 x go through the kernel as float32: the results equal the float32
    run on the same values, in x's dtype."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    x = x.to(dtype)
    got = run_kernel(x, ids, weights, grad, packed)
    want = run_kernel(x.float(), ids, weights, grad.to(dtype).float(), packed)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


def test_backward_takes_saved_tensors_that_a_hook_copied(extension):
    """The forward saves its gate/up products as a view of padded rows; a saved-tensor hook that copies them
    (torch.autograd.graph.save_on_cpu, a clone) hands the backward compact rows, which it reads as well."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    want = run_kernel(x, ids, weights, grad, packed)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        got = run_kernel(x, ids, weights, grad, packed)
    with torch.autograd.graph.save_on_cpu():
        offloaded = run_kernel(x, ids, weights, grad, packed)
    for g, o, w in zip(got, offloaded, want):
        assert torch.equal(g, w) and torch.equal(o, w)


def test_create_graph_is_refused(extension):
    """The backward runs in C++, so its gradients have no graph: create_graph=True raises instead of letting a
    gradient penalty silently miss its second derivative."""
    experts, x, ids, weights, _ = make_case(*SHAPES["top6"])
    packed = moe.PackedExperts.from_weights(*experts)
    x = x.clone().requires_grad_()
    y = moe.cpu_moe(x, ids, weights, packed)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_rows_equal_their_float32_widening(extension, force_isa, isa, weight_dtype):
    """The kernel takes bf16 x and grad_y as they are (copied, not widened, into bf16 operands); since
    bf16 -> fp32 is exact, every output must equal the one for the widened fp32 rows bit for bit."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["busy_expert_top3"])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    x16, grad16 = x.bfloat16(), grad.bfloat16()
    outputs = {}
    for name, rows, grad_rows in (("bf16", x16, grad16), ("fp32", x16.float(), grad16.float())):
        y, saved, _ = extension.moe_forward(rows, ids, weights, *packed.kernel_args(), isa, True, NO_TENSOR, False)
        grad_x, grad_w, _ = extension.moe_backward(grad_rows, ids, weights, saved, *packed.kernel_args(),
                                                   *packed.transposed_args(), isa, NO_TENSOR, False)
        outputs[name] = (y, grad_x, grad_w)
    for got, want in zip(outputs["bf16"], outputs["fp32"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("isa", ["avx512", "portable"])
def test_gradients_match_finite_differences(force_isa, monkeypatch, isa):
    """Directional derivatives of L = <y, dy> by central differences, L(z + eps v) - L(z - eps v) = 2 eps <grad, v>.

    The kernel's forward is evaluated in fp32 (avx512: its fma kernel, as dpbf16 rounds x to bf16), so
    eps = 1e-2 keeps the O(eps^2) truncation and the fp32 noise (about 1e-7 / eps relative) both near 1e-4;
    the routing weights enter linearly (exact).
    """
    force_isa(isa)
    monkeypatch.setenv(AVX512_BF16_ENV, "fma")
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    _, grad_x, grad_w = run_kernel(x, ids, weights, grad, packed)
    gen = torch.Generator().manual_seed(1)
    vx, vw = torch.randn(x.shape, generator=gen), torch.randn(weights.shape, generator=gen)

    def loss(x_, w_):
        with torch.no_grad():
            return (moe.cpu_moe(x_, ids, w_, packed).double() * grad.double()).sum().item()

    eps = 1e-2
    dx_numeric = (loss(x + eps * vx, weights) - loss(x - eps * vx, weights)) / (2 * eps)
    dw_numeric = (loss(x, weights + eps * vw) - loss(x, weights - eps * vw)) / (2 * eps)
    assert dx_numeric == pytest.approx((grad_x * vx).sum().item(), rel=2e-3)
    assert dw_numeric == pytest.approx((grad_w * vw).sum().item(), rel=2e-3)


# ----------------------------------------------------------------------------------- LoRA hooks
# cpu_moe(..., gate_up_delta=delta, return_hidden=True): delta [T k, 2I] enters before the SiLU, h [T k, I]
# is returned, both sorted by expert; the tests keep them in pair order [T, k, n] and take
# L = <y, grad> + <h, grad_h> (either term may be left out).


def make_hooks(tokens: int, top_k: int, inter: int, seed: int = 2):
    """A gate/up delta [T, k, 2I] of about the size of the gate/up outputs, and a gradient for h [T, k, I]."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(tokens, top_k, 2 * inter, generator=gen), torch.randn(tokens, top_k, inter, generator=gen)


def reference_hook_grads(x, ids, weights, delta, grad, grad_h, experts):
    """(y, h, dL/dx, dL/dw, dL/ddelta) in float64; grad or grad_h None leaves out its term; delta None: no delta."""
    xr, wr = x.double().requires_grad_(), weights.double().requires_grad_()
    dr = None if delta is None else delta.double().requires_grad_()
    y, h = reference_with_hidden(xr, ids, wr, *experts, dr)
    hook_loss(y, h, grad, grad_h).backward()
    return y.detach(), h.detach(), xr.grad, wr.grad, None if dr is None else dr.grad


def sorted_by_expert(ids, pair_rows):
    """``[T, k, n]`` per-pair rows -> ``[T k, n]`` in the order the kernel's hooks take (stable sort by expert)."""
    return pair_rows.flatten(0, 1)[ids.flatten().argsort(stable=True)]


def in_pair_order(ids, sorted_rows):
    """The inverse of ``sorted_by_expert`` (differentiable)."""
    order = ids.flatten().argsort(stable=True)
    return sorted_rows[order.argsort()].view(*ids.shape, -1)


def run_kernel_hooks(x, ids, weights, delta, grad, grad_h, packed):
    """The kernel's (y, h, dL/dx, dL/dw, dL/ddelta) with return_hidden=True, like reference_hook_grads (delta,
    h and their gradients in pair order [T, k, n]; the kernel gets and returns them sorted by expert)."""
    xk, wk = x.clone().requires_grad_(), weights.clone().requires_grad_()
    dk = None if delta is None else delta.clone().requires_grad_()
    y, h = moe.cpu_moe(xk, ids, wk, packed, gate_up_delta=None if dk is None else sorted_by_expert(ids, dk),
                       return_hidden=True)
    h = in_pair_order(ids, h)
    hook_loss(y, h, grad, grad_h).backward()
    return y.detach(), h.detach(), xk.grad, wk.grad, None if dk is None else dk.grad


def hook_loss(y, h, grad, grad_h):
    """<y, grad> + <h, grad_h>, leaving out a term whose gradient is None."""
    terms = [(t * g.to(device=t.device, dtype=t.dtype)).sum() for t, g in ((y, grad), (h, grad_h)) if g is not None]
    return sum(terms[1:], terms[0])


HOOK_OUTPUTS = ("y", "h", "grad_x", "grad_weights", "grad_delta")


@pytest.mark.parametrize("shape", ["odd_sizes_top2", "top6"])
@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_lora_hooks_match_float64_reference(force_isa, isa, weight_dtype, shape):
    """y, h and the gradients of x, the routing weights and the delta for L = <y, grad> + <h, grad_h>."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES[shape])
    delta, grad_h = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    if weight_dtype == "int8":
        experts = tuple(dequantize_int8(w) for w in experts)
    want = reference_hook_grads(x, ids, weights, delta, grad, grad_h, experts)
    got = run_kernel_hooks(x, ids, weights, delta, grad, grad_h, packed)
    tol = tolerance(isa, weight_dtype)
    for name, g, w in zip(HOOK_OUTPUTS, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert_close(g, w, tol, f"{isa}/{weight_dtype}/{shape} {name}")


@pytest.mark.parametrize("isa", ISAS)
def test_lora_delta_without_hidden(force_isa, isa):
    """return_hidden=False with a delta: y alone (a tensor, not a tuple) and the gradients of <y, grad>."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    delta, _ = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    y_ref, _, *grads_ref = reference_hook_grads(x, ids, weights, delta, grad, None, experts)
    xk, wk, dk = (t.clone().requires_grad_() for t in (x, weights, delta))
    y = moe.cpu_moe(xk, ids, wk, packed, gate_up_delta=sorted_by_expert(ids, dk))
    assert isinstance(y, torch.Tensor)
    y.backward(grad)
    for name, g, w in zip(("y", "grad_x", "grad_weights", "grad_delta"), (y, xk.grad, wk.grad, dk.grad),
                          (y_ref, *grads_ref)):
        assert_close(g.detach(), w, tolerance(isa, "bf16"), f"{isa} {name}")


@pytest.mark.parametrize("needs_grad", ["weights", "delta"])
def test_backward_when_only_the_weights_or_only_the_delta_need_a_gradient(extension, needs_grad):
    """LoRA on the routed experts with a frozen router and an input that needs no gradient (only the delta
    does), or the routing weights alone: the forward still saves what the backward needs, whose gradient for that
    one input matches the float64 reference."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    delta, _ = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    _, _, _, grad_w, grad_delta = reference_hook_grads(x, ids, weights, delta, grad, None, experts)
    wk = weights.clone().requires_grad_(needs_grad == "weights")
    dk = delta.clone().requires_grad_(needs_grad == "delta")
    moe.cpu_moe(x, ids, wk, packed, gate_up_delta=sorted_by_expert(ids, dk)).backward(grad)
    got, want = (wk.grad, grad_w) if needs_grad == "weights" else (dk.grad, grad_delta)
    assert_close(got, want, tolerance(moe.selected_isa(), "bf16"), f"grad of the {needs_grad}")


@pytest.mark.parametrize("isa", ISAS)
def test_lora_hidden_without_delta(force_isa, isa):
    """return_hidden=True without a delta: h of the frozen experts, differentiable."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["top6"])
    _, grad_h = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    want = reference_hook_grads(x, ids, weights, None, grad, grad_h, experts)
    got = run_kernel_hooks(x, ids, weights, None, grad, grad_h, packed)
    for name, g, w in zip(HOOK_OUTPUTS[:4], got, want):
        assert_close(g, w, tolerance(isa, "bf16"), f"{isa} {name}")
    assert got[4] is None


@pytest.mark.parametrize("isa", ISAS)
def test_lora_hooks_with_one_loss_term(force_isa, isa):
    """h returned but unused by the loss (no grad_h reaches the kernel): the same bits as return_hidden=False;
    and the converse, only h in the loss (no grad_y)."""
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    delta, grad_h = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    grads = run_kernel_hooks(x, ids, weights, delta, grad, None, packed)[2:]
    xk, wk, dk = (t.clone().requires_grad_() for t in (x, weights, delta))
    moe.cpu_moe(xk, ids, wk, packed, gate_up_delta=sorted_by_expert(ids, dk)).backward(grad)
    for got, want in zip(grads, (xk.grad, wk.grad, dk.grad)):
        assert torch.equal(got, want)
    want = reference_hook_grads(x, ids, weights, delta, None, grad_h, experts)
    got = run_kernel_hooks(x, ids, weights, delta, None, grad_h, packed)
    assert want[3] is None and not got[3].any()  # h does not depend on the routing weights
    for index in (0, 1, 2, 4):
        assert_close(got[index], want[index], tolerance(isa, "bf16"), f"{isa} h only {HOOK_OUTPUTS[index]}")


def test_lora_zero_delta_changes_nothing(extension):
    """A zero delta and an unused h give the outputs and gradients of a plain call, bit for bit."""
    experts, x, ids, weights, grad = make_case(*SHAPES["busy_expert_top3"])
    packed = moe.PackedExperts.from_weights(*experts)
    delta = torch.zeros(*ids.shape, 2 * experts[0].shape[1])
    plain = run_kernel(x, ids, weights, grad, packed)
    hooked = run_kernel_hooks(x, ids, weights, delta, grad, None, packed)
    for got, want in zip((hooked[0], *hooked[2:4]), plain):
        assert torch.equal(got, want)


def test_lora_gradients_match_finite_differences(force_isa):
    """Directional derivative of L = <y, grad> + <h, grad_h> along the delta, by central differences on the fp32
    portable path (eps as in test_gradients_match_finite_differences)."""
    force_isa("portable")
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    delta, grad_h = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    grad_delta = run_kernel_hooks(x, ids, weights, delta, grad, grad_h, packed)[4]
    direction = torch.randn(delta.shape, generator=torch.Generator().manual_seed(3))

    def loss(delta_):
        with torch.no_grad():
            y, h = moe.cpu_moe(x, ids, weights, packed, gate_up_delta=sorted_by_expert(ids, delta_),
                               return_hidden=True)
            return hook_loss(y.double(), in_pair_order(ids, h).double(), grad, grad_h).item()

    eps = 1e-2
    numeric = (loss(delta + eps * direction) - loss(delta - eps * direction)) / (2 * eps)
    assert numeric == pytest.approx((grad_delta * direction).sum().item(), rel=2e-3)


def test_lora_bad_delta_raises_value_error(extension):
    experts, x, ids, weights, _ = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    tokens, top_k = ids.shape
    inter, inter_pad = packed.intermediate_size, packed.padded_intermediate_size
    assert (inter, inter_pad) == (70, 128)
    expected = rf"gate_up_delta must be a float \[T k, 2I\] = \({tokens * top_k}, 140\)"
    for shape in ((tokens * top_k, inter), (tokens * top_k, 2 * inter_pad), ((tokens + 1) * top_k, 2 * inter),
                  (tokens, top_k, 2 * inter)):
        with pytest.raises(ValueError, match=expected):
            moe.cpu_moe(x, ids, weights, packed, gate_up_delta=torch.zeros(shape))
    with pytest.raises(ValueError, match="gate_up_delta must be a float"):
        moe.cpu_moe(x, ids, weights, packed, gate_up_delta=torch.zeros(tokens * top_k, 2 * inter, dtype=torch.long))


def test_lora_kernel_checks_hook_tensors(extension):
    """The C++ functions reject hook tensors of the wrong shape or dtype with a message naming them."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    pairs, isa = ids.numel(), moe.available_isas()[-1]
    with pytest.raises(RuntimeError, match=rf"gu_delta must be \[{pairs}, 256\]"):
        extension.moe_forward(x, ids, weights, *packed.kernel_args(), isa, False, torch.zeros(pairs, 140), False)
    _, saved, _ = extension.moe_forward(x, ids, weights, *packed.kernel_args(), isa, True, NO_TENSOR, False)
    with pytest.raises(RuntimeError, match="grad_h must be a contiguous float32"):
        extension.moe_backward(grad, ids, weights, saved, *packed.kernel_args(), *packed.transposed_args(), isa,
                               torch.zeros(pairs, 128, dtype=torch.float64), False)


def test_raw_kernel_refuses_mismatched_packed_weights_and_wide_gradients(extension):
    """The C++ entry points check what would otherwise read or write out of bounds: down weights of fewer experts
    than gate/up, and (backward) a grad_y wider than the packed hidden size."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts)
    isa = moe.available_isas()[-1]
    gate_up, s13, c13, down, s2, c2 = packed.kernel_args()
    with pytest.raises(RuntimeError, match="packed gate/up and down weights do not match"):
        extension.moe_forward(x, ids, weights, gate_up, s13, c13, down[:-1].contiguous(), s2, c2, isa, False,
                              NO_TENSOR, False)
    _, saved, _ = extension.moe_forward(x, ids, weights, *packed.kernel_args(), isa, True, NO_TENSOR, False)
    wide = torch.zeros(grad.shape[0], 4096)
    with pytest.raises(RuntimeError, match="grad_y has more columns than the packed weights"):
        extension.moe_backward(wide, ids, weights, saved, *packed.kernel_args(), *packed.transposed_args(), isa,
                               NO_TENSOR, False)


def test_calls_from_two_python_threads_at_once_give_the_sequential_results(extension):
    """The kernel runs without the GIL (other Python threads go on), so calls may overlap: the process-wide
    block cache and the per-thread scratch keep them apart."""
    experts, x, ids, weights, grad = make_case(*SHAPES["busy_expert_top3"])
    packed = moe.PackedExperts.from_weights(*experts)
    expected = run_kernel(x, ids, weights, grad, packed)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_kernel(x, ids, weights, grad, packed), range(4)))
    for result in results:
        for a, b in zip(result, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("weight_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_deterministic_across_runs_and_threads(force_isa, isa, weight_dtype):
    force_isa(isa)
    experts, x, ids, weights, grad = make_case(*SHAPES["busy_expert_top3"])
    packed = moe.PackedExperts.from_weights(*experts, weight_dtype=weight_dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run_kernel(x, ids, weights, grad, packed)
        second = run_kernel(x, ids, weights, grad, packed)
        torch.set_num_threads(1)
        single = run_kernel(x, ids, weights, grad, packed)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_no_grad_forward_equals_training_forward(extension):
    experts, x, ids, weights, grad = make_case(*SHAPES["top6"])
    packed = moe.PackedExperts.from_weights(*experts)
    with torch.no_grad():
        inference = moe.cpu_moe(x, ids, weights, packed)
    training = run_kernel(x, ids, weights, grad, packed)[0]
    assert torch.equal(inference, training)


def test_empty_batch(extension):
    experts, x, ids, weights, _ = make_case(*SHAPES["top6"])
    packed = moe.PackedExperts.from_weights(*experts)
    y = moe.cpu_moe(x[:0], ids[:0], weights[:0], packed)
    assert y.shape == (0, x.shape[1])


def test_empty_cached_reuses_freed_blocks(extension):
    """empty_cached hands a freed block of 2 MB or more out again (no fresh pages to fault in), and a live block
    to nobody else; smaller tensors come from torch.empty."""
    first = moe.empty_cached((1024, 1024), torch.float32)
    assert first.shape == (1024, 1024) and first.dtype == torch.float32 and first.is_contiguous()
    address = first.data_ptr()
    other = moe.empty_cached((1024, 1024), torch.float32)
    assert other.data_ptr() != address
    del first
    assert moe.empty_cached((1024, 1024), torch.float32).data_ptr() == address
    small = moe.empty_cached((4, 3), torch.bfloat16)
    assert small.shape == (4, 3) and small.dtype == torch.bfloat16


def test_a_free_block_serves_requests_down_to_half_its_size(extension):
    """A freed block of 61 pages of 2 MB (size class 64 pages, 128 MB) serves an 80 MB request (40 pages, at least
    half of it) but not a 40 MB one: calls of varying token counts share blocks instead of each size keeping its
    own."""
    page = 2**21 // 4  # float32 elements in 2 MB
    block = moe.empty_cached((61, page), torch.float32)
    address = block.data_ptr()
    del block
    small = moe.empty_cached((20, page), torch.float32)
    assert small.data_ptr() != address
    assert moe.empty_cached((40, page), torch.float32).data_ptr() == address


def test_growing_requests_do_not_pile_up_blocks(extension):
    """Requests growing one after another (token counts rising batch after batch) never find a free block big enough;
    the smaller ones are unmapped once the free blocks hold more than the most bytes in use at once, so the memory
    stays within twice the largest request instead of the sum of all (1.1 GB here). A fresh process: the high-water
    mark is process-wide."""
    code = """
import resource, torch
from dpo_llama.models import cpu_moe
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
start = rss_mb()
for pages in range(8, 65, 4):
    cpu_moe.empty_cached((pages, 2**19), torch.float32).fill_(1.0)  # 2 MB pages, touched, then freed
print(rss_mb() - start)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(result.stdout.split()[-1]) < 2 * 128 + 64  # MB: the largest request is 128 MB


def test_packed_layout_sizes(extension):
    """H = 100 -> 128 and I = 70 -> 128 after padding to 64; gate/up interleave -> 2I' = 256 rows."""
    experts, *_ = make_case(*SHAPES["odd_sizes_top2"])
    bf16 = moe.PackedExperts.from_weights(*experts)
    assert bf16.gate_up.shape == (5, 256 // 32, 128 // 2, 32, 2) and bf16.gate_up.dtype == torch.bfloat16
    assert bf16.down.shape == (5, 128 // 32, 128 // 2, 32, 2)
    int8 = moe.PackedExperts.from_weights(*experts, weight_dtype="int8")
    assert int8.gate_up.shape == (5, 256 // 32, 128 // 4, 32, 4) and int8.gate_up.dtype == torch.int8
    assert int8.gate_up_scale.shape == (5, 256) and int8.down_colsum.shape == (5, 128)
    assert bf16.gate_up_t.numel() == 0 and bf16.down_t.numel() == 0
    both = moe.PackedExperts.from_weights(*experts, transposed_copy=True)
    assert both.gate_up_t.shape == (5, 128 // 32, 256 // 2, 32, 2) and both.gate_up_t.dtype == torch.bfloat16
    assert both.down_t.shape == (5, 128 // 32, 128 // 2, 32, 2)


def test_transposed_copy_values(extension):
    """gate_up_t packs the transpose of the interleaved gate/up rows: entry [e, p, k/2, n, k%2] = W^T[e, 32p + n, k]."""
    experts, *_ = make_case(*SHAPES["odd_sizes_top2"])
    packed = moe.PackedExperts.from_weights(*experts, transposed_copy=True)
    gate, up, down = (w.bfloat16() for w in experts)
    # W_gate_up^T[h, j]: column j = 64 q + c is gate row 32 q + c (c < 32) or up row 32 q + c - 32.
    assert packed.gate_up_t[1, 0, 0, 3, 0] == gate[1, 0, 3]  # h = 3, j = 0: gate row 0
    assert packed.gate_up_t[1, 0, 16, 3, 0] == up[1, 0, 3]  # j = 32: up row 0
    assert packed.gate_up_t[1, 0, 32, 3, 1] == gate[1, 33, 3]  # j = 65: gate row 33
    assert packed.down_t[2, 1, 5, 4, 1] == down[2, 11, 36]  # W_down^T[i = 36, h = 11]


def test_bad_inputs_raise_value_error(extension):
    experts, x, ids, weights, _ = make_case(*SHAPES["top6"])
    with pytest.raises(ValueError, match="weight_dtype"):
        moe.PackedExperts.from_weights(*experts, weight_dtype="fp8")
    with pytest.raises(ValueError, match="transposed_copy"):
        moe.PackedExperts.from_weights(*experts, weight_dtype="int8", transposed_copy=True)
    with pytest.raises(ValueError, match="down_proj"):
        moe.PackedExperts.from_weights(experts[0], experts[1], experts[0])
    packed = moe.PackedExperts.from_weights(*experts)
    with pytest.raises(ValueError, match="topk_ids"):
        moe.cpu_moe(x, ids + 8, weights, packed)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 8\)"):  # E itself is one too many
        moe.cpu_moe(x, torch.full_like(ids, packed.num_experts), weights, packed)
    with pytest.raises(ValueError, match="x must be"):
        moe.cpu_moe(x[:, :-1], ids, weights, packed)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        moe.cpu_moe(x.long(), ids, weights, packed)


def test_a_failed_build_reads_as_no_kernel(monkeypatch):
    """kernel_available() is False (not an exception) when the build fails, so the MoE layer's backend check can
    say to use experts_backend='torch', giving the build's error."""
    @functools.cache
    def failed_build():
        raise RuntimeError("Error building extension 'dpo_llama_moe': [1/2] c++ -MMD -O3 -fopenmp -c moe_kernel.cpp\n"
                           "In file included from moe_kernel.cpp:1:\n/bin/sh: 1: c++: not found\n"
                           "ninja: build stopped: subcommand failed.\n")

    monkeypatch.setattr(moe, "_compile", failed_build)
    monkeypatch.setattr(moe, "_is_built", lambda: True)
    moe.kernel_error.cache_clear()
    try:
        assert moe.kernel_available() is False
        with pytest.raises(RuntimeError, match=r"not available on this machine \(Error building extension.*"
                                               r"\| \.\.\. \| /bin/sh: 1: c\+\+: not found \| ninja: build stopped"):
            load_cpu_kernel()  # the reason, at the end of the build's log, is in the message
    finally:
        moe.kernel_error.cache_clear()


def test_stale_build_lock_is_removed(tmp_path, capsys):
    """torch waits forever on a build lock that a killed build left behind: a lock older than _STALE_LOCK_S is
    removed, a fresh one (another build may hold it) stays, with a message naming it."""
    lock = tmp_path / "lock"
    lock.touch()
    moe._clear_stale_lock(lock)
    assert lock.exists() and str(lock) in capsys.readouterr().err
    old = time.time() - moe._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    moe._clear_stale_lock(lock)
    assert not lock.exists() and "interrupted build" in capsys.readouterr().err
    moe._clear_stale_lock(lock)
    assert capsys.readouterr().err == ""


def test_forced_isa_validation(extension, monkeypatch):
    monkeypatch.setenv("DPO_LLAMA_MOE_ISA", "sse9")
    with pytest.raises(ValueError, match="DPO_LLAMA_MOE_ISA"):
        moe.selected_isa()
    monkeypatch.setenv("DPO_LLAMA_MOE_ISA", " Portable ")  # as typed in a shell or a .env file
    assert moe.selected_isa() == "portable"
    monkeypatch.delenv("DPO_LLAMA_MOE_ISA")
    assert moe.selected_isa() == moe.available_isas()[0]
    assert moe.available_isas()[-1] == "portable"
    missing = [isa for isa in ISAS if isa not in moe.available_isas()]
    if missing:
        monkeypatch.setenv("DPO_LLAMA_MOE_ISA", missing[0])
        with pytest.raises(RuntimeError, match="only runs"):
            moe.selected_isa()


def test_amx_runs_in_a_subprocess(extension):
    """A real tile instruction path in a fresh process: a fault there cannot take the test run down."""
    if "amx" not in moe.available_isas():
        pytest.skip("AMX not runnable here (CPUID, XCR0 or arch_prctl, or the forked tile probe failed)")
    script = textwrap.dedent(
        """
        import torch
        from dpo_llama.models import cpu_moe as moe
        moe.load_extension(verbose=False)
        g, u, d = torch.randn(2, 64, 64), torch.randn(2, 64, 64), torch.randn(2, 64, 64)
        y = moe.cpu_moe(torch.randn(3, 64), torch.tensor([[0], [1], [0]]), torch.ones(3, 1),
                        moe.PackedExperts.from_weights(g, u, d))
        assert torch.isfinite(y).all()
        print("ok")
        """
    )
    env = dict(os.environ, DPO_LLAMA_MOE_ISA="amx", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (hybrid GPU + CPU path)")
def test_cuda_inputs_round_trip(extension):
    experts, x, ids, weights, grad = make_case(*SHAPES["top6"])
    packed = moe.PackedExperts.from_weights(*experts)
    want = run_kernel(x, ids, weights, grad, packed)
    got = run_kernel(x.cuda(), ids.cuda(), weights.cuda(), grad.cuda(), packed)
    assert got[0].device.type == "cuda" and got[1].device.type == "cuda"
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (hybrid GPU + CPU path)")
def test_cuda_lora_hooks_round_trip(extension):
    """The delta comes from CUDA; h and every gradient go back to their devices, equal to the CPU run."""
    experts, x, ids, weights, grad = make_case(*SHAPES["odd_sizes_top2"])
    delta, grad_h = make_hooks(*ids.shape, experts[0].shape[1])
    packed = moe.PackedExperts.from_weights(*experts)
    want = run_kernel_hooks(x, ids, weights, delta, grad, grad_h, packed)
    got = run_kernel_hooks(*(t.cuda() for t in (x, ids, weights, delta, grad, grad_h)), packed)
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        assert torch.equal(g.cpu(), w)
