"""LoRA via peft: merged equals unmerged, only adapters train, peft-format adapters, merge command, DPO."""

import dataclasses
import json

import torch
from safetensors.torch import load_file

from xiaolm.cli import main
from xiaolm.model.transformer import Transformer
from xiaolm.train.runners import run_dpo, run_sft
from xiaolm.checkpoint import load_model, resolve_checkpoint
from xiaolm.config import LoraConfig
from xiaolm.model.lora import apply_lora, merge_lora

from chat_helpers import DPO_TRAIN, SFT_TRAIN, make_checkpoint
from conftest import tiny_model_config, tiny_train_config


def test_merged_model_equals_adapter_model(tokenizer):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    peft_model = apply_lora(model, LoraConfig(rank=4, alpha=8))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters do something
                param.normal_(std=0.05)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        merged = merge_lora(peft_model)
        assert type(merged) is Transformer and not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)


def test_lora_sft_resumes_saves_peft_adapters_and_merges(tmp_path, tokenizer):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    settings = LoraConfig(rank=4, alpha=8, targets=r".*\.(q_proj|v_proj)")
    cfg = tiny_train_config(tmp_path / "a", seq_len=64, max_steps=4, save_every=2, eval_every=0, lr=1e-2)
    run_sft(start, [SFT_TRAIN], cfg, val_fraction=0, lora=settings)
    cfg_b = tiny_train_config(tmp_path / "b", seq_len=64, max_steps=4, save_every=2, eval_every=0, lr=1e-2)
    run_sft(start, [SFT_TRAIN], dataclasses.replace(cfg_b, stop_after_steps=2), val_fraction=0, lora=settings)
    cfg_b.resume = True
    run_sft(start, [SFT_TRAIN], cfg_b, val_fraction=0, lora=settings)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")] for run in "ab"]
    assert losses[0] == losses[1]
    checkpoint = resolve_checkpoint(tmp_path / "a")
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and k.startswith("base_model.model.layers.") for k in adapter)
    base = load_model(start).model
    # the frozen base weights are unchanged; the adapters moved
    saved = load_file(str(checkpoint / "model.safetensors"))
    torch.testing.assert_close(saved["layers.0.attn.q_proj.base_layer.weight"], base.layers[0].attn.q_proj.weight)
    torch.testing.assert_close(saved["layers.0.mlp.up_proj.weight"], base.layers[0].mlp.up_proj.weight)
    # peft's own loader puts the adapter onto the plain model and gives the merged model's output
    from peft import PeftModel

    lora_model = PeftModel.from_pretrained(base, str(checkpoint)).eval()
    merged_out = tmp_path / "merged"
    assert main(["lora", "merge", "--ckpt", str(tmp_path / "a"), "--out", str(merged_out)]) == 0
    merged = load_model(merged_out)
    merged, configs = merged.model, merged.configs
    on_the_fly = load_model(tmp_path / "a").model
    ids = torch.randint(0, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), lora_model(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(on_the_fly.eval()(ids), lora_model(ids), atol=1e-5, rtol=1e-5)
    assert "lora" not in configs and configs["merged_from"]["lora"]["rank"] == 4


def test_lora_dpo(tmp_path, tokenizer):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    cfg = tiny_train_config(tmp_path / "dpo", seq_len=64, batch_size=2, max_steps=2, eval_every=0, lr=1e-3)
    result = run_dpo(start, [DPO_TRAIN], cfg, val_fraction=0, lora=LoraConfig(rank=2),
                     precompute_reference=False)
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert abs(metrics[0]["loss"] - 0.6931) < 1e-3 and "reward_margin" in metrics[-1]


def test_lora_on_a_moe_model(tokenizer):
    # experts are plain SwiGLU modules: the default pattern puts adapters on them too, the router
    # stays frozen, the balance loss still reaches the loss, and merging keeps the output
    config = tiny_model_config(vocab_size=tokenizer.vocab_size, num_experts=4, num_experts_per_token=2)
    model = Transformer(config)
    peft_model = apply_lora(model, LoraConfig(rank=4, alpha=8))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in trained) and not any("router" in n for n in trained)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    peft_model.train()
    _, aux_loss = peft_model(ids, return_aux_loss=True)
    assert aux_loss is not None and torch.isfinite(aux_loss)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        peft_model.eval()
        adapted = peft_model(ids)
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
