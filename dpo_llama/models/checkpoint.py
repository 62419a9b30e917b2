"""Our checkpoint format, and loading a model from it.

A checkpoint directory holds:

* ``params.json`` — the model's args dataclass as JSON, including ``"model_type"`` (``"llama"``, ``"deepseek"``
  or ``"deepseek_v2"``), which selects the model class;
* ``model.safetensors`` — all weights, or ``model-0000i-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {key: file}}``) when large;
* the tokenizer file(s) copied beside the weights (``tokenizer.model``, or ``tokenizer.json`` +
  ``tokenizer_config.json``).

Weight keys are the module paths of our model classes (e.g. ``layers.0.self_attn.q_proj.weight``).
Loading streams tensors one at a time from the safetensors files into a model built on the meta device, so
no second full copy of the weights is ever held; modules may intercept their own tensors (4-bit layers
quantize them on arrival) through a ``load_tensor(name, tensor)`` method.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LORA_CONFIG_FILE = "lora_config.json"  # an adapter directory's settings (see lora.py)
SHARD_GLOB = "model-*-of-*.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SHARD_BYTES = 4 * 1024**3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16" | "fp16" | "fp32"`` -> torch dtype; ``None`` or ``"keep"`` -> None (keep the stored dtype)."""
    if name in (None, "keep"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from keep, {', '.join(DTYPES)}")
    return DTYPES[name]


def model_classes(model_type: str) -> tuple[type, type]:
    """Returns ``(ArgsClass, ModelClass)`` for a ``params.json`` ``model_type``."""
    if model_type == "llama":
        from dpo_llama.models.llama import ModelArgs, Transformer
        return ModelArgs, Transformer
    if model_type in ("deepseek", "deepseek_v2"):
        from dpo_llama.models.deepseek import DeepseekArgs, DeepseekTransformer
        return DeepseekArgs, DeepseekTransformer
    raise ValueError(f"unsupported model_type {model_type!r} (supported: 'llama', 'deepseek', 'deepseek_v2')")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file ``path``; a ``ValueError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


class JsonObject(dict):
    """A JSON object read from a file: looking up a key it lacks raises a one-line ``ValueError`` naming the file
    and the key (a ``KeyError`` would print as the bare quoted key)."""

    def __init__(self, path: str | os.PathLike, content: dict[str, Any]):
        super().__init__(content)
        self.path = path

    def __missing__(self, key: str) -> Any:
        raise ValueError(f'{self.path} lacks the required key "{key}"')


def read_json_object(path: str | os.PathLike) -> JsonObject:
    """``read_json`` for a file that holds a JSON object, as a ``JsonObject`` (missing keys name the file)."""
    return JsonObject(path, read_json(path))


@contextmanager
def errors_name(path: str | os.PathLike) -> Iterator[None]:
    """Runs the body so that a ``ValueError`` it raises starts with ``path``, the file whose content caused it
    (``error: <dir>/params.json: dim=100 must be a multiple of n_heads=3``)."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {err}") from err


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Calls ``write(tmp_path)``, flushes the temporary file to disk and renames it to ``path``; a write that
    fails or is interrupted leaves ``path`` as it was and no temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_params(ckpt_dir: str | os.PathLike):
    """Reads ``params.json`` of a checkpoint directory into the matching args dataclass.

    Raises:
        FileNotFoundError: No such directory; a LoRA adapter or a LoRA run's checkpoints where a model was
            expected (with how to use it); or a directory without ``params.json``.
    """
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / PARAMS_FILE
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"model checkpoint directory not found: {ckpt_dir}")
    if not path.is_file():
        if (ckpt_dir / LORA_CONFIG_FILE).is_file() or any(ckpt_dir.glob(f"step-*/{LORA_CONFIG_FILE}")):
            raise FileNotFoundError(f"{ckpt_dir} holds a LoRA adapter, not a model: merge it onto its base with "
                                    "scripts/convert_lora_checkpoint.py, or pass it as an adapter (--lora, "
                                    "--init-lora-dir)")
        raise FileNotFoundError(f"{path} not found: is {ckpt_dir} a dpo_llama checkpoint directory?")
    params = read_json(path)
    with errors_name(path):
        args_cls, _ = model_classes(params.get("model_type", "llama"))
        return args_cls.from_dict(params)


def weight_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / INDEX_FILE).is_file():
        weight_map = read_json(ckpt_dir / INDEX_FILE)["weight_map"]
        return [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        return [ckpt_dir / WEIGHTS_FILE]
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {ckpt_dir}")


def open_safetensors(path: Path) -> safe_open:
    """``safe_open(path)`` for torch tensors.

    Raises:
        ValueError: the file is not readable safetensors (a truncated file, say: its header is checked here).
    """
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(key, tensor)`` pairs one tensor at a time from safetensors files.

    Raises:
        ValueError: a file is not readable safetensors (truncated, say), or a key is stored in two of the files
            (which copy would win is not defined).
    """
    seen: dict[str, str] = {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key in seen:
                    raise ValueError(f"weight {key!r} is stored in both {seen[key]} and {path.name}")
                seen[key] = path.name
                yield key, f.get_tensor(key)


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor, device: str | torch.device = "cpu") -> None:
    """Puts ``tensor`` at ``key`` in ``model`` on ``device``, letting the owning module intercept it via
    ``load_tensor`` (and choose another device through a ``load_device`` attribute)."""
    module_path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise ValueError(f"unexpected key {key!r}: the model has no module {module_path!r}") from None
    if hasattr(module, "load_tensor"):
        module.load_tensor(name, tensor.to(getattr(module, "load_device", None) or device))
        return
    old = module._parameters.get(name)
    if old is None:
        raise ValueError(f"unexpected key {key!r}: {type(module).__name__} has no parameter {name!r}")
    if old.shape != tensor.shape:
        raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(old.shape)}")
    module._parameters[name] = nn.Parameter(tensor.to(device), requires_grad=old.requires_grad)


def missing_keys(model: nn.Module) -> list[str]:
    """Names of parameters still on the meta device (never loaded)."""
    return [name for name, p in model.named_parameters() if p.is_meta]


def load_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Loads a model from one of our checkpoint directories.

    Args:
        ckpt_dir: Directory with ``params.json`` and safetensors weights.
        device: Where the weights go.
        dtype: Floating-point dtype to cast weights to; ``None`` keeps the stored dtype.
        prepare: Called on the (meta-device) model before any weight arrives, e.g. to swap ``nn.Linear``
            layers for LoRA or 4-bit layers, which then receive their weights through ``load_tensor``.

    Returns:
        The model in eval mode. ``model(tokens)`` gives float logits ``[B, T, vocab]``;
        ``model.forward_hidden(tokens)`` the final hidden states and ``model.output_logits(h)`` the head.
    """
    args = read_params(ckpt_dir)
    _, model_cls = model_classes(args.model_type)
    with torch.device("meta"):
        model = model_cls(args)
    if prepare is not None:
        prepare(model)
    for key, tensor in iter_safetensors(weight_files(ckpt_dir)):
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        assign_tensor(model, key, tensor, device)
    missing = missing_keys(model)
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.init_rope(device)
    return model.eval()


class ShardedWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes``, holding one shard in memory.

    Shards are written under temporary names; ``close()`` renames them to ``model-0000i-of-0000N.safetensors``
    and writes the index (or a single ``model.safetensors`` when one shard suffices). Weight files of an earlier
    checkpoint in the same directory are removed, the index first: ``weight_files`` prefers an index, so a stale
    one would load the old weights in place of a new single file.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self.num_params = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queues one tensor, flushing the current shard first if it would overflow."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size
        self.num_params += tensor.numel()

    def flush(self) -> None:
        """Writes the pending tensors as the next temporary shard."""
        if not self.pending:
            return
        self.shards.append(list(self.pending))  # first, so that abort() also removes a shard cut short
        save_file(self.pending, str(self._tmp_name(len(self.shards) - 1)), metadata={"format": "pt"})
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, index: int) -> Path:
        return self.out_dir / f".shard-{index:05d}.safetensors.tmp"

    def abort(self) -> None:
        """Deletes the temporary shards written so far."""
        for i in range(len(self.shards)):
            self._tmp_name(i).unlink(missing_ok=True)

    def close(self) -> list[Path]:
        """Finalises file names and the index, removes stale weight files; returns the files written."""
        self.flush()
        stale = {self.out_dir / WEIGHTS_FILE, *self.out_dir.glob(SHARD_GLOB)}
        (self.out_dir / INDEX_FILE).unlink(missing_ok=True)
        files = self._finalise()
        for path in stale - set(files):
            path.unlink(missing_ok=True)
        return files

    def _finalise(self) -> list[Path]:
        if len(self.shards) == 1:
            final = self.out_dir / WEIGHTS_FILE
            os.replace(self._tmp_name(0), final)
            return [final]
        count, weight_map, files = len(self.shards), {}, []
        for i, keys in enumerate(self.shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._tmp_name(i), final)
            weight_map.update(dict.fromkeys(keys, final.name))
            files.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return files + [self.out_dir / INDEX_FILE]


def expected_shapes(args) -> dict[str, torch.Size]:
    """Key -> shape of every weight of the model described by ``args`` (built on the meta device, no memory)."""
    _, model_cls = model_classes(args.model_type)
    with torch.device("meta"):
        return {key: value.shape for key, value in model_cls(args).state_dict().items()}


def checked_tensors(args, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes ``(key, tensor)`` pairs through, refusing unknown keys, wrong shapes and (at the end) missing keys."""
    expected = expected_shapes(args)
    for key, tensor in tensors:
        if key not in expected:
            raise ValueError(f"unexpected weight {key!r} for a {args.model_type} model with these params")
        if tensor.shape != expected[key]:
            raise ValueError(f"shape mismatch for {key}: got {tuple(tensor.shape)}, "
                             f"params imply {tuple(expected[key])}")
        del expected[key]
        yield key, tensor
    if expected:
        raise ValueError(f"{len(expected)} weights missing, e.g. {sorted(expected)[:5]}")


def save_checkpoint(out_dir: str | os.PathLike, args, tensors: Iterable[tuple[str, torch.Tensor]],
                    tokenizer_files: Sequence[str | os.PathLike] = (),
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Writes a checkpoint directory from a stream of ``(key, tensor)`` pairs (:func:`write_model_dir`, with
    ``params.json`` as its description).

    Every key and shape is checked against the model ``args`` describe before anything is finalised.

    Returns:
        A summary dict: ``num_params``, ``bytes``, ``dtypes`` and ``files`` written.
    """
    params = json.dumps(args.to_dict(), indent=2)
    return write_model_dir(out_dir, checked_tensors(args, tensors), tokenizer_files, PARAMS_FILE, lambda _: params,
                           max_shard_bytes)


def write_model_dir(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                    tokenizer_files: Sequence[str | os.PathLike], description: str,
                    description_text: Callable[[set[str]], str], max_shard_bytes: int) -> dict:
    """Writes the weights (sharded), the tokenizer files, then the JSON file ``description`` (``params.json``,
    HF's ``config.json``) holding ``description_text(dtypes of the tensors written)``.

    On an error the temporary shard files are removed and nothing is left half-written. ``description`` is
    removed before the new weights replace old ones and written last, so a write interrupted in between reads as
    no model, never as new weights under an old description or beside an old tokenizer. The directory keeps only
    the tokenizer files given (none when ``tokenizer_files`` is empty).

    Returns:
        A summary dict: ``num_params``, ``bytes``, ``dtypes`` and ``files`` written.

    Raises:
        FileNotFoundError: A tokenizer file does not exist (checked before anything is written).
    """
    out_dir = Path(out_dir)
    missing = [str(path) for path in tokenizer_files if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer file(s) not found: {', '.join(missing)}")
    writer = ShardedWriter(out_dir, max_shard_bytes)
    dtypes = set()
    try:
        for key, tensor in tensors:
            writer.add(key, tensor)
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
        (out_dir / description).unlink(missing_ok=True)
        files = writer.close()  # inside: writing the last (often the only) shard can be interrupted too
    except BaseException:
        writer.abort()
        raise
    files += copy_tokenizer(tokenizer_files, out_dir)
    text = description_text(dtypes)
    write_atomically(out_dir / description, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    files.append(out_dir / description)
    return {"num_params": writer.num_params, "bytes": writer.total_bytes, "dtypes": sorted(dtypes),
            "files": [str(f) for f in files]}


def copy_tokenizer(tokenizer_files: Sequence[str | os.PathLike], out_dir: Path) -> list[Path]:
    """Copies the tokenizer files into ``out_dir`` and removes the other ``TOKENIZER_FILES`` there (another model's
    tokenizer must not pass for this one's); returns the copies."""
    copied = {Path(f).name for f in tokenizer_files}
    for name in set(TOKENIZER_FILES) - copied:
        (out_dir / name).unlink(missing_ok=True)
    return [Path(shutil.copy2(f, out_dir / Path(f).name)) for f in tokenizer_files]


def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer_files: Sequence[str | os.PathLike] = (),
               dtype: torch.dtype | None = None) -> dict:
    """Saves a plain (un-adapted) model in our format, optionally casting floating weights to ``dtype``."""
    def tensors():
        for key, value in model.state_dict().items():
            yield key, value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return save_checkpoint(out_dir, model.args, tensors(), tokenizer_files)


def files_sha256(paths: Sequence[str | os.PathLike], chunk_bytes: int = 16 * 1024**2) -> str:
    """SHA-256 over the names and contents of ``paths`` in order (streamed, constant memory)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike, chunk_bytes: int = 16 * 1024**2) -> str:
    """SHA-256 over ``params.json`` and every weight file of a checkpoint (streamed, constant memory)."""
    return files_sha256([Path(ckpt_dir) / PARAMS_FILE, *weight_files(ckpt_dir)], chunk_bytes)


def format_summary(summary: dict) -> str:
    """Human-readable summary of ``save_checkpoint``'s result."""
    lines = [f"parameters: {summary['num_params']:,} ({summary['bytes'] / 1024**2:,.1f} MiB, "
             f"dtype {', '.join(summary['dtypes'])})", "files written:"]
    lines += [f"  {f}" for f in summary["files"]]
    return "\n".join(lines)
