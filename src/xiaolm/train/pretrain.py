"""Pretraining from text files: tokenize once into shards (cached), build the model, train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from xiaolm.config import ModelConfig, TrainConfig
from xiaolm.data.readers import ReadStats, iter_documents
from xiaolm.data.shards import PackedTokens, fingerprint_paths, write_shards
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.distributed import seed_everything
from xiaolm.train.loop import TrainResult, train
from xiaolm.train.stages import pretrain_stage


def tokenize_files(
    paths: Sequence[str | Path],
    tokenizer: XiaoTokenizer,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    skip_bad: bool = False,
) -> dict:
    """Tokenize user files into shards at `out_dir`, reusing them while inputs are unchanged."""
    stats = ReadStats()
    key = f"{fingerprint_paths(paths)}|{text_field}|skip_bad={skip_bad}"
    meta = write_shards(
        iter_documents(paths, text_field=text_field, skip_bad=skip_bad, stats=stats), tokenizer, out_dir,
        source_key=key,
    )
    stats.report_skipped()
    return meta


def token_num_bytes(tokenizer: XiaoTokenizer) -> torch.Tensor:
    """Bytes of text behind each token id; special tokens stand for no text."""
    table = [0 if i in tokenizer.special_ids else len(b) for i, b in enumerate(tokenizer.token_bytes())]
    return torch.tensor(table, dtype=torch.float64)


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer: XiaoTokenizer,
    train_shards: str | Path,
    val_shards: str | Path | None = None,
    *,
    stop_after_steps: int | None = None,
) -> TrainResult:
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={model_cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    train_data = PackedTokens(train_shards, train_cfg.seq_len, seed=train_cfg.seed)
    val_data = PackedTokens(val_shards, train_cfg.seq_len, seed=0, shuffle=False) if val_shards else None
    seed_everything(train_cfg.seed)
    model = Transformer(model_cfg)
    identity = {"train_tokens": train_data.meta["num_tokens"], "train_data_key": train_data.meta["key"]}
    stage = pretrain_stage(train_data, val_data, token_num_bytes(tokenizer), train_cfg, identity)
    return train(model, stage, train_cfg, tokenizer=tokenizer, stop_after_steps=stop_after_steps)
