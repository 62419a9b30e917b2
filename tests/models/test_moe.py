"""The MoE router, balancing losses and expert backends against naive per-token references."""

import copy
import sys

import pytest
import torch

from dpo_llama.models.moe import (RoutedExperts, batch_aux_loss, load_cpu_kernel, routing_weights, select_experts,
                                  sequence_aux_loss)


def naive_route(scores, top_k, method="greedy", n_group=None, topk_group=None, norm=False, scale=1.0):
    """Per token: the eligible experts (all, or those of the ``topk_group`` groups with the best maximum), the
    ``top_k`` best of them, their scores normalised or scaled. Returns ``[{expert: weight}]``."""
    routes = []
    for s in scores.tolist():
        eligible = list(range(len(s)))
        if method == "group_limited_greedy":
            size = len(s) // n_group
            groups = sorted(range(n_group), key=lambda g: -max(s[g * size:(g + 1) * size]))[:topk_group]
            eligible = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(eligible, key=lambda e: -s[e])[:top_k]
        total = sum(s[e] for e in chosen)
        routes.append({e: s[e] / total if norm and top_k > 1 else s[e] * scale for e in chosen})
    return routes


def as_routes(topk_ids, weights):
    return [dict(zip(ids, ws)) for ids, ws in zip(topk_ids.tolist(), weights.tolist())]


def test_hand_example_greedy_and_group_limited():
    """Scores (0.1, 0.4, 0.2, 0.3), k = 2.

    Greedy picks experts 1 and 3 with weights 0.4, 0.3; normalised 4/7, 3/7; scaled by 2: 0.8, 0.6.
    Group-limited with groups {0, 1}, {2, 3} (maxima 0.4 and 0.3) and one group allowed keeps only experts 0
    and 1: weights 0.1 and 0.4.
    """
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    top, ids = select_experts(scores, 2)
    assert as_routes(ids, top) == [pytest.approx({1: 0.4, 3: 0.3})]
    assert as_routes(ids, routing_weights(top, True, 2.0)) == [pytest.approx({1: 4 / 7, 3: 3 / 7})]
    assert as_routes(ids, routing_weights(top, False, 2.0)) == [pytest.approx({1: 0.8, 3: 0.6})]
    top, ids = select_experts(scores, 2, "group_limited_greedy", n_group=2, topk_group=1)
    assert as_routes(ids, top) == [pytest.approx({0: 0.1, 1: 0.4})]


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("norm,scale", [(False, 1.0), (True, 1.0), (False, 2.5)])
def test_router_matches_per_token_reference(method, norm, scale):
    scores = torch.randn(50, 16).softmax(-1)
    top, ids = select_experts(scores, 3, method, n_group=4, topk_group=2)
    weights = routing_weights(top, norm, scale)
    expected = naive_route(scores, 3, method, n_group=4, topk_group=2, norm=norm, scale=scale)
    assert [pytest.approx(r) for r in expected] == as_routes(ids, weights)


def test_top1_is_never_normalised():
    """With k = 1 the reference skips normalisation and applies the scaling factor."""
    top = torch.tensor([[0.3]])
    assert routing_weights(top, True, 2.0).item() == pytest.approx(0.6)


def test_unknown_topk_method_is_refused():
    with pytest.raises(ValueError, match="unknown topk_method"):
        select_experts(torch.rand(2, 4), 1, "noaux_tc")


SCORES = torch.tensor([[[0.7, 0.3], [0.6, 0.4]], [[0.2, 0.8], [0.5, 0.5]]])
IDS = torch.tensor([[[0], [0]], [[1], [0]]])


def test_sequence_aux_loss_hand_example():
    """E = 2, k = 1, T = 2, so ce = count / (T k / E) = count.

    Sequence 0: counts (2, 0), mean scores (0.65, 0.35): sum_i ce_i P_i = 1.3.
    Sequence 1: counts (1, 1), mean scores (0.35, 0.65): 1.0.  aux_b = alpha * (1.3, 1.0); their mean, DeepSeek's
    loss, is 1.15 alpha.
    """
    assert sequence_aux_loss(SCORES, IDS, 0.01).tolist() == pytest.approx([0.013, 0.010])
    assert sequence_aux_loss(SCORES, IDS, 0.01).mean().item() == pytest.approx(0.0115)


def test_sequence_aux_loss_counts_every_one_of_the_k_slots():
    """E = 4, k = 2, T = 2 tokens routed to (0, 1) and (2, 3), uniform scores 1/4: ce = count / (T k / E) = 1 for
    every expert, so a perfectly balanced sequence gives aux = alpha · sum_i 1 · 1/4 = alpha."""
    scores = torch.full((1, 2, 4), 0.25)
    assert sequence_aux_loss(scores, torch.tensor([[[0, 1], [2, 3]]]), 0.01).item() == pytest.approx(0.01)


def test_batch_aux_loss_hand_example():
    """Over all 4 tokens: counts (3, 1), f = E * count / (N k) = (1.5, 0.5), P = (0.5, 0.5): aux = alpha * 1.0."""
    assert batch_aux_loss(SCORES.view(4, 2), IDS.view(4, 1), 0.01).item() == pytest.approx(0.01)


def test_aux_losses_leave_padding_out():
    """Sequence 1 padded by a third position (a pad token routed to expert 0): with ``valid`` both losses equal the
    hand examples above, which saw no padding; without it the pad would count."""
    scores = torch.cat([SCORES, torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]]])], dim=1)
    ids = torch.cat([IDS, torch.zeros(2, 1, 1, dtype=torch.long)], dim=1)
    valid = torch.tensor([[True, True, False], [True, True, False]])
    assert sequence_aux_loss(scores, ids, 0.01, valid).tolist() == pytest.approx([0.013, 0.010])
    assert sequence_aux_loss(scores, ids, 0.01).mean().item() != pytest.approx(0.0115)
    assert batch_aux_loss(scores.view(6, 2), ids.view(6, 1), 0.01, valid.view(6)).item() == pytest.approx(0.01)


def test_aux_loss_gradient_flows_through_scores_only():
    """d aux / d P_{b,i} = alpha * ce_{b,i} / B, spread evenly over the T tokens: d / d s_{b,t,i} = alpha ce / (B T)."""
    scores = SCORES.clone().requires_grad_()
    sequence_aux_loss(scores, IDS, 1.0).mean().backward()
    ce = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(scores.grad, (ce / 4)[:, None, :].expand(2, 2, 2))


def make_experts(n_experts=6, dim=16, hidden=12) -> RoutedExperts:
    return RoutedExperts(n_experts, dim, hidden)


def naive_experts(x, ids, weights, experts: RoutedExperts):
    """``y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t)``, one token and one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            y = y + weights[t, j] * (experts.down_proj[e] @ h)
        rows.append(y)
    return torch.stack(rows)


def routing_inputs(tokens=20, n_experts=6, k=2):
    x = torch.randn(tokens, 16, requires_grad=True)
    ids = torch.stack([torch.randperm(n_experts - 1)[:k] for _ in range(tokens)])  # the last expert gets no token
    weights = torch.rand(tokens, k, requires_grad=True)
    return x, ids, weights


def grads(fn, experts, x, ids, weights):
    experts.zero_grad()
    x.grad = weights.grad = None
    out = fn(x, ids, weights)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), x.grad, weights.grad, experts.gate_proj.grad, experts.down_proj.grad


def test_torch_backend_equals_per_token_loop():
    """Forward and gradients (wrt x, routing weights and expert weights) of the sorted/grouped computation."""
    experts = make_experts()
    x, ids, weights = routing_inputs()
    fast = grads(experts, experts, x, ids, weights)
    slow = grads(lambda *a: naive_experts(*a, experts), experts, x, ids, weights)
    for got, expected in zip(fast, slow):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert fast[3][-1].abs().sum() == 0  # the unused expert has a zero gradient


def test_torch_backend_bf16_keeps_dtype():
    experts = make_experts().to(torch.bfloat16)
    x, ids, weights = routing_inputs()
    out = experts(x.detach().bfloat16(), ids, weights.detach())
    assert out.dtype == torch.bfloat16
    expected = naive_experts(x.detach().bfloat16().float(), ids, weights.detach(), make_experts_from(experts))
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def grouped(experts: RoutedExperts):
    """``grouped_experts`` on these experts, called directly (the backend uses it on CUDA only)."""
    from dpo_llama.models.moe import PairGroups, grouped_experts

    def run(x, ids, weights):
        return grouped_experts(x, PairGroups(ids, experts.n_experts), weights, experts.gate_proj, experts.up_proj,
                               experts.down_proj)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_expert_path(dtype):
    """The grouped GEMMs (``torch._grouped_mm``, which also runs on the CPU) give the per-expert path's output and
    gradients (x, routing weights, expert weights), with an expert that gets no token; on the CPU the backend
    keeps the per-expert path."""
    from dpo_llama.models.moe import grouped_gemm_runs
    experts = make_experts(hidden=16).to(dtype)  # grouped GEMM rows: multiples of 16 bytes
    x, ids, weights = routing_inputs()
    x = x.detach().to(dtype).requires_grad_()
    assert not grouped_gemm_runs(x, experts)
    want = grads(experts, experts, x, ids, weights)
    got = grads(grouped(experts), experts, x, ids, weights)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    assert got[3][-1].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_experts_match_the_cpu():
    """On CUDA the bf16 backend runs grouped GEMMs where they have their kernel (compute capability 9.0+), the
    per-expert path elsewhere; either gives the CPU per-expert path's output and gradients (to bf16 rounding)."""
    from dpo_llama.models.moe import grouped_gemm_runs
    experts = make_experts(hidden=16).to(torch.bfloat16)
    x, ids, weights = routing_inputs()
    x = x.detach().bfloat16().requires_grad_()
    want = grads(experts, experts, x, ids, weights)
    on_gpu = copy.deepcopy(experts).cuda()
    x_gpu, weights_gpu = (t.detach().cuda().requires_grad_() for t in (x, weights))
    assert grouped_gemm_runs(x_gpu, on_gpu) == (torch.cuda.get_device_capability() >= (9, 0))
    got = grads(on_gpu, on_gpu, x_gpu, ids.cuda(), weights_gpu)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=3e-2, rtol=3e-2)


def make_experts_from(experts: RoutedExperts) -> RoutedExperts:
    """A float32 copy."""
    copy = make_experts(experts.n_experts, experts.dim, experts.hidden_dim)
    copy.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    return copy


def test_load_tensor_checks_shapes():
    experts = make_experts()
    with pytest.raises(ValueError, match="shape mismatch for experts.down_proj"):
        experts.load_tensor("down_proj", torch.zeros(6, 12, 16))
    with pytest.raises(ValueError, match="unexpected tensor"):
        experts.load_tensor("bias", torch.zeros(6))


def test_missing_cpu_kernel_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dpo_llama.models.cpu_moe", None)
    with pytest.raises(RuntimeError, match="experts backend 'cpu_kernel' needs dpo_llama.models.cpu_moe"):
        load_cpu_kernel()
    experts = make_experts()
    experts.backend = "cpu_kernel"
    x, ids, weights = routing_inputs()
    with pytest.raises(RuntimeError, match="cpu_kernel"):
        experts(x, ids, weights)


def cpu_kernel_or_skip():
    cpu_moe = pytest.importorskip("dpo_llama.models.cpu_moe")
    if not cpu_moe.kernel_available():
        pytest.skip("the C++ MoE kernel does not build on this machine")
    return cpu_moe


def kernel_inputs(x, ids, weights):
    """Fresh leaf copies of the routing inputs (each backend gets its own gradients)."""
    return x.detach().clone().requires_grad_(), ids, weights.detach().clone().requires_grad_()


def backward_of(out, x, weights):
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, weights.grad


def test_cpu_kernel_backend_equals_torch_backend(monkeypatch):
    """Weights rounded to bf16 first, so the kernel's bf16 packing is exact; the portable ISA keeps fp32
    activations (AMX would round them to bf16), so both backends agree to fp32 rounding."""
    cpu_kernel_or_skip()
    monkeypatch.setenv("DPO_LLAMA_MOE_ISA", "portable")
    experts = make_experts()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(p.bfloat16().float())
    experts.requires_grad_(False)
    kernel_experts = copy.deepcopy(experts)
    kernel_experts.set_backend("cpu_kernel")
    x, ids, weights = routing_inputs()
    inputs = kernel_inputs(x, ids, weights)
    expected = backward_of(experts(*inputs), inputs[0], inputs[2])
    inputs = kernel_inputs(x, ids, weights)
    got = backward_of(kernel_experts(*inputs), inputs[0], inputs[2])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cpu_kernel_int8_backend_runs_the_int8_kernel():
    """``"cpu_kernel_int8"`` packs the experts as int8 and computes exactly what the kernel computes on those
    weights (forward and gradients), within the int8 quantization of the bf16 backend; it keeps no transposed
    copies, and packed experts refuse another backend."""
    cpu_kernel_or_skip()
    from dpo_llama.models import cpu_moe
    experts = make_experts().requires_grad_(False)
    int8 = copy.deepcopy(experts)
    with pytest.raises(ValueError, match="transposed copies are for bf16 experts"):
        copy.deepcopy(experts).set_backend("cpu_kernel_int8", transposed_copy=True)
    packed = cpu_moe.PackedExperts.from_weights(experts.gate_proj, experts.up_proj, experts.down_proj,
                                                weight_dtype="int8")
    int8.set_backend("cpu_kernel_int8")
    experts.set_backend("cpu_kernel")
    assert int8.kernel_packed.weight_dtype == "int8" and int8.gate_proj is None
    routing = routing_inputs()
    inputs = kernel_inputs(*routing)
    got = backward_of(int8(*inputs), inputs[0], inputs[2])
    inputs = kernel_inputs(*routing)
    direct = backward_of(cpu_moe.cpu_moe(inputs[0], inputs[1], inputs[2], packed), inputs[0], inputs[2])
    inputs = kernel_inputs(*routing)
    bf16 = backward_of(experts(*inputs), inputs[0], inputs[2])
    for a, b, c in zip(got, direct, bf16):
        assert torch.equal(a, b)
        assert (a - c).abs().max() <= 0.05 * c.abs().max()
    with pytest.raises(RuntimeError, match="packed for 'cpu_kernel_int8'.*reload the model"):
        int8.set_backend("cpu_kernel")


def test_cpu_kernel_transposed_copies_give_the_same_gradients():
    cpu_kernel_or_skip()
    experts = make_experts().requires_grad_(False)
    with_copies = copy.deepcopy(experts)
    experts.set_backend("cpu_kernel")
    with_copies.set_backend("cpu_kernel", transposed_copy=True)
    assert experts.kernel_packed.gate_up_t.numel() == 0 and with_copies.kernel_packed.gate_up_t.numel() > 0
    routing, results = routing_inputs(), []
    for module in (experts, with_copies):
        inputs = kernel_inputs(*routing)
        results.append(backward_of(module(*inputs), inputs[0], inputs[2]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_packs_once_and_frees_the_full_precision_weights():
    cpu_kernel_or_skip()
    experts = make_experts().requires_grad_(False)
    experts.set_backend("cpu_kernel")
    packed = experts.kernel_packed
    assert packed is not None and experts.gate_proj is None and list(experts.parameters()) == []
    with torch.no_grad():
        experts(*routing_inputs())
    assert experts.kernel_packed is packed
    with pytest.raises(RuntimeError, match="reload the model"):
        experts.set_backend("torch")
    with pytest.raises(RuntimeError, match="reload the model"):  # copies need the freed weights
        experts.set_backend("cpu_kernel", transposed_copy=True)
    experts.set_backend("cpu_kernel")  # the same setting again is no change


def test_a_refused_kernel_switch_changes_nothing():
    """Trainable experts cannot be packed (the kernel computes no weight gradients): the switch raises and the
    experts stay on the torch backend, still usable; packed experts refuse new weights with a clear message."""
    cpu_kernel_or_skip()
    experts = make_experts()
    with pytest.raises(RuntimeError, match="computes no gradients for expert weights"):
        experts.set_backend("cpu_kernel")
    assert experts.backend == "torch" and experts.kernel_packed is None
    with torch.no_grad():
        experts(*routing_inputs())
    experts.requires_grad_(False).set_backend("cpu_kernel")
    with pytest.raises(RuntimeError, match="packed for the 'cpu_kernel' backend.*load_model"):
        experts.load_tensor("gate_proj", torch.zeros(experts.shape_of("gate_proj")))


def test_cpu_kernel_experts_are_packed_while_loading(tmp_path):
    """With the backend chosen before the weights stream in, each layer's experts arrive on the CPU and are
    packed as soon as all three matrices are there: no full-precision expert weight survives loading."""
    cpu_kernel_or_skip()
    from dpo_llama.models.checkpoint import load_model, save_model
    from dpo_llama.models.deepseek import DeepseekTransformer
    from dpo_llama.models.presets import get_preset

    reference = DeepseekTransformer(get_preset("tiny-deepseek-v2")).eval()
    save_model(reference, tmp_path)
    model = load_model(tmp_path, prepare=lambda m: m.requires_grad_(False).set_experts_backend("cpu_kernel"))
    for moe in model.moe_layers():
        assert moe.experts.gate_proj is None and moe.experts.kernel_packed is not None
    tokens = torch.randint(0, reference.args.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0.05, rtol=0.05)  # bf16 experts


def test_cpu_kernel_refuses_trainable_experts():
    cpu_kernel_or_skip()
    experts = make_experts()
    experts.backend = "cpu_kernel"
    with pytest.raises(RuntimeError, match="freeze them"):
        experts(*routing_inputs())


def quant_or_skip():
    return pytest.importorskip("dpo_llama.models.quant")


def test_4bit_experts_equal_dequantized_per_token_loop():
    """4-bit experts (one Packed4bit per expert) against the per-token loop on the dequantized weights,
    forward and gradients wrt x and the routing weights (the 4-bit weights get none)."""
    quant = quant_or_skip()
    experts = make_experts(dim=64, hidden=64)
    cfg = quant.Quant4bitConfig(compute_dtype=torch.float32)
    experts.quantize_4bit(cfg)
    assert experts.gate_proj is None and len(experts.packed["gate_proj"]) == 6
    assert list(experts.parameters()) == []
    dense = make_experts(dim=64, hidden=64)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dense, name).copy_(torch.stack([p.dequantize() for p in experts.packed[name]]))
    x = torch.randn(20, 64, requires_grad=True)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, requires_grad=True)
    got = grads(experts, dense, x, ids, weights)[:3]
    expected = grads(lambda *a: naive_experts(*a, dense), dense, x, ids, weights)[:3]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_4bit_experts_quantize_on_load_from_meta():
    """As in ``load_model(prepare=...)``: quantize_4bit on the meta device, the weights arrive later."""
    quant = quant_or_skip()
    with torch.device("meta"):
        experts = make_experts(dim=64, hidden=64)
    cfg = quant.Quant4bitConfig(compute_dtype=torch.float32)
    experts.quantize_4bit(cfg)
    source = make_experts(dim=64, hidden=64)
    for name, tensor in source.state_dict().items():
        experts.load_tensor(name, tensor)
    assert experts.gate_proj is None and experts.packed["down_proj"][0].shape == (64, 64)
    expected = quant.quantize_4bit(source.up_proj[2].detach(), cfg).dequantize()
    torch.testing.assert_close(experts.packed["up_proj"][2].dequantize(), expected, atol=0, rtol=0)


def adapted_experts(scaling=0.5, seed=0) -> RoutedExperts:
    """Experts with bf16-exact weights (so the kernel's packing is exact) and adapters whose B are random."""
    experts = make_experts()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(p.bfloat16().float())
    experts.requires_grad_(False)
    experts.add_lora(r=3, scaling=scaling)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapters in experts.lora.values():
            adapters.lora_B.copy_(torch.randn(adapters.lora_B.shape, generator=gen) * 0.2)
    return experts


def naive_adapted_experts(x, ids, weights, experts: RoutedExperts):
    """Float64 per (token, slot): ``g = W1 x + s B1 A1 x``, ``u = W3 x + s B3 A3 x``, ``h = silu(g) u``,
    ``o = W2 h + s B2 A2 h``, ``y_t = sum_j w_tj o_tj``."""
    def project(name, v, e):
        adapters = experts.lora[name]
        weight, a, b = (t[e].double() for t in (getattr(experts, name), adapters.lora_A, adapters.lora_B))
        return weight @ v + adapters.scaling * (b @ (a @ v))

    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(ids.shape[1]):
            e, xt = int(ids[t, j]), x[t].double()
            h = torch.nn.functional.silu(project("gate_proj", xt, e)) * project("up_proj", xt, e)
            y = y + weights[t, j].double() * project("down_proj", h, e)
        rows.append(y)
    return torch.stack(rows)


def adapter_grads(fn, experts, x, ids, weights):
    """Output and gradients wrt x, the routing weights and the six adapter tensors."""
    experts.zero_grad()
    x, ids, weights = kernel_inputs(x, ids, weights)
    out = fn(x, ids, weights)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [out.detach(), x.grad, weights.grad, *(p.grad.clone() for p in experts.lora.parameters())]


def test_expert_adapters_match_float64_per_pair_reference():
    """Torch backend with adapters on all three projections: output and gradients (x, routing weights, every
    lora_A / lora_B) against the float64 per-pair loop; the unused last expert's adapters get zero gradients."""
    experts = adapted_experts()
    x, ids, weights = routing_inputs()
    got = adapter_grads(experts, experts, x, ids, weights)
    expected = adapter_grads(lambda *a: naive_adapted_experts(*a, experts).float(), experts, x, ids, weights)
    for name, a, b in zip(["y", "x", "weights", *dict(experts.lora.named_parameters())], got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert all(g[-1].abs().sum() == 0 for g in got[3:])
    assert all(g.abs().sum() > 0 for g in got[3:])


def test_fresh_expert_adapters_leave_the_output_unchanged():
    """B = 0 at creation; A_e is U(-1/sqrt(in), 1/sqrt(in)) per expert, as nn.Linear's Kaiming init."""
    experts = make_experts()
    x, ids, weights = routing_inputs()
    expected = experts(x, ids, weights)
    experts.add_lora(r=4, scaling=2.0)
    assert torch.equal(experts(x, ids, weights), expected)
    gate = experts.lora["gate_proj"]
    assert gate.lora_A.shape == (6, 4, 16) and gate.lora_B.shape == (6, 12, 4)
    down = experts.lora["down_proj"]
    assert down.lora_A.shape == (6, 4, 12) and down.lora_B.shape == (6, 16, 4)
    assert 0 < gate.lora_A.abs().max() <= 1 / 16**0.5 and gate.lora_B.abs().max() == 0
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        experts.add_lora(r=4, scaling=2.0)


def test_expert_adapters_merge_unmerge_and_disable():
    experts = adapted_experts()
    base = copy.deepcopy(experts)
    base.lora = None
    x, ids, weights = (t.detach() for t in routing_inputs())
    adapted, plain = experts(x, ids, weights), base(x, ids, weights)
    experts.merge()
    torch.testing.assert_close(experts(x, ids, weights), adapted, atol=1e-5, rtol=1e-5)
    experts.adapter_enabled = False
    torch.testing.assert_close(experts(x, ids, weights), plain, atol=1e-5, rtol=1e-5)
    experts.unmerge()
    torch.testing.assert_close(experts(x, ids, weights), plain, atol=1e-6, rtol=0)  # unmerged up to rounding
    torch.testing.assert_close(experts.gate_proj, base.gate_proj, atol=1e-6, rtol=0)


def test_a_bf16_merge_sums_in_float32_and_merging_twice_is_merging_once():
    """bf16 experts: W <- bf16(float32(W) + s·B A), one rounding; a second merge() changes nothing."""
    experts = adapted_experts().to(torch.bfloat16)
    for adapters in experts.lora.values():
        adapters.float()
    before = {name: getattr(experts, name).clone() for name in ("gate_proj", "up_proj", "down_proj")}
    experts.merge()
    merged = {name: getattr(experts, name).clone() for name in before}
    for name, weight in before.items():
        assert torch.equal(merged[name], (weight.float() + experts.lora[name].delta_weight()).bfloat16()), name
    experts.merge()
    assert all(torch.equal(getattr(experts, name), merged[name]) for name in merged)


def test_expert_adapter_dropout_applies_in_training_on_the_torch_backend():
    """Dropout 0.5 on the adapters' input: two training forwards differ, eval forwards are equal."""
    experts = make_experts().requires_grad_(False)
    experts.add_lora(r=3, scaling=0.5, dropout=0.5)
    with torch.no_grad():
        for adapters in experts.lora.values():
            adapters.lora_B.normal_(std=0.5)
    x, ids, weights = (t.detach() for t in routing_inputs())
    with torch.no_grad():
        experts.train()
        assert not torch.equal(experts(x, ids, weights), experts(x, ids, weights))
        experts.eval()
        assert torch.equal(experts(x, ids, weights), experts(x, ids, weights))


def test_merged_then_disabled_experts_are_the_base_in_train_mode():
    """With dropout the adapters' update is random in train mode; merged, it entered the weights without dropout,
    so disabling takes it back out without dropout too: the base experts, exactly up to rounding."""
    experts = make_experts().requires_grad_(False)
    base = copy.deepcopy(experts)
    experts.add_lora(r=3, scaling=0.5, dropout=0.5)
    with torch.no_grad():
        for adapters in experts.lora.values():
            adapters.lora_B.normal_(std=0.5)
    x, ids, weights = (t.detach() for t in routing_inputs())
    experts.merge()
    experts.adapter_enabled = False
    experts.train()
    torch.testing.assert_close(experts(x, ids, weights), base(x, ids, weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["portable", "amx"])
def test_cpu_kernel_with_adapters_equals_torch_backend(monkeypatch, isa):
    """The kernel with adapters (delta before the SiLU, h returned, [dg | du] back) against the torch backend:
    output and gradients of x, the routing weights and every adapter tensor. Portable keeps fp32 activations
    (agreement to fp32 rounding); AMX rounds the kernel's activations to bf16 (2 % of the largest value)."""
    cpu_moe = cpu_kernel_or_skip()
    if isa not in cpu_moe.available_isas():
        pytest.skip(f"{isa} compiled but not runnable here; available: {cpu_moe.available_isas()}")
    monkeypatch.setenv("DPO_LLAMA_MOE_ISA", isa)
    experts = adapted_experts()
    kernel_experts = copy.deepcopy(experts)
    kernel_experts.set_backend("cpu_kernel")
    assert kernel_experts.gate_proj is None and kernel_experts.lora is not None
    routing = routing_inputs()
    expected = adapter_grads(experts, experts, *routing)
    got = adapter_grads(kernel_experts, kernel_experts, *routing)
    tol = 1e-4 if isa == "portable" else 2e-2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0)


def test_cpu_kernel_experts_refuse_merging():
    cpu_kernel_or_skip()
    experts = adapted_experts()
    experts.merge()
    with pytest.raises(RuntimeError, match="unmerge first"):
        experts.set_backend("cpu_kernel")
    experts.unmerge()
    experts.set_backend("cpu_kernel")
    with pytest.raises(ValueError, match="convert_lora_checkpoint"):
        experts.merge()


def test_gather_pairs_blocks_come_from_one_node_and_sum_their_gradients():
    """GatherPairs hands every expert its tokens' rows from one autograd node, whose backward adds each block's
    gradient into its tokens' rows in float32 (one per-expert slice or index_select instead would give every
    expert a zero-filled gradient of the size of x, 64 per layer at DeepSeek-V2-Lite's experts)."""
    from dpo_llama.models.moe import GatherPairs, PairGroups

    pairs = PairGroups(torch.tensor([[0, 2], [3, 0], [2, 3]]), 4)
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    blocks = GatherPairs.apply(x, pairs)
    assert [block[:, 0].tolist() for block in blocks] == [[0, 2], [0, 4], [2, 4]]
    assert len({block.grad_fn for block in blocks}) == 1
    sum(block.sum() * (expert + 1) for (expert, _), block in zip(pairs.spans(), blocks)).backward()
    # token 0: experts 0 and 2 (1 + 3), token 1: 3 and 0 (4 + 1), token 2: 2 and 3 (3 + 4)
    assert x.grad[:, 0].tolist() == [4, 5, 7]


def test_gather_and_scatter_pairs_pass_gradcheck():
    """GatherPairs and ScatterPairs' hand-written backwards against finite differences in float64, chained as
    the torch backend chains them (an expert's block times a per-expert matrix in between): 5 tokens, top-2 of
    4 experts, expert 1 unused; gradients for the token states, the routing weights and the matrices."""
    from dpo_llama.models.moe import GatherPairs, PairGroups, ScatterPairs

    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 2], [3, 0], [2, 3], [0, 3], [3, 2]])
    pairs = PairGroups(ids, 4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, topk_weights, mats = rand(5, 3), rand(5, 2), rand(4, 3, 3)

    def moe(x_, w_, m_):
        outs = [rows @ m_[e] for (e, _), rows in zip(pairs.spans(), GatherPairs.apply(x_, pairs))]
        return ScatterPairs.apply(w_.reshape(-1)[pairs.order], pairs, *outs)

    expected = sum(topk_weights[:, j, None] * torch.einsum("th,thi->ti", x, mats[ids[:, j]]) for j in range(2))
    torch.testing.assert_close(moe(x, topk_weights, mats), expected)
    assert torch.autograd.gradcheck(moe, (x, topk_weights, mats))


def test_a_float64_torch_backend_passes_gradcheck():
    """The whole torch backend in float64 (its routing weights too, not float32): finite differences agree for
    the token states and the routing weights, with a token routed twice to one expert."""
    torch.manual_seed(0)
    experts = make_experts(4, 6, 5).double()
    ids = torch.tensor([[0, 2], [3, 3], [2, 1]])
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: experts(x_, ids, w_), (x, weights))


def test_grouped_lora_allocates_its_per_pair_tensors_through_empty():
    """With ``empty`` given, GroupedLoRA takes its per-pair output (no scatter) and the per-pair input's
    gradient (no gather) from it, the two [pairs, ...] tensors, and computes the same as without it."""
    from dpo_llama.models.moe import GroupedLoRA, PairGroups

    gen = torch.Generator().manual_seed(0)
    pairs = PairGroups(torch.tensor([[0, 2], [3, 0], [2, 3]]), 4)
    weights = [torch.randn(4, 2, 5, generator=gen).requires_grad_(), torch.randn(4, 3, 2, generator=gen)]
    rows = torch.randn(6, 5, generator=gen).requires_grad_()
    made = []

    def empty(shape, dtype):
        made.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype)

    grads = []
    for alloc in (empty, None):
        out = GroupedLoRA.apply(rows, None, pairs, False, False, (2.0,), alloc, *weights)
        grads.append(torch.autograd.grad(out.square().sum(), (rows, weights[0])))
        grads[-1] = (out, *grads[-1])
    assert made == [(6, 3), (6, 5)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gather, scatter", [(False, False), (True, False), (False, True), (True, True)])
def test_grouped_lora_passes_gradcheck(gather, scatter):
    """GroupedLoRA's hand-written backward against finite differences in float64: two adapters sharing the
    rows with per-row scales, and one without; 5 tokens, top-2 of 4 experts (expert 1 unused); rows read from
    the tokens (gather) or one per pair, outputs summed per token (scatter) or one per pair."""
    from dpo_llama.models.moe import GroupedLoRA, PairGroups

    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 2], [3, 0], [2, 3], [0, 3], [3, 2]])
    pairs, dim, r = PairGroups(ids, 4), 5, 2
    assert pairs.counts == [3, 0, 3, 4]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, scale = rand(5 if gather else 10, dim), rand(10)
    weights = (rand(4, r, dim), rand(4, 3, r), rand(4, r + 1, dim), rand(4, 6, r + 1))

    def two(x_, c_, *w):
        return GroupedLoRA.apply(x_, c_, pairs, gather, scatter, (0.5, 2.0), None, *w)

    def one(x_, *w):
        return GroupedLoRA.apply(x_, None, pairs, gather, scatter, (1.5,), None, *w)

    assert two(x, scale, *weights).shape == (5 if scatter else 10, 9)
    assert torch.autograd.gradcheck(two, (x, scale, *weights))
    assert torch.autograd.gradcheck(one, (x, *weights[:2]))


def test_grouped_lora_takes_float32_row_scales_with_bf16_adapters_and_refuses_a_second_derivative():
    """A bf16 model (``model.to(torch.bfloat16)``) keeps its routing weights float32: the scales are applied in the
    adapters' dtype, forward and backward, as the float32 computation rounded to bf16. create_graph=True raises
    (the backward is hand-written)."""
    from dpo_llama.models.moe import GroupedLoRA, PairGroups

    gen = torch.Generator().manual_seed(0)
    pairs = PairGroups(torch.tensor([[0, 2], [3, 0], [2, 3]]), 4)
    x = torch.randn(3, 5, generator=gen, requires_grad=True)
    scale = torch.rand(6, generator=gen, requires_grad=True)
    weights = [torch.randn(4, 2, 5, generator=gen), torch.randn(4, 3, 2, generator=gen)]
    outputs = []
    for dtype in (torch.bfloat16, torch.float32):
        w = [t.to(dtype).requires_grad_() for t in weights]
        out = GroupedLoRA.apply(x, scale, pairs, True, True, (0.5,), None, *w)
        x_grad, scale_grad, a_grad = torch.autograd.grad(out.float().sum(), (x, scale, w[0]))
        outputs.append((out.float(), x_grad.float(), scale_grad, a_grad.float()))
    for bf16, fp32 in zip(*outputs):
        torch.testing.assert_close(bf16, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0)
    out = GroupedLoRA.apply(x, scale, pairs, True, True, (0.5,), None, *(t.requires_grad_() for t in weights))
    with pytest.raises(RuntimeError, match="GroupedLoRA has no second derivative"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (hybrid GPU + CPU path)")
def test_cpu_kernel_adapters_stay_on_the_cpu_for_cuda_inputs():
    """Hybrid: the hidden states on CUDA, the packed experts and their adapters in CPU RAM; the output and the
    gradients come back to their devices and equal an all-CPU run."""
    cpu_kernel_or_skip()
    experts = adapted_experts()
    experts.set_backend("cpu_kernel")
    routing = routing_inputs()
    expected = adapter_grads(experts, experts, *routing)
    got = adapter_grads(experts, experts, *(t.cuda() for t in routing))
    assert got[0].device.type == "cuda" and got[1].device.type == "cuda"
    assert all(p.device.type == "cpu" for p in experts.lora.parameters())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


def test_expert_adapter_dropout_in_both_backends():
    """lora_dropout: training steps run in both backends (masks drawn differently, see the module docstring);
    in eval mode dropout is off and the backends agree."""
    cpu_kernel_or_skip()
    experts = make_experts().requires_grad_(False)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(p.bfloat16().float())
    experts.add_lora(r=3, scaling=0.5, dropout=0.5)
    with torch.no_grad():
        for adapters in experts.lora.values():
            adapters.lora_B.normal_(0, 0.2)
    kernel_experts = copy.deepcopy(experts)
    kernel_experts.set_backend("cpu_kernel")
    routing = routing_inputs()
    for module in (experts, kernel_experts):
        module.train()
        grads = adapter_grads(module, module, *routing)
        assert all(torch.isfinite(g).all() for g in grads)
        module.eval()
    with torch.no_grad():
        inputs = [t.detach() for t in routing]
        torch.testing.assert_close(kernel_experts(*inputs), experts(*inputs), atol=2e-2, rtol=0)
