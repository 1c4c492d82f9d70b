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
  checksums.json      size and sha256 of every other file, recorded when the folder is written
`RUN/checkpoints/latest` names the newest complete checkpoint; it is replaced atomically only
after the folder is complete, so a kill at any moment leaves the last good checkpoint in place.
Every load verifies the checksums (`verify_checkpoint`): a truncated or modified file is an error
naming it, and `--resume` falls back to the newest checkpoint that verifies (`find_resume_point`).
`training_state.pt` is read with `torch.load(weights_only=True)`: a checkpoint from someone else
cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xiaolm.config import LoraConfig, ModelConfig, from_dict
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer, load_tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
CHECKSUMS_FILE = "checksums.json"
LATEST_FILE = "latest"
SHARDED_DIR = "sharded"
STEP_FOLDER = re.compile(r"step_(\d+)")
# what torch.load(weights_only=True) must be allowed to rebuild in a training state: numpy's random
# state holds an array (python's is a tuple, torch's a tensor: allowed anyway); numpy 1 and 2 name
# the array constructor differently
_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
STATE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                 (_reconstruct, "numpy.core.multiarray._reconstruct"),
                 (_reconstruct, "numpy._core.multiarray._reconstruct")]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, unreadable or changed since it was written."""


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
    """Write every file of a checkpoint into `directory` (which must not exist yet), checksums last.
    With `sharded_weights` (a folder of DCP shards already written by every process) the weights
    are that folder, moved in, instead of model.safetensors."""
    directory.mkdir(parents=True)
    if sharded_weights is not None:
        os.replace(sharded_weights, directory / SHARDED_DIR)
    else:
        save_file(model_state_for_saving(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(configs, indent=2, ensure_ascii=False) + "\n")
    tokenizer.save(directory)
    if training_state is not None:
        torch.save(training_state, directory / STATE_FILE)
    write_checksums(directory)
    for f in [*directory.iterdir(), *(directory / SHARDED_DIR).glob("*")]:
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def write_new_folder(out: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` creates and fills a sibling folder that is then renamed to `out`, which must not
    exist yet: an interrupted write leaves no half-written folder where a complete one is expected.
    The folder's checksums are recorded before the rename, so loading it later verifies it."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        if not (tmp / CHECKSUMS_FILE).is_file():  # write_model_folder records them itself
            write_checksums(tmp)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- checksums


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path, new_files_only: bool = False) -> None:
    """Record the size and sha256 of every file under `directory` in checksums.json (replaced
    atomically); `new_files_only`: keep what it lists and add the files it does not list yet."""
    path = directory / CHECKSUMS_FILE
    files = _read_checksums(path) if new_files_only and path.is_file() else {}
    for file in sorted(directory.rglob("*")):
        name = str(file.relative_to(directory))
        if file.is_file() and CHECKSUMS_FILE not in file.name and name not in files:
            files[name] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
    tmp = path.with_name(f".{CHECKSUMS_FILE}.tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": dict(sorted(files.items()))}, indent=1) + "\n")
    os.replace(tmp, path)


def _read_checksums(path: Path) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values()):
            raise TypeError("an entry lacks its size or sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); the checkpoint is damaged") from None
    return files


def verify_checkpoint(directory: str | Path) -> bool:
    """Check every file checksums.json lists: present, of the recorded size and sha256. Returns
    False for a folder without checksums.json (written before xiaolm recorded them, or by another
    tool); raises CheckpointError naming the first file that does not match."""
    directory = Path(directory)
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        return False
    for name, expected in _read_checksums(path).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {CHECKSUMS_FILE}); the checkpoint is "
                                  "incomplete")
        size = file.stat().st_size
        if size != expected["size"]:
            state = "truncated or changed" if size < expected["size"] else "changed"
            raise CheckpointError(f"{file}: {state} ({size:,} bytes; {expected['size']:,} were written)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 differs from the one recorded when it "
                                  "was written): the file was changed or damaged")
    return True


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def check_checkpoint(directory: Path) -> None:
    """verify_checkpoint, with a note for a xiaolm checkpoint written before checksums existed."""
    if not verify_checkpoint(directory) and (directory / CONFIG_FILE).is_file():
        _note(f"{directory} has no {CHECKSUMS_FILE} (written before xiaolm recorded checksums): "
              "loading it unverified")


# --------------------------------------------------------------------------- run checkpoints


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
    """Save atomically as RUN/checkpoints/step_NNNNNN and point `latest` at it. A write that fails
    (full disk, read-only folder) leaves nothing behind and raises a CheckpointWriteError saying
    how much space a checkpoint needs and which checkpoint is still the last good one."""
    root = Path(run_dir) / "checkpoints"
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write_model_folder(tmp, model, tokenizer, configs, training_state, sharded_weights)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, SafetensorError):  # safetensors reports the OS error in its message
            code = re.search(r"os error (\d+)", str(error))
            error = OSError(int(code.group(1)) if code else None, str(error))
        num_bytes = _checkpoint_bytes(model, tokenizer, training_state)
        raise CheckpointWriteError(error, root, name, num_bytes) from None
    final = root / name
    if final.exists():  # re-saving a step (after a resume): move the old one aside first
        trash = root / f".old-{name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(root)
    point_latest_at(final)
    prune_checkpoints(root, keep)
    return final


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written; the message names the last good checkpoint."""

    def __init__(self, error: OSError, root: Path, name: str, num_bytes: int) -> None:
        latest = root / LATEST_FILE
        last = root / latest.read_text().strip() if latest.is_file() else None
        kept = (f"the last good checkpoint, {last}, is intact" if last
                else "no checkpoint of this run was written yet")
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = shutil.disk_usage(root).free if root.is_dir() else 0
            reason = (f"no space left on the disk: a checkpoint needs about {num_bytes / 2**20:,.1f} MiB and "
                      f"{free / 2**20:,.1f} MiB are free")
        else:
            reason = f"{error.strerror or error} ({error.filename or root})"
        super().__init__(f"cannot write checkpoint {name} in {root}: {reason}; {kept}")


def _checkpoint_bytes(model: Transformer, tokenizer: XiaoTokenizer, training_state: Any) -> int:
    """What a checkpoint of this model and training state takes on disk, about."""

    def tensor_bytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    weights = sum(t.numel() * 4 for t in model_state_for_saving(model).values())
    return weights + tensor_bytes(training_state) + 2 * len(tokenizer.tokenizer.to_str())


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def point_latest_at(checkpoint: Path) -> None:
    """Atomically make `checkpoints/latest` name `checkpoint`."""
    root = checkpoint.parent
    latest_tmp = root / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(checkpoint.name + "\n")
    os.replace(latest_tmp, root / LATEST_FILE)
    _fsync_dir(root)


def prune_checkpoints(root: Path, keep: int) -> None:
    latest = (root / LATEST_FILE).read_text().strip()
    steps = step_folders(root)[::-1]  # oldest first
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != latest:
            shutil.rmtree(old)
    for stale in [*root.glob(".tmp-*"), *root.glob(".shards-*")]:  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint's weights: model.safetensors, or --fsdp's sharded/."""
    return (folder / MODEL_FILE).is_file() or (folder / SHARDED_DIR / ".metadata").is_file()


def step_folders(root: Path) -> list[Path]:
    """The step_NNNNNN folders under `root`, newest step first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether a run folder holds checkpoints (usable or not)."""
    root = Path(run_dir) / "checkpoints"
    return (root / LATEST_FILE).is_file() or bool(root.is_dir() and step_folders(root))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file missing, a checksum mismatch), or None."""
    missing = [name for name in (CONFIG_FILE, STATE_FILE) if not (checkpoint / name).is_file()]
    if not has_weights(checkpoint):
        missing.insert(0, MODEL_FILE)
    if missing:
        return f"incomplete: {', '.join(missing)} missing"
    try:
        verify_checkpoint(checkpoint)
    except CheckpointError as error:
        return str(error)
    return None


@dataclass
class ResumePoint:
    """Where a run starts: `checkpoint` (None: from scratch), the unusable checkpoint folders found
    on the way, and notes saying what was found and why this checkpoint was chosen."""

    checkpoint: Path | None
    unusable: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.checkpoint.name[len("step_"):]) if self.checkpoint is not None else 0


def find_resume_point(run_dir: str | Path, resume: bool, max_steps: int | None = None) -> ResumePoint:
    """Where a run in `run_dir` starts, changing nothing on disk (so it can be checked before any work).

    Without `resume`, a folder that holds checkpoints is refused. With it, the run continues from
    the newest complete checkpoint whose checksums verify, whatever `latest` says (a kill between a
    folder's rename and the update of `latest` leaves a newer complete folder); a folder without
    checkpoints is a fresh start; one whose checkpoints are all unusable is refused, naming them, and
    so is a `max_steps` below the chosen checkpoint's step (a run cannot go back)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if not has_checkpoints(run_dir):
        fresh = [f"no checkpoint in {run_dir}: starting a fresh run"] if resume else []
        return ResumePoint(None, notes=fresh)
    latest_file = root / LATEST_FILE
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if not resume:
        raise ValueError(f"{run_dir} already holds checkpoints ({latest or 'no latest'}); pass --resume to "
                         "continue it or choose another --out-dir")
    point, problems = ResumePoint(None), []
    for folder in step_folders(root):
        problem = checkpoint_problem(folder)
        if problem is None:
            point.checkpoint = folder
            break
        point.unusable.append(folder)
        problems.append(f"{folder.name} ({problem})")
    chosen = point.checkpoint
    if chosen is None:
        raise ValueError(
            f"cannot resume {run_dir}: none of its checkpoints is usable (latest names "
            f"{latest or 'nothing'}; found: {'; '.join(problems) or 'no step folder'}); move the run folder "
            "away or choose another --out-dir to start a new run"
        )
    point.notes += [f"skipped {problem}" for problem in problems]
    if latest is None:
        point.notes.append(f"{latest_file} is missing")
    elif latest != chosen.name and not (root / latest).exists():
        point.notes.append(f"{latest_file} names {latest}, which does not exist")
    elif latest != chosen.name and STEP_FOLDER.fullmatch(latest) and int(latest[5:]) < point.step:
        point.notes.append(f"{chosen.name} is complete but {latest_file} still named {latest}: the run was "
                           "stopped between the two")
    if not verify_checkpoint(chosen):
        point.notes.append(f"{chosen} has no {CHECKSUMS_FILE} (written before xiaolm recorded checksums): "
                           "unverified")
    if max_steps is not None and max_steps < point.step:
        raise ValueError(f"--max-steps {max_steps} is below step {point.step} of {chosen}: a resumed run "
                         "cannot go back; pass a larger --max-steps, or another --out-dir for a new run")
    return point


def settle_resume_point(point: ResumePoint) -> None:
    """Make the disk agree with `point`: unusable checkpoint folders are renamed
    `.unusable-step_NNNNNN` (kept for inspection, out of the way of later saves and pruning) and
    `latest` names the checkpoint the run continues from."""
    for folder in point.unusable:
        kept = folder.with_name(f".unusable-{folder.name}")
        shutil.rmtree(kept, ignore_errors=True)
        folder.rename(kept)
        point.notes.append(f"{folder.name} is kept as {kept}")
    latest = point.checkpoint.parent / LATEST_FILE
    if not latest.is_file() or latest.read_text().strip() != point.checkpoint.name:
        point_latest_at(point.checkpoint)


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
            others = ", ".join(p.name for p in step_folders(root) if has_weights(p)) or "none"
            raise ValueError(f"{latest} names {candidate.name}, which is missing or incomplete; "
                             f"complete checkpoints in {root}: {others} (pass one with its path)")
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
    try:
        configs = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(configs, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(configs).__name__}")
    return configs


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
    GGUF file (interop/gguf_import.py: llama, qwen2, qwen3), after verifying a folder's files against
    the checksums recorded when they were written (a transformers folder has them when xiaolm wrote it).

    A LoRA checkpoint (config.json has a "lora" section) comes with its adapters merged into the
    weights, so every command takes one; `merge_lora=False` keeps them as separate layers.
    `device` is a torch device or a name `runtime.resolve_device` understands ("auto", "cuda:1").
    """
    from xiaolm.runtime import check_model_fits, resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    fmt = detect_format(path)
    if fmt in ("hf", "gguf"):
        if fmt == "hf":
            from xiaolm.interop.hf_import import load_hf as load_foreign

            verify_checkpoint(path)
        else:  # a truncated or damaged file is refused by the reader itself
            from xiaolm.interop.gguf_import import load_gguf as load_foreign
        model, tokenizer, configs = load_foreign(path)
        return LoadedModel(model.to(device), model.config, tokenizer, configs, Path(path))
    checkpoint = resolve_checkpoint(path)
    check_checkpoint(checkpoint)
    configs = read_configs(checkpoint)
    if "model" not in configs:
        raise ValueError(f"{checkpoint / CONFIG_FILE}: no 'model' section; not a xiaolm checkpoint")
    config = model_config_from(configs, checkpoint / CONFIG_FILE)
    check_model_fits(config, device, training=False)
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


def model_config_from(configs: dict[str, Any], where: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json, or an error naming the file."""
    try:
        return from_dict(ModelConfig, configs["model"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: 'model' section: {error}") from None


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
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error}); the checkpoint is "
                              "damaged") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    bad_missing = set(missing) - allowed_missing
    if bad_missing or unexpected:
        raise ValueError(
            f"{file}: weights do not fit the model config: missing {sorted(bad_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """training_state.pt, read with weights_only=True: tensors and plain data only, so a checkpoint
    from someone else cannot run code while it loads."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume from {checkpoint}: {STATE_FILE} is missing")
    try:
        with torch.serialization.safe_globals(STATE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(error))
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise CheckpointError(f"{path}: refused: it holds a Python object{what} that a training state never "
                              "holds and that could run code when loaded") from None
    except (RuntimeError, EOFError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: unreadable ({reason}); the checkpoint is damaged") from None


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
