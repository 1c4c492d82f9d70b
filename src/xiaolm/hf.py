"""xiaolm -> Hugging Face transformers: a checkpoint as a `LlamaForCausalLM` folder, and a LoRA
checkpoint's adapter renamed so that peft loads it onto that model (`pip install 'xiaolm[hf]'`).

xiaolm's dense model is Llama's computation under other module names (model/transformer.py:
rotate-half RoPE, RMSNorm, GQA, SwiGLU), so the export is a renaming, checked against
transformers' logits in tests/test_hf.py. What Llama has no field for is refused: QK-norm and
Mixture-of-Experts layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xiaolm.config import ModelConfig

LLAMA_RENAMES = (("attn.", "self_attn."), ("input_norm.", "input_layernorm."),
                 ("post_attn_norm.", "post_attention_layernorm."))
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def hf_name(name: str) -> str:
    """A xiaolm parameter or module name -> its name in transformers' LlamaForCausalLM."""
    if name.startswith("lm_head"):
        return name
    for old, new in LLAMA_RENAMES:
        name = name.replace(old, new)
    return "model." + name


def check_llama_compatible(config: ModelConfig) -> None:
    if config.num_experts > 0:
        raise ValueError("a Mixture-of-Experts model has no transformers Llama equivalent; only dense models export")
    if config.qk_norm:
        raise ValueError("transformers' Llama has no QK-norm; a model trained with qk_norm=True cannot export as Llama")


def llama_config(config: ModelConfig, eos_ids: list[int] | None = None) -> dict[str, Any]:
    """transformers.LlamaConfig keyword arguments computing what xiaolm's `config` computes."""
    check_llama_compatible(config)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        # no padding_idx: xiaolm's embedding has none, and it would zero that row's gradient
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=eos_ids,
    )


def build_llama(config: ModelConfig, state_dict: dict | None = None, eos_ids: list[int] | None = None):
    """An fp32 LlamaForCausalLM (SDPA attention) of xiaolm's shape, with `state_dict` (xiaolm names)
    copied in when given."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise ValueError("exporting to transformers needs the transformers package: pip install 'xiaolm[hf]'") from error
    model = LlamaForCausalLM(LlamaConfig(**llama_config(config, eos_ids), attn_implementation="sdpa")).float()
    if state_dict is not None:
        weights = {hf_name(name): tensor for name, tensor in state_dict.items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # a tied lm_head is the embedding itself; anything else missing or extra is a mapping bug
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weights do not map onto Llama: missing {missing}, unexpected {unexpected}")
        if config.tie_embeddings:
            model.tie_weights()
    return model


def export_hf(checkpoint: str | Path, out: str | Path, *, keep_adapter: bool = False) -> Path:
    """Write `checkpoint` as a transformers model folder `out` (config.json, model.safetensors,
    generation_config.json, the tokenizer with its chat template), loadable with
    `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.

    A LoRA checkpoint is merged, unless `keep_adapter`: then `out` holds the base weights and
    `out/adapter` the adapter under transformers' module names (`PeftModel.from_pretrained`).
    """
    from xiaolm import checkpoint as ckpt

    loaded = ckpt.load_model(checkpoint, merge_lora=not keep_adapter)  # a LoRA checkpoint comes merged
    source, config, tokenizer = loaded.path, loaded.config, loaded.tokenizer
    check_llama_compatible(config)
    if keep_adapter:
        if loaded.peft_model is None:
            raise ValueError(f"{source} is not a LoRA checkpoint (its config.json has no 'lora' section)")
        model = loaded.peft_model.unload()  # the base weights, adapters removed unmerged
    else:
        model = loaded.model
    eos_ids = [tokenizer.im_end_id, tokenizer.eos_id]

    def write(folder: Path) -> None:
        llama = build_llama(config, model.state_dict(), eos_ids)
        llama.generation_config.eos_token_id = eos_ids
        llama.generation_config.pad_token_id = tokenizer.eos_id
        llama.save_pretrained(str(folder))
        tokenizer.save(folder)
        if keep_adapter:
            convert_adapter(source, folder / "adapter", base_model=str(Path(out).resolve()))

    return ckpt.write_new_folder(out, write)


def convert_adapter(checkpoint: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Rename the peft adapter saved in a LoRA checkpoint (adapter_config.json +
    adapter_model.safetensors, xiaolm module names) to transformers' Llama module names, into `out`.
    The target modules become the explicit list of adapted modules, so any --lora-targets pattern
    carries over."""
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
        name = hf_name(key[len(PEFT_PREFIX):])
        weights[PEFT_PREFIX + name] = tensor
        modules.add(name.split(".lora_")[0])
    config["target_modules"] = sorted(modules)
    config["base_model_name_or_path"] = base_model

    def write(folder: Path) -> None:
        folder.mkdir()
        save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return ckpt.write_new_folder(out, write)
