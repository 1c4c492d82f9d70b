"""xiaolm's `ModelConfig` <-> transformers' config.json, architecture by architecture, and the
weight names. Only what computes exactly the same logits maps; anything else is refused with the
field and value that stand in the way.

Export: the transformers architecture that computes what a xiaolm model computes.

| xiaolm model                                                    | transformers              |
|-----------------------------------------------------------------|---------------------------|
| dense, no q/k/v bias, no QK-norm                                | LlamaForCausalLM          |
| dense, q/k/v bias (`qkv_bias`)                                  | Qwen2ForCausalLM          |
| dense, QK-norm (`qk_norm`, any `head_dim`)                      | Qwen3ForCausalLM          |
| MoE: softmax router, top-k > 1 renormalised, no shared experts, | MixtralForCausalLM        |
|   every block MoE, no q/k/v bias, no QK-norm                    |                           |
| MoE: softmax router, no shared experts, QK-norm                 | Qwen3MoeForCausalLM       |
|   (`first_k_dense` -> `mlp_only_layers`)                        |                           |

Refused MoE models, and why (transformers 4.51 - 5.x):
- Mixtral renormalises the top-k weights always: with top-1 every weight is 1, where xiaolm
  weighs the one expert by its router probability; Mixtral has no shared experts nor dense blocks.
- Qwen2-MoE always has a shared expert, gated by sigmoid(w . x): xiaolm's are ungated.
- DeepSeek-V3 (sigmoid router, bias-steered choice, shared experts, first_k_dense: xiaolm's
  router) attends with multi-head latent attention (low-rank q and kv with a norm between), which
  no GQA weights express. (GLM-4-MoE pairs that router with GQA attention, from transformers 4.54;
  not mapped yet.)
- A non-zero aux-loss-free routing bias (`moe_bias_update_rate`) exists only in DeepSeek-V3.

Import: Llama, Qwen2 and Qwen3 config.json files (either major version's RoPE fields).
"""

from __future__ import annotations

import math
import re
from typing import Any

from xiaolm.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
IMPORTABLE = ("llama", "qwen2", "qwen3")
_MIXTRAL_EXPERT = {"gate": "w1", "down": "w2", "up": "w3"}


# --------------------------------------------------------------------------- export


def architecture_for(config: ModelConfig) -> str:
    """The transformers model_type computing exactly what `config` computes; ValueError if none."""
    if config.num_experts == 0:
        if config.qkv_bias and config.qk_norm:
            raise ValueError("no transformers architecture has both q/k/v bias and QK-norm (Qwen3's "
                             "attention_bias also puts a bias on the output projection)")
        return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    refuse = "a Mixture-of-Experts model exports only as Mixtral or Qwen3-MoE (interop/hf_config.py)"
    if config.moe_scoring != "softmax":
        raise ValueError(f"{refuse}: moe_scoring={config.moe_scoring!r} (DeepSeek-V3's router sits on latent "
                         "attention, which xiaolm's GQA weights cannot express)")
    if config.num_shared_experts:
        raise ValueError(f"{refuse}: num_shared_experts={config.num_shared_experts} (Qwen2-MoE gates its "
                         "shared expert with a sigmoid, xiaolm's are ungated)")
    if config.qkv_bias:
        raise ValueError(f"{refuse}: qkv_bias=True (neither has a bias on q/k/v alone)")
    if config.qk_norm:
        return "qwen3_moe"
    if config.first_k_dense:
        raise ValueError(f"{refuse}: first_k_dense={config.first_k_dense} without qk_norm (Mixtral has no "
                         "dense blocks)")
    if config.num_experts_per_token == 1 or not config.moe_norm_topk:
        raise ValueError(f"{refuse}: Mixtral renormalises the top-k weights to sum to 1; this model "
                         f"(num_experts_per_token={config.num_experts_per_token}, moe_norm_topk="
                         f"{config.moe_norm_topk}) does not. Train with --qk-norm for Qwen3-MoE")
    return "mixtral"


def rope_fields(config: ModelConfig) -> dict[str, Any]:
    """config.json's RoPE fields as both major versions read them: transformers 4.x reads
    `rope_theta` + `rope_scaling`, 5.x `rope_parameters` (and the 4.x ones, which then win).
    NTK-aware fixed scaling is a larger base, exported as such."""
    kind, factor, theta = config.rope_scaling, config.rope_scaling_factor, config.rope_theta
    max_positions, scaling = config.max_seq_len, None
    if kind == "ntk":
        theta = theta * factor ** (config.head_dim / (config.head_dim - 2))
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": factor}
    elif kind == "dynamic":
        # transformers grows the base past max_position_embeddings: it holds the trained context
        scaling, max_positions = {"rope_type": "dynamic", "factor": factor}, config.original_max_seq_len
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": config.original_max_seq_len,
                   "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor}
    elif kind == "yarn":
        # 4.x takes YaRN's factor as max_position_embeddings / original: both must say the same
        max_positions = round(config.original_max_seq_len * factor)
        if max_positions != config.original_max_seq_len * factor:
            raise ValueError(f"yarn: rope_original_max_seq_len * rope_scaling_factor = "
                             f"{config.original_max_seq_len * factor} must be a whole number of positions")
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": config.original_max_seq_len,
                   "beta_fast": config.rope_yarn_beta_fast, "beta_slow": config.rope_yarn_beta_slow}
        if config.rope_attention_factor:
            scaling["attention_factor"] = config.rope_attention_factor
    return {"rope_theta": theta, "rope_scaling": scaling, "max_position_embeddings": max_positions,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}


def hf_config(config: ModelConfig, architecture: str, *, eos_ids: list[int], bos_id: int | None) -> dict[str, Any]:
    """The config.json of `architecture` for `config`: every field transformers 4.51 to 5.x reads
    to build the model, so neither version falls back to a default that computes something else."""
    fields: dict[str, Any] = {
        "architectures": [ARCHITECTURES[architecture]], "model_type": architecture,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True,
        # no pad_token_id: transformers would make it the embedding's padding_idx, which xiaolm's lacks
        "bos_token_id": bos_id, "eos_token_id": eos_ids, "pad_token_id": None,
        "torch_dtype": "float32", "dtype": "float32",  # 4.x's name, 5.x's name
        **rope_fields(config),
    }
    if architecture in ("llama", "qwen3", "qwen3_moe"):
        fields["attention_bias"] = False  # Llama and Qwen3 put it on o_proj too
    if architecture == "llama":
        fields.update(mlp_bias=False, pretraining_tp=1)
    if architecture in ("qwen2", "qwen3", "qwen3_moe"):
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    if architecture == "mixtral":  # experts as wide as intermediate_size: every block is MoE
        fields.update(intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_token,
                      sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
                      router_aux_loss_coef=config.moe_aux_loss_coef)
    if architecture == "qwen3_moe":
        fields.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_token,
                      moe_intermediate_size=config.moe_intermediate_size, decoder_sparse_step=1,
                      mlp_only_layers=list(range(config.first_k_dense)), output_router_logits=False,
                      router_aux_loss_coef=config.moe_aux_loss_coef,
                      # xiaolm renormalises only when k > 1: a top-1 weight stays the router probability
                      norm_topk_prob=config.moe_norm_topk and config.num_experts_per_token > 1)
    return fields


def hf_weight_name(name: str, architecture: str) -> str:
    """A xiaolm parameter or module name -> its name in the transformers `architecture`."""
    if name.startswith("lm_head"):
        return name
    for old, new in (("attn.", "self_attn."), ("input_norm.", "input_layernorm."),
                     ("post_attn_norm.", "post_attention_layernorm.")):
        name = re.sub(rf"(^|\.){re.escape(old)}", rf"\g<1>{new}", name)
    if architecture == "mixtral":
        name = name.replace(".mlp.router.", ".block_sparse_moe.gate.")
        name = re.sub(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj",
                      lambda m: f".block_sparse_moe.experts.{m[1]}.{_MIXTRAL_EXPERT[m[2]]}", name)
    elif architecture == "qwen3_moe":
        name = name.replace(".mlp.router.", ".mlp.gate.")
    return "model." + name


# --------------------------------------------------------------------------- import


_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "low_freq_factor",
              "high_freq_factor", "partial_rotary_factor"}


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE fields from `rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"config.json: rope_scaling field(s) {unknown} are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={params.get('partial_rotary_factor')} "
                         "(RoPE on part of each head) is not supported")
    max_positions = hf.get("max_position_embeddings", 2048)
    fields = {"rope_theta": theta, "max_seq_len": max_positions}
    if kind == "default":
        return fields
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"config.json: rope_scaling rope_type={kind!r} is not supported "
                         "(linear, dynamic, yarn and llama3 are)")
    factor = float(params.get("factor") or 1.0)
    fields.update(rope_scaling=kind, rope_scaling_factor=factor)
    original = int(params.get("original_max_position_embeddings") or max_positions)
    if kind == "dynamic":  # transformers' trained context is max_position_embeddings
        fields.update(rope_original_max_seq_len=max_positions, max_seq_len=int(max_positions * factor))
    elif kind == "llama3":
        fields.update(rope_original_max_seq_len=original, rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
        # transformers 4.x takes the factor as max_position_embeddings / original when the two disagree
        # (Qwen2.5's suggested config): xiaolm follows the factor, as 5.x does, and runs that far
        fields["max_seq_len"] = max(max_positions, int(original * factor))
        if params.get("truncate", True) is not True:
            raise ValueError("config.json: yarn truncate=false is not supported")
        fields.update(rope_original_max_seq_len=original,
                      rope_yarn_beta_fast=float(params.get("beta_fast") or 32.0),
                      rope_yarn_beta_slow=float(params.get("beta_slow") or 1.0))
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form of the same factor
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        fields["rope_attention_factor"] = float(attention_factor or 0.0)
    return fields


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, str]:
    """(ModelConfig, model_type) for a transformers config.json of the Llama, Qwen2 or Qwen3 family."""
    model_type = hf.get("model_type")
    if model_type not in IMPORTABLE:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; xiaolm imports "
                         f"{', '.join(IMPORTABLE)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("quantization_config"):
        raise ValueError("config.json: quantization_config is set; import an unquantised model")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        raise ValueError(f"config.json: attention_bias=true ({model_type} also puts a bias on the output "
                         "projection, which xiaolm has not)")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise ValueError(f"config.json: use_sliding_window={hf.get('use_sliding_window')} / layer_types "
                         "(sliding-window attention) is not supported")
    num_heads = hf["num_attention_heads"]
    config = ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim") or 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        init_std=hf.get("initializer_range", 0.02), **_rope_from_hf(hf),
    )
    return config, model_type


def xiaolm_weight_name(name: str) -> str | None:
    """A Llama / Qwen2 / Qwen3 weight name -> xiaolm's; None for what xiaolm derives (RoPE tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith("model."):
        name = name[len("model."):]
    for old, new in (("self_attn.", "attn."), ("input_layernorm.", "input_norm."),
                     ("post_attention_layernorm.", "post_attn_norm.")):
        name = name.replace(old, new)
    return name
