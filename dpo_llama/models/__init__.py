"""Models of dpo_llama: ``load_model`` reads our checkpoint format, ``load_tokenizer`` a tokenizer file.

    from dpo_llama.models import load_model, load_tokenizer
    model = load_model("checkpoints/llama-2-7b", device="cuda", dtype=torch.bfloat16)
    tokenizer = load_tokenizer("checkpoints/llama-2-7b")
    logits = model(tokens)                          # [B, T, vocab], float
    hidden = model.forward_hidden(tokens)           # [B, T, dim], no output head
    logits_at = model.output_logits(hidden[:, -1])  # the head, only where needed
"""

from dpo_llama.models.checkpoint import load_model, save_checkpoint, save_model
from dpo_llama.models.generation import generate
from dpo_llama.models.llama import ModelArgs, Transformer
from dpo_llama.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ModelArgs", "Tokenizer", "Transformer", "generate", "load_model", "load_tokenizer", "save_checkpoint",
           "save_model"]
