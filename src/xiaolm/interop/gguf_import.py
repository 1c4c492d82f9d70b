"""GGUF -> xiaolm: a llama.cpp file of the llama, qwen2 or qwen3 architecture as a xiaolm model, with
its tokenizer and chat template (`pip install 'xiaolm[gguf]'`).

transformers' GGUF loader does the work (`load_gguf_checkpoint`): it reads the metadata as a
transformers config, dequantises every tensor to fp32 (the `gguf` package's own numpy kernels),
undoes llama.cpp's q/k row order for llama files and names the tensors as transformers does; its
tokenizer converter rebuilds the byte-level BPE from the vocabulary, merges and token types. The
result feeds interop/hf_import.py's `model_from_hf`, as a transformers folder would. What is done
here by hand: refusing what xiaolm cannot read before anything is loaded (another architecture, a
quantisation type outside `QUANT_TYPES`, a truncated or corrupt file), the metadata transformers'
config leaves out (a qwen3 head width other than Qwen3's 128, RoPE scaling), and keeping memory at
the model's fp32 size twice at most (each dequantised tensor is dropped once copied).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from xiaolm.config import to_dict
from xiaolm.interop.gguf_export import require_gguf
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""llama.cpp architectures whose transformers counterpart xiaolm imports (interop/hf_config.py)."""
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
"""Tensor types read (dequantised to fp32); each is checked against the gguf package's kernels in
tests/test_gguf.py."""
MAGIC = b"GGUF"


def require_transformers_gguf():
    from xiaolm.interop.hf_export import require_transformers

    require_gguf()
    try:
        transformers = require_transformers()
        import accelerate  # noqa: F401  transformers' GGUF loading asks for it
    except (ImportError, ValueError) as error:
        raise ValueError("reading GGUF files needs transformers and accelerate: pip install 'xiaolm[gguf]'"
                         ) from error
    return transformers


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path`, after checking what xiaolm can read: the magic, the
    architecture, every tensor's type; a truncated or corrupt file is a ValueError naming it."""
    gguf = require_gguf()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as handle:
        if handle.read(4) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (it does not start with {MAGIC!r})")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the reader's errors for a cut or garbled file are of every kind
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(error).__name__}: {error})") from error
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: general.architecture is missing")
    architecture = field.contents()
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture={architecture!r} is not supported; xiaolm imports "
                         f"{', '.join(ARCHITECTURES)}")
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in QUANT_TYPES:
            raise ValueError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}; xiaolm reads "
                             f"{', '.join(QUANT_TYPES)}")
    return reader


def missing_config_fields(reader, architecture: str) -> dict[str, Any]:
    """config.json fields transformers' GGUF config does not fill in: the head width (qwen3's
    mapping ignores attention.key_length) and the RoPE scaling."""
    def value(key: str):
        field = reader.fields.get(f"{architecture}.{key}")
        return None if field is None else field.contents()

    fields: dict[str, Any] = {}
    if value("attention.key_length") is not None:
        fields["head_dim"] = int(value("attention.key_length"))
    scaling = value("rope.scaling.type")
    if scaling == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": float(value("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"{architecture}.rope.scaling.type={scaling!r} is not supported (linear is)")
    return fields


def read_gguf_tokenizer(path: Path, transformers) -> XiaoTokenizer:
    """The tokenizer transformers rebuilds from the file's metadata, saved and read back as an
    imported transformers tokenizer (roles, chat template: interop's tokenizer import)."""
    from xiaolm.tokenizer.bpe import load_tokenizer

    fast = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    stop_ids = [i for i in (fast.eos_token_id,) if i is not None]
    with tempfile.TemporaryDirectory() as folder:
        fast.save_pretrained(folder)
        return load_tokenizer(folder, stop_ids=stop_ids)


def load_gguf(path: str | Path) -> tuple[Transformer, XiaoTokenizer, dict[str, Any]]:
    """(model, tokenizer, configs) of a GGUF file; configs as a checkpoint's config.json holds them,
    with where the model came from under "imported_from"."""
    from xiaolm.interop.hf_config import config_from_hf
    from xiaolm.interop.hf_import import model_from_hf

    transformers = require_transformers_gguf()  # one clear line when an extra is missing, before any work
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    reader = open_gguf(path)
    architecture = reader.fields["general.architecture"].contents()
    try:
        extra = missing_config_fields(reader, architecture)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    del reader
    hf = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config, model_type = config_from_hf({**hf.to_dict(), **extra})
    tokenizer = read_gguf_tokenizer(path, transformers)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"{config.vocab_size} rows")
    with torch.device("meta"):  # names only: the loader maps GGUF names onto this model's
        skeleton = transformers.AutoModelForCausalLM.from_config(hf)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = model_from_hf(config, _drain(tensors), str(path))
    configs = {"model": to_dict(config), "imported_from": {"format": "gguf", "path": str(path.resolve()),
                                                         "architecture": architecture, "model_type": model_type}}
    return model, tokenizer, configs


def _drain(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, each removed from `tensors` as it is handed out, so memory holds the
    dequantised tensors not yet copied plus the model: twice the fp32 size at the most."""
    while tensors:
        yield tensors.popitem()


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """Write the GGUF file `path` as a xiaolm checkpoint folder `out`."""
    from xiaolm.checkpoint import write_model_folder, write_new_folder

    model, tokenizer, configs = load_gguf(path)
    return write_new_folder(out, lambda folder: write_model_folder(folder, model, tokenizer, configs))
