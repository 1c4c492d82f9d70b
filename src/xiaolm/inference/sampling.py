"""Sampling: per-request settings, penalties, and the choice of the next token.

Every decode (`xiaolm generate`, `chat`, `serve`) samples here, through the engine
(inference/engine.py), which samples all active rows of a batch at once: `penalize` works on
every row together, `sample_rows` groups rows with equal settings and draws each row with its own
generator, so a seeded request gets the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xiaolm.config import SAMPLING_PRESETS, doc, from_preset

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily, as 0 does: dividing logits by them overflows float32."""


@dataclass
class SamplingConfig:
    """How one request is sampled; the commands start from a named preset (config.SAMPLING_PRESETS)."""

    max_new_tokens: int = doc("Tokens to generate at most (the model's context may stop it sooner).", 128)
    temperature: float = doc("Softmax temperature; 0 means greedy.", 0.8)
    top_k: int = doc("Sample among the k most likely tokens; 0 disables.", 0)
    top_p: float = doc("Sample among the most likely tokens that cover probability p; 1 disables.", 1.0)
    repetition_penalty: float = doc("Above 1 discourages tokens already in the context (CTRL's); 1 disables.",
                                    1.0)
    seed: int | None = doc("Seed of the sampler, for repeatable samples (none: torch's global generator).",
                           None)
    presence_penalty: float = doc("OpenAI's: subtracted once from every token already generated.", 0.0)
    frequency_penalty: float = doc("OpenAI's: subtracted once per time a token was generated.", 0.0)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SamplingConfig:
        return from_preset(cls, SAMPLING_PRESETS, "sampling", name, overrides)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def __post_init__(self) -> None:
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones.
    logits (B, V), seen (B, V) bool: the tokens in each row's context; penalty a number or (B, 1)."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def penalize(logits: torch.Tensor, configs: Sequence[SamplingConfig], seen: torch.Tensor,
             counts: torch.Tensor) -> torch.Tensor:
    """All penalties of rows with their own settings. logits (B, V); seen (B, V) bool, the tokens of
    each row's prompt and reply; counts (B, V), how often each token was generated in the reply."""
    penalties = {c.repetition_penalty for c in configs}
    if penalties != {1.0}:
        if len(penalties) == 1:  # one value: as a plain number, the arithmetic of a single request
            penalty = penalties.pop()
        else:
            penalty = torch.tensor([c.repetition_penalty for c in configs], device=logits.device)[:, None]
        logits = apply_repetition_penalty(logits, seen, penalty)
    if any(c.presence_penalty or c.frequency_penalty for c in configs):
        presence = torch.tensor([c.presence_penalty for c in configs], device=logits.device)[:, None]
        frequency = torch.tensor([c.frequency_penalty for c in configs], device=logits.device)[:, None]
        logits = logits - counts * frequency - (counts > 0) * presence
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V) after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p; the first always stays
        # (a top_p below float32's range, 5e-324, rounds to 0 and would drop it too: fuzzing found it)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), every row with the same settings and generator."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_rows(logits: torch.Tensor, configs: Sequence[SamplingConfig],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token of each row, each with its own settings and generator. logits (B, V), penalised.

    Rows with equal settings share the arithmetic; each sampled row then draws from its own
    generator, so what a seeded row gets does not depend on the other rows of the batch."""
    tokens = [0] * len(configs)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, cfg in enumerate(configs):
        key = (0.0, 0, 1.0) if cfg.greedy else (cfg.temperature, cfg.top_k, cfg.top_p)
        groups.setdefault(key, []).append(row)
    for (temperature, top_k, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        if temperature == 0:
            picked = logits.index_select(0, index).argmax(dim=-1).tolist()
        else:
            probs = sampling_probs(logits.index_select(0, index), temperature, top_k, top_p)
            picked = [int(torch.multinomial(probs[i:i + 1], 1, generator=generators[row]))
                      for i, row in enumerate(rows)]
        for row, token in zip(rows, picked):
            tokens[row] = token
    return tokens
