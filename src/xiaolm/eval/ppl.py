"""Loss, perplexity and bits-per-byte of a model on held-out text.

The text is tokenized into shards (reused while the files and tokenizer are unchanged) and scored
by the same `evaluate_packed` that validation uses during training, so the numbers match the
`val_loss` / `val_bpb` of metrics.jsonl. Bits-per-byte divides by the UTF-8 bytes behind the target
tokens, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xiaolm.data.shards import PackedTokens
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.train.distributed import DistContext
from xiaolm.train.pretrain import token_num_bytes, tokenize_files
from xiaolm.train.stages import evaluate_packed


def evaluate_text(
    model: torch.nn.Module,
    tokenizer: XiaoTokenizer,
    paths: Sequence[str | Path],
    tokens_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """{loss, perplexity, bpb, num_tokens} over windows of `seq_len` tokens of `paths`."""
    tokenize_files(paths, tokenizer, tokens_dir, text_field=text_field)
    result = evaluate_shards(model, tokenizer, tokens_dir, seq_len=seq_len, batch_size=batch_size,
                             max_batches=max_batches)
    return {**result, "data": [str(p) for p in paths]}


def evaluate_shards(
    model: torch.nn.Module,
    tokenizer: XiaoTokenizer,
    tokens_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """The same over token shards already written (a run's `tokens/val`)."""
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    data = PackedTokens(tokens_dir, seq_len, seed=0, shuffle=False)
    num_batches = max_batches or math.ceil(data.num_windows / batch_size)
    evaluate = evaluate_packed(data, token_num_bytes(tokenizer), batch_size, num_batches)
    model.eval()
    with torch.inference_mode():
        metrics = evaluate(model, DistContext(), contextlib.nullcontext)
    num_windows = min(data.num_windows, num_batches * batch_size)
    return {
        "kind": "ppl",
        "data": [str(tokens_dir)],
        "loss": metrics["val_loss"],
        "perplexity": math.exp(metrics["val_loss"]),
        "bpb": metrics["val_bpb"],
        "num_tokens": num_windows * seq_len,
        "seq_len": seq_len,
    }
