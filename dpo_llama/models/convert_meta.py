"""Meta's original checkpoints (``consolidated.NN.pth`` + ``params.json``) -> our format.

Meta ships one ``consolidated.NN.pth`` per model-parallel rank. Each weight is either replicated (norms) or
split along one dimension: column-parallel layers (``wq, wk, wv, w1, w3, output``) along dim 0,
row-parallel layers (``wo, w2``) along dim 1, and the embedding along dim 1 (LLaMA-2) or dim 0 (LLaMA-3).
Rather than hard-coding that table, ``merge_shards`` compares each shard's piece with the full shape the
params imply and concatenates along the one dimension that differs.

The shards are opened with ``torch.load(mmap=True)``: their bytes stay in the page cache and only the
tensor being merged (plus one output shard) is in memory, so a 7B converts well within 24 GiB.
Meta's weights already use the interleaved rotary layout our model uses: no permutation is needed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpo_llama.models.checkpoint import errors_name, expected_shapes, read_json_object
from dpo_llama.models.llama import ModelArgs
from dpo_llama.models.presets import LLAMA31_SCALING

META_TO_OURS = {
    "tok_embeddings": "embed_tokens", "output": "lm_head", "norm": "norm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
IGNORED_KEYS = ("rope.freqs",)
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta computes it: ``round_up(m * int(2 * 4d / 3), multiple_of)``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def shard_files(meta_dir: str | Path) -> list[Path]:
    """``consolidated.00.pth``, ``consolidated.01.pth``, ... in rank order; a gap in the numbering (a missing
    shard) is a ``FileNotFoundError`` naming the missing files."""
    files = {int(match.group(1)): path for path in Path(meta_dir).glob("consolidated.*.pth")
             if (match := SHARD_NAME.fullmatch(path.name))}
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth in {meta_dir}")
    missing = [f"consolidated.{rank:02d}.pth" for rank in range(max(files)) if rank not in files]
    if missing:
        raise FileNotFoundError(f"{meta_dir} lacks shard(s) {', '.join(missing)}: the shards must be numbered "
                                f"00 to {max(files):02d} without gaps")
    return [files[rank] for rank in sorted(files)]


def meta_args(params: dict[str, Any], vocab_size: int, max_seq_len: int | None = None) -> ModelArgs:
    """Maps Meta's ``params.json`` to ``ModelArgs``.

    ``vocab_size`` comes from the embedding (LLaMA-2 writes -1). ``use_scaled_rope`` selects LLaMA-3.1 scaling
    with ``rope_scaling_factor`` (default 8, the factor Meta's reference code applies to every scaled-rope model).
    Hugging Face's LLaMA-3.2 1B / 3B configs use factor 32 while Meta's ``params.json`` names none: add
    ``"rope_scaling_factor": 32.0`` to it, or convert the Hugging Face checkpoint, to match them.
    ``max_seq_len`` defaults to 4096 (rope_theta 1e4), 8192 (LLaMA-3) or 131072 (scaled rope).
    """
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown keys in Meta params.json: {unknown}")
    theta = float(params.get("rope_theta", 10000.0))
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = {**LLAMA31_SCALING, "factor": float(params.get("rope_scaling_factor", 8.0))}
    default_len = 131072 if scaling else (8192 if theta > 10000.0 else 4096)
    return ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
        hidden_dim=meta_hidden_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=default_len if max_seq_len is None else max_seq_len)


def our_key(meta_key: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``layers.3.self_attn.q_proj.weight``."""
    match = re.fullmatch(r"(layers\.\d+\.)?(.+)\.weight", meta_key)
    if match is None or match.group(2) not in META_TO_OURS:
        raise ValueError(f"unknown key {meta_key!r} in Meta checkpoint")
    return f"{match.group(1) or ''}{META_TO_OURS[match.group(2)]}.weight"


def merge_shards(pieces: list[torch.Tensor], shape: torch.Size, key: str) -> torch.Tensor:
    """Concatenates model-parallel pieces along the dimension where they are smaller than ``shape``; a weight
    every shard holds whole (the norms) must be the same in all of them. Pieces that add up to less than ``shape``
    are refused as a likely missing shard."""
    if pieces[0].shape == shape:
        if any(not torch.equal(piece, pieces[0]) for piece in pieces[1:]):
            raise ValueError(f"{key}: the shards hold different full-size copies of {tuple(shape)}")
        return pieces[0]
    split_dims = [d for d in range(len(shape)) if pieces[0].shape[d] != shape[d]]
    if len(split_dims) != 1:
        raise ValueError(f"shape mismatch for {key}: shard piece {tuple(pieces[0].shape)} vs full {tuple(shape)}")
    merged = torch.cat(pieces, dim=split_dims[0])
    if merged.shape[split_dims[0]] < shape[split_dims[0]]:
        raise ValueError(f"shape mismatch for {key}: the {len(pieces)} shard(s) found merge to {tuple(merged.shape)}, "
                         f"params.json implies {tuple(shape)}: is a consolidated.NN.pth shard missing?")
    if merged.shape != shape:
        raise ValueError(f"shape mismatch for {key}: merged {tuple(merged.shape)} vs params {tuple(shape)}")
    return merged


def load_meta(meta_dir: str | Path, max_seq_len: int | None = None) -> tuple[ModelArgs, list[dict]]:
    """Reads ``params.json`` and memory-maps every shard."""
    params_path = Path(meta_dir) / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: not a Meta checkpoint directory")
    shards = [load_shard(path) for path in shard_files(meta_dir)]
    params = read_json_object(params_path)
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:
        vocab_size = embedding_rows([shard["tok_embeddings.weight"] for shard in shards], params["dim"])
    with errors_name(params_path):
        return meta_args(params, vocab_size, max_seq_len), shards


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-maps one ``consolidated.NN.pth`` (tensors only, ``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None


def embedding_rows(pieces: list[torch.Tensor], dim: int) -> int:
    """The vocabulary size from the shards' embedding pieces: LLaMA-2 splits the embedding along its columns
    (every piece has all the rows), LLaMA-3 along its rows (the pieces' rows add up)."""
    if len(pieces) > 1 and pieces[0].shape[1] == dim:
        return sum(piece.shape[0] for piece in pieces)
    return pieces[0].shape[0]


def meta_tensors(args: ModelArgs, shards: list[dict],
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams our ``(key, tensor)`` pairs, merging the model-parallel pieces of one weight at a time."""
    shapes = expected_shapes(args)
    for meta_key in shards[0]:
        if meta_key in IGNORED_KEYS:
            continue
        key = our_key(meta_key)
        if key not in shapes:
            raise ValueError(f"unexpected weight {meta_key!r} for these params")
        tensor = merge_shards([shard[meta_key] for shard in shards], shapes[key], meta_key)
        yield key, tensor.to(dtype) if dtype is not None else tensor
