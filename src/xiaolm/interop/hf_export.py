"""xiaolm -> Hugging Face transformers: a checkpoint as a transformers model folder of the matching
architecture (interop/hf_config.py: Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE), and a LoRA
checkpoint's adapter renamed so that peft loads it onto that model.

The folder is written by xiaolm itself (config.json, model.safetensors, generation_config.json, the
tokenizer), not by transformers' `save_pretrained`: what it holds then does not depend on which
transformers version is installed, and it carries the fields every supported version reads
(tests/test_interop.py loads it under the oldest and the newest). The end token transformers
scores and stops with (`tokenizer.eos_token`) is the one the model learned to end with: a base
model's documents end in <|endoftext|>, a chat model's replies in <|im_end|>; generation_config.json
lists every stop token either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xiaolm.config import ModelConfig
from xiaolm.interop.hf_config import architecture_for, hf_config, hf_weight_name
from xiaolm.tokenizer.bpe import ENDOFTEXT, IM_END, XiaoTokenizer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CHAT_STAGES = ("sft", "dpo", "distill")


def hf_state_dict(model: torch.nn.Module, config: ModelConfig, architecture: str) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, fp32; a tied output projection once (as the
    embedding); the MoE routing bias, which must be zero there, left out."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("expert_bias"):
            if tensor.any():
                raise ValueError(f"{name} is not zero (aux-loss-free balancing, --moe-bias-update-rate): only "
                                 "DeepSeek-V3 routes with such a bias, and it cannot be exported")
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        weights[hf_weight_name(name, architecture)] = tensor.detach().to("cpu", torch.float32).contiguous()
    return weights


def build_hf_model(config: ModelConfig, model: torch.nn.Module | None = None):
    """An fp32 transformers model (SDPA attention) of xiaolm's shape and matching architecture, with
    `model`'s weights copied in when given (benchmark peers, tests)."""
    transformers = require_transformers()
    architecture = architecture_for(config)
    fields = hf_config(config, architecture, eos_ids=[], bos_id=None)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in fields.items() if k != "architectures"})
    hf._attn_implementation = "sdpa"
    hf_model = transformers.AutoModelForCausalLM.from_config(hf).float()
    if model is not None:
        missing, unexpected = hf_model.load_state_dict(hf_state_dict(model, config, architecture), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weights do not map onto {architecture}: missing {missing}, unexpected {unexpected}")
        if config.tie_embeddings:
            hf_model.tie_weights()
    return hf_model


def require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ValueError("this needs the transformers package: pip install 'xiaolm[hf]'") from error
    return transformers


def export_eos_token(tokenizer: XiaoTokenizer, configs: dict[str, Any]) -> str:
    """What transformers' `tokenizer.eos_token` is in the export: for xiaolm's tokenizer, <|im_end|>
    once a chat stage (SFT, DPO, distillation) trained the model, else <|endoftext|>; an imported
    tokenizer keeps its own."""
    if not tokenizer.is_native:
        return tokenizer.hf_eos_token()
    return IM_END if any(stage in configs for stage in CHAT_STAGES) else ENDOFTEXT


def write_hf_folder(folder: Path, model: torch.nn.Module, config: ModelConfig, tokenizer: XiaoTokenizer,
                    configs: dict[str, Any]) -> str:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer into the new
    folder `folder`; returns the architecture."""
    from safetensors.torch import save_file

    architecture = architecture_for(config)
    eos_token = export_eos_token(tokenizer, configs)
    eos_id = tokenizer.tokenizer.token_to_id(eos_token)
    eos_ids = [eos_id] + [i for i in tokenizer.stop_ids if i != eos_id]  # the tokenizer's eos first
    folder.mkdir(parents=True)
    fields = hf_config(config, architecture, eos_ids=eos_ids, bos_id=tokenizer.bos_id)
    (folder / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    save_file(hf_state_dict(model, config, architecture), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(folder, eos_token=eos_token)
    return architecture


def export_hf(checkpoint: str | Path, out: str | Path, *, keep_adapter: bool = False) -> Path:
    """Write `checkpoint` as a transformers model folder `out`, loadable with
    `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.

    A LoRA checkpoint is merged, unless `keep_adapter`: then `out` holds the base weights and
    `out/adapter` the adapter under transformers' module names (`PeftModel.from_pretrained`).
    """
    from xiaolm import checkpoint as ckpt

    loaded = ckpt.load_model(checkpoint, merge_lora=not keep_adapter)  # a LoRA checkpoint comes merged
    config = loaded.config
    architecture = architecture_for(config)  # refused before anything is written
    if keep_adapter:
        if loaded.peft_model is None:
            raise ValueError(f"{loaded.path} is not a LoRA checkpoint (its config.json has no 'lora' section)")
        model = loaded.peft_model.unload()  # the base weights, adapters removed unmerged
    else:
        model = loaded.model

    def write(folder: Path) -> None:
        write_hf_folder(folder, model, config, loaded.tokenizer, loaded.configs)
        if keep_adapter:
            convert_adapter(loaded.path, folder / "adapter", architecture, base_model=str(Path(out).resolve()))

    return ckpt.write_new_folder(out, write)


def convert_adapter(checkpoint: str | Path, out: str | Path, architecture: str, base_model: str | None = None) -> Path:
    """Rename the peft adapter saved in a LoRA checkpoint (adapter_config.json +
    adapter_model.safetensors, xiaolm module names) to the transformers `architecture`'s module
    names, into `out`. The target modules become the explicit list of adapted modules, so any
    --lora-targets pattern carries over."""
    from safetensors.torch import load_file, save_file

    from xiaolm import checkpoint as ckpt

    source = ckpt.resolve_checkpoint(checkpoint)
    if not (source / ADAPTER_CONFIG).is_file() or not (source / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{source}: no peft adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}); it is written into "
                         "the final checkpoint of a --lora run")
    config = json.loads((source / ADAPTER_CONFIG).read_text())
    weights, modules = {}, set()
    for key, tensor in load_file(str(source / ADAPTER_WEIGHTS)).items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{source / ADAPTER_WEIGHTS}: unexpected key {key!r}")
        name = hf_weight_name(key[len(PEFT_PREFIX):], architecture)
        weights[PEFT_PREFIX + name] = tensor
        modules.add(name.split(".lora_")[0])
    config["target_modules"] = sorted(modules)
    config["base_model_name_or_path"] = base_model

    def write(folder: Path) -> None:
        folder.mkdir()
        save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return ckpt.write_new_folder(out, write)
