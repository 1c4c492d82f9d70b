"""LoRA through the `peft` library (`pip install 'xiaolm[lora]'`), on the plain torch Transformer.

How a LoRA run is stored (the simplest design that resumes exactly and stays loadable):
- `peft.get_peft_model` injects the adapters into the Transformer in place; the training loop
  trains that Transformer (only the lora_A / lora_B matrices require gradients) and checkpoints
  it as usual, so `model.safetensors` holds the frozen base weights and the adapters under peft's
  module names, and `--resume` restores both bit for bit.
- `config.json` gets a "lora" section (rank, alpha, dropout, target pattern), which is how a LoRA
  checkpoint is recognised: `checkpoint.load_model` merges it on load (or keeps the adapters apart
  with merge_lora=False), `xiaolm lora merge` writes a merged plain checkpoint.
- The final checkpoint of a run also holds the adapter in peft's own format
  (adapter_config.json + adapter_model.safetensors, written by `PeftModel.save_pretrained`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from xiaolm.model.transformer import Transformer

# every attention and MLP projection of model/transformer.py (module names end with these)
DEFAULT_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraSettings:
    rank: int = 8
    """Rank r of each adapter (B @ A with A: r x in, B: out x r)."""
    alpha: float = 16.0
    """Scale: the update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    targets: str = DEFAULT_TARGETS
    """Regular expression over module names (full match) choosing the nn.Linear layers to adapt."""

    def __post_init__(self) -> None:
        if self.rank <= 0 or not self.alpha > 0:  # `not >`: NaN too
            raise ValueError(f"LoRA rank and alpha must be positive, got rank={self.rank}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as error:
            raise ValueError(f"LoRA targets {self.targets!r}: not a regular expression ({error})") from None


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ValueError("LoRA needs the peft package: pip install 'xiaolm[lora]'") from error
    return peft


def apply_lora(model: Transformer, settings: LoraSettings):
    """Inject LoRA adapters into `model` in place (base weights frozen); returns the PeftModel
    wrapper, which is only needed to save the adapter in peft's format."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=settings.targets, bias="none")
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"LoRA targets {settings.targets!r}: {error}") from error
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


def settings_dict(settings: LoraSettings) -> dict[str, Any]:
    return asdict(settings)
