"""THE training loop. Every stage (pretraining, SFT, DPO, distillation, with or without LoRA) runs
through `train`; a stage differs only in its data, its loss and which parameters it trains.
"""

from __future__ import annotations

import contextlib
import json
import math
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
    choose_training_precision,
    matmul_peak,
    run_info,
    seed_everything,
    setup_runtime,
)
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train import fsdp
from xiaolm.train.optim import build_optimizer, learning_rate

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


class MetricsLog:
    """metrics.jsonl on the main process, plus TensorBoard / wandb when asked for."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start_step: int, enabled: bool, configs: dict) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run drops what the killed run logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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
               "stage": {"name": stage.name, **stage.identity},
               # what one step sees, however it is split over processes: a resume may change the split
               "batch": {"global_batch_size": cfg.batch_size * ctx.world_size}}

    model.to(device)
    if cfg.activation_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise ValueError(f"--activation-checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing = True
    # --precision auto on a CPU: bf16 autocast only where a timed probe shows it faster
    runtime = choose_training_precision(runtime, cfg.precision, model, cfg.batch_size, cfg.seq_len)
    precision = runtime.precision
    if ctx.is_main:
        print(f"precision {precision} ({runtime.precision_reason})", flush=True)
    if cfg.compile and hasattr(model, "layers"):
        # each block compiled in place (names and state dict unchanged): the blocks share code and
        # shapes, so one graph serves them all and compiles in a fraction of the whole model's time
        for block in model.layers:
            block.compile()
    if cfg.fsdp:  # before the optimizer exists: its state is created per shard
        fsdp.check_supported(cfg.optimizer, model)
        model = fsdp.shard_model(model, runtime)
    trainable = list(stage.trainable(model) if stage.trainable else model.named_parameters())
    optimizer = build_optimizer(trainable, cfg, device.type)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    params = [p for _, p in trainable if p.requires_grad]

    start_step, bad_steps, tokens_seen = 0, 0, 0
    latest = ckpt.find_latest_checkpoint(run_dir)
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints ({latest.name}); pass --resume to continue it "
            "or choose another --out-dir"
        )
    if cfg.resume and latest is not None:
        state = _restore(latest, model, optimizer, scaler, configs)
        start_step, bad_steps, tokens_seen = state["step"], state["bad_steps"], state["tokens_seen"]
    raw_model = model
    if ctx.enabled and not cfg.fsdp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward_model = model
    if cfg.compile and not hasattr(raw_model, "layers"):
        forward_model = torch.compile(model)

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, ctx)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_dir / "config.json", configs)
        save_json(run_dir / "run_info.json", run_info(runtime))
    log = MetricsLog(run_dir, cfg, start_step, ctx.is_main, configs)
    autocast = runtime.autocast
    # model FLOPs utilisation: model FLOPs per token x tokens/s over the measured matmul peak of
    # all processes (measured once per machine and precision, then cached)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len) if hasattr(raw_model, "flops_per_token") else None
    peak_flops = matmul_peak(device, precision) * ctx.world_size if ctx.is_main and flops_per_token else None

    progress = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=stage.name)

    last_loss, last_eval, saved = math.nan, {}, latest if cfg.resume else None
    stop_after_steps = stop_after_steps or cfg.stop_after_steps or None
    end_step = cfg.max_steps if stop_after_steps is None else min(cfg.max_steps, stop_after_steps)
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    model.train()
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
            last_micro = micro == cfg.grad_accum_steps - 1
            if cfg.fsdp and ctx.enabled:
                model.set_requires_gradient_sync(last_micro)
            sync = model.no_sync() if ctx.enabled and not cfg.fsdp and not last_micro else contextlib.nullcontext()
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
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
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
            if peak_flops:
                extra["mfu"] = flops_per_token * tok_per_s / peak_flops
            if device.type == "cuda":
                extra["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
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
        if bad_steps == 0 and ((cfg.save_every and done % cfg.save_every == 0) or done == end_step):
            state = {
                "step": done, "bad_steps": bad_steps, "tokens_seen": tokens_seen,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": ckpt.capture_rng_state(),
            }
            shards = None
            if cfg.fsdp:  # every process writes its shards (weights and optimizer state), then main files them
                shards = run_dir / "checkpoints" / f".shards-step_{done:06d}"
                fsdp.save_sharded(shards, model, optimizer)
            else:
                state["optimizer"] = optimizer.state_dict()
            if ctx.is_main:
                saved = ckpt.save_checkpoint(run_dir, done, raw_model, tokenizer, configs, state,
                                             keep=cfg.keep_checkpoints, sharded_weights=shards)
            if ctx.enabled:
                dist.barrier()
    if progress is not None:
        progress.close()
    log.close()
    seconds = time.perf_counter() - started
    return TrainResult(end_step, tokens_seen, seconds, last_loss, last_eval, saved)


def _restore(checkpoint: Path, model: nn.Module, optimizer, scaler, configs: dict[str, Any]) -> dict[str, Any]:
    """Load weights, optimizer and RNG state, refusing a checkpoint of a different run."""
    saved = ckpt.read_configs(checkpoint)
    # fields added since the checkpoint was written take their defaults
    if "model" in saved:
        saved["model"] = to_dict(from_dict(ModelConfig, saved["model"]))
    if "train" in saved:
        saved["train"] = to_dict(from_dict(TrainConfig, saved["train"]))
    if "batch" not in saved:  # written before the global batch was recorded: the split must match
        configs = {k: v for k, v in configs.items() if k != "batch"}
    problems = []
    for section in sorted(set(saved) | set(configs)):
        ignore = frozenset()
        if section == "train":  # the per-process batch may change with the number of processes
            ignore = RESUMABLE_TRAIN_FIELDS | ({"batch_size"} if "batch" in saved else frozenset())
        problems += [f"{section}.{line}" for line in diff_configs(saved.get(section) or {}, configs.get(section) or {}, ignore)]
    if problems:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a different configuration:\n  "
            + "\n  ".join(problems)
        )
    state_file = checkpoint / ckpt.STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"cannot resume from {checkpoint}: {ckpt.STATE_FILE} is missing")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if (checkpoint / ckpt.SHARDED_DIR).is_dir():  # --fsdp: resharded to this run's processes
        fsdp.load_sharded(checkpoint / ckpt.SHARDED_DIR, model, optimizer)
    else:
        ckpt.load_weights(model, checkpoint / ckpt.MODEL_FILE)
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"])
    return state
