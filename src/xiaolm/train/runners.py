"""The runners the CLI and speedrun call, one per stage: each loads or builds the model, builds its
data and stage (train/stages.py), adds LoRA adapters when asked (`train_stage`) and hands
everything to the one loop. A sequence length longer than the model's context is capped at it
(`config.fit_seq_len`), as in every command.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xiaolm.checkpoint import load_model
from xiaolm.config import MODEL_PRESETS, LoraConfig, ModelConfig, TrainConfig, fit_seq_len, to_dict
from xiaolm.data.chat_formats import read_conversations, read_preferences
from xiaolm.data.chat_tokens import SftData, build_sft_data
from xiaolm.data.corpus import split_held_out
from xiaolm.data.readers import ReadStats
from xiaolm.data.shards import PackedTokens
from xiaolm.eval.ppl import token_num_bytes
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import Runtime, seeded, setup_runtime
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.loop import Stage, TrainResult, train
from xiaolm.train.stages import (
    build_preference_data,
    compute_reference_logps,
    distill_stage,
    dpo_stage,
    pretrain_stage,
    sft_stage,
)


def train_stage(model: Transformer, stage: Stage, cfg: TrainConfig, *, tokenizer: XiaoTokenizer,
                configs: dict[str, Any] | None = None, lora: LoraConfig | None = None,
                runtime: Runtime | None = None) -> TrainResult:
    """`train`, with LoRA adapters injected into `model` first when `lora` is given (then only they
    train, and the final checkpoint also holds the adapter in peft's format)."""
    peft_model = None
    if lora is not None:
        from xiaolm.model.lora import apply_lora, lora_parameters

        with seeded(cfg.seed):  # the adapters' random initialisation is part of the run
            peft_model = apply_lora(model, lora)
        stage = dataclasses.replace(stage, trainable=lora_parameters)
        configs = {**(configs or {}), "lora": to_dict(lora)}
    result = train(model, stage, cfg, tokenizer=tokenizer, configs=configs, runtime=runtime)
    if peft_model is not None and result.checkpoint is not None:
        from xiaolm.model.lora import save_adapter

        save_adapter(peft_model, result.checkpoint)
    return result


def with_seq_len_fitted(cfg: TrainConfig, *models: ModelConfig) -> TrainConfig:
    """`cfg` with its seq_len capped at the models' context (`fit_seq_len`)."""
    seq_len = fit_seq_len(cfg.seq_len, *models)
    return cfg if seq_len == cfg.seq_len else dataclasses.replace(cfg, seq_len=seq_len)


# --------------------------------------------------------------------------- pretraining


def run_pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, tokenizer: XiaoTokenizer,
                 train_shards: str | Path, val_shards: str | Path | None = None, *,
                 runtime: Runtime | None = None) -> TrainResult:
    """A fresh model pretrained on token shards (data/shards.py)."""
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={model_cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    train_cfg = with_seq_len_fitted(train_cfg, model_cfg)
    train_data = PackedTokens(train_shards, train_cfg.seq_len, seed=train_cfg.seed)
    val_data = PackedTokens(val_shards, train_cfg.seq_len, seed=0, shuffle=False) if val_shards else None
    with seeded(train_cfg.seed):
        model = Transformer(model_cfg)
    identity = {"train_tokens": train_data.meta["num_tokens"], "train_data_key": train_data.meta["key"]}
    stage = pretrain_stage(train_data, val_data, token_num_bytes(tokenizer), train_cfg, identity)
    return train(model, stage, train_cfg, tokenizer=tokenizer, runtime=runtime)


# --------------------------------------------------------------------------- chat data


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
    print(f"{name}: {s.num_conversations} conversations -> {data.num_rows} rows; "
          f"{s.num_supervised_tokens:,} of {s.num_tokens:,} tokens supervised; {s.num_truncated} longer than "
          f"seq_len, {s.num_dropped} dropped (no whole assistant reply within seq_len, or none at all under "
          "--truncate tokens)")


def load_sft_splits(data: Sequence[str | Path], val_data: Sequence[str | Path] | None,
                    tokenizer: XiaoTokenizer, cfg: TrainConfig, *, fmt: str, pack: bool, truncate: str,
                    val_fraction: float, skip_bad: bool) -> tuple[SftData, SftData | None]:
    """Tokenized, packed SFT rows of the training and held-out conversations (statistics printed)."""
    train_items, val_items = load_chat_splits(data, val_data, fmt=fmt, val_fraction=val_fraction,
                                              skip_bad=skip_bad)

    def build(items: list, seed: int = 0) -> SftData:
        return build_sft_data(items, tokenizer, cfg.seq_len, pack=pack, seed=seed, truncate=truncate)

    train_data = build(train_items, cfg.seed)
    _print_sft_stats("train", train_data)
    val = held_out_data(build, val_items)
    if val is not None:
        _print_sft_stats("val", val)
    return train_data, val


def check_same_tokenizer(teacher: XiaoTokenizer, student: XiaoTokenizer) -> None:
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ValueError(
            f"teacher and student must share a tokenizer (teacher: {teacher.vocab_size} tokens, student: "
            f"{student.vocab_size}, vocabularies differ); distillation compares logits token by token"
        )


# --------------------------------------------------------------------------- SFT, DPO, distillation


def run_sft(from_checkpoint: str | Path, data: Sequence[str | Path], cfg: TrainConfig, *,
            val_data: Sequence[str | Path] | None = None, fmt: str = "auto", pack: bool = True,
            truncate: str = "turns", val_fraction: float = 0.05, skip_bad: bool = False,
            lora: LoraConfig | None = None, runtime: Runtime | None = None) -> TrainResult:
    """Supervised fine-tuning of `from_checkpoint` on chat data."""
    start = load_model(from_checkpoint)
    model, tokenizer = start.model, start.tokenizer
    cfg = with_seq_len_fitted(cfg, model.config)
    train_data, val = load_sft_splits(data, val_data, tokenizer, cfg, fmt=fmt, pack=pack, truncate=truncate,
                                      val_fraction=val_fraction, skip_bad=skip_bad)
    stage = sft_stage(train_data, val, cfg, packed=pack)
    configs = {"sft": {"from": str(from_checkpoint), "format": fmt, "pack": pack, "truncate": truncate}}
    return train_stage(model, stage, cfg, tokenizer=tokenizer, configs=configs, lora=lora, runtime=runtime)


def run_dpo(from_checkpoint: str | Path, data: Sequence[str | Path], cfg: TrainConfig, *,
            val_data: Sequence[str | Path] | None = None, beta: float = 0.1, reference_checkpoint=None,
            precompute_reference: bool = True, truncate: str = "turns", val_fraction: float = 0.05,
            skip_bad: bool = False, lora: LoraConfig | None = None,
            runtime: Runtime | None = None) -> TrainResult:
    """DPO from `from_checkpoint`; the reference is `reference_checkpoint` or the starting model."""
    start = load_model(from_checkpoint)
    model, tokenizer = start.model, start.tokenizer
    cfg = with_seq_len_fitted(cfg, model.config)
    if reference_checkpoint is not None:
        loaded = load_model(reference_checkpoint)
        reference = loaded.model
        check_same_tokenizer(loaded.tokenizer, tokenizer)
    else:
        reference = copy.deepcopy(model)
    train_items, val_items = load_chat_splits(data, val_data, val_fraction=val_fraction, skip_bad=skip_bad,
                                              preference=True)
    train_data = build_preference_data(train_items, tokenizer, cfg.seq_len, truncate)
    val = held_out_data(lambda items: build_preference_data(items, tokenizer, cfg.seq_len, truncate),
                        val_items)
    print(f"preference pairs: {train_data.num_pairs} train ({train_data.num_dropped} dropped), "
          f"{val.num_pairs if val else 0} val")
    runtime = runtime or setup_runtime(cfg.device, cfg.precision)
    if precompute_reference:
        train_data.reference_logps = compute_reference_logps(reference, train_data, cfg.batch_size, runtime)
        if val is not None:
            val.reference_logps = compute_reference_logps(reference, val, cfg.batch_size, runtime)
        reference = None  # freed: the loop never runs it
    stage = dpo_stage(train_data, val, cfg, beta=beta, reference=reference)
    configs = {"dpo": {"from": str(from_checkpoint),
                       "reference": str(reference_checkpoint or from_checkpoint),
                       "precompute_reference": precompute_reference, "truncate": truncate}}
    return train_stage(model, stage, cfg, tokenizer=tokenizer, configs=configs, lora=lora, runtime=runtime)


def run_distill(teacher_checkpoint: str | Path, student: str | Path, data: Sequence[str | Path],
                cfg: TrainConfig, *, val_data: Sequence[str | Path] | None = None,
                student_overrides: dict | None = None, fmt: str = "auto", pack: bool = True,
                truncate: str = "turns", temperature: float = 2.0, alpha: float = 0.5,
                val_fraction: float = 0.05, skip_bad: bool = False,
                lora: LoraConfig | None = None, runtime: Runtime | None = None) -> TrainResult:
    """Distil `teacher_checkpoint` into `student`: a checkpoint (same tokenizer required) or a model
    preset name (a fresh model with the teacher's tokenizer; `student_overrides` change its shape)."""
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
        raise ValueError(f"--student {student}: no checkpoint there and not a model preset "
                         f"({sorted(MODEL_PRESETS)})")
    if model.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"teacher and student must have as many output rows (teacher: "
                         f"{teacher.config.vocab_size}, student: {model.config.vocab_size}); distillation "
                         "compares logits token by token")
    cfg = with_seq_len_fitted(cfg, model.config, teacher.config)
    train_data, val = load_sft_splits(data, val_data, tokenizer, cfg, fmt=fmt, pack=pack, truncate=truncate,
                                      val_fraction=val_fraction, skip_bad=skip_bad)
    stage = distill_stage(train_data, val, teacher, cfg, temperature=temperature, alpha=alpha, packed=pack)
    configs = {"distill": {"teacher": str(teacher_checkpoint), "student": str(student), "format": fmt,
                           "truncate": truncate, "teacher_model": to_dict(teacher.config)}}
    return train_stage(model, stage, cfg, tokenizer=tokenizer, configs=configs, lora=lora, runtime=runtime)
