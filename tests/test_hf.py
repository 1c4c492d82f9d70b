"""Export to transformers: same logits as xiaolm, tied weights, tokenizer and chat template; a LoRA
adapter renamed onto the exported model gives the LoRA model's logits."""

import json

import pytest
import torch

from xiaolm.cli import main
from xiaolm.interop.hf_export import export_hf
from xiaolm.train.runners import run_sft
from xiaolm.checkpoint import load_model, resolve_checkpoint
from xiaolm.config import LoraConfig

from chat_helpers import SFT_TRAIN, make_checkpoint
from conftest import tiny_train_config

transformers = pytest.importorskip("transformers")


def xiaolm_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_export_gives_transformers_the_same_model(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    out = tmp_path / "hf"
    assert main(["export", "hf", "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    model = load_model(checkpoint).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied on load
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, xiaolm_logits(model, ids), atol=1e-5, rtol=1e-5)
    # greedy decoding stops at either end token; a base model's eos is <|endoftext|> (tests/test_interop.py)
    assert hf.generation_config.eos_token_id == [tokenizer.eos_id, tokenizer.end_of_turn_id]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "你好"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert main(["export", "hf", "--ckpt", str(checkpoint), "--out", str(out)]) == 2  # never over a model
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_lora_adapter_loads_onto_the_exported_model(tmp_path, tokenizer):
    from peft import PeftModel

    start = make_checkpoint(tmp_path / "start", tokenizer)
    cfg = tiny_train_config(tmp_path / "lora", seq_len=64, max_steps=2, save_every=2, eval_every=0, lr=2e-2)
    run_sft(start, [SFT_TRAIN], cfg, val_fraction=0, truncate="tokens", lora=LoraConfig(rank=4, alpha=8))
    checkpoint = resolve_checkpoint(tmp_path / "lora")
    lora_model = load_model(checkpoint).model  # adapters merged: the LoRA model's function
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    expected = xiaolm_logits(lora_model, ids)
    base_only = xiaolm_logits(load_model(start).model, ids)
    assert not torch.allclose(expected, base_only, atol=1e-4)  # the adapters do something

    out = export_hf(checkpoint, tmp_path / "hf-base", keep_adapter=True)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.layers.1.mlp.down_proj" in config["target_modules"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, base_only, atol=1e-5, rtol=1e-5)
        adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        torch.testing.assert_close(adapted(ids).logits, expected, atol=1e-4, rtol=1e-4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(export_hf(checkpoint, tmp_path / "hf"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        export_hf(start, tmp_path / "x", keep_adapter=True)
