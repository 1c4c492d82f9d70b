"""Hugging Face transformers -> xiaolm: a model folder of the Llama, Qwen2 or Qwen3 family (config.json,
*.safetensors, tokenizer.json + tokenizer_config.json, generation_config.json) as a xiaolm model,
with its tokenizer, the roles of its special tokens and its chat template.

Weights are streamed tensor by tensor (safetensors' `safe_open`) into a fp32 model, so loading
needs the model's fp32 size plus one tensor; writing a checkpoint (`import_hf`) adds one fp32 copy
while safetensors serialises it: about 2x the fp32 size at the peak.

Other formats plug in below the folder reading: `model_from_hf` takes a transformers config dict
and (name, tensor) pairs from anywhere (a GGUF file read through transformers, for one), and
`checkpoint.detect_format` is where a new format is recognised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from xiaolm.config import ModelConfig, to_dict
from xiaolm.interop.hf_config import config_from_hf, xiaolm_weight_name
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer, load_tokenizer


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: config.json is missing; not a transformers model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error


def _stop_ids(directory: Path, hf: dict[str, Any]) -> list[int]:
    """The model's end tokens: generation_config.json's eos_token_id (an id or a list), else config.json's."""
    path = directory / "generation_config.json"
    generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    ids = generation.get("eos_token_id", hf.get("eos_token_id"))
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def read_hf_tokenizer(directory: Path, hf: dict[str, Any]) -> XiaoTokenizer:
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: tokenizer.json is missing (a sentencepiece-only tokenizer.model is not "
                         "supported; transformers' AutoTokenizer.save_pretrained writes tokenizer.json)")
    return load_tokenizer(directory, stop_ids=_stop_ids(directory, hf))


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise ValueError(f"{directory}: no *.safetensors weights" + (f" (found {found}; only safetensors is read: "
                         "it cannot run code and streams tensor by tensor)" if found else ""))
    return files


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one tensor at a time, never a whole file in memory."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as error:  # truncated or corrupt files
            raise ValueError(f"{file}: cannot read safetensors ({error})") from error


@torch.no_grad()
def model_from_hf(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], source: str = "") -> Transformer:
    """A xiaolm model of `config` filled with `tensors` under transformers' Llama/Qwen names, each
    copied into place (as fp32) and dropped, so memory holds the model and one tensor."""
    model = Transformer(config)
    params = dict(model.named_parameters())  # a tied lm_head is the embedding: listed once
    filled: set[str] = set()
    for hf_name, tensor in tensors:
        name = xiaolm_weight_name(hf_name)
        if name is None or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # derived tables; a tied head saved twice
        if name not in params:
            raise ValueError(f"{source}: weight {hf_name!r} has no place in a {describe(config)} model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(tensor)  # converts to fp32 in place: no second copy of a large tensor
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"{source}: weights missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def describe(config: ModelConfig) -> str:
    return (f"{config.num_layers}-layer, hidden {config.hidden_size}, heads {config.num_heads}/{config.num_kv_heads}"
            f"x{config.head_dim}" + (", q/k/v bias" if config.qkv_bias else "") + (", QK-norm" if config.qk_norm else ""))


def load_hf(directory: str | Path) -> tuple[Transformer, XiaoTokenizer, dict[str, Any]]:
    """(model, tokenizer, configs) of a transformers folder; configs as a checkpoint's config.json holds
    them, with where the model came from under "imported_from"."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config, model_type = config_from_hf(hf)
    tokenizer = read_hf_tokenizer(directory, hf)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"{config.vocab_size} rows")
    model = model_from_hf(config, iter_safetensors(safetensors_files(directory)), str(directory))
    configs = {"model": to_dict(config), "imported_from": {"format": "hf", "path": str(directory.resolve()),
                                                         "model_type": model_type}}
    return model, tokenizer, configs


def import_hf(directory: str | Path, out: str | Path) -> Path:
    """Write the transformers folder `directory` as a xiaolm checkpoint folder `out`."""
    from xiaolm.checkpoint import write_model_folder, write_new_folder

    model, tokenizer, configs = load_hf(directory)
    return write_new_folder(out, lambda folder: write_model_folder(folder, model, tokenizer, configs))
