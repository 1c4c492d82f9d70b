"""Fully sharded data parallel (FSDP2, `--fsdp`): each process keeps 1/W of every parameter, its
gradient and its optimizer state, and gathers a block's weights only while that block runs
(`torch.distributed.fsdp.fully_shard`, one unit per block plus the root for the embedding, final
norm and head). Same batches and losses as DDP; the memory of a model, its gradients and AdamW's
two moments is divided by the number of processes.

Checkpoints go through `torch.distributed.checkpoint` (DCP): every process writes its own shards
into `step_N/sharded/` at once, nobody gathers the whole model, and DCP reshards on load, so a
run may resume on another number of processes (2 -> 1 -> 2: one process loads the shards into
its plain model). The rest of the folder (config, tokenizer, step and RNG state) is written as
for any checkpoint. `consolidate_checkpoint` turns such a folder into the plain single-file one
that chat, export and every other command read (load_model also reads a sharded one directly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xiaolm.runtime import Runtime



def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def shard_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Shard `model` in place over every process of the run (a no-op in a single process, whose
    checkpoints still come out in the sharded format so that a later run may use more)."""
    if not runtime.ctx.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.ctx.world_size,))
    for block in model.layers:  # one all-gather per block in forward, one reduce-scatter in backward
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the embedding, final norm and (tied) head
    return model


def _state(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # keyed by parameter names, never by position or shard: any world size reads it back
    model_state, optimizer_state = get_state_dict(model, _optimizers(optimizer))
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Every process writes its shards of the weights and optimizer state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def load_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Load weights and optimizer state written by any number of processes into this run's
    (sharded or plain) model and optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def check_supported(optimizer_name: str, model: nn.Module) -> None:
    if optimizer_name == "muon":
        raise ValueError("--fsdp with --optimizer muon is not supported: Muon orthogonalises whole matrices, "
                         "and FSDP leaves each process a shard of them; use --optimizer adamw or DDP")
    if not hasattr(model, "layers"):
        raise ValueError(f"--fsdp: {type(model).__name__} has no `layers` to shard block by block")
