"""Pretraining from token shards (data/shards.py): build the model, train."""

from __future__ import annotations

from pathlib import Path

from xiaolm.config import ModelConfig, TrainConfig
from xiaolm.data.shards import PackedTokens
from xiaolm.eval.ppl import token_num_bytes
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import Runtime, seeded
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.loop import TrainResult, train
from xiaolm.train.stages import pretrain_stage


def pretrain(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer: XiaoTokenizer,
    train_shards: str | Path,
    val_shards: str | Path | None = None,
    *,
    runtime: Runtime | None = None,
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
    with seeded(train_cfg.seed):
        model = Transformer(model_cfg)
    identity = {"train_tokens": train_data.meta["num_tokens"], "train_data_key": train_data.meta["key"]}
    stage = pretrain_stage(train_data, val_data, token_num_bytes(tokenizer), train_cfg, identity)
    return train(model, stage, train_cfg, tokenizer=tokenizer, runtime=runtime, stop_after_steps=stop_after_steps)
