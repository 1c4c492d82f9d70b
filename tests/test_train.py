import contextlib
import json
import math

import pytest
import torch

from xiaolm.data.shards import PackedTokens
from xiaolm.model.transformer import Transformer
from xiaolm import checkpoint as ckpt
from xiaolm.runtime import DistContext, Runtime, cpu_has_native_bf16
from xiaolm.train.loop import (
    StageLoss,
    TrainingDiverged,
    init_train_state,
    micro_batch_samples,
    train,
    train_step,
)
from xiaolm.eval.ppl import token_num_bytes
from xiaolm.train.runners import run_pretrain
from xiaolm.train.stages import pretrain_stage

from conftest import tiny_model_config, tiny_train_config


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "tok_per_s" in r]


def test_loss_falls_and_checkpoint_loads(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "run", max_steps=30, eval_every=10, save_every=10, keep_checkpoints=2)
    result = run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.5
    assert math.isfinite(result.last_eval["val_bpb"]) and result.last_eval["val_bpb"] > 0
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_000020", "step_000030"]
    loaded = ckpt.load_model(tmp_path / "run")
    model, tok, configs = loaded.model, loaded.tokenizer, loaded.configs
    assert configs["model"]["hidden_size"] == 64 and tok.vocab_size == tokenizer.vocab_size
    assert "lm_head.weight" not in ckpt.model_state_for_saving(model)  # tied: stored once


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, tokenizer, shards, optimizer):
    full = tiny_train_config(tmp_path / "full", max_steps=12, save_every=6, optimizer=optimizer)
    run_pretrain(tiny_model_config(dropout=0.1), full, tokenizer, *shards)
    half = tiny_train_config(tmp_path / "half", max_steps=12, save_every=6, optimizer=optimizer,
                             stop_after_steps=6)
    run_pretrain(tiny_model_config(dropout=0.1), half, tokenizer, *shards)
    assert len(losses(tmp_path / "half")) == 6
    resumed = tiny_train_config(tmp_path / "half", max_steps=12, save_every=6, resume=True, optimizer=optimizer)
    run_pretrain(tiny_model_config(dropout=0.1), resumed, tokenizer, *shards)
    assert losses(tmp_path / "half") == losses(tmp_path / "full")  # bit for bit, dropout included
    a = ckpt.load_model(tmp_path / "full").model.state_dict()
    b = ckpt.load_model(tmp_path / "half").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoints_need_resume(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "run", max_steps=2)
    run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    with pytest.raises(ValueError, match="pass --resume"):
        run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)


def test_resume_refuses_a_different_config(tmp_path, tokenizer, shards):
    run_pretrain(tiny_model_config(), tiny_train_config(tmp_path / "run", max_steps=2), tokenizer, *shards)
    with pytest.raises(ValueError, match=r"model.hidden_size: checkpoint has 64, this run has 128"):
        run_pretrain(tiny_model_config(hidden_size=128),
                     tiny_train_config(tmp_path / "run", max_steps=4, resume=True), tokenizer, *shards)
    with pytest.raises(ValueError, match=r"train.lr"):
        changed = tiny_train_config(tmp_path / "run", max_steps=4, resume=True, lr=1.0)
        run_pretrain(tiny_model_config(), changed, tokenizer, *shards)


def test_killed_save_leaves_last_good_checkpoint(tmp_path, tokenizer, shards):
    run = tmp_path / "run"
    run_pretrain(tiny_model_config(), tiny_train_config(run, max_steps=4, save_every=4), tokenizer, *shards)
    root = run / "checkpoints"
    # what a kill in the middle of writing step 8 leaves behind: a partial temporary folder
    partial = root / ".tmp-step_000008-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(run).name == "step_000004"
    result = run_pretrain(tiny_model_config(), tiny_train_config(run, max_steps=8, save_every=4, resume=True),
                      tokenizer, *shards)
    assert result.checkpoint.name == "step_000008" and not partial.exists()


def test_nonfinite_loss_skips_updates_then_stops(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "run", max_steps=10, save_every=2, max_bad_steps=3)
    data = PackedTokens(shards[0], cfg.seq_len, seed=0)
    stage = pretrain_stage(data, None, token_num_bytes(tokenizer), cfg)
    good_loss = stage.compute_loss
    calls = {"n": 0}

    def poisoned(model, batch):  # finite for 4 steps, then NaN forever
        calls["n"] += 1
        out = good_loss(model, batch)
        return StageLoss(out.loss if calls["n"] <= 4 else out.loss * float("nan"), out.num_tokens)

    stage.compute_loss = poisoned
    model = Transformer(tiny_model_config())
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps"):
        train(model, stage, cfg, tokenizer=tokenizer, configs={})
    # no checkpoint is written during a non-finite streak: the latest is the last good step
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step_000004"
    saved = ckpt.load_model(tmp_path / "run").model
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    # the skipped updates left the weights as they were at step 4
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, tokenizer, shards, precision):
    cfg = tiny_train_config(tmp_path / "run", max_steps=12, eval_every=12, precision=precision, lr=1e-2)
    emulated = precision == "bf16" and not cpu_has_native_bf16()
    with pytest.warns(UserWarning, match="many times slower") if emulated else contextlib.nullcontext():
        result = run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["precision"] == precision
    # master weights stay fp32 in the checkpoint whatever the compute precision
    model = ckpt.load_model(result.checkpoint).model
    assert all(p.dtype == torch.float32 for p in model.parameters())




def test_compiled_model_trains_like_eager(tmp_path, tokenizer, shards):
    eager = tiny_train_config(tmp_path / "eager", max_steps=3, eval_every=0)
    compiled = tiny_train_config(tmp_path / "compiled", max_steps=3, eval_every=0, compile=True)
    run_pretrain(tiny_model_config(), eager, tokenizer, *shards)
    run_pretrain(tiny_model_config(), compiled, tokenizer, *shards)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tokenizer, shards):
    # two micro-batches of 2 rows (each loss a mean over its tokens, halved) make the update one
    # batch of 4 rows makes
    cfg = tiny_train_config("unused", lr=1e-2, warmup_steps=0)
    data = PackedTokens(shards[0], cfg.seq_len, seed=0)
    stage = pretrain_stage(data, None, token_num_bytes(tokenizer), cfg)
    runs = []
    one_batch = [stage.train_batch(range(0, 4))]
    for batches in (one_batch, [stage.train_batch(range(0, 2)), stage.train_batch(range(2, 4))]):
        torch.manual_seed(0)
        state = init_train_state(Transformer(tiny_model_config()), cfg, Runtime(torch.device("cpu"), "fp32"))
        runs.append((state, train_step(state, batches, stage, cfg)))
    (one, one_metrics), (accumulated, accumulated_metrics) = runs
    assert one_metrics.loss == pytest.approx(accumulated_metrics.loss, abs=1e-6) and one_metrics.finite
    assert one_metrics.grad_norm == pytest.approx(accumulated_metrics.grad_norm, rel=1e-5)  # same gradient
    assert one.step == accumulated.step == 1 and one.num_tokens_seen == accumulated.num_tokens_seen == 4 * 32
    # Adam's first step is about lr * sign(gradient): only entries with a gradient near 0 may differ
    for a, b in zip(one.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=cfg.lr / 100)


def test_data_parallel_micro_batches_split_the_big_batch():
    # rank r of W takes its share of the samples one process with W times the batch would take
    one = [list(micro_batch_samples(m, 4, DistContext())) for m in range(3)]
    two = [[list(micro_batch_samples(m, 2, DistContext(rank=r, world_size=2))) for r in range(2)]
           for m in range(3)]
    assert one == [first + second for first, second in two]
