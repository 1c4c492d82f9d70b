"""Helpers shared by the chat tests: a tiny starting checkpoint and the committed chat sample."""

from pathlib import Path

from xiaolm.config import to_dict
from xiaolm.model.transformer import Transformer
from xiaolm.checkpoint import write_model_folder

from conftest import SAMPLE, tiny_model_config

CHAT = SAMPLE / "chat"
SFT_TRAIN, SFT_VAL = CHAT / "sft" / "train.jsonl", CHAT / "sft" / "val.jsonl"
DPO_TRAIN, DPO_VAL = CHAT / "dpo" / "train.jsonl", CHAT / "dpo" / "val.jsonl"


def make_checkpoint(directory: Path, tokenizer, **model_overrides) -> Path:
    """A freshly initialised tiny model saved as a checkpoint folder (stands in for a pretrained one)."""
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, **model_overrides))
    write_model_folder(directory, model, tokenizer, {"model": to_dict(model.config)})
    return directory
