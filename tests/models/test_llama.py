"""The LLaMA model against Hugging Face ``LlamaForCausalLM`` (the oracle), plus its own invariants."""

import numpy as np
import pytest
import torch

from dpo_llama.models.checkpoint import load_model, read_params, save_model
from dpo_llama.models.generation import generate
from dpo_llama.models.llama import ModelArgs, Transformer, llama3_scale_frequencies, rope_frequencies, rope_tables
from dpo_llama.models.presets import get_preset, preset_names
from scripts.convert_hf_checkpoint import main as convert_hf
from tests.model_fixtures import make_hf_llama

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama31_rope": dict(num_key_value_heads=2, rope_scaling=LLAMA31_ROPE, rope_theta=500000.0),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_and_ours(request, tmp_path_factory):
    """A random HF model and the same weights converted to our format and loaded."""
    hf_dir = tmp_path_factory.mktemp("hf")
    ours_dir = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    hf_model = make_hf_llama(hf_dir, **VARIANTS[request.param])
    assert convert_hf(["--input", str(hf_dir), "--output", str(ours_dir)]) == 0
    return hf_model, load_model(ours_dir)


def test_logits_match_hf(hf_and_ours):
    hf_model, model = hf_and_ours
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_greedy_generate_matches_hf(hf_and_ours):
    hf_model, model = hf_and_ours
    prompt = [1, 17, 42, 99, 5]
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, max_new_tokens=20) == expected


def test_generate_stops_at_stop_id(hf_and_ours):
    _, model = hf_and_ours
    free_run = generate(model, [1, 2, 3], max_new_tokens=10)
    stop = free_run[3]
    first = free_run.index(stop)
    assert generate(model, [1, 2, 3], max_new_tokens=10, stop_ids=[stop]) == free_run[:first + 1]
    assert generate(model, np.array([1, 2, 3], dtype=np.int32), max_new_tokens=10) == free_run  # as datasets store


def tiny_model(**overrides) -> Transformer:
    return Transformer(get_preset("tiny", **overrides)).eval()


def test_kv_cache_decoding_equals_full_forward():
    """Logits of a prompt fed at once, then token by token through the cache, equal one full forward."""
    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 20)
        prefix = model(tokens[:, :12], start_pos=0)
        steps = [model(tokens[:, i:i + 1], start_pos=i) for i in range(12, 16)]
        chunk = model(tokens[:, 16:], start_pos=16)
        model.clear_cache()
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5, rtol=0)


def test_forward_hidden_then_head_equals_forward():
    model = tiny_model()
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        hidden = model.forward_hidden(tokens)
        assert hidden.shape == (2, 9, 64)
        torch.testing.assert_close(model.output_logits(hidden[:, 3]), model(tokens)[:, 3])


def test_activation_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    tokens = torch.randint(0, 512, (2, 16))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(tokens).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_params_json_round_trip(tmp_path):
    model = tiny_model(rope_scaling=dict(LLAMA31_ROPE), tie_word_embeddings=True)
    save_model(model, tmp_path)
    assert read_params(tmp_path) == model.args
    loaded = load_model(tmp_path)
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_unknown_params_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        ModelArgs.from_dict({"dim": 64, "n_layers": 1, "n_heads": 4, "bogus": 1})


@pytest.mark.parametrize("bad,message", [
    (dict(dim=100, n_heads=3), r"dim=100 must be a multiple of n_heads=3 \(or head_dim given\)"),
    (dict(dim=96, n_heads=32), r"head_dim=3 must be a positive even integer \(rotary embeddings"),
    (dict(dim=64, n_heads=4, head_dim=9), "head_dim=9 must be a positive even integer"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(dim=64, n_heads=4, n_kv_heads=0), "n_heads=4 must be a multiple of n_kv_heads=0"),
    (dict(dim=0), "dim=0 must be a positive integer"),
    (dict(n_layers=-1), "n_layers=-1 must be a positive integer"),
    (dict(vocab_size=32000.0), "vocab_size=32000.0 must be a positive integer"),
])
def test_a_head_layout_the_model_cannot_build_is_refused(bad, message):
    """The error names the fields, where before a reshape deep in the model failed (or, for an odd head width,
    rotary embeddings went silently wrong)."""
    with pytest.raises(ValueError, match=message):
        ModelArgs(**bad)


def test_an_explicit_head_dim_frees_dim_from_the_head_count():
    args = ModelArgs(dim=96, n_heads=3, n_kv_heads=1, head_dim=16)
    assert (args.n_kv_heads, args.head_dim) == (1, 16)


def test_llama31_scaling_bands():
    """High frequencies are kept, low ones divided by the factor, the band between interpolated.

    With L = 32, low = 1, high = 4: wavelengths below 8 keep f, above 32 get f / 8.
    """
    inv_freq = torch.tensor([2 * torch.pi / 4, 2 * torch.pi / 64, 2 * torch.pi / 16], dtype=torch.float64)
    scaled = llama3_scale_frequencies(inv_freq, LLAMA31_ROPE)
    smooth = (32 / 16 - 1) / (4 - 1)
    expected = [inv_freq[0], inv_freq[1] / 8, (1 - smooth) * inv_freq[2] / 8 + smooth * inv_freq[2]]
    torch.testing.assert_close(scaled, torch.stack(expected))


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        rope_frequencies(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


PUBLISHED_SIZES = {  # parameters in billions, from the model cards
    "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "llama-3-8b": 8.03, "llama-3.1-70b": 70.55,
    "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "tinyllama-1.1b": 1.10,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_have_published_sizes(name):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED_SIZES[name], abs=0.01)


def test_every_preset_builds_and_unknown_is_refused():
    for name in preset_names():
        get_preset(name)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("llama-9")


def test_swiglu_matches_autograd_bitwise_and_keeps_two_tensors():
    """swiglu = silu(g) * u with the same forward and gradients as autograd's (bitwise, bf16), while the backward
    keeps only g and u (autograd also keeps silu(g)); float64 gradients against finite differences."""
    import torch.nn.functional as F

    from dpo_llama.models.llama import swiglu

    gen = torch.Generator().manual_seed(0)
    g, u, grad = (torch.randn(7, 33, generator=gen).bfloat16() for _ in range(3))
    results = []
    for fn in (swiglu, lambda a, b: F.silu(a) * b):
        a, b = g.clone().requires_grad_(), u.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            h = fn(a, b)
        h.backward(grad)
        results.append((h, a.grad, b.grad, len(saved)))
    for ours, reference in zip(results[0][:3], results[1][:3]):
        assert torch.equal(ours, reference)
    assert (results[0][3], results[1][3]) == (2, 3)
    g64, u64 = (torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (g64, u64))
    with torch.no_grad():
        assert torch.equal(swiglu(g, u), F.silu(g) * u)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32)])
def test_rmsnorm_function_matches_autograd_and_keeps_x_in_its_dtype(x_dtype, w_dtype):
    """RMSNormFunction = w.to(x.dtype) * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype): bitwise the
    same output (in x's dtype, also beside a float32 trained weight) and gradients as autograd on those operations,
    keeping x and r only (no float32 copy of a bf16 x); float64 gradients against finite differences."""
    from dpo_llama.models.llama import RMSNormFunction

    def reference(x, w, eps):
        x32 = x.float()
        return w.to(x.dtype) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, 64, generator=gen)).to(x_dtype)
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(w_dtype)
    results = []
    for fn in (RMSNormFunction.apply, reference):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(*leaves, 1e-5)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        results.append((y, leaves[0].grad, leaves[1].grad, {(t.dtype, t.numel()) for t in saved}))
    (y, gx, gw, saved), (y_ref, gx_ref, gw_ref, saved_ref) = results
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    assert y.dtype == x_dtype and gw.dtype == w_dtype
    assert (torch.float32, x.numel()) not in saved or x_dtype == torch.float32
    assert x_dtype == torch.float32 or (torch.float32, x.numel()) in saved_ref
    x64, w64 = torch.randn(3, 7, dtype=torch.float64).requires_grad_(), torch.randn(7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x64, w64.requires_grad_()))


@pytest.mark.parametrize("start_pos, t", [(0, 6), (4, 2), (5, 1)])
def test_causal_attention_with_a_smaller_value_head_matches_softmax_reference(start_pos, t):
    """causal_attention with D_v < D (DeepSeek MLA: v zero-padded for SDPA's fused kernels, output cut back):
    output and gradients equal explicit softmax(q kᵀ s + causal mask) v in float64, for a full prefix, queries
    after a cache and one decode step; in bf16 it keeps no [B, H, T, S] attention matrix for the backward."""
    from dpo_llama.models.llama import causal_attention

    gen = torch.Generator().manual_seed(0)
    s = start_pos + t
    q, k = torch.randn(1, 2, t, 12, generator=gen, dtype=torch.float64), torch.randn(1, 2, s, 12, generator=gen,
                                                                                      dtype=torch.float64)
    v, grad = torch.randn(1, 2, s, 8, generator=gen, dtype=torch.float64), torch.randn(1, 2, t, 8, generator=gen,
                                                                                      dtype=torch.float64)

    def reference(q_, k_, v_):
        mask = torch.arange(s)[None, :] <= torch.arange(start_pos, s)[:, None]
        scores = (q_ @ k_.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v_

    results = []
    for fn in (lambda *a: causal_attention(*a, start_pos, scale=0.3), reference):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        results.append((out, *(x.grad for x in leaves)))
    assert results[0][0].shape == (1, 2, t, 8)
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected)
    if t > 1:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
            causal_attention(*(x.bfloat16().requires_grad_() for x in (q, k, v)), start_pos, scale=0.3)
        assert (1, 2, t, s) not in saved


def test_hand_written_backwards_refuse_create_graph():
    """RMSNorm's and LoRA's backwards read r = rsqrt(mean x^2) and t = x A^T computed without a graph: a gradient
    penalty through them would silently miss terms, so create_graph=True raises instead."""
    from dpo_llama.models.llama import RMSNormFunction
    from dpo_llama.models.lora import LoRAUpdate

    x = torch.randn(3, 8, requires_grad=True)
    for name, y in (("RMSNorm", RMSNormFunction.apply(x, torch.ones(8), 1e-6)),
                    ("LoRA", LoRAUpdate.apply(x, torch.randn(2, 8), torch.randn(4, 2), 0.5))):
        with pytest.raises(RuntimeError, match=f"{name} has no second derivative"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (grad,) = torch.autograd.grad(y.pow(2).sum(), x)  # first order: unchanged
        assert grad.shape == x.shape


@pytest.mark.parametrize("scaling", [None, LLAMA31_ROPE], ids=["plain", "llama31"])
def test_rope_tables_equal_hf_far_into_the_context(scaling):
    """cos/sin at 16k positions equal HF's LlamaRotaryEmbedding (float32 angles, as the models were trained with;
    float64 angles would differ by up to about 1e-3 there)."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0,
                                      max_position_embeddings=16384, rope_scaling=scaling and dict(scaling))
    positions = torch.arange(16384)[None]
    hf_cos, hf_sin = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)(
        torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_tables(rope_frequencies(64, 500000.0, scaling), 16384)
    torch.testing.assert_close(cos, hf_cos[0, :, :32], atol=2e-7, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, :32], atol=2e-7, rtol=0)
