"""The DeepSeek MoE models against their oracles, plus their own invariants.

* DeepSeek-V2 (``deepseek_v2``: latent attention, YaRN): the oracle is Hugging Face ``DeepseekV2ForCausalLM``
  (transformers 5.23, random weights, ``save_pretrained``, converted with ``scripts/convert_hf_checkpoint.py``):
  logits to 1e-4 in fp32 and greedy generation.
* DeepSeek-MoE 16B (``deepseek``: multi-head attention): transformers has no class for it (its modeling code
  is remote code on the Hub), so the oracle is a straightforward per-token float64 reference written below
  from DeepSeek's ``modeling_deepseek.py``: rotate-half RoPE on the HF-layout q/k rows, one softmax per query,
  a per-token router that sorts scores in Python, one expert at a time. It checks the attention module, the
  MoE block, and a HF-layout checkpoint written here (``config.json`` as deepseek-moe-16b-base's, its real key
  names, rotate-half q/k, two shards splitting one layer's experts) after conversion.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from dpo_llama.models.checkpoint import load_model, read_params, save_model
from dpo_llama.models.convert_hf import unpermute_rotary
from dpo_llama.models.deepseek import (DeepseekArgs, DeepseekMoE, DeepseekTransformer, LatentCache,
                                       mla_softmax_scale, yarn_frequencies)
from dpo_llama.models.generation import generate
from dpo_llama.models.llama import Attention, rope_frequencies, rope_tables
from dpo_llama.models.moe import sequence_aux_loss
from dpo_llama.models.presets import get_preset
from dpo_llama.utils.logprobs import sequence_logps
from scripts.convert_hf_checkpoint import main as convert_hf
from tests.model_fixtures import (deepseek_moe_config, make_hf_deepseek_v2, random_deepseek_state,
                                  write_hf_deepseek)

# ----------------------------------------------------------------------------- DeepSeek-V2 against HF

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
V2_VARIANTS = {
    # q compression, YaRN with mscale != mscale_all_dim (cos/sin and softmax both rescaled), group-limited routing
    "q_lora_yarn_groups": dict(q_lora_rank=24, rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.707},
                               topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5),
    # DeepSeek-V2-Lite's layout: plain q_proj, YaRN with mscale == mscale_all_dim
    "plain_q_yarn": dict(q_lora_rank=None, rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "plain_q_no_scaling_tied": dict(q_lora_rank=None, rope_scaling=None, tie_word_embeddings=True, n_shared_experts=1),
    # rms_norm_eps far from 1e-6: the block norms use it, q_a_layernorm / kv_a_layernorm keep their default 1e-6
    "norm_eps_1e-2": dict(q_lora_rank=24, rms_norm_eps=1e-2),
}


@pytest.fixture(scope="module", params=list(V2_VARIANTS))
def hf_and_ours(request, tmp_path_factory):
    """A random HF DeepSeek-V2 model and the same weights converted to our format and loaded."""
    hf_dir, ours_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    hf_model = make_hf_deepseek_v2(hf_dir, **V2_VARIANTS[request.param])
    assert convert_hf(["--input", str(hf_dir), "--output", str(ours_dir)]) == 0
    return hf_model, load_model(ours_dir)


def test_v2_logits_match_hf(hf_and_ours):
    """48 positions, beyond YaRN's original 32, so the frequency interpolation matters."""
    hf_model, model = hf_and_ours
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        assert expected.abs().max() > 1
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


def test_v2_greedy_generate_matches_hf(hf_and_ours):
    hf_model, model = hf_and_ours
    prompt = [1, 17, 42, 99, 5]
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, max_new_tokens=20) == expected


# ----------------------------------------------------------------------------- per-token float64 reference

def ref_rmsnorm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean() + eps)


def ref_swiglu(x, sd, prefix):
    gate, up, down = (sd[f"{prefix}{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj"))
    return down @ (F.silu(gate @ x) * (up @ x))


def ref_rope_rotate_half(v, pos, theta):
    """HF layout: dims (i, i + d/2) rotate together by angle ``pos * theta^(-2i/d)``."""
    half = v.shape[0] // 2
    angle = pos * theta ** (-torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
    v1, v2 = v[:half], v[half:]
    return torch.cat([v1 * angle.cos() - v2 * angle.sin(), v2 * angle.cos() + v1 * angle.sin()])


def ref_attention(xs, sd, prefix, cfg):
    """Causal multi-head attention, one query position and one head at a time."""
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    theta = cfg["rope_theta"]
    q, k, v = ([(sd[f"{prefix}{n}_proj.weight"] @ x).view(heads, d) for x in xs] for n in "qkv")
    outputs = []
    for t in range(len(xs)):
        per_head = []
        for h in range(heads):
            query = ref_rope_rotate_half(q[t][h], t, theta)
            scores = torch.stack([ref_rope_rotate_half(k[s][h], s, theta) @ query for s in range(t + 1)]) / math.sqrt(d)
            probs = scores.softmax(0)
            per_head.append(sum(probs[s] * v[s][h] for s in range(t + 1)))
        outputs.append(sd[f"{prefix}o_proj.weight"] @ torch.cat(per_head))
    return outputs


def ref_route(scores, cfg):
    """``{expert: weight}`` of one token (see DeepSeek's MoEGate)."""
    s, k = scores.tolist(), cfg["num_experts_per_tok"]
    eligible = list(range(len(s)))
    if cfg.get("topk_method") == "group_limited_greedy":
        size = len(s) // cfg["n_group"]
        groups = sorted(range(cfg["n_group"]), key=lambda g: -max(s[g * size:(g + 1) * size]))[:cfg["topk_group"]]
        eligible = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(eligible, key=lambda e: -s[e])[:k]
    if cfg.get("norm_topk_prob") and k > 1:
        return {e: s[e] / sum(s[c] for c in chosen) for e in chosen}
    return {e: s[e] * cfg.get("routed_scaling_factor", 1.0) for e in chosen}


def ref_moe(x, sd, prefix, cfg):
    route = ref_route((sd[f"{prefix}gate.weight"] @ x).softmax(0), cfg)
    y = sum(w * ref_swiglu(x, sd, f"{prefix}experts.{e}.") for e, w in route.items())
    if cfg.get("n_shared_experts"):
        y = y + ref_swiglu(x, sd, f"{prefix}shared_experts.")
    return y


def ref_logits(sd, cfg, tokens):
    """Logits ``[T, vocab]`` of one sequence, from a HF-layout state dict, everything in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    eps = cfg["rms_norm_eps"]
    hs = [sd["model.embed_tokens.weight"][t] for t in tokens]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        normed = [ref_rmsnorm(h, sd[p + "input_layernorm.weight"], eps) for h in hs]
        attn = ref_attention(normed, sd, p + "self_attn.", cfg)
        hs = [h + a for h, a in zip(hs, attn)]
        moe = layer >= cfg["first_k_dense_replace"] and layer % cfg["moe_layer_freq"] == 0
        ffn = [ref_rmsnorm(h, sd[p + "post_attention_layernorm.weight"], eps) for h in hs]
        hs = [h + (ref_moe(x, sd, p + "mlp.", cfg) if moe else ref_swiglu(x, sd, p + "mlp.")) for h, x in zip(hs, ffn)]
    return torch.stack([sd["lm_head.weight"] @ ref_rmsnorm(h, sd["model.norm.weight"], eps) for h in hs])


# ----------------------------------------------------------------------------- DeepSeek-MoE ("deepseek")

def test_mha_attention_matches_per_token_reference():
    """LLaMA's Attention with q/k rows un-permuted (interleaved RoPE) equals rotate-half on the HF rows."""
    cfg = deepseek_moe_config()
    sd = {k: v for k, v in random_deepseek_state(cfg).items() if ".layers.0.self_attn." in k}
    args = DeepseekArgs(model_type="deepseek", dim=32, n_heads=4, n_routed_experts=8)
    attn = Attention(args)
    with torch.no_grad():
        for name in "qkvo":
            weight = sd[f"model.layers.0.self_attn.{name}_proj.weight"]
            getattr(attn, f"{name}_proj").weight.copy_(unpermute_rotary(weight, 4) if name in "qk" else weight)
        x = torch.randn(1, 10, 32)
        cos, sin = rope_tables(rope_frequencies(8, 10000.0, None), 10)
        got = attn(x, cos, sin, start_pos=0)[0]
    expected = ref_attention(list(x[0].double()), {k: v.double() for k, v in sd.items()},
                             "model.layers.0.self_attn.", cfg)
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=1e-5, rtol=0)


MOE_VARIANTS = {
    "greedy": {},
    "normalised": dict(norm_topk_prob=True),
    "scaled": dict(routed_scaling_factor=2.5),
    "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
}


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_block_matches_per_token_reference(variant):
    cfg = deepseek_moe_config(**MOE_VARIANTS[variant])
    sd = random_deepseek_state(cfg)
    args = DeepseekArgs(model_type="deepseek", dim=32, n_heads=4, moe_hidden_dim=16, n_routed_experts=8,
                        n_shared_experts=2, num_experts_per_tok=3, norm_topk_prob=cfg["norm_topk_prob"],
                        routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
                        topk_method=cfg.get("topk_method", "greedy"), n_group=cfg.get("n_group"),
                        topk_group=cfg.get("topk_group"))
    moe = DeepseekMoE(args).eval()
    p = "model.layers.1.mlp."
    with torch.no_grad():
        moe.gate.weight.copy_(sd[p + "gate.weight"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.experts, name).copy_(torch.stack([sd[f"{p}experts.{e}.{name}.weight"] for e in range(8)]))
            getattr(moe.shared_experts, name).weight.copy_(sd[f"{p}shared_experts.{name}.weight"])
        x = torch.randn(2, 7, 32)
        got, aux = moe(x)
    assert aux is None  # eval mode
    sd64 = {k: v.double() for k, v in sd.items()}
    expected = torch.stack([ref_moe(row, sd64, p, cfg) for row in x.double().view(-1, 32)]).view(2, 7, 32)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_converted_deepseek_checkpoint_matches_per_token_reference(tmp_path):
    """A HF-layout deepseek-moe checkpoint (bf16, two shards) converted by the script and loaded in fp32."""
    cfg = deepseek_moe_config()
    sd = {k: v.bfloat16().float() for k, v in random_deepseek_state(cfg).items()}
    write_hf_deepseek(tmp_path / "hf", cfg, sd)
    assert convert_hf(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"), "--dtype", "fp32"]) == 0
    model = load_model(tmp_path / "ours")
    assert model.args.model_type == "deepseek" and model.args.n_shared_experts == 2
    tokens = torch.randint(0, 120, (12,))
    with torch.no_grad():
        got = model(tokens[None])[0]
    torch.testing.assert_close(got.double(), ref_logits(sd, cfg, tokens.tolist()), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- invariants of both variants

TINY = ["tiny-deepseek", "tiny-deepseek-v2"]


def tiny_model(name: str, **overrides) -> DeepseekTransformer:
    return DeepseekTransformer(get_preset(name, **overrides)).eval()


def greedy_without_cache(model, prompt, steps):
    """Greedy decoding by a full forward over the whole sequence at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", TINY)
def test_cached_generation_equals_uncached(name):
    model = tiny_model(name)
    prompt = torch.randint(0, 512, (6,)).tolist()
    assert generate(model, prompt, max_new_tokens=12) == greedy_without_cache(model, prompt, 12)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    """Logits of a prompt fed at once, then token by token through the cache, equal one full forward."""
    model = tiny_model(name)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 20)
        prefix = model(tokens[:, :12], start_pos=0)
        steps = [model(tokens[:, i:i + 1], start_pos=i) for i in range(12, 16)]
        chunk = model(tokens[:, 16:], start_pos=16)
        model.clear_cache()
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5, rtol=0)


def test_mla_caches_the_compressed_latent():
    """DeepSeek-V2 caches kv_lora_rank + qk_rope_head_dim numbers per token (32 + 8 here), not full k/v."""
    model = tiny_model("tiny-deepseek-v2")
    model.setup_cache(1, 10)
    cache = model.layers[0].self_attn.kv_cache
    assert isinstance(cache, LatentCache)
    assert cache.latent.shape == (1, 10, 32) and cache.k_pe.shape == (1, 10, 8)


@pytest.mark.parametrize("name", TINY)
def test_activation_checkpointing_gives_same_gradients(name):
    """Including the balancing loss, which is computed inside the checkpointed blocks."""
    model = tiny_model(name, aux_loss_alpha=0.1).train()
    tokens = torch.randint(0, 512, (2, 16))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        loss = model(tokens).logsumexp(-1).mean() + model.aux_loss()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "layers.1.mlp.gate.weight" in plain
    for name_ in plain:
        torch.testing.assert_close(checkpointed[name_], plain[name_], atol=1e-6, rtol=1e-5)


def test_aux_loss_of_a_padded_row_equals_its_unpadded_loss():
    """With ``lengths``, a row's balancing loss does not depend on how much the batch padded it (DPO pads chosen
    and rejected rows to each other's length); the router stays float32 under bf16 autocast."""
    model = tiny_model("tiny-deepseek-v2", aux_loss_alpha=0.1).train()
    tokens = torch.randint(0, 512, (1, 9))
    model(tokens)
    alone = model.aux_loss()
    padded = torch.cat([tokens, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    model.forward_hidden(padded, lengths=torch.tensor([9]))
    torch.testing.assert_close(model.aux_loss(), alone)
    moe = model.moe_layers()[0]
    x = torch.randn(5, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = moe.route(x)[0]
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, moe.route(x)[0], atol=0, rtol=0)


def test_aux_loss_is_the_sum_over_moe_layers_of_the_latest_training_forward():
    model = tiny_model("tiny-deepseek-v2", n_layers=3, aux_loss_alpha=0.1).train()
    inputs = []
    for moe in model.moe_layers():
        moe.register_forward_hook(lambda module, args, out: inputs.append((module, args[0])))
    tokens = torch.randint(0, 512, (2, 9))
    model(tokens)
    assert len(inputs) == 2
    expected = 0
    for moe, x in inputs:
        scores, ids, _ = moe.route(x.reshape(-1, 64))
        expected = expected + sequence_aux_loss(scores.view(2, 9, -1), ids.view(2, 9, -1), 0.1)
    torch.testing.assert_close(model.aux_loss(), expected.mean())
    weights = torch.tensor([3.0, 5.0])
    torch.testing.assert_close(model.aux_loss(weights), 3.0 * expected[0] + 5.0 * expected[1])
    model.eval()
    model(tokens)
    assert model.aux_loss().item() == 0  # reset by the next forward; not computed in eval mode


def test_aux_loss_disabled_by_alpha_zero():
    model = tiny_model("tiny-deepseek", aux_loss_alpha=0.0).train()
    model(torch.randint(0, 512, (1, 5)))
    assert model.last_aux_losses == [] and model.aux_loss().item() == 0


def test_sequence_logps_trains_through_the_moe():
    """dpo_llama.utils.logprobs works unchanged; gradients reach the router and the experts."""
    model = tiny_model("tiny-deepseek-v2").train()
    tokens = torch.randint(0, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :4] = False
    sums, counts = sequence_logps(model, tokens, mask, chunk_size=4)
    expected = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)[:, 3:].sum(-1)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [6, 6]
    (sums.sum() + model.aux_loss()).backward()
    moe = model.moe_layers()[0]
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.experts.gate_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
def test_params_json_round_trip(name, tmp_path):
    model = tiny_model(name, tie_word_embeddings=True)
    save_model(model, tmp_path)
    assert read_params(tmp_path) == model.args
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(tokens), model(tokens))


def test_unknown_params_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        DeepseekArgs.from_dict({"model_type": "deepseek_v2", "bogus": 1})


@pytest.mark.parametrize("bad,match", [
    (dict(model_type="llama"), "model_type"),
    (dict(topk_method="group_limited_greedy"), "group_limited_greedy needs"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(experts_backend="cuda"), "experts_backend"),
    (dict(num_experts_per_tok=65), "num_experts_per_tok"),
    (dict(num_experts_per_tok=None), "num_experts_per_tok"),  # what DeepseekV2Config() writes by default
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "YaRN"),
    (dict(model_type="deepseek", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "only supported for deepseek_v2"),
    (dict(model_type="deepseek", dim=100, n_heads=3), "dim=100 must be a multiple of n_heads=3"),
    (dict(model_type="deepseek", n_heads=16, n_kv_heads=5), "n_heads=16 must be a multiple of n_kv_heads=5"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim=7 must be even \(rotary"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive integer"),
    (dict(n_routed_experts=0), "n_routed_experts=0 must be a positive integer"),
])
def test_invalid_args_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        DeepseekArgs(**bad)


def test_set_experts_backend(monkeypatch):
    model = tiny_model("tiny-deepseek")
    with pytest.raises(ValueError, match="unknown experts backend"):
        model.set_experts_backend("cuda")
    monkeypatch.setitem(sys.modules, "dpo_llama.models.cpu_moe", None)
    with pytest.warns(RuntimeWarning, match="needs dpo_llama.models.cpu_moe.*Falling back to experts_backend='torch'"):
        model.set_experts_backend("cpu_kernel")
    assert model.args.experts_backend == "torch"
    assert all(moe.experts.backend == "torch" for moe in model.moe_layers())


def test_params_json_leaves_out_the_experts_backend(tmp_path):
    """The backend is a run-time choice: the same weights give the same params.json whichever one ran."""
    model = tiny_model("tiny-deepseek-v2")
    save_model(model, tmp_path / "torch")
    model.args.experts_backend = "cpu_kernel"
    save_model(model, tmp_path / "kernel")
    assert (tmp_path / "torch" / "params.json").read_text() == (tmp_path / "kernel" / "params.json").read_text()
    assert "experts_backend" not in (tmp_path / "torch" / "params.json").read_text()
    assert read_params(tmp_path / "torch").experts_backend == "torch"
    old_params = {**model.args.to_dict(), "experts_backend": "cpu_kernel"}  # files written before this change
    assert DeepseekArgs.from_dict(old_params).experts_backend == "torch"  # chosen at run time, not by the file


def test_cpu_kernel_backend_runs_the_model():
    cpu_moe = pytest.importorskip("dpo_llama.models.cpu_moe")
    if not cpu_moe.kernel_available():
        pytest.skip("the C++ MoE kernel does not build on this machine")
    model = tiny_model("tiny-deepseek-v2")
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        expected = model(tokens)
        model.requires_grad_(False).set_experts_backend("cpu_kernel")
        got = model(tokens)
    assert model.moe_layers()[0].experts.backend == "cpu_kernel"
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)  # the kernel computes in bf16


def test_yarn_frequencies_hand_example():
    """d = 8, theta = 1e4, L = 64, s = 4: d(r) = 8 ln(64 / (2 pi r)) / (2 ln 1e4).

    d(32) = -0.50 -> lo = max(floor(-0.50), 0) = 0;  d(1) = 1.008 -> hi = ceil(1.008) = 2.
    Ramp over i = 0..3: (0, 0.5, 1, 1), so f' = f * (1, 0.5/4 + 0.5, 1/4, 1/4).
    Attention factor (mscale 1, mscale_all_dim 0.707): (0.1 ln 4 + 1) / (0.0707 ln 4 + 1) = 1.03699.
    """
    scaling = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}
    inv_freq, factor = yarn_frequencies(8, 10000.0, scaling)
    plain = rope_frequencies(8, 10000.0, None)
    torch.testing.assert_close(inv_freq / plain, torch.tensor([1, 0.625, 0.25, 0.25], dtype=torch.float32))
    assert factor == pytest.approx((0.1 * math.log(4) + 1) / (0.0707 * math.log(4) + 1))


def test_yarn_tables_equal_hf_far_into_the_context():
    """DeepSeek-V2-Lite's YaRN cos/sin (times the attention factor) at 16k positions against HF's
    DeepseekV2RotaryEmbedding: float32 angles as there (float64 ones differed by 6e-4)."""
    import transformers
    scaling = dict(get_preset("deepseek-v2-lite").rope_scaling)
    config = transformers.DeepseekV2Config(hidden_size=256, num_attention_heads=2, qk_rope_head_dim=64,
                                           qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=64, rope_theta=1e4,
                                           max_position_embeddings=163840, rope_scaling=dict(scaling))
    rotary = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2RotaryEmbedding(config)
    hf = rotary(torch.zeros(1), torch.arange(16384)[None])[0, :, :32]
    inv_freq, attention_factor = yarn_frequencies(64, 1e4, scaling)
    cos, sin = rope_tables(inv_freq, 16384)
    torch.testing.assert_close(attention_factor * cos, hf.real, atol=1e-4, rtol=0)
    torch.testing.assert_close(attention_factor * sin, hf.imag, atol=1e-4, rtol=0)


def test_yarn_ramp_of_deepseek_v2_lite():
    """d = 64, theta = 1e4, L = 4096, s = 40: d(32) = 64 ln(4096 / 64 pi) / (2 ln 1e4) = 10.47 -> lo = 10,
    d(1) = 22.53 -> hi = 23. Dimensions 0..10 keep f, 23..31 get f / 40, and dimension 11 is 1/13 of the way:
    f' / f = 1 - (1 - 1/40) / 13."""
    scaling = get_preset("deepseek-v2-lite").rope_scaling
    ratio = yarn_frequencies(64, 10000.0, scaling)[0] / rope_frequencies(64, 10000.0, None)
    assert ratio[:11].tolist() == [1.0] * 11 and ratio[23:].tolist() == pytest.approx([1 / 40] * 9)
    assert ratio[11].item() == pytest.approx(1 - (1 - 1 / 40) / 13)


def test_moe_layer_freq_picks_every_other_layer():
    """first_k_dense_replace = 1, moe_layer_freq = 2 (the reference code's rule): layers 2 and 4 of 5 are MoE."""
    args = get_preset("tiny-deepseek-v2", n_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    assert [args.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    assert len(DeepseekTransformer(args).moe_layers()) == 2


def test_mla_softmax_scale_of_deepseek_v2_lite():
    """1/sqrt(128 + 64) * (0.1 * 0.707 * ln 40 + 1)^2 = 0.07217 * 1.2608^2 = 0.11473."""
    scale = mla_softmax_scale(get_preset("deepseek-v2-lite"))
    assert scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


PUBLISHED_SIZES = {"deepseek-moe-16b": 16.4, "deepseek-v2-lite": 15.7}  # billions, from the model cards


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_have_published_sizes(name):
    with torch.device("meta"):
        model = DeepseekTransformer(get_preset(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED_SIZES[name], abs=0.05)


def test_chat_presets_share_the_base_shape():
    assert get_preset("deepseek-v2-lite-chat") == get_preset("deepseek-v2-lite")
    assert isinstance(get_preset("deepseek-moe-16b-chat"), DeepseekArgs)
