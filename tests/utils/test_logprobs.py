"""Scored-position log-probs against a direct full-logits computation."""

import pytest
import torch

from dpo_llama.models.llama import Transformer
from dpo_llama.models.presets import get_preset
from dpo_llama.utils.logprobs import sequence_logps, token_logps


def reference_logps(model, tokens, mask):
    """Sum over scored t of log_softmax(logits[t-1])[x_t], from the full [B, T, vocab] logits."""
    logp = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


@pytest.fixture
def model():
    return Transformer(get_preset("tiny")).eval()


def test_sequence_logps_equal_full_logits_reference(model):
    tokens = torch.randint(0, 512, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 1:3] = True
    mask[2, 11] = True
    with torch.no_grad():
        sums, counts = sequence_logps(model, tokens, mask, chunk_size=4)
        torch.testing.assert_close(sums, reference_logps(model, tokens, mask), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [7, 2, 1]


def test_first_response_token_is_scored(model):
    """A mask with one True at position p scores exactly log p(x_p | x_<p)."""
    tokens = torch.randint(0, 512, (1, 6))
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 3] = True
    with torch.no_grad():
        sums, _ = sequence_logps(model, tokens, mask)
        expected = model(tokens[:, :3])[0, -1].log_softmax(-1)[tokens[0, 3]]
    torch.testing.assert_close(sums[0], expected, atol=1e-5, rtol=0)


def test_gradients_through_checkpointed_chunks_match(model):
    tokens = torch.randint(0, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    model.train()
    sequence_logps(model, tokens, mask, chunk_size=3)[0].sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_logps(model, tokens, mask).sum().backward()
    for name, grad in chunked.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4)


def test_token_logps_handles_empty_input(model):
    out = token_logps(model.output_logits, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_position_zero_cannot_be_scored(model):
    with pytest.raises(ValueError, match="position"):
        sequence_logps(model, torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


def test_chunk_logits_are_recomputed_when_only_the_head_trains():
    """LoRA on lm_head alone: the hidden states need no gradient but the head does. Each chunk's [chunk, vocab]
    logits must still be recomputed in the backward instead of kept (all chunks together are [tokens, vocab]):
    nothing that large is saved for the backward, and the gradient equals the unchunked one."""
    torch.manual_seed(0)
    head, hidden, targets = torch.nn.Linear(16, 512), torch.randn(12, 16), torch.randint(0, 512, (12,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logps = token_logps(head, hidden, targets, chunk_size=4)
    assert max(saved) < 4 * 512
    logps.sum().backward()
    chunked = head.weight.grad.clone()
    head.zero_grad()
    head(hidden).log_softmax(-1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(chunked, head.weight.grad, atol=1e-5, rtol=1e-5)
