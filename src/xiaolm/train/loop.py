"""THE training loop. Every stage (pretraining, SFT, DPO, distillation, with or without LoRA) runs
through `train`; a stage (train/stages.py) differs only in its data, its loss and which parameters
it trains.

Top to bottom: what a stage gives the loop (`Stage`, whose loss returns a `StageLoss`); what a step
reads and changes (`TrainState`, made by `init_train_state`, saved by `save_train_state` and
restored by `restore_train_state`); one optimizer step (`train_step`); what a run reports
(`RunLog`); and the run around the steps (`train`): resume, the data-parallel split of the
samples (`micro_batch_samples`), logging, validation and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from xiaolm import checkpoint as ckpt
from xiaolm.config import (
    RESUMABLE_TRAIN_FIELDS,
    ModelConfig,
    TrainConfig,
    diff_configs,
    from_dict,
    save_json,
    to_dict,
)
from xiaolm.runtime import (
    DistContext,
    Runtime,
    all_reduce_sum,
    choose_training_precision,
    matmul_peak,
    raise_matmul_peak,
    run_info,
    seed_everything,
    setup_runtime,
)
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train import fsdp
from xiaolm.train.optim import build_optimizer, learning_rate

Batch = dict[str, torch.Tensor]


class StageLoss(NamedTuple):
    """What a stage's loss gives for one micro-batch."""

    loss: torch.Tensor  # the stage's mean loss, a scalar with gradient
    num_tokens: int  # tokens in the micro-batch: tokens/s and tokens seen
    # the model's auxiliary loss of this forward (MoE load balancing; None if it has none): the
    # loop adds it to `loss`, so every stage trains with it
    aux_loss: torch.Tensor | None = None


@dataclass
class Stage:
    """What makes a training stage: data, loss, evaluation and trainable parameters."""

    name: str
    # this process's sample positions of one micro-batch (`micro_batch_samples`) -> batch on CPU
    train_batch: Callable[[range], Batch]
    # (model, batch on the device) -> its loss; runs under the run's autocast
    compute_loss: Callable[[nn.Module, Batch], StageLoss]
    # (model in eval mode, runtime) -> validation metrics, the same on every rank (it all-reduces;
    # runtime.evaluation_sums is the usual skeleton)
    evaluate: Callable[[nn.Module, Runtime], dict[str, float]] | None = None
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
    num_steps: int
    num_tokens: int
    seconds: float
    last_loss: float
    last_eval: dict[str, float]
    checkpoint: Path | None


@dataclass
class TrainState:
    """What a training step reads and changes. A checkpoint keeps the weights, the optimizer and
    scaler state, the counters and the RNG state (`save_train_state`)."""

    model: nn.Module  # the model itself (its blocks sharded under --fsdp), as checkpoints store it
    # what computes the loss: `model`, under DDP when there are several processes (not with --fsdp)
    forward_model: nn.Module
    optimizer: torch.optim.Optimizer  # or train/optim.py's CombinedOptimizer (--optimizer muon)
    scaler: torch.amp.GradScaler | None  # loss scaling, fp16 only
    params: list[nn.Parameter]  # the trainable parameters: what the gradient norm is taken over
    runtime: Runtime  # its precision as chosen for this run (`--precision auto` on a CPU measures)
    fsdp: bool = False  # `model` is sharded over the processes (FSDP2) instead of replicated
    step: int = 0  # optimizer steps done
    num_tokens_seen: int = 0  # training tokens so far, all processes together
    num_bad_steps: int = 0  # consecutive non-finite steps up to `step`


@dataclass
class StepMetrics:
    """One optimizer step, as every process sees it."""

    loss: float  # mean over processes of the step's loss (auxiliary loss included)
    lr: float
    grad_norm: float  # before clipping
    num_tokens: int  # this step's tokens, all processes together
    finite: bool  # False: the loss or the gradient was NaN/inf and the update was skipped


def init_train_state(model: nn.Module, cfg: TrainConfig, runtime: Runtime,
                     trainable: Callable[[nn.Module], Iterator[tuple[str, nn.Parameter]]] | None = None
                     ) -> TrainState:
    """`model` moved to the runtime's device and made ready as cfg asks (activation checkpointing,
    each block compiled in place, FSDP shards), the precision settled (`--precision auto` on a CPU:
    bf16 autocast only where a timed probe shows it faster), an optimizer over `trainable(model)`
    (default: every parameter) and, under fp16, a GradScaler. Its forward model is the model
    itself until `train` wraps it (DDP, torch.compile of a model without blocks)."""
    model.to(runtime.device)
    if cfg.activation_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise ValueError(f"--activation-checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing = True
    runtime = choose_training_precision(runtime, cfg.precision, model, cfg.batch_size, cfg.seq_len)
    if cfg.compile and hasattr(model, "layers"):
        # each block compiled in place (names and state dict unchanged): the blocks share code and
        # shapes, so one graph serves them all and compiles in a fraction of the whole model's time
        for block in model.layers:
            block.compile()
    if cfg.fsdp:  # before the optimizer exists: its state is created per shard
        fsdp.check_supported(cfg.optimizer, model)
        model = fsdp.shard_model(model, runtime)
    named = list(trainable(model) if trainable else model.named_parameters())
    optimizer = build_optimizer(named, cfg, runtime.device.type)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None
    return TrainState(model=model, forward_model=model, optimizer=optimizer, scaler=scaler,
                      params=[p for _, p in named if p.requires_grad], runtime=runtime, fsdp=cfg.fsdp)


def train_step(state: TrainState, batches: Sequence[Batch], stage: Stage, cfg: TrainConfig) -> StepMetrics:
    """One optimizer step on `batches`, the step's micro-batches on CPU: gradients accumulate over
    them and are all-reduced once; an update whose loss or gradient norm is not finite is skipped.
    Advances state.step."""
    runtime, ctx = state.runtime, state.runtime.ctx
    lr = learning_rate(state.step, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=runtime.device)
    num_tokens = 0
    for micro, batch in enumerate(batches):
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
        # gradients are all-reduced (FSDP: reduce-scattered) once per optimizer step, on the last micro-batch
        last = micro == len(batches) - 1
        if state.fsdp and ctx.enabled:
            state.model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext()
        if ctx.enabled and not state.fsdp and not last:
            sync = state.forward_model.no_sync()
        with sync:
            with runtime.autocast():
                out = stage.compute_loss(state.forward_model, batch)
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                loss = loss / len(batches)
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        loss_sum += loss.detach()
        num_tokens += out.num_tokens
    loss_value = all_reduce_sum(loss_sum, ctx).item() / ctx.world_size
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)  # skips the update itself when gradients overflowed
        state.scaler.update()
    elif finite:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    # optional model hook for state that follows the weights (e.g. MoE routing biases)
    if finite and hasattr(state.model, "after_optimizer_step"):
        state.model.after_optimizer_step(lambda values: all_reduce_sum(values, ctx))
    state.step += 1
    state.num_tokens_seen += num_tokens * ctx.world_size
    state.num_bad_steps = 0 if finite else state.num_bad_steps + 1
    return StepMetrics(loss_value, lr, grad_norm, num_tokens * ctx.world_size, finite)


def micro_batch_samples(micro_index: int, batch_size: int, ctx: DistContext) -> range:
    """This process's sample positions in micro-batch `micro_index` (counted over the whole run).
    Micro-batch m of rank r takes samples (m * W + r) * B ... + B: a run on W processes sees
    exactly the samples one process with W times the batch would."""
    first = (micro_index * ctx.world_size + ctx.rank) * batch_size
    return range(first, first + batch_size)


class RunLog:
    """What a run reports: metrics.jsonl on the main process (plus TensorBoard / wandb when asked
    for), the progress bar, and tokens/s over the steps since the last train record, with the model
    FLOPs utilisation it means and, on a GPU, the peak memory."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, stage_name: str, start_step: int, is_main: bool,
                 configs: dict, model: nn.Module, runtime: Runtime) -> None:
        self.enabled = is_main
        self.device, self.precision, self.world_size = runtime.device, runtime.precision, runtime.ctx.world_size
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        self.progress = None
        self.started = self.window_start = time.perf_counter()
        self.num_window_tokens = 0
        self.flops_per_token = self.peak_flops = None
        if not is_main:
            return
        if hasattr(model, "flops_per_token"):
            # model FLOPs utilisation: model FLOPs per token x tokens/s over the measured matmul peak
            # of all processes (measured once per machine and precision, then cached)
            self.flops_per_token = model.flops_per_token(cfg.seq_len)
            self.peak_flops = matmul_peak(runtime.device, runtime.precision) * runtime.ctx.world_size
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
        if cfg.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                 desc=stage_name)
        self.started = self.window_start = time.perf_counter()  # the run's clock starts with its first step

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

    def step_done(self, metrics: StepMetrics) -> None:
        self.num_window_tokens += metrics.num_tokens
        if self.progress is not None:
            self.progress.update(1)

    def nonfinite(self, state: TrainState, metrics: StepMetrics) -> None:
        if self.enabled:
            print(f"warning: step {state.step}: non-finite loss ({metrics.loss}) or gradient norm "
                  f"({metrics.grad_norm}); update skipped", flush=True)
        self.write({"step": state.step, "event": "skipped_nonfinite", "loss": str(metrics.loss)})

    def train_record(self, state: TrainState, metrics: StepMetrics, extra: dict[str, Any]) -> None:
        """The train metrics of the step just done, and tokens/s since the previous record."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.window_start
        tok_per_s = self.num_window_tokens / elapsed if elapsed > 0 else 0.0
        extra = dict(extra)
        if self.peak_flops:
            achieved = self.flops_per_token * tok_per_s
            if achieved > self.peak_flops:  # the cached peak was measured under load: raise it
                self.peak_flops = raise_matmul_peak(self.device, self.precision, achieved / self.world_size)
                self.peak_flops *= self.world_size
            extra["mfu"] = achieved / self.peak_flops
        if self.device.type == "cuda":
            extra["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.write({"step": state.step, "loss": metrics.loss, "lr": metrics.lr,
                    "grad_norm": metrics.grad_norm, "tokens": state.num_tokens_seen, "tok_per_s": tok_per_s,
                    "elapsed_s": time.perf_counter() - self.started, **extra})
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{metrics.loss:.3f}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
        self.window_start, self.num_window_tokens = time.perf_counter(), 0

    def eval_record(self, step: int, metrics: dict[str, float]) -> None:
        self.write({"step": step, **metrics})
        if self.progress is not None:
            self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def wrap_model(model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> nn.Module:
    """What computes the training forward: `model` under DistributedDataParallel when there are
    several processes (with --fsdp, `model` is sharded already), then under torch.compile when
    asked and the model has no blocks (init_train_state compiles those one by one)."""
    forward_model = model
    if runtime.ctx.enabled and not cfg.fsdp:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        forward_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile and not hasattr(model, "layers"):
        forward_model = torch.compile(forward_model)
    return forward_model


def train(
    model: nn.Module,
    stage: Stage,
    cfg: TrainConfig,
    *,
    tokenizer: XiaoTokenizer,
    configs: dict[str, Any] | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train `model` (built, on CPU, fp32) through `stage` as `cfg` says.

    The model's config, `cfg`, the stage's identity and `configs` (anything else that defines
    the run) go into every checkpoint, and a resume must match them. `runtime` is the process's
    device, precision and process group when the caller set them up already (`setup_runtime`),
    else they come from cfg.device and cfg.precision. cfg.stop_after_steps ends the run early, as
    a kill after that step's checkpoint would: the schedule still follows cfg.max_steps.
    """
    run_dir = Path(cfg.out_dir)
    runtime = runtime or setup_runtime(cfg.device, cfg.precision)
    ctx = runtime.ctx
    seed_everything(cfg.seed + ctx.rank)
    configs = {"model": to_dict(model.config), **(configs or {}), "train": to_dict(cfg),
               "stage": {"name": stage.name, **stage.identity},
               # what one step sees, however it is split over processes: a resume may change the split
               "batch": {"global_batch_size": cfg.batch_size * ctx.world_size}}

    state = init_train_state(model, cfg, runtime, stage.trainable)
    runtime = state.runtime
    if ctx.is_main:
        print(f"precision {runtime.precision} ({runtime.precision_reason})", flush=True)
    saved = checkpoint_to_resume(run_dir, cfg)
    if saved is not None:
        restore_train_state(saved, state, configs)
    state.forward_model = wrap_model(state.model, cfg, runtime)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_dir / "config.json", configs)
        save_json(run_dir / "run_info.json", run_info(runtime))
    log = RunLog(run_dir, cfg, stage.name, state.step, ctx.is_main, configs, state.model, runtime)

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, ctx)

    last_loss, last_eval = math.nan, {}
    end_step = min(cfg.max_steps, cfg.stop_after_steps) if cfg.stop_after_steps else cfg.max_steps
    state.forward_model.train()
    while state.step < end_step:
        first_micro = state.step * cfg.grad_accum_steps
        batches = [stage.train_batch(micro_batch_samples(first_micro + micro, cfg.batch_size, ctx))
                   for micro in range(cfg.grad_accum_steps)]
        metrics = train_step(state, batches, stage, cfg)
        log.step_done(metrics)
        if metrics.finite:
            last_loss = metrics.loss
        else:
            log.nonfinite(state, metrics)
            if state.num_bad_steps >= cfg.max_bad_steps:
                log.close()
                raise TrainingDiverged(
                    f"{state.num_bad_steps} consecutive non-finite steps (last at step {state.step}); "
                    f"stopping without saving. Last good checkpoint: {saved or 'none'}. Lower --lr or check "
                    "the data."
                )
        done = state.step
        if done % cfg.log_every == 0 or done == end_step:
            # optional model and stage metrics (MoE expert load, DPO rewards); every rank all-reduces
            extra = state.model.training_metrics(reduce) if hasattr(state.model, "training_metrics") else {}
            if stage.metrics is not None:
                extra = {**extra, **stage.metrics(reduce)}
            log.train_record(state, metrics, extra)
        if stage.evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == end_step):
            last_eval = evaluate(state, stage)
            log.eval_record(done, last_eval)
        # never checkpoint inside a non-finite streak: the last good checkpoint stays the latest
        if state.num_bad_steps == 0 and ((cfg.save_every and done % cfg.save_every == 0) or done == end_step):
            saved = save_train_state(state, run_dir, tokenizer, configs, cfg.keep_checkpoints) or saved
    log.close()
    seconds = time.perf_counter() - log.started
    return TrainResult(end_step, state.num_tokens_seen, seconds, last_loss, last_eval, saved)


def checkpoint_to_resume(run_dir: Path, cfg: TrainConfig) -> Path | None:
    """The latest checkpoint in `run_dir` when cfg.resume asks to continue; a folder that holds
    checkpoints is refused without it."""
    latest = ckpt.find_latest_checkpoint(run_dir)
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints ({latest.name}); pass --resume to continue it "
            "or choose another --out-dir"
        )
    return latest


def evaluate(state: TrainState, stage: Stage) -> dict[str, float]:
    """The stage's validation metrics, the model in eval mode and without gradients meanwhile."""
    state.forward_model.eval()
    with torch.no_grad():
        metrics = stage.evaluate(state.forward_model, state.runtime)
    state.forward_model.train()
    return metrics


def save_train_state(state: TrainState, run_dir: Path, tokenizer: XiaoTokenizer, configs: dict[str, Any],
                     keep: int) -> Path | None:
    """A checkpoint of `state` (written by the main process; every process waits for it). Returns
    its folder on the main process, None on the others. Under --fsdp every process first writes its
    shards of the weights and optimizer state, which the main process then files in the folder."""
    saved, shards = None, None
    if state.fsdp:
        shards = run_dir / "checkpoints" / f".shards-step_{state.step:06d}"
        fsdp.save_sharded(shards, state.model, state.optimizer)
    if state.runtime.ctx.is_main:
        training_state = {  # keys as every checkpoint so far names them
            "step": state.step, "bad_steps": state.num_bad_steps, "tokens_seen": state.num_tokens_seen,
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "rng": ckpt.capture_rng_state(),
        }
        if not state.fsdp:
            training_state["optimizer"] = state.optimizer.state_dict()
        saved = ckpt.save_checkpoint(run_dir, state.step, state.model, tokenizer, configs, training_state,
                                     keep=keep, sharded_weights=shards)
    if state.runtime.ctx.enabled:
        dist.barrier()
    return saved


def restore_train_state(checkpoint: Path, state: TrainState, configs: dict[str, Any]) -> None:
    """Weights, optimizer and scaler state, counters and RNG state from `checkpoint`, refusing a
    checkpoint written by a different run."""
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
        problems += [f"{section}.{line}"
                     for line in diff_configs(saved.get(section) or {}, configs.get(section) or {}, ignore)]
    if problems:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was written by a different configuration:\n  "
            + "\n  ".join(problems)
        )
    state_file = checkpoint / ckpt.STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"cannot resume from {checkpoint}: {ckpt.STATE_FILE} is missing")
    training_state = torch.load(state_file, map_location="cpu", weights_only=False)
    if (checkpoint / ckpt.SHARDED_DIR).is_dir():  # --fsdp: resharded to this run's processes
        fsdp.load_sharded(checkpoint / ckpt.SHARDED_DIR, state.model, state.optimizer)
    else:
        ckpt.load_weights(state.model, checkpoint / ckpt.MODEL_FILE)
        state.optimizer.load_state_dict(training_state["optimizer"])
    if state.scaler is not None and training_state.get("scaler"):
        state.scaler.load_state_dict(training_state["scaler"])
    ckpt.restore_rng_state(training_state["rng"])
    state.step = training_state["step"]
    state.num_bad_steps = training_state["bad_steps"]
    state.num_tokens_seen = training_state["tokens_seen"]
