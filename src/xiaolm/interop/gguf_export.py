"""xiaolm -> GGUF, the single-file format of llama.cpp and ollama (`pip install 'xiaolm[gguf]'`).

One file holds the weights (f32, f16, bf16 or q8_0), the shape, the RoPE settings, the tokenizer
(byte-level BPE tokens, merges, token types, special-token ids) and the chat template, under
llama.cpp's key names, written with the `gguf` package (llama.cpp's own writer).

Tensor names go through transformers' names (interop/hf.py) and then the `gguf` package's own
transformers -> GGUF table, so no name is spelled out here. One thing is not a renaming: llama.cpp's
`llama` architecture rotates the adjacent pairs (2i, 2i + 1) of each head, where xiaolm (and
transformers) rotate the halves (i, i + D/2); llama.cpp's converter therefore reorders the rows of
each head of the q and k projections (`permute_rotary_rows`), and so does this export.
transformers' GGUF loader undoes it; tests/test_gguf.py checks that its logits equal xiaolm's, and
that they do not when the reordering is left out.
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

DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises runs of 32 values of a row, each with its own scale


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
    if config.num_experts > 0:
        raise ValueError("GGUF export covers dense models; a Mixture-of-Experts model has no llama.cpp "
                         "architecture computing exactly what xiaolm's computes")
    if config.qk_norm:
        raise ValueError("GGUF export: qk_norm=True (per-head QK-norm) has no place in llama.cpp's llama "
                         "architecture")
    return "llama"


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
    gguf = require_gguf()
    from xiaolm.hf import hf_name

    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        module, suffix = hf_name(name).rsplit(".", 1)
        target = names.get_name(module)
        if target is None:
            raise ValueError(f"weight {name!r} has no GGUF name in llama.cpp's {architecture} architecture")
        tensor = tensor.detach().to("cpu", torch.float32)
        if architecture == "llama" and name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            tensor = permute_rotary_rows(tensor, heads)
        yield f"{target}.{suffix}", tensor.contiguous()


def encode_tensor(tensor: torch.Tensor, dtype: str):
    """(array, GGML type) in `dtype`. Vectors (norms) stay f32, as llama.cpp's converter keeps them;
    q8_0 needs rows that are a whole number of 32-value blocks, else that matrix is stored f16."""
    gguf = require_gguf()
    types = gguf.GGMLQuantizationType
    array = tensor.numpy()
    if tensor.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), types.F32
    if dtype == "f16" or (dtype == "q8_0" and array.shape[-1] % Q8_BLOCK):
        return array.astype(np.float16), types.F16
    qtype = types.BF16 if dtype == "bf16" else types.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


def tokenizer_metadata(tokenizer, eos_id: int) -> dict[str, Any]:
    """The tokenizer under llama.cpp's keys, each named as GGUFWriter's `add_<key>` method: the
    byte-level vocabulary in id order, merges, token types (special tokens are CONTROL, so llama.cpp
    never splits them), the ids of the special tokens and the chat template. xiaolm's tokenizer has
    no beginning-of-text token and adds none."""
    from xiaolm.tokenizer.bpe import CHAT_TEMPLATE

    gguf = require_gguf()
    backend = tokenizer.tokenizer
    spec = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    if "" in tokens:
        raise ValueError(f"the tokenizer's ids are not contiguous (id {tokens.index('')} is unused)")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for index, added in backend.get_added_tokens_decoder().items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return {
        "tokenizer_model": "gpt2",  # llama.cpp's name for byte-level BPE
        "tokenizer_pre": pre_tokenizer_name(spec),
        "token_list": tokens,
        "token_types": [int(t) for t in types],
        "token_merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "eos_token_id": eos_id,
        "pad_token_id": tokenizer.eos_id,
        "eot_token_id": tokenizer.im_end_id,  # end of turn: llama.cpp stops a chat reply there
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp names the text splitting a vocabulary was learned with instead of storing it;
    xiaolm's is GPT-2's (the ByteLevel pre-tokenizer's regular expression), llama.cpp's `gpt-2`."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name")


def write_gguf(path: Path, model: torch.nn.Module, config: ModelConfig, tokenizer, *, dtype: str, name: str,
               eos_id: int) -> None:
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
        "layer_norm_rms_eps": config.norm_eps, "rope_freq_base": config.rope_theta,
        "rope_dimension_count": config.head_dim,  # RoPE on the whole head
        **tokenizer_metadata(tokenizer, eos_id),
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
    """Write `checkpoint` (a LoRA one merged) as the GGUF file `out`, which must not exist yet; it
    appears only once complete."""
    from xiaolm import checkpoint as ckpt

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new file")
    check_dtype(dtype)
    loaded = ckpt.load_model(checkpoint)
    gguf_architecture(loaded.config)  # refused before anything is written
    tokenizer = loaded.tokenizer
    # a chat model ends its replies with <|im_end|>; a pretrained one its documents with <|endoftext|>
    chat_trained = any(stage in loaded.configs for stage in ("sft", "dpo", "distill"))
    eos_id = tokenizer.im_end_id if chat_trained else tokenizer.eos_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_gguf(tmp, loaded.model, loaded.config, tokenizer, dtype=dtype, name=loaded.path.name, eos_id=eos_id)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
