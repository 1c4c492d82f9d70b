"""Sampling and KV-cache decoding, with text streamed a whole character at a time."""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from xiaolm.model.transformer import Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables; >1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones.
    logits (B, V), context (B, S)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int] | torch.Tensor,
    cfg: SamplingConfig,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time; rows that produced a stop token yield it
    once and then repeat it. Stops when all rows stopped or after max_new_tokens.

    The prompt (a list for one row, or a (B, S) tensor of equal-length rows) is prefilled in one
    forward; each later step feeds one token through the KV cache. Without the cache each step
    re-runs the whole sequence, which is slow but the reference the cache is tested against.
    """
    device = model.embed_tokens.weight.device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    max_len = model.config.max_seq_len
    if ids.shape[1] >= max_len:
        raise ValueError(f"prompt of {ids.shape[1]} tokens leaves no room in max_seq_len={max_len}")
    steps = min(cfg.max_new_tokens, max_len - ids.shape[1])
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    cache = model.allocate_cache(ids.shape[0], ids.shape[1] + steps) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, cache=cache)[:, -1]  # (B, V)
        for _ in range(steps):
            logits = apply_repetition_penalty(logits, ids, cfg.repetition_penalty)
            next_ids = sample_next(logits, cfg, generator)
            next_ids = torch.where(finished, ids[:, -1], next_ids)
            finished |= torch.isin(next_ids, stop)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            yield next_ids
            if bool(finished.all()):
                return
            logits = model(next_ids[:, None], cache=cache)[:, -1] if use_cache else model(ids)[:, -1]
    finally:
        model.train(was_training)


class TextStreamer:
    """Turns token ids into text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character (a Chinese character
    is 3 bytes); the incremental decoder holds such bytes back until the character completes.
    Invalid sequences become U+FFFD rather than vanishing.
    """

    def __init__(self, token_bytes: Sequence[bytes], skip_ids: frozenset[int] = frozenset()) -> None:
        self.token_bytes = token_bytes
        self.skip_ids = skip_ids
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        return self.decoder.decode(self.token_bytes[token_id])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
