"""Foreign models built offline for the interop tests: byte-level BPE tokenizers trained with the
tokenizers library and dressed as a Qwen-style and a Llama-3-style tokenizer (tokenizer_config.json
with their special tokens, BOS rule and Jinja chat template), and tiny random transformers models
(`from_config`) of the Llama, Qwen2 and Qwen3 architectures saved as model folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import sample_texts

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.2's template without the tool calls: BOS, a system header with today's date, trimmed contents
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
STYLES = {
    "qwen": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template=QWEN_TEMPLATE,
                 config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "add_bos_token": False}, stop=["<|im_end|>", "<|endoftext|>"]),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], template=LLAMA3_TEMPLATE,
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                   stop=["<|end_of_text|>", "<|eot_id|>"]),
}


def foreign_tokenizer(style: str, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained here, its special tokens added after the learned vocabulary (as
    Qwen's and Llama 3's are); Llama 3's post-processor puts the BOS first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(sample_texts("train", limit=200) + ["Hello world. The answer is 4."], trainer)
    tokenizer.add_special_tokens(STYLES[style]["specials"])
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def write_foreign_tokenizer(folder: Path, style: str) -> Tokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = foreign_tokenizer(style)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "chat_template": STYLES[style]["template"], **STYLES[style]["config"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer


ARCHITECTURES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def tiny_hf_model(architecture: str, vocab_size: int, **overrides):
    """A random transformers model, weights drawn wide enough (norm weights and biases too) that
    greedy decoding has clear winners and every tensor's mapping matters."""
    import transformers

    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1, rope_theta=10000.0)
    if architecture == "qwen3":
        fields["head_dim"] = 32  # not hidden / heads (16), as in Qwen3
    fields.update(overrides)
    config = getattr(transformers, ARCHITECTURES[architecture])(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_hf_model(folder: Path, architecture: str, style: str, **overrides):
    """A transformers model folder: the random model (save_pretrained), a foreign tokenizer and a
    generation_config.json naming the style's end tokens."""
    tokenizer = write_foreign_tokenizer(folder, style)
    model = tiny_hf_model(architecture, tokenizer.get_vocab_size() + 8, **overrides)  # padded like Qwen's
    stops = [tokenizer.token_to_id(t) for t in STYLES[style]["stop"]]
    model.config.eos_token_id = stops
    model.generation_config.eos_token_id = stops
    model.save_pretrained(str(folder))
    return model
