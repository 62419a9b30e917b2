"""4-bit layers against bitsandbytes, loading a checkpoint into 4-bit layer by layer, and QLoRA training on CPU."""

import copy
import weakref

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from torch import nn

from dpo_llama.models.checkpoint import load_model, save_model
from dpo_llama.models.llama import Transformer
from dpo_llama.models.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from dpo_llama.models.presets import get_preset
from dpo_llama.models.quant import Linear4bit, Packed4bit, Quant4bitConfig, quantize_4bit

FP32 = dict(compute_dtype=torch.float32)
QLORA = dict(lora_r=8, quant_4bit=True, quant_lora_4bit=True, quant_4bit_compute_dtype="fp32")
CONFIGS = [Quant4bitConfig(quant_type=t, blocksize=b, double_quant=d, **FP32)
           for t in ("nf4", "fp4") for b in (64, 128) for d in (False, True)]


def config_id(cfg: Quant4bitConfig) -> str:
    return f"{cfg.quant_type}-{cfg.blocksize}-{'dq' if cfg.double_quant else 'plain'}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_linear4bit_matches_bitsandbytes(cfg):
    """Our layer equals bitsandbytes' dequantize_4bit + matmul, and bnb.nn.Linear4bit, for the same weight."""
    linear = nn.Linear(256, 96, bias=True)
    layer = Linear4bit.from_linear(linear, cfg)
    x = torch.randn(2, 5, 256)
    data, state = bnb_functional.quantize_4bit(linear.weight.data, blocksize=cfg.blocksize,
                                               compress_statistics=cfg.double_quant, quant_type=cfg.quant_type)
    expected = x @ bnb_functional.dequantize_4bit(data, state).t() + linear.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)

    reference = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.float32, quant_type=cfg.quant_type,
                                  compress_statistics=cfg.double_quant, quant_storage=torch.uint8)
    reference.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=cfg.blocksize,
                                         compress_statistics=cfg.double_quant, quant_type=cfg.quant_type)
    reference.bias = nn.Parameter(linear.bias.data.clone())
    reference = reference.to("cpu").train()
    assert torch.equal(reference.weight.data, layer.packed.data)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=0)


def test_code_book_values_round_trip_exactly():
    """A block whose entries are 2 · c_k (c = the NF4 code book, max |c_k| = 1) has absmax m = 2, and
    w / m = c_k is its own nearest code, so ŵ = c_k · m = w exactly (no double quant: m stored in fp32)."""
    code = bnb_functional.get_4bit_type("nf4", device="cpu")
    weight = (2 * code).repeat(8).reshape(2, 64)
    packed = quantize_4bit(weight, Quant4bitConfig(double_quant=False, **FP32))
    assert torch.equal(packed.dequantize(), weight)
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == weight.numel() // 2


def test_packed_weight_reports_shape_dtype_and_compute_dtype():
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    packed = quantize_4bit(weight, Quant4bitConfig())
    assert packed.shape == (32, 64) and packed.dtype == torch.bfloat16
    assert packed.dequantize().dtype == torch.bfloat16
    assert Packed4bit(packed.data, packed.state, torch.float32).dequantize().dtype == torch.float32


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_the_one_the_layer_multiplies_with(weight_dtype, compute_dtype):
    """``dequantize()`` + ``F.linear`` equals the layer bit for bit, also for bf16 weights computed in fp32 (the
    product dequantizes straight into fp32; through bf16 it would round Ŵ to bf16 first). Merges rely on it."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False).to(weight_dtype)
    layer = Linear4bit.from_linear(linear, Quant4bitConfig(compute_dtype=compute_dtype))
    x = torch.randn(5, 128, dtype=compute_dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, layer.packed.dequantize()))


@pytest.mark.parametrize(("x_dtype", "compute_dtype"), [(torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32)])
def test_output_comes_back_in_the_inputs_dtype(x_dtype, compute_dtype):
    """The product runs in compute_dtype and returns x's dtype: Ŵ x computed in compute_dtype, then cast."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32, bias=False), Quant4bitConfig(compute_dtype=compute_dtype))
    x = torch.randn(3, 64, dtype=x_dtype)
    with torch.no_grad():
        y = layer(x)
        expected = nn.functional.linear(x.to(compute_dtype), layer.packed.dequantize()).to(x_dtype)
    assert y.dtype == x_dtype and torch.equal(y, expected)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_backward_multiplies_with_the_forwards_weight(weight_dtype, compute_dtype):
    """dL/dx is computed with the same Ŵ as the forward, bit for bit: for bf16 weights computed in fp32 too, which
    bitsandbytes' backward would otherwise dequantize through bf16."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 64, bias=False).to(weight_dtype),
                                   Quant4bitConfig(compute_dtype=compute_dtype))
    x = torch.randn(5, 128, dtype=compute_dtype, requires_grad=True)
    grad = torch.randn(5, 64, dtype=compute_dtype)
    layer(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    nn.functional.linear(x_ref, layer.packed.dequantize()).backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_gradient_flows_to_the_input_only():
    """dL/dx = dL/dy · Ŵ for y = x Ŵᵀ; the 4-bit weight is frozen and holds no Parameter."""
    layer = Linear4bit.from_linear(nn.Linear(64, 32, bias=False), Quant4bitConfig(**FP32))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.packed.dequantize().sum(0).expand(3, 64), atol=1e-5, rtol=0)
    assert list(layer.parameters()) == []


@pytest.fixture
def quantize_calls(monkeypatch):
    """Counts every call of bitsandbytes' quantize_4bit made through dpo_llama.models.quant."""
    import bitsandbytes.functional as bnb_functional

    calls = []
    original = bnb_functional.quantize_4bit

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(bnb_functional, "quantize_4bit", counting)
    return calls


def test_moving_or_casting_never_requantizes(quantize_calls):
    """``.half()`` casts parameters (here none: no bias) but never the packed data or its fp32 scales."""
    layer = Linear4bit.from_linear(nn.Linear(64, 32, bias=False), Quant4bitConfig(**FP32))
    assert len(quantize_calls) == 1
    data = layer.packed.data
    x = torch.randn(2, 64)
    before = layer(x)
    layer.to("cpu")
    layer.half().float()
    nn.Sequential(layer).to("cpu", torch.float32)
    assert len(quantize_calls) == 1 and layer.packed.data is data
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)


def test_packed_data_is_never_quantized_again(quantize_calls):
    """Re-loading the same weight quantizes the full-precision tensor again (same bytes); packed uint8 data
    is refused by the layer (its shape is [numel / 2, 1]) and by quantize_4bit itself."""
    weight = torch.randn(32, 64)
    layer = Linear4bit.from_linear(nn.Linear(64, 32, bias=False), Quant4bitConfig(**FP32))
    layer.load_tensor("weight", weight)
    first = layer.packed.data.clone()
    layer.load_tensor("weight", weight)
    assert torch.equal(layer.packed.data, first) and len(quantize_calls) == 3
    with pytest.raises(ValueError, match=r"shape mismatch for weight: got \(1024, 1\)"):
        layer.load_tensor("weight", first)
    with pytest.raises(ValueError, match="already-packed 4-bit data is never quantized again"):
        quantize_4bit(first.view(32, 32), layer.quant)
    assert len(quantize_calls) == 3


def test_moving_a_layer_moves_data_and_quant_state():
    """``.to(device)`` moves the packed bytes and every tensor of the QuantState (meta stands in for a GPU)."""
    layer = Linear4bit.from_linear(nn.Linear(128, 64), Quant4bitConfig(double_quant=True))
    layer.to("meta")
    state = layer.packed.state
    assert layer.packed.device.type == "meta" and layer.bias.is_meta
    assert {t.device.type for t in (state.absmax, state.code, state.offset, state.state2.absmax)} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layer_matches_cpu_layer():
    layer = Linear4bit.from_linear(nn.Linear(256, 128), Quant4bitConfig(**FP32))
    x = torch.randn(4, 256)
    expected = layer(x)
    torch.testing.assert_close(layer.to("cuda")(x.cuda()).cpu(), expected, atol=1e-4, rtol=0)


def tiny_checkpoint(tmp_path) -> Transformer:
    base = Transformer(get_preset("tiny")).eval()
    save_model(base, tmp_path)
    return base


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "quant", None) is not None]


def test_loading_into_4bit_keeps_no_full_precision_weight(tmp_path):
    tiny_checkpoint(tmp_path)
    model = load_model(tmp_path, prepare=lambda m: apply_lora(m, LoRAConfig(**QLORA)))
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7
    for layer in layers:
        assert layer.weight is None and layer.packed is not None
        assert all(p.numel() < layer.packed.shape.numel() for p in layer.parameters())
    full = {name for name, p in model.named_parameters() if not name.endswith(("lora_A", "lora_B"))}
    assert full == {"embed_tokens.weight", "norm.weight", "lm_head.weight",
                    *(f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm",
                                                                          "post_attention_layernorm"))}


def test_checkpoint_streams_into_4bit_one_weight_at_a_time(tmp_path, monkeypatch):
    """While a checkpoint loads, at most one full-precision weight of a 4-bit layer is alive: each is
    quantized on arrival and dropped before the next one is read (weak references tell which are alive)."""
    tiny_checkpoint(tmp_path)
    arrived, most_alive = [], []

    def instrument(cls):
        original = cls.load_tensor

        def load_tensor(self, name, tensor):
            if name == "weight":
                arrived.append(weakref.ref(tensor))
                most_alive.append(sum(ref() is not None for ref in arrived))
            original(self, name, tensor)
        monkeypatch.setattr(cls, "load_tensor", load_tensor)

    instrument(Linear4bit)
    instrument(LoRALinear)
    load_model(tmp_path, prepare=lambda m: apply_lora(m, LoRAConfig(**QLORA)))
    assert len(arrived) == 2 * 7 and max(most_alive) == 1
    assert all(ref() is None for ref in arrived)


def test_qlora_overfits_a_tiny_task_on_cpu(tmp_path):
    """4-bit frozen base + float32 adapters (every layer, the full-precision head too) learn to predict two
    fixed sequences: the cross-entropy falls from about ln(512) ≈ 6.2 to under a tenth of it in 50 AdamW
    steps, and the 4-bit data never changes."""
    tiny_checkpoint(tmp_path)
    cfg = LoRAConfig(**QLORA, lora_attn_key=True, lora_attn_proj=True, lora_mlp_gate=True, lora_mlp_up=True,
                     lora_mlp_down=True, lora_head=True)
    model = load_model(tmp_path, prepare=lambda m: apply_lora(m, cfg)).train()
    packed_before = [layer.packed.data.clone() for layer in quantized_layers(model)]
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(50):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert all(torch.equal(layer.packed.data, before)
               for layer, before in zip(quantized_layers(model), packed_before))


def test_4bit_lora_layer_equals_dequantized_base_plus_adapter():
    """y = x Ŵᵀ + s · B A x with Ŵ the 4-bit round trip of W."""
    linear = nn.Linear(64, 48, bias=False)
    qcfg = Quant4bitConfig(**FP32)
    layer = LoRALinear.from_linear(copy.deepcopy(linear), r=4, scaling=0.5, quant=qcfg)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    w_hat = quantize_4bit(linear.weight.data, qcfg).dequantize()
    expected = x @ w_hat.t() + 0.5 * x @ (layer.lora_B @ layer.lora_A).t()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot merge LoRA into a 4-bit base"):
        layer.merge()


def test_lm_head_lora_keeps_a_full_precision_base():
    model = apply_lora(Transformer(get_preset("tiny")), LoRAConfig(lora_head=True, **QLORA))
    assert model.lm_head.packed is None and model.lm_head.weight is not None
    assert all(layer.packed is not None for name, layer in lora_layers(model) if name != "lm_head")
