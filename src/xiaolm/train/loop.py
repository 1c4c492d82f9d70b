"""THE training loop. Every stage (pretraining, SFT, DPO, distillation, with or without LoRA) runs
through `train`; a stage differs only in its data, its loss and which parameters it trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xiaolm.config import (
    RESUMABLE_TRAIN_FIELDS,
    ModelConfig,
    TrainConfig,
    diff_configs,
    from_dict,
    save_json,
    to_dict,
)
from xiaolm import checkpoint as ckpt
from xiaolm.runtime import (
    DistContext,
    Runtime,
    all_reduce_sum,
    barrier,
    run_info,
    seed_everything,
    setup_runtime,
)
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.optim import build_optimizer, learning_rate
from xiaolm.train.signals import StopRequests, TrainingInterrupted
from xiaolm.utils import check_output_folder

Batch = dict[str, torch.Tensor]


@dataclass
class Stage:
    """What makes a training stage: data, loss, evaluation and trainable parameters."""

    name: str
    # (micro-batch number counted over the whole run, rank, world size) -> batch on CPU
    train_batch: Callable[[int, int, int], Batch]
    # (model, batch on device) -> (mean loss, number of tokens in the batch)
    compute_loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
    # (model, rank, world size, autocast context factory) -> sums to all-reduce, turned into metrics
    evaluate: Callable[[nn.Module, DistContext, Callable], dict[str, float]] | None = None
    # which parameters train; default all
    trainable: Callable[[nn.Module], Iterator[tuple[str, nn.Parameter]]] | None = None
    # recorded in the checkpoint and compared on resume (e.g. the data's identity)
    identity: dict[str, Any] = field(default_factory=dict)
    # (all-reduce-sum function) -> train metrics the stage gathered since the last log step
    # (e.g. DPO rewards); called on every rank at log steps
    metrics: Callable[[Callable[[torch.Tensor], torch.Tensor]], dict[str, float]] | None = None


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite steps; no checkpoint is written for them."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    last_loss: float
    last_eval: dict[str, float]
    checkpoint: Path | None
    start_step: int = 0  # where it started: the resumed checkpoint's step, or 0


class MetricsLog:
    """metrics.jsonl on the main process, plus TensorBoard / wandb when asked for."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start_step: int, enabled: bool, configs: dict) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():
            keep_metrics_until(run_dir, start_step)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from error
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as error:
                raise ValueError("--wandb needs the wandb package: pip install wandb") from error
            self.wandb = wandb.init(project="xiaolm", name=run_dir.name, config=configs, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """A run resumed from `step` logs the steps after it again (the same values: the resume is exact),
    so the records past it go; every record up to it stays. Rewritten whole (temporary file, then
    rename): a kill meanwhile leaves the old file. A line cut short by a crash is dropped."""
    from xiaolm.eval.report import read_metrics

    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    if len(kept) == sum(bool(line.strip()) for line in lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    print(f"metrics.jsonl: kept the {len(kept)} records up to step {step}; the steps after it are logged again")


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse, before any work, an out_dir this run cannot use: a file, a folder it cannot write, a run
    that needs --resume, one whose checkpoints are all unusable, a --max-steps below its checkpoint."""
    check_output_folder(cfg.out_dir, "--out-dir")
    ckpt.find_resume_point(cfg.out_dir, cfg.resume, cfg.max_steps)


def resume_point(run_dir: Path, cfg: TrainConfig, ctx: DistContext) -> ckpt.ResumePoint:
    """The checkpoint this run continues from (`checkpoint.find_resume_point`), the run folder settled
    to agree with it by the main process, and what was found said on stdout."""
    point = ckpt.find_resume_point(run_dir, cfg.resume, cfg.max_steps)
    barrier(ctx)  # every process has looked before the main one renames anything
    if ctx.is_main:
        if point.checkpoint is not None:
            ckpt.settle_resume_point(point)
        for note in point.notes:
            print(f"resume: {note}")
        if point.checkpoint is not None:
            print(f"resuming from {point.checkpoint} (step {point.step})", flush=True)
    barrier(ctx)
    return point


def save_on_every_rank(ctx: DistContext, device: torch.device, save: Callable[[], Path]) -> Path | None:
    """`save()` on the main process; every process returns once it is done, and raises if it failed
    (no process is left waiting for one that stopped). The main process's path, None elsewhere."""
    saved, error = None, None
    if ctx.is_main:
        try:
            saved = save()
        except Exception as caught:  # re-raised below, once every rank knows
            error = caught
    if ctx.enabled:
        failed = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise ValueError("the main process could not write the checkpoint (its error says why)")
    if error is not None:
        raise error
    return saved


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself under the torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def train(
    model: nn.Module,
    stage: Stage,
    cfg: TrainConfig,
    *,
    tokenizer: XiaoTokenizer,
    configs: dict[str, Any] | None = None,
    runtime: Runtime | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train `model` (built, on CPU, fp32) through `stage` as `cfg` says.

    The model's config, `cfg`, the stage's identity and `configs` (anything else that defines
    the run) go into every checkpoint, and a resume must match them. `runtime` is the process's
    device, precision and process group when the caller set them up already (`setup_runtime`),
    else they come from cfg.device and cfg.precision. `stop_after_steps` ends the run early, as a
    kill after that step's checkpoint would: the schedule still follows cfg.max_steps.
    """
    run_dir = Path(cfg.out_dir)
    runtime = runtime or setup_runtime(cfg.device, cfg.precision)
    device, precision, ctx = runtime.device, runtime.precision, runtime.ctx
    seed_everything(cfg.seed + ctx.rank)
    configs = {"model": to_dict(model.config), **(configs or {}), "train": to_dict(cfg),
               "stage": {"name": stage.name, **stage.identity}}

    model.to(device)
    trainable = list(stage.trainable(model) if stage.trainable else model.named_parameters())
    optimizer = build_optimizer(trainable, cfg, device.type)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    params = [p for _, p in trainable if p.requires_grad]

    start_step, bad_steps, tokens_seen = 0, 0, 0
    point = resume_point(run_dir, cfg, ctx)
    latest = point.checkpoint
    if latest is not None:
        state = _restore(latest, model, optimizer, scaler, configs)
        start_step, bad_steps, tokens_seen = state["step"], state["bad_steps"], state["tokens_seen"]
    raw_model = model
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward_model = torch.compile(model) if cfg.compile else model

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, ctx)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_dir / "config.json", configs)
        save_json(run_dir / "run_info.json", run_info(runtime))
    log = MetricsLog(run_dir, cfg, start_step, ctx.is_main, configs)
    autocast = runtime.autocast

    progress = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=stage.name)

    last_loss, last_eval, saved = math.nan, {}, latest
    end_step = cfg.max_steps if stop_after_steps is None else min(cfg.max_steps, stop_after_steps)
    if start_step >= end_step and ctx.is_main:
        print(f"nothing to train: {latest} is at step {start_step} and --max-steps is {cfg.max_steps}")
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    model.train()
    # SIGINT / SIGTERM: finish the step, write its checkpoint, stop (train/signals.py)
    with StopRequests() as stop:
        for step in range(start_step, end_step):
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum_steps):
                batch = stage.train_batch(step * cfg.grad_accum_steps + micro, ctx.rank, ctx.world_size)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # gradients are all-reduced once per optimizer step, on the last micro-batch
                sync = model.no_sync() if ctx.enabled and micro < cfg.grad_accum_steps - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss, num_tokens = stage.compute_loss(forward_model, batch)
                        loss = loss / cfg.grad_accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
                step_tokens += num_tokens
            loss_value = all_reduce_sum(loss_sum, ctx).item() / ctx.world_size
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            grad_norm = float(grad_norm)
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skips the update itself when gradients overflowed
                scaler.update()
            elif finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # optional model hook for state that follows the weights (e.g. MoE routing biases)
            if finite and hasattr(raw_model, "after_optimizer_step"):
                raw_model.after_optimizer_step(reduce)
            tokens_seen += step_tokens * ctx.world_size
            window_tokens += step_tokens * ctx.world_size
            if finite:
                bad_steps = 0
                last_loss = loss_value
            else:
                bad_steps += 1
                message = f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); update skipped"
                if ctx.is_main:
                    print(f"warning: {message}", flush=True)
                log.write({"step": step + 1, "event": "skipped_nonfinite", "loss": str(loss_value)})
                if bad_steps >= cfg.max_bad_steps:
                    log.close()
                    if progress is not None:
                        progress.close()
                    raise TrainingDiverged(
                        f"{bad_steps} consecutive non-finite steps (last at step {step + 1}); stopping without "
                        f"saving. Last good checkpoint: {saved or 'none'}. Lower --lr or check the data."
                    )
            done = step + 1
            if progress is not None:
                progress.update(1)
            is_log_step = done % cfg.log_every == 0 or done == end_step
            # optional model metrics (e.g. MoE expert load); every rank joins their all-reduce
            extra = {}
            if is_log_step and hasattr(raw_model, "training_metrics"):
                extra = raw_model.training_metrics(reduce)
            if is_log_step and stage.metrics is not None:
                extra = {**extra, **stage.metrics(reduce)}
            if ctx.is_main and is_log_step:
                elapsed = time.perf_counter() - window_start
                tok_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
                log.write({"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                           "tokens": tokens_seen, "tok_per_s": tok_per_s,
                           "elapsed_s": time.perf_counter() - started, **extra})
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
            if stage.evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == end_step):
                model.eval()
                with torch.no_grad():
                    last_eval = stage.evaluate(forward_model, ctx, autocast)
                model.train()
                log.write({"step": done, **last_eval})
                if progress is not None:
                    progress.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            # never checkpoint inside a non-finite streak: the last good checkpoint stays the latest
            signum = stop.requested(runtime)
            if bad_steps == 0 and ((cfg.save_every and done % cfg.save_every == 0) or done == end_step or signum):

                def save() -> Path:
                    state = {
                        "step": done, "bad_steps": bad_steps, "tokens_seen": tokens_seen,
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": ckpt.capture_rng_state(),
                    }
                    return ckpt.save_checkpoint(run_dir, done, raw_model, tokenizer, configs, state,
                                                keep=cfg.keep_checkpoints)

                saved = save_on_every_rank(ctx, device, save) or saved
                signum = signum or stop.requested(runtime)  # a signal during the save is answered now
            if signum:
                log.close()
                if progress is not None:
                    progress.close()
                raise TrainingInterrupted(signum, done, saved, saved_now=bad_steps == 0)
    if progress is not None:
        progress.close()
    log.close()
    seconds = time.perf_counter() - started
    return TrainResult(end_step, tokens_seen, seconds, last_loss, last_eval, saved, start_step)


def _restore(checkpoint: Path, model: nn.Module, optimizer, scaler, configs: dict[str, Any]) -> dict[str, Any]:
    """Load weights, optimizer and RNG state, refusing a checkpoint of a different run."""
    saved = ckpt.read_configs(checkpoint)
    if "model" in saved:  # fields added since the checkpoint was written take their defaults
        saved["model"] = to_dict(from_dict(ModelConfig, saved["model"]))
    problems = []
    for section in sorted(set(saved) | set(configs)):
        ignore = RESUMABLE_TRAIN_FIELDS if section == "train" else frozenset()
        problems += [f"{section}.{line}" for line in diff_configs(saved.get(section) or {}, configs.get(section) or {}, ignore)]
    if problems:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a different configuration:\n  "
            + "\n  ".join(problems)
        )
    state = ckpt.load_training_state(checkpoint)
    ckpt.load_weights(model, checkpoint / ckpt.MODEL_FILE)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"])
    return state
