"""LoRA through the `peft` library (`pip install 'xiaolm[lora]'`), on the plain torch Transformer.

How a LoRA run is stored (the simplest design that resumes exactly and stays loadable):
- `peft.get_peft_model` injects the adapters into the Transformer in place; the training loop
  trains that Transformer (only the lora_A / lora_B matrices require gradients) and checkpoints
  it as usual, so `model.safetensors` holds the frozen base weights and the adapters under peft's
  module names, and `--resume` restores both bit for bit.
- `config.json` gets a "lora" section (`config.LoraConfig`: rank, alpha, dropout, target pattern),
  which is how a LoRA checkpoint is recognised: `checkpoint.load_model` merges it on load (or
  keeps the adapters apart with merge_lora=False), `xiaolm lora merge` writes a merged plain
  checkpoint.
- The final checkpoint of a run also holds the adapter in peft's own format
  (adapter_config.json + adapter_model.safetensors, written by `PeftModel.save_pretrained`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch import nn

from xiaolm.config import LoraConfig
from xiaolm.model.transformer import Transformer


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ValueError("LoRA needs the peft package: pip install 'xiaolm[lora]'") from error
    return peft


def apply_lora(model: Transformer, lora: LoraConfig):
    """Inject LoRA adapters into `model` in place (base weights frozen); returns the PeftModel
    wrapper, which is only needed to save the adapter in peft's format."""
    peft = _peft()
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.targets, bias="none")
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"LoRA targets {lora.targets!r}: {error}") from error
    return peft_model


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapter matrices: the only parameters a LoRA stage trains."""
    return ((name, p) for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


def save_adapter(peft_model, directory: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) into `directory`."""
    peft_model.save_pretrained(str(directory))


def merge_lora(peft_model) -> Transformer:
    """W <- W + (alpha / r) B @ A in every adapted layer; returns the plain Transformer."""
    return peft_model.merge_and_unload()
