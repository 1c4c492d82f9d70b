"""xiaolm -> GGUF, the single-file format of llama.cpp and ollama (`pip install 'xiaolm[gguf]'`).

One file holds the weights (f32, f16, bf16 or q8_0), the shape, the RoPE settings, the tokenizer
(byte-level BPE tokens, merges, token types, special-token ids) and the chat template, under
llama.cpp's key names, written with the `gguf` package (llama.cpp's own writer). The architecture is
llama.cpp's counterpart of the transformers one `xiaolm export hf` picks (interop/hf_config.py):
`llama`, `qwen2` (q/k/v bias) or `qwen3` (QK-norm); Mixture-of-Experts models are refused.

Tensor names go through transformers' names and then the `gguf` package's own transformers ->
GGUF table, so no name is spelled out here. One thing is not a renaming: llama.cpp's `llama`
architecture rotates the adjacent pairs (2i, 2i + 1) of each head, where xiaolm (and transformers)
rotate the halves (i, i + D/2); llama.cpp's converter therefore reorders the rows of each head of
the q and k projections (`permute_rotary_rows`), and so does this export (`qwen2` and `qwen3` rotate
halves, as xiaolm does). transformers' GGUF loader undoes it; tests/test_gguf.py checks that its
logits equal xiaolm's, and that they do not when the reordering is left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xiaolm.config import ModelConfig
from xiaolm.tokenizer.bpe import XiaoTokenizer

DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises runs of 32 values of a row, each with its own scale
# llama.cpp names the text splitting of a byte-level vocabulary instead of storing it: the
# tokenizer.json pre-tokenizers it has a name for (Split regex + ByteLevel, as the tokenizers
# library writes them for Qwen2 and Llama 3)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def require_gguf():
    try:
        import gguf
    except ImportError as error:
        raise ValueError("GGUF files need the gguf package: pip install 'xiaolm[gguf]'") from error
    return gguf


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"GGUF export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture computing what `config` computes; ValueError if it has none."""
    from xiaolm.interop.hf_config import architecture_for

    if config.num_experts > 0:
        raise ValueError("GGUF export covers dense models; a Mixture-of-Experts model is refused (export it "
                         "with `xiaolm export hf`)")
    if config.rope_scaling not in ("none", "ntk", "linear"):
        raise ValueError(f"GGUF export: rope_scaling={config.rope_scaling!r} is not exported (none, ntk and "
                         "linear are: llama.cpp computes them as xiaolm does)")
    return architecture_for(config)  # llama, qwen2, qwen3: llama.cpp uses transformers' names


def rope_metadata(config: ModelConfig) -> dict[str, Any]:
    """RoPE under llama.cpp's keys: the base, the rotated width and the scaling. NTK-aware fixed
    scaling is a larger base (as the transformers export writes it); linear divides positions by
    the factor, llama.cpp's `linear` type."""
    from xiaolm.interop.hf_config import rope_fields

    gguf = require_gguf()
    fields = {"rope_freq_base": rope_fields(config)["rope_theta"], "rope_dimension_count": config.head_dim}
    if config.rope_scaling == "linear":
        fields.update(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=config.rope_scaling_factor)
    return fields


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (num_heads * D, in) from rotate-half order (each head's rows
    0..D/2-1 pair with D/2..D-1) to llama.cpp's interleaved order (row 2i pairs with 2i + 1):
    within each head, row i goes to 2i and row i + D/2 to 2i + 1. llama.cpp's convert_hf_to_gguf
    does the same; transformers' GGUF loader inverts it."""
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    per_head = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])  # (H, half, D/2, ...)
    return per_head.transpose(1, 2).reshape(weight.shape)  # (H, D/2, half, ...) -> (H * D, ...)


def gguf_weights(model: torch.nn.Module, config: ModelConfig, architecture: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight; a tied output projection is left out, as
    llama.cpp reads the embedding for it."""
    from xiaolm.interop.hf_config import hf_weight_name

    gguf = require_gguf()
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        module, suffix = hf_weight_name(name, architecture).rsplit(".", 1)
        target = names.get_name(module)
        if target is None:
            raise ValueError(f"weight {name!r} has no GGUF name in llama.cpp's {architecture} architecture")
        tensor = tensor.detach().to("cpu", torch.float32)
        if architecture == "llama" and name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            tensor = permute_rotary_rows(tensor, heads)
        yield f"{target}.{suffix}", tensor.contiguous()


def encode_tensor(tensor: torch.Tensor, dtype: str):
    """(array, GGML type) in `dtype`. Vectors (norms, biases) stay f32, as llama.cpp's converter
    keeps them; q8_0 needs rows that are a whole number of 32-value blocks, else that matrix is
    stored f16."""
    gguf = require_gguf()
    types = gguf.GGMLQuantizationType
    array = tensor.numpy()
    if tensor.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), types.F32
    if dtype == "f16" or (dtype == "q8_0" and array.shape[-1] % Q8_BLOCK):
        return array.astype(np.float16), types.F16
    qtype = types.BF16 if dtype == "bf16" else types.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


def tokenizer_metadata(tokenizer: XiaoTokenizer, eos_token: str) -> dict[str, Any]:
    """The tokenizer under llama.cpp's keys, each named as GGUFWriter's `add_<key>` method: the
    byte-level vocabulary in id order, merges, token types (special tokens are CONTROL, so llama.cpp
    never splits them), the ids of the special tokens and the chat template. `eos_token` is the
    token the model ends a text with (interop/hf_export.py's choice, as for transformers)."""
    gguf = require_gguf()
    backend = tokenizer.tokenizer
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export: only byte-level BPE tokenizers are exported (llama.cpp's gpt2 model)")
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    if "" in tokens:
        raise ValueError(f"the tokenizer's ids are not contiguous (id {tokens.index('')} is unused)")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for index, added in backend.get_added_tokens_decoder().items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    fields = {
        "tokenizer_model": "gpt2",  # llama.cpp's name for byte-level BPE
        "tokenizer_pre": pre_tokenizer_name(spec),
        "token_list": tokens,
        "token_types": [int(t) for t in types],
        "token_merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "eos_token_id": backend.token_to_id(eos_token),
        "pad_token_id": tokenizer.pad_id,
        "eot_token_id": tokenizer.end_of_turn_id,  # end of turn: llama.cpp stops a chat reply there
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
    }
    if tokenizer.bos_id is not None:
        fields["bos_token_id"] = tokenizer.bos_id
    if tokenizer.chat_template:
        fields["chat_template"] = tokenizer.chat_template
    return fields


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the text splitting of a tokenizer.json: xiaolm's (the ByteLevel
    pre-tokenizer's own expression, GPT-2's) is `gpt-2`; Qwen2's and Llama 3's are named too."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is None:
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
        if [p.get("type") for p in parts] == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            name = PRE_TOKENIZERS.get(parts[0].get("pattern", {}).get("Regex"))
            if name:
                return name
        if ([p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
                and parts[1].get("use_regex", True)):
            return "smollm"  # SmolLM's: digits one by one, then GPT-2's
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name")


def write_gguf(path: Path, model: torch.nn.Module, config: ModelConfig, tokenizer: XiaoTokenizer, *,
               dtype: str, name: str, eos_token: str) -> None:
    """Write the GGUF file `path` for `model` with its tokenizer, quantised as `dtype`."""
    gguf = require_gguf()
    check_dtype(dtype)
    architecture = gguf_architecture(config)
    writer = gguf.GGUFWriter(str(path), architecture)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    metadata = {
        "name": name, "file_type": file_types[dtype],
        "vocab_size": config.vocab_size, "context_length": config.max_seq_len,
        "embedding_length": config.hidden_size, "block_count": config.num_layers,
        "feed_forward_length": config.intermediate_size, "head_count": config.num_heads,
        "head_count_kv": config.num_kv_heads, "key_length": config.head_dim, "value_length": config.head_dim,
        "layer_norm_rms_eps": config.norm_eps, **rope_metadata(config),
        **tokenizer_metadata(tokenizer, eos_token),
    }
    if dtype == "q8_0":
        metadata["quantization_version"] = gguf.GGML_QUANT_VERSION
    for key, value in metadata.items():  # GGUFWriter has one add_<key> method per key, typed
        getattr(writer, f"add_{key}")(value)
    for tensor_name, tensor in gguf_weights(model, config, architecture):
        array, qtype = encode_tensor(tensor, dtype)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(checkpoint: str | Path, out: str | Path, *, dtype: str = "f16") -> Path:
    """Write `checkpoint` (a LoRA one merged; a transformers folder or a GGUF file too, as every
    command reads them) as the GGUF file `out`, which must not exist yet; it appears only once
    complete."""
    from xiaolm import checkpoint as ckpt
    from xiaolm.interop.hf_export import export_eos_token

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new file")
    check_dtype(dtype)
    loaded = ckpt.load_model(checkpoint)
    gguf_architecture(loaded.config)  # refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_gguf(tmp, loaded.model, loaded.config, loaded.tokenizer, dtype=dtype, name=loaded.path.name,
                   eos_token=export_eos_token(loaded.tokenizer, loaded.configs))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
