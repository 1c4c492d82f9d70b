"""AdamW with decay / no-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from xiaolm.config import TrainConfig


def build_optimizer(parameters: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig, device_type: str):
    """Matrices (embeddings, projections) decay; vectors (norm weights, biases) do not:
    decaying a norm's gain towards 0 only fights the normalisation."""
    decay, no_decay, seen = [], [], set()
    for _, param in parameters:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel is the fast path on GPU and on CPU alike (bench: 0.07 s against 0.30 s for
    # the default per-parameter loop on 26M parameters, 2 CPU cores); MPS lacks it
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
