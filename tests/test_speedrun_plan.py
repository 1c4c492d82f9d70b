"""The speedrun sizes its pretraining to the machine: a probe's step time sets max_steps."""

import json

import xiaolm.runtime
from xiaolm.speedrun import EVALS_PER_RUN, PLAN_FILE, SPEEDRUN_MUON_LR, plan_pretraining, pretrain_optimizer

from conftest import tiny_model_config, tiny_train_config


def test_pretraining_plan_fills_the_budget_and_is_kept(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "pretrain", max_steps=400, num_eval_batches=2)
    splits = {"train": shards[0], "val": shards[1]}
    planned = plan_pretraining(tmp_path, tiny_model_config(), cfg, tokenizer, splits, budget_s=20.0)
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    assert planned.max_steps == plan["max_steps"] >= 4 * EVALS_PER_RUN
    # the steps fill the budget at the measured pace, less the validations' share
    assert plan["max_steps"] == max(16, int(20.0 / plan["probe_step_s"] - EVALS_PER_RUN * 2 / 3))
    assert planned.eval_every == planned.save_every == plan["max_steps"] // EVALS_PER_RUN
    assert not (tmp_path / "probe").exists()  # the probe's scratch run is gone
    # a second run (a resumed speedrun) keeps the schedule instead of measuring again
    again = plan_pretraining(tmp_path, tiny_model_config(), cfg, tokenizer, splits, budget_s=999.0)
    assert again.max_steps == planned.max_steps


def test_pretraining_takes_muon_only_where_it_was_measured_to_win(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(xiaolm.runtime, "cpu_has_native_bf16", lambda: True)
    assert pretrain_optimizer(tiny_model_config(), {}) == {"optimizer": "muon", "lr": SPEEDRUN_MUON_LR}
    assert pretrain_optimizer(tiny_model_config(), {"optimizer": "adamw"}) == {}  # the caller's choice stands
    moe = tiny_model_config(num_experts=4, num_experts_per_token=2)
    assert pretrain_optimizer(moe, {}) == {}  # MoE: not raced
    monkeypatch.setattr(xiaolm.runtime, "cpu_has_native_bf16", lambda: False)  # bf16 emulated: not raced
    assert pretrain_optimizer(tiny_model_config(), {}) == {}
