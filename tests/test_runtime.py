"""Precision chosen by measurement, the measured matmul peak, and MFU accounting."""

import json

import pytest
import torch

from xiaolm.config import ModelConfig
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import MachineCache, choose_cpu_precision, cpu_has_native_bf16, matmul_peak
from xiaolm.train.runners import run_pretrain

from conftest import tiny_model_config, tiny_train_config


def test_auto_precision_on_cpu_is_measured_recorded_and_cached(tmp_path, monkeypatch, tokenizer, shards):
    monkeypatch.setenv("XIAOLM_CACHE", str(tmp_path / "cache"))
    infos = []
    for name in ("first", "second"):
        run_pretrain(tiny_model_config(), tiny_train_config(tmp_path / name, max_steps=1, precision="auto"),
                     tokenizer, *shards)
        infos.append(json.loads((tmp_path / name / "run_info.json").read_text()))
    first, second = infos
    assert first["precision"] == second["precision"] in ("fp32", "bf16")
    if not cpu_has_native_bf16():
        assert first["precision"] == "fp32" and "no native bf16" in first["precision_reason"]
        return
    # measured once, then read back for the same machine and shape
    assert "measured now" in first["precision_reason"] and "cached" in second["precision_reason"]
    assert first["precision_reason"].split(";")[0] == second["precision_reason"].split(";")[0]
    probes = json.loads((tmp_path / "cache" / "machine.json").read_text())
    (entry,) = probes.values()
    (timings,) = entry["precision_probe"].values()
    assert timings["fp32"] > 0 and timings["bf16"] > 0
    ratio = timings["fp32"] / timings["bf16"]
    assert (first["precision"] == "bf16") == (ratio >= 1.1)


def test_cpu_without_native_bf16_stays_fp32(tmp_path):
    precision, reason = choose_cpu_precision(Transformer(tiny_model_config()), 2, 16, native_bf16=False,
                                             cache=MachineCache(torch.device("cpu"), tmp_path / "m.json"))
    assert precision == "fp32" and "no native bf16" in reason
    assert not (tmp_path / "m.json").exists()  # nothing to measure


def test_probe_leaves_model_and_rng_untouched(tmp_path):
    model = Transformer(tiny_model_config(dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    choose_cpu_precision(model, 2, 16, native_bf16=True, cache=MachineCache(torch.device("cpu"), tmp_path / "m.json"))
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_matmul_peak_is_measured_once_per_machine(tmp_path):
    cache = MachineCache(torch.device("cpu"), tmp_path / "machine.json")
    peak = matmul_peak(torch.device("cpu"), "fp32", cache)
    assert peak > 1e8  # any CPU does more than 0.1 GFLOP/s
    saved = json.loads((tmp_path / "machine.json").read_text())[cache.key]
    assert saved["matmul_peak_flops"]["fp32"] == peak and saved["fingerprint"]["device"] == "cpu"
    assert matmul_peak(torch.device("cpu"), "fp32", cache) == peak  # read back, not measured again


def test_flops_per_token_counts_active_weights():
    config = tiny_model_config()
    model = Transformer(config)
    C, L, V = config.hidden_size, config.num_layers, config.vocab_size
    kv = config.num_kv_heads * config.head_dim
    per_layer = C * C * 2 + C * kv * 2 + 3 * C * config.intermediate_size
    expected = 6 * (L * per_layer + V * C) + 12 * L * config.num_heads * config.head_dim * 32
    assert model.flops_per_token(32) == expected
    # a top-1 MoE of experts as wide as the dense feed-forward costs the dense model plus its router
    moe = Transformer(ModelConfig.from_preset("tiny-moe"))
    dense = Transformer(ModelConfig.from_preset("tiny"))
    router = sum(block.mlp.router.weight.numel() for block in moe.layers)
    assert moe.flops_per_token(256) == pytest.approx(dense.flops_per_token(256) + 6 * router)


def test_mfu_is_logged(tmp_path, tokenizer, shards):
    run_pretrain(tiny_model_config(), tiny_train_config(tmp_path / "run", max_steps=2), tokenizer, *shards)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    mfu = [r["mfu"] for r in records if "tok_per_s" in r]
    assert len(mfu) == 2 and all(0 < value <= 1 for value in mfu)


def test_a_peak_measured_under_load_is_raised_by_what_a_run_reaches(tmp_path, tokenizer, shards, monkeypatch):
    # a cached fp32 peak of 1 kFLOP/s, as if measured on a machine busy with other work: the first
    # record of the run beats it, so the cache is raised to what the run did and MFU stays <= 1
    monkeypatch.setenv("XIAOLM_CACHE", str(tmp_path / "cache"))
    cache = MachineCache(torch.device("cpu"))
    cache.put("matmul_peak_flops", "fp32", 1e3)
    run_pretrain(tiny_model_config(), tiny_train_config(tmp_path / "run", max_steps=2), tokenizer, *shards)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    mfu = [r["mfu"] for r in records if "tok_per_s" in r]
    assert len(mfu) == 2 and all(0 < value <= 1 for value in mfu) and mfu[0] == pytest.approx(1.0)
    assert MachineCache(torch.device("cpu")).get("matmul_peak_flops", "fp32") > 1e6
