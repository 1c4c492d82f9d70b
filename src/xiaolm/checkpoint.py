"""Checkpoint folders: written whole under a temporary name, then renamed; and `load_model`, the one
way every command (training, inference, evaluation, export) loads a model.

Layout of `RUN/checkpoints/step_000100/`:
  model.safetensors   fp32 weights (a tied output projection is stored once, as the embedding)
  config.json         {"model": ModelConfig, "train": TrainConfig, ...}
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  training_state.pt   optimizer, step, RNG states, data position (absent in exported models)
  sharded/            instead of model.safetensors, in a run with --fsdp: weights and optimizer state as
                      torch.distributed.checkpoint shards (train/fsdp.py); `consolidate_checkpoint`
                      writes the plain folder
`RUN/checkpoints/latest` names the newest complete checkpoint; it is replaced atomically only
after the folder is complete, so a kill at any moment leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xiaolm.config import LoraConfig, ModelConfig, from_dict
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer, load_tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
SHARDED_DIR = "sharded"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as embed_tokens.weight
    return state


def write_model_folder(
    directory: Path,
    model: Transformer,
    tokenizer: XiaoTokenizer,
    configs: dict[str, Any],
    training_state: dict[str, Any] | None = None,
    sharded_weights: Path | None = None,
) -> None:
    """Write every file of a checkpoint into `directory` (which must not exist yet). With
    `sharded_weights` (a folder of DCP shards already written by every process) the weights are
    that folder, moved in, instead of model.safetensors."""
    directory.mkdir(parents=True)
    if sharded_weights is not None:
        os.replace(sharded_weights, directory / SHARDED_DIR)
    else:
        save_file(model_state_for_saving(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(configs, indent=2, ensure_ascii=False) + "\n")
    tokenizer.save(directory)
    if training_state is not None:
        torch.save(training_state, directory / STATE_FILE)
    for f in [*directory.iterdir(), *(directory / SHARDED_DIR).glob("*")]:
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def write_new_folder(out: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` creates and fills a sibling folder that is then renamed to `out`, which must not
    exist yet: an interrupted write leaves no half-written folder where a complete one is expected."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    tokenizer: XiaoTokenizer,
    configs: dict[str, Any],
    training_state: dict[str, Any],
    keep: int = 2,
    sharded_weights: Path | None = None,
) -> Path:
    """Save atomically as RUN/checkpoints/step_NNNNNN and point `latest` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_folder(tmp, model, tokenizer, configs, training_state, sharded_weights)
    final = root / name
    if final.exists():  # re-saving a step (after a resume): move the old one aside first
        trash = root / f".old-{name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    latest = (root / LATEST_FILE).read_text().strip()
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != latest:
            shutil.rmtree(old)
    for stale in [*root.glob(".tmp-*"), *root.glob(".shards-*")]:  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def has_weights(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() or (folder / SHARDED_DIR / ".metadata").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run folder, or a run's checkpoints folder."""
    path = Path(path)
    if has_weights(path):
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST_FILE
        if latest.is_file():
            candidate = root / latest.read_text().strip()
            if has_weights(candidate):
                return candidate
    raise ValueError(f"no checkpoint found at {path} (expected {MODEL_FILE} or checkpoints/{LATEST_FILE})")


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    try:
        return resolve_checkpoint(Path(run_dir) / "checkpoints")
    except ValueError:
        return None


def read_configs(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint}: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


@dataclass
class LoadedModel:
    """What `load_model` returns: the model (fp32, in eval mode, on the asked device), its config and
    tokenizer, everything its config.json holds, and the checkpoint folder it came from."""

    model: Transformer
    config: ModelConfig
    tokenizer: XiaoTokenizer
    configs: dict[str, Any]
    path: Path
    peft_model: Any = None
    """A LoRA checkpoint loaded with merge_lora=False: the peft wrapper around `model`, whose
    layers then hold the base weights and the adapters (model/lora.py)."""


def detect_format(path: str | Path) -> str:
    """What `path` holds: "xiaolm" (a checkpoint, run or checkpoints folder), "hf" (a transformers
    model folder: config.json with a model_type) or "gguf" (a .gguf file). New formats are recognised
    here."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{path}: a file; expected a checkpoint, run or transformers model folder or a .gguf file")
    config = path / CONFIG_FILE
    if config.is_file() and not (path / STATE_FILE).exists():
        try:
            fields = json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config}: not JSON ({error})") from error
        if "model_type" in fields and "model" not in fields:
            return "hf"
    return "xiaolm"


def load_model(path: str | Path, device: str | torch.device = "cpu", *, merge_lora: bool = True) -> LoadedModel:
    """Load a checkpoint folder, a run folder (its latest checkpoint), a transformers model folder
    (imported on the fly, interop/hf_import.py: `xiaolm export hf` output, Llama / Qwen2 / Qwen3) or a
    GGUF file (interop/gguf_import.py: llama, qwen2, qwen3).

    A LoRA checkpoint (config.json has a "lora" section) comes with its adapters merged into the
    weights, so every command takes one; `merge_lora=False` keeps them as separate layers.
    `device` is a torch device or a name `runtime.resolve_device` understands ("auto", "cuda:1").
    """
    from xiaolm.runtime import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    fmt = detect_format(path)
    if fmt in ("hf", "gguf"):
        if fmt == "hf":
            from xiaolm.interop.hf_import import load_hf as load_foreign
        else:
            from xiaolm.interop.gguf_import import load_gguf as load_foreign

        model, tokenizer, configs = load_foreign(path)
        return LoadedModel(model.to(device), model.config, tokenizer, configs, Path(path))
    checkpoint = resolve_checkpoint(path)
    configs = read_configs(checkpoint)
    if "model" not in configs:
        raise ValueError(f"{checkpoint / CONFIG_FILE}: no 'model' section; not a xiaolm checkpoint")
    config = from_dict(ModelConfig, configs["model"])
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > config.vocab_size:  # fewer is fine: imported embeddings are often padded
        raise ValueError(
            f"{checkpoint}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    model, peft_model = Transformer(config), None
    if "lora" in configs:
        from xiaolm.model.lora import apply_lora, merge_lora as merge

        peft_model = apply_lora(model, from_dict(LoraConfig, configs["lora"]))
        load_weights(model, checkpoint / MODEL_FILE)
        if merge_lora:
            # peft froze the base weights; merged, they are a plain model's weights again
            model, peft_model = merge(peft_model).requires_grad_(True), None
    else:
        load_weights(model, checkpoint / MODEL_FILE)
    model.to(device).eval()
    return LoadedModel(model, config, tokenizer, configs, checkpoint, peft_model)


def merge_lora_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the LoRA checkpoint at `path` as a plain checkpoint folder `out` with merged weights."""
    loaded = load_model(path)
    if "lora" not in loaded.configs:
        raise ValueError(f"{loaded.path} is not a LoRA checkpoint (its config.json has no 'lora' section)")
    configs = {k: v for k, v in loaded.configs.items() if k != "lora"}
    configs["merged_from"] = {"checkpoint": str(loaded.path), "lora": loaded.configs["lora"]}
    return write_new_folder(out, lambda folder: write_model_folder(folder, loaded.model, loaded.tokenizer, configs))


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the sharded (--fsdp) checkpoint at `path` as a plain checkpoint folder `out`: one
    model.safetensors, what chat, export and the other tools read anywhere."""
    loaded = load_model(path)
    if not (loaded.path / SHARDED_DIR).is_dir():
        raise ValueError(f"{loaded.path} is not a sharded checkpoint (no {SHARDED_DIR}/ folder)")
    configs = {**loaded.configs, "consolidated_from": str(loaded.path)}
    return write_new_folder(out, lambda folder: write_model_folder(folder, loaded.model, loaded.tokenizer, configs))


def load_weights(model: Transformer, file: Path) -> None:
    """Weights from a checkpoint's model.safetensors, or from its sharded/ folder (any number of
    processes wrote it; read here by this process alone)."""
    if file.name == MODEL_FILE and not file.is_file() and (file.parent / SHARDED_DIR).is_dir():
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}  # tied weights: one tensor under both names
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(file.parent / SHARDED_DIR), no_dist=not dist.is_initialized())
        model.load_state_dict(state["model"])
        return
    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    bad_missing = set(missing) - allowed_missing
    if bad_missing or unexpected:
        raise ValueError(
            f"{file}: weights do not fit the model config: missing {sorted(bad_missing)}, unexpected {sorted(unexpected)}"
        )


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
