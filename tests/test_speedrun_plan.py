"""The speedrun sizes its pretraining to the machine: a probe's step time sets max_steps."""

import json

from xiaolm.speedrun import EVALS_PER_RUN, PLAN_FILE, plan_pretraining

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
