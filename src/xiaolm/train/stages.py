"""Training stages as small builders over the one loop in loop.py."""

from __future__ import annotations

import torch
from torch import nn

from xiaolm.config import TrainConfig
from xiaolm.data.shards import PackedTokens
from xiaolm.eval.ppl import evaluate_packed
from xiaolm.model.transformer import document_mask
from xiaolm.train.loop import Batch, Stage, unwrap_model


def next_token_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of each target token; targets of -100 carry no loss (SFT: everything but
    the assistant tokens). A model with an
    auxiliary loss (MoE load balancing) adds it here, so every stage that trains through this
    function gets it."""
    loss = masked_forward(model, batch, targets=batch["targets"])  # the head and cross-entropy fused
    return add_aux_loss(model, loss), batch["inputs"].numel()


def masked_forward(model: nn.Module, batch: Batch, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V), or with `targets` the model's mean loss on them. A batch that carries
    `doc_ids` (packed SFT rows) gets the block-diagonal causal mask, so packed conversations never
    attend to each other."""
    mask = document_mask(batch["doc_ids"]) if "doc_ids" in batch else None
    return model(batch["inputs"], attn_mask=mask, targets=targets)


def add_aux_loss(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """`loss` plus the model's auxiliary loss from its latest forward, if it has one. Stages whose
    loss is not `next_token_loss` (DPO, distillation) call this after their training forward."""
    inner = unwrap_model(model)
    aux = inner.aux_loss() if hasattr(inner, "aux_loss") else None
    return loss if aux is None else loss + aux


def pretrain_stage(
    train_data: PackedTokens,
    val_data: PackedTokens | None,
    token_num_bytes: torch.Tensor,
    cfg: TrainConfig,
    identity: dict | None = None,
) -> Stage:
    """Next-token prediction on packed windows. Micro-batch m of rank r takes the samples
    ((m * world + r) * B ...): a run on W processes sees exactly the samples one process with
    W times the batch would."""

    def train_batch(micro_index: int, rank: int, world_size: int) -> Batch:
        first = (micro_index * world_size + rank) * cfg.batch_size
        inputs, targets = train_data.batch(first, cfg.batch_size)
        return {"inputs": inputs, "targets": targets}

    evaluate = None
    if val_data is not None:
        evaluate = evaluate_packed(val_data, token_num_bytes, cfg.batch_size, cfg.eval_batches)
    return Stage(
        name="pretrain",
        train_batch=train_batch,
        compute_loss=next_token_loss,
        evaluate=evaluate,
        identity=identity or {},
    )
