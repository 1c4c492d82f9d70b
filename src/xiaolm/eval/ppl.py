"""Loss, perplexity and bits-per-byte of a model on held-out text.

The text is tokenized into shards (reused while the files and tokenizer are unchanged) and scored
by `evaluate_packed`, which pretraining's validation also uses, so the numbers match the
`val_loss` / `val_bpb` of metrics.jsonl. Bits-per-byte divides by the UTF-8 bytes behind the target
tokens, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.config import fit_seq_len
from xiaolm.data.shards import PackedTokens, tokenize_files
from xiaolm.runtime import Runtime, evaluation_sums
from xiaolm.tokenizer.bpe import XiaoTokenizer


def token_num_bytes(tokenizer: XiaoTokenizer) -> torch.Tensor:
    """Bytes of text behind each token id; special tokens stand for no text."""
    table = [0 if i in tokenizer.special_ids else len(b) for i, b in enumerate(tokenizer.token_bytes())]
    return torch.tensor(table, dtype=torch.float64)


def evaluate_packed(
    data: PackedTokens, token_num_bytes: torch.Tensor, batch_size: int, num_batches: int
) -> Callable[[nn.Module, Runtime], dict[str, float]]:
    """Validation loss and bits-per-byte over the first windows of `data`, split across ranks.

    Bits-per-byte = total nats / ln 2 / total bytes of the target tokens: the loss of a model
    per byte of text, comparable across tokenizers.
    """

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        byte_table = token_num_bytes.to(runtime.device)

        def batch_sums(windows: range) -> torch.Tensor:
            inputs, targets = data.batch(windows.start, len(windows))
            inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
            logits = model(inputs)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            num_tokens = torch.tensor(targets.numel(), dtype=torch.float64, device=runtime.device)
            return torch.stack([nats.double(), num_tokens, byte_table[targets].sum().double()])

        sums = evaluation_sums(runtime, data.num_windows, batch_size, num_batches, 3, batch_sums)
        nats, num_tokens, num_bytes = sums.tolist()
        return {"val_loss": nats / num_tokens, "val_bpb": nats / math.log(2) / max(num_bytes, 1.0)}

    return evaluate


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
    precision: str = "fp32",
) -> dict[str, Any]:
    """{loss, perplexity, bpb, num_tokens} over windows of `seq_len` tokens of `paths`."""
    seq_len = check_eval_settings(model, seq_len, batch_size, max_batches)
    tokenize_files(paths, tokenizer, tokens_dir, text_field=text_field)
    result = evaluate_shards(model, tokenizer, tokens_dir, seq_len=seq_len, batch_size=batch_size,
                             max_batches=max_batches, precision=precision)
    return {**result, "data": [str(p) for p in paths]}


def check_eval_settings(model: nn.Module, seq_len: int | None, batch_size: int, max_batches: int | None) -> int:
    """The window length to score with (None: the model's context; longer than it: capped at it,
    `fit_seq_len`), after refusing settings that cannot work, before anything is tokenized."""
    seq_len = model.config.max_seq_len if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}")
    return fit_seq_len(seq_len, model.config)


def evaluate_shards(
    model: torch.nn.Module,
    tokenizer: XiaoTokenizer,
    tokens_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The same over token shards already written (a run's `tokens/val`); the forwards in fp32, or
    under bf16 / fp16 autocast (`precision`, recorded in the result)."""
    seq_len = check_eval_settings(model, seq_len, batch_size, max_batches)
    data = PackedTokens(tokens_dir, seq_len, seed=0, shuffle=False)
    num_batches = max_batches or math.ceil(data.num_windows / batch_size)
    evaluate = evaluate_packed(data, token_num_bytes(tokenizer), batch_size, num_batches)
    model.eval()
    with torch.inference_mode():
        metrics = evaluate(model, Runtime(next(model.parameters()).device, precision))
    num_windows = min(data.num_windows, num_batches * batch_size)
    return {
        "kind": "ppl",
        "data": [str(tokens_dir)],
        "loss": metrics["val_loss"],
        "perplexity": math.exp(metrics["val_loss"]),
        "bpb": metrics["val_bpb"],
        "num_tokens": num_windows * seq_len,
        "seq_len": seq_len,
        "precision": precision,
    }
