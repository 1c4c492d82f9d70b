"""Checks that need a CUDA GPU: skipped on a CPU machine, run by bench/gpu_check.py on a GPU one."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from xiaolm.model.loss import linear_cross_entropy
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import setup_runtime
from xiaolm.train.runners import run_pretrain

from conftest import tiny_model_config, tiny_train_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "tok_per_s" in r]


def test_auto_precision_on_a_gpu():
    runtime = setup_runtime("cuda", "auto")
    assert runtime.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert runtime.precision_reason


def test_trains_on_the_gpu_with_auto_precision_mfu_and_memory(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "run", max_steps=20, eval_every=10, device="cuda", precision="auto", lr=1e-2)
    result = run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if "tok_per_s" in r]
    assert train[-1]["loss"] < train[0]["loss"] and math.isfinite(result.last_eval["val_loss"])
    assert all(0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0 for r in train)


def test_compiled_training_matches_eager_on_the_gpu(tmp_path, tokenizer, shards):
    for name, compile_model in (("eager", False), ("compiled", True)):
        cfg = tiny_train_config(tmp_path / name, max_steps=3, eval_every=0, device="cuda", compile=compile_model)
        run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-3)


def test_fused_loss_on_the_gpu_equals_the_plain_one():
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(500, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 500, (300,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = F.cross_entropy((hidden @ weight.T).float(), targets)
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-2)


def test_kv_cache_decode_equals_full_forward_on_the_gpu():
    model = Transformer(tiny_model_config()).cuda().eval()
    ids = torch.randint(0, 512, (2, 20), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 20)
        steps = [model(ids[:, :12], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
