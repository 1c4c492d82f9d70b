"""Alignment stages on the one training loop: SFT, DPO and distillation, each data + loss +
trainable parameters (`sft_stage`, `dpo_stage`, `distill_stage`), plus the runners the CLI and
speedrun call (`run_sft`, `run_dpo`, `run_distill`), which load the starting checkpoint, add LoRA
adapters when asked (model/lora.py) and hand everything to `train`.

Packed SFT keeps conversations apart with a block-diagonal causal attention mask built from
per-token document ids. Positions are not reset per conversation: with RoPE, attention depends
only on the distance between query and key, so a conversation packed at offset k gets exactly
the logits it gets alone (tested).

Learning rates of the `sft` and `dpo` presets (config.py), from a sweep on a small model (hidden
128, 2 layers, vocab 6400) pretrained 300 steps on data/sample, then trained on the default chat
sets at seq_len 128, batch 16 (SFT) / 8 pairs (DPO), on CPU:
- SFT, val loss after 60 steps: lr 2e-4 6.49, 5e-4 6.34, 1e-3 6.21, 2e-3 6.09, 4e-3 6.03. 2e-3:
  within 0.06 of the best and under the pretraining peak (3e-3).
- DPO (beta 0.1), after 30 steps, val loss / chosen reward / margin (19 held-out pairs, so noisy):
  5e-6 0.691 / +0.002 / 0.003, 2e-5 0.686 / +0.007 / 0.014, 1e-4 0.662 / -0.04 / 0.07,
  3e-4 0.587 / -0.46 / 0.29, 1e-3 0.639 / -2.5 / 0.64. 1e-4: a clear gain while the chosen
  replies' log-probability barely moves; from 3e-4 up, DPO buys its margin mostly by lowering
  both replies' probability, the known failure mode.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.checkpoint import load_model
from xiaolm.config import TrainConfig, to_dict
from xiaolm.data.chat_formats import PreferencePair, read_conversations, read_preferences
from xiaolm.data.chat_tokens import IGNORE_INDEX, SftData, build_sft_data, tokenize_preference
from xiaolm.data.corpus import split_held_out
from xiaolm.data.readers import ReadStats
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import DistContext, Runtime, all_reduce_sum, rank_batches, seeded, setup_runtime
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.loop import Batch, Stage, TrainResult, train
from xiaolm.train.stages import add_aux_loss, masked_forward, next_token_loss

# --------------------------------------------------------------------------- SFT


def _epoch_order(num_rows: int, seed: int) -> Callable[[int], int]:
    """Sample position -> row, a fresh seeded permutation of the rows every epoch."""
    orders: dict[int, torch.Tensor] = {}

    def row(position: int) -> int:
        epoch = position // num_rows
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(num_rows, generator=generator)
        return int(orders[epoch][position % num_rows])

    return row


def _trim_padding(batch: Batch, doc_ids: torch.Tensor) -> Batch:
    """Drop trailing columns that are padding in every row (short conversations)."""
    used = int((doc_ids >= 0).any(dim=0).nonzero().max()) + 1
    return {k: v[:, :used] for k, v in batch.items()}


def sft_batch(data: SftData, rows: torch.Tensor, packed: bool) -> Batch:
    batch = {"inputs": data.inputs[rows], "targets": data.targets[rows]}
    if packed:
        batch["doc_ids"] = data.doc_ids[rows]
    return _trim_padding(batch, data.doc_ids[rows])


def _data_key(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate_sft(data: SftData, batch_size: int, num_batches: int, packed: bool):
    """val_loss: mean nats per supervised token over the first rows of `data`, split across ranks."""

    def evaluate(model: nn.Module, ctx: DistContext, autocast: Callable) -> dict[str, float]:
        device = next(model.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, supervised tokens
        for rows in rank_batches(data.num_rows, batch_size, num_batches, ctx):
            batch = {k: v.to(device) for k, v in sft_batch(data, torch.tensor(rows), packed).items()}
            with autocast():
                logits = masked_forward(model, batch)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            totals += torch.stack([nats.double(), (batch["targets"] != IGNORE_INDEX).sum().double()])
        totals = all_reduce_sum(totals, ctx)
        return {"val_loss": (totals[0] / totals[1].clamp(min=1)).item()}

    return evaluate


def sft_stage(train_data: SftData, val_data: SftData | None, cfg: TrainConfig, *, packed: bool = True,
              trainable: Callable | None = None, identity: dict | None = None) -> Stage:
    """Supervised fine-tuning: next-token loss on the assistant tokens only."""
    row_of = _epoch_order(train_data.num_rows, cfg.seed)

    def train_batch(micro_index: int, rank: int, world_size: int) -> Batch:
        first = (micro_index * world_size + rank) * cfg.batch_size
        rows = torch.tensor([row_of(first + i) for i in range(cfg.batch_size)])
        return sft_batch(train_data, rows, packed)

    evaluate = evaluate_sft(val_data, cfg.batch_size, cfg.eval_batches, packed) if val_data is not None else None
    identity = {"train_rows": train_data.num_rows, "train_data_key": _data_key(train_data.inputs, train_data.targets),
                "packed": packed, **(identity or {})}
    return Stage(name="sft", train_batch=train_batch, compute_loss=next_token_loss, evaluate=evaluate,
                 trainable=trainable, identity=identity)


# --------------------------------------------------------------------------- DPO


@dataclass
class PreferenceData:
    """Tokenized preference pairs: (prompt, chosen reply, rejected reply) ids per pair, and the
    frozen reference's summed log-probabilities of each reply when precomputed, (N, 2)."""

    examples: list[tuple[list[int], list[int], list[int]]]
    pad_id: int
    num_dropped: int = 0
    reference_logps: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.examples)


def build_preference_data(pairs: Sequence[PreferencePair], tokenizer: XiaoTokenizer, max_len: int,
                          truncate: str = "turns") -> PreferenceData:
    """Fit each pair into `max_len` tokens per sequence (`tokenize_preference`, under the `truncate`
    policy); pairs that do not fit are counted (`num_dropped`) and dropped."""
    examples, dropped = [], 0
    for pair in pairs:
        example = tokenize_preference(tokenizer, pair, max_len + 1, truncate)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise ValueError(f"no preference pair fits in seq_len={max_len} ({dropped} dropped); raise --seq-len"
                         + (" or pass --truncate tokens" if truncate == "turns" else ""))
    return PreferenceData(examples, tokenizer.pad_id, dropped)


def preference_batch(data: PreferenceData, indices: Sequence[int]) -> Batch:
    """Chosen sequences in rows [0, B), rejected in [B, 2B); targets only on reply tokens."""
    sequences, prompt_lengths = [], []
    for which in (1, 2):
        for i in indices:
            prompt, reply = data.examples[i][0], data.examples[i][which]
            sequences.append(prompt + reply)
            prompt_lengths.append(len(prompt))
    length = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), length), data.pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        # the target at position t is token t + 1: reply tokens start at prompt_length
        targets[row, prompt_length - 1: len(ids) - 1] = torch.tensor(ids[prompt_length:])
    batch = {"inputs": inputs, "targets": targets}
    if data.reference_logps is not None:
        rows = torch.as_tensor(list(indices))
        batch["reference_logps"] = torch.cat([data.reference_logps[rows, 0], data.reference_logps[rows, 1]])
    return batch


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens (IGNORE_INDEX skipped): (B, T, V) -> (B,)."""
    mask = targets != IGNORE_INDEX
    logps = logits.float().log_softmax(dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return (logps * mask).sum(dim=-1)


def dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023). Inputs (2B,): chosen rows first, then rejected.
    Returns (mean loss, chosen rewards (B,), rejected rewards (B,)); reward = beta * log(pi / ref)."""
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, data: PreferenceData, batch_size: int,
                            runtime: Runtime | None = None) -> torch.Tensor:
    """The frozen reference's summed reply log-probabilities for every pair, (N, 2), computed once,
    on the runtime's device and in its precision (the training forward's autocast)."""
    runtime = runtime or Runtime(torch.device("cpu"), "fp32")
    reference = reference.to(runtime.device).eval()
    out = torch.zeros(data.num_pairs, 2)
    for start in range(0, data.num_pairs, batch_size):
        indices = list(range(start, min(start + batch_size, data.num_pairs)))
        batch = {k: v.to(runtime.device) for k, v in preference_batch(data, indices).items()}
        with runtime.autocast():
            logits = reference(batch["inputs"])
        logps = sequence_logps(logits, batch["targets"]).cpu()
        chosen, rejected = logps.chunk(2)
        out[start: start + len(indices)] = torch.stack([chosen, rejected], dim=1)
    return out


class _RewardMeter:
    """Sums of DPO statistics between log steps, kept on the device of the rewards (so the
    all-reduce works with nccl): chosen reward, rejected reward, correct pairs, pairs."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        sums = torch.stack([chosen.sum().double(), rejected.sum().double(), (chosen > rejected).sum().double(),
                            torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device)])
        self.sums = sums if self.sums is None else self.sums + sums

    def metrics(self, reduce: Callable, prefix: str = "") -> dict[str, float]:
        sums = self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64)
        self.sums = None
        chosen, rejected, correct, count = reduce(sums).tolist()
        count = max(count, 1.0)
        return {f"{prefix}reward_chosen": chosen / count, f"{prefix}reward_rejected": rejected / count,
                f"{prefix}reward_margin": (chosen - rejected) / count, f"{prefix}reward_accuracy": correct / count}


def dpo_stage(train_data: PreferenceData, val_data: PreferenceData | None, cfg: TrainConfig, *,
              beta: float = 0.1, reference: nn.Module | None = None, trainable: Callable | None = None,
              identity: dict | None = None) -> Stage:
    """DPO against a frozen reference: either `reference` (a model, run every step) or the
    reference log-probabilities precomputed into `train_data` / `val_data`."""
    if reference is None and train_data.reference_logps is None:
        raise ValueError("DPO needs a reference model or precomputed reference log-probabilities")
    if reference is not None:
        reference.eval().requires_grad_(False)
    row_of = _epoch_order(train_data.num_pairs, cfg.seed)
    meter = _RewardMeter()

    def reference_logps(batch: Batch) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        device = batch["inputs"].device
        if next(reference.parameters()).device != device:
            reference.to(device)
        with torch.no_grad():
            return sequence_logps(reference(batch["inputs"]), batch["targets"])

    def train_batch(micro_index: int, rank: int, world_size: int) -> Batch:
        first = (micro_index * world_size + rank) * cfg.batch_size
        return preference_batch(train_data, [row_of(first + i) for i in range(cfg.batch_size)])

    def compute_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        policy = sequence_logps(model(batch["inputs"]), batch["targets"])
        loss, chosen, rejected = dpo_loss(policy, reference_logps(batch), beta)
        meter.add(chosen, rejected)
        return add_aux_loss(model, loss), batch["inputs"].numel()

    def evaluate(model: nn.Module, ctx: DistContext, autocast: Callable) -> dict[str, float]:
        device = next(model.parameters()).device
        val_meter = _RewardMeter()
        losses = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, pairs
        for indices in rank_batches(val_data.num_pairs, cfg.batch_size, cfg.eval_batches, ctx):
            batch = {k: v.to(device) for k, v in preference_batch(val_data, indices).items()}
            with autocast():
                policy = sequence_logps(model(batch["inputs"]), batch["targets"])
            loss, chosen, rejected = dpo_loss(policy, reference_logps(batch), beta)
            val_meter.add(chosen, rejected)
            count = torch.tensor(float(len(indices)), dtype=torch.float64, device=device)
            losses += torch.stack([loss.detach().double() * count, count])

        def reduce(values: torch.Tensor) -> torch.Tensor:
            return all_reduce_sum(values, ctx)

        losses = reduce(losses)
        return {"val_loss": (losses[0] / losses[1].clamp(min=1)).item(), **val_meter.metrics(reduce, "val_")}

    identity = {"train_pairs": train_data.num_pairs, "beta": beta,
                "reference": "precomputed" if reference is None else "model", **(identity or {})}
    return Stage(name="dpo", train_batch=train_batch, compute_loss=compute_loss,
                 evaluate=evaluate if val_data is not None else None, trainable=trainable,
                 identity=identity, metrics=meter.metrics)


# --------------------------------------------------------------------------- distillation


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T || student_T), over the supervised
    tokens; T^2 keeps the soft term's gradient scale independent of the temperature (Hinton 2015)."""
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(student_logits[mask].float(), targets[mask])
    student = (student_logits[mask].float() / temperature).log_softmax(dim=-1)
    teacher = (teacher_logits[mask].float() / temperature).log_softmax(dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return alpha * ce + (1 - alpha) * kl


def check_same_tokenizer(teacher: XiaoTokenizer, student: XiaoTokenizer) -> None:
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ValueError(
            f"teacher and student must share a tokenizer (teacher: {teacher.vocab_size} tokens, student: "
            f"{student.vocab_size}, vocabularies differ); distillation compares logits token by token"
        )


def distill_stage(train_data: SftData, val_data: SftData | None, teacher: nn.Module, cfg: TrainConfig, *,
                  temperature: float = 2.0, alpha: float = 0.5, packed: bool = True,
                  trainable: Callable | None = None, identity: dict | None = None) -> Stage:
    """The SFT data and mask, with the loss pulled towards a frozen teacher's distribution."""
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"distillation needs temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    teacher.eval().requires_grad_(False)
    base = sft_stage(train_data, val_data, cfg, packed=packed, trainable=trainable, identity=identity)

    def compute_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if next(teacher.parameters()).device != batch["inputs"].device:
            teacher.to(batch["inputs"].device)
        with torch.no_grad():
            teacher_logits = masked_forward(teacher, batch)
        loss = distillation_loss(masked_forward(model, batch), teacher_logits, batch["targets"], temperature, alpha)
        return add_aux_loss(model, loss), batch["inputs"].numel()

    base.identity.update({"temperature": temperature, "alpha": alpha})
    return Stage(name="distill", train_batch=base.train_batch, compute_loss=compute_loss, evaluate=base.evaluate,
                 trainable=trainable, identity=base.identity)


# --------------------------------------------------------------------------- runners


def fit_seq_len(cfg: TrainConfig, *models: Transformer) -> TrainConfig:
    """`cfg` with seq_len capped at the models' context (the stage presets use 256)."""
    limit = min(m.config.max_seq_len for m in models)
    if cfg.seq_len <= limit:
        return cfg
    print(f"seq_len {cfg.seq_len} -> {limit}: the model's max_seq_len")
    return dataclasses.replace(cfg, seq_len=limit)


def _with_lora(model: Transformer, lora, seed: int) -> tuple[Any, Callable | None, dict]:
    if lora is None:
        return None, None, {}
    from xiaolm.model.lora import apply_lora, lora_parameters, settings_dict

    with seeded(seed):  # the adapters' random initialisation is part of the run
        peft_model = apply_lora(model, lora)
    return peft_model, lora_parameters, {"lora": settings_dict(lora)}


def _finish(result: TrainResult, peft_model) -> TrainResult:
    if peft_model is not None and result.checkpoint is not None:
        from xiaolm.model.lora import save_adapter

        save_adapter(peft_model, result.checkpoint)
    return result


def load_chat_splits(data: Sequence[str | Path], val_data: Sequence[str | Path] | None, *, fmt: str = "auto",
                     val_fraction: float = 0.05, skip_bad: bool = False, preference: bool = False):
    """(train, val) records; without val_data a stable-hash share of `data` is held out."""
    stats = ReadStats()
    read = (lambda p: read_preferences(p, skip_bad=skip_bad, stats=stats)) if preference else (
        lambda p: read_conversations(p, fmt, skip_bad=skip_bad, stats=stats))
    train_items = read(data)
    if val_data:
        val_items = read(val_data)
    elif val_fraction > 0:
        key = (lambda p: repr((p.prompt, p.chosen, p.rejected))) if preference else repr
        train_items, val_items = split_held_out(train_items, val_fraction, key=key)
    else:
        val_items = []
    stats.report_skipped()
    if not train_items:
        raise ValueError(f"no training records in {[str(p) for p in data]}")
    return train_items, val_items


def held_out_data(build: Callable[[list], Any], items: list) -> Any | None:
    """`build(items)` for the held-out split, or None (no validation, said on stdout) when it has no
    record or none fits in seq_len: a long run should not die for want of a validation set."""
    if not items:
        return None
    try:
        return build(items)
    except ValueError as error:
        print(f"held-out data unusable, training without validation: {error}")
        return None


def _print_sft_stats(name: str, data: SftData) -> None:
    s = data.stats
    print(f"{name}: {s.num_conversations} conversations -> {data.num_rows} rows; {s.num_supervised_tokens:,} of "
          f"{s.num_tokens:,} tokens supervised; {s.num_truncated} longer than seq_len, {s.num_dropped} dropped "
          "(no whole assistant reply within seq_len, or none at all under --truncate tokens)")


def run_sft(from_checkpoint: str | Path, data: Sequence[str | Path], cfg: TrainConfig, *,
            val_data: Sequence[str | Path] | None = None, fmt: str = "auto", pack: bool = True,
            truncate: str = "turns", val_fraction: float = 0.05, skip_bad: bool = False, lora=None,
            stop_after_steps: int | None = None) -> TrainResult:
    start = load_model(from_checkpoint)
    model, tokenizer = start.model, start.tokenizer
    cfg = fit_seq_len(cfg, model)
    train_items, val_items = load_chat_splits(data, val_data, fmt=fmt, val_fraction=val_fraction, skip_bad=skip_bad)
    train_data = build_sft_data(train_items, tokenizer, cfg.seq_len, pack=pack, seed=cfg.seed, truncate=truncate)
    _print_sft_stats("train", train_data)
    val = held_out_data(lambda items: build_sft_data(items, tokenizer, cfg.seq_len, pack=pack, truncate=truncate),
                        val_items)
    if val is not None:
        _print_sft_stats("val", val)
    peft_model, trainable, lora_configs = _with_lora(model, lora, cfg.seed)
    stage = sft_stage(train_data, val, cfg, packed=pack, trainable=trainable)
    configs = {"sft": {"from": str(from_checkpoint), "format": fmt, "pack": pack, "truncate": truncate}, **lora_configs}
    result = train(model, stage, cfg, tokenizer=tokenizer, configs=configs, stop_after_steps=stop_after_steps)
    return _finish(result, peft_model)


def run_dpo(from_checkpoint: str | Path, data: Sequence[str | Path], cfg: TrainConfig, *,
            val_data: Sequence[str | Path] | None = None, beta: float = 0.1, reference_checkpoint=None,
            precompute_reference: bool = True, truncate: str = "turns", val_fraction: float = 0.05,
            skip_bad: bool = False, lora=None,
            stop_after_steps: int | None = None) -> TrainResult:
    """DPO from `from_checkpoint`; the reference is `reference_checkpoint` or the starting model."""
    start = load_model(from_checkpoint)
    model, tokenizer = start.model, start.tokenizer
    cfg = fit_seq_len(cfg, model)
    if reference_checkpoint is not None:
        loaded = load_model(reference_checkpoint)
        reference = loaded.model
        check_same_tokenizer(loaded.tokenizer, tokenizer)
    else:
        reference = copy.deepcopy(model)
    train_items, val_items = load_chat_splits(data, val_data, val_fraction=val_fraction, skip_bad=skip_bad,
                                              preference=True)
    train_data = build_preference_data(train_items, tokenizer, cfg.seq_len, truncate)
    val = held_out_data(lambda items: build_preference_data(items, tokenizer, cfg.seq_len, truncate), val_items)
    print(f"preference pairs: {train_data.num_pairs} train ({train_data.num_dropped} dropped), "
          f"{val.num_pairs if val else 0} val")
    runtime = setup_runtime(cfg.device, cfg.precision)
    if precompute_reference:
        train_data.reference_logps = compute_reference_logps(reference, train_data, cfg.batch_size, runtime)
        if val is not None:
            val.reference_logps = compute_reference_logps(reference, val, cfg.batch_size, runtime)
        reference = None  # freed: the loop never runs it
    peft_model, trainable, lora_configs = _with_lora(model, lora, cfg.seed)
    stage = dpo_stage(train_data, val, cfg, beta=beta, reference=reference, trainable=trainable)
    configs = {"dpo": {"from": str(from_checkpoint), "reference": str(reference_checkpoint or from_checkpoint),
                       "precompute_reference": precompute_reference, "truncate": truncate}, **lora_configs}
    result = train(model, stage, cfg, tokenizer=tokenizer, configs=configs, runtime=runtime,
                   stop_after_steps=stop_after_steps)
    return _finish(result, peft_model)


def run_distill(teacher_checkpoint: str | Path, student: str | Path, data: Sequence[str | Path], cfg: TrainConfig, *,
                val_data: Sequence[str | Path] | None = None, student_overrides: dict | None = None,
                fmt: str = "auto", pack: bool = True, truncate: str = "turns",
                temperature: float = 2.0, alpha: float = 0.5,
                val_fraction: float = 0.05, skip_bad: bool = False, lora=None,
                stop_after_steps: int | None = None) -> TrainResult:
    """Distil `teacher_checkpoint` into `student`: a checkpoint (same tokenizer required) or a model
    preset name (a fresh model with the teacher's tokenizer; `student_overrides` change its shape)."""
    from xiaolm.config import MODEL_PRESETS, ModelConfig

    loaded = load_model(teacher_checkpoint)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    if Path(student).exists():
        loaded = load_model(student)
        model = loaded.model
        check_same_tokenizer(tokenizer, loaded.tokenizer)
    elif str(student) in MODEL_PRESETS:
        with seeded(cfg.seed):
            # as many output rows as the teacher (an imported model's embedding may be padded)
            model = Transformer(ModelConfig.from_preset(str(student), vocab_size=teacher.config.vocab_size,
                                                        **(student_overrides or {})))
    else:
        raise ValueError(f"--student {student}: no checkpoint there and not a model preset ({sorted(MODEL_PRESETS)})")
    if model.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"teacher and student must have as many output rows (teacher: {teacher.config.vocab_size}, "
                         f"student: {model.config.vocab_size}); distillation compares logits token by token")
    cfg = fit_seq_len(cfg, model, teacher)
    train_items, val_items = load_chat_splits(data, val_data, fmt=fmt, val_fraction=val_fraction, skip_bad=skip_bad)
    train_data = build_sft_data(train_items, tokenizer, cfg.seq_len, pack=pack, seed=cfg.seed, truncate=truncate)
    _print_sft_stats("train", train_data)
    val = held_out_data(lambda items: build_sft_data(items, tokenizer, cfg.seq_len, pack=pack, truncate=truncate),
                        val_items)
    peft_model, trainable, lora_configs = _with_lora(model, lora, cfg.seed)
    stage = distill_stage(train_data, val, teacher, cfg, temperature=temperature, alpha=alpha, packed=pack,
                          trainable=trainable)
    configs = {"distill": {"teacher": str(teacher_checkpoint), "student": str(student), "format": fmt,
                           "truncate": truncate,
                           "teacher_model": to_dict(teacher.config)}, **lora_configs}
    result = train(model, stage, cfg, tokenizer=tokenizer, configs=configs, stop_after_steps=stop_after_steps)
    return _finish(result, peft_model)
