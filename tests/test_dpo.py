"""DPO: log 2 at the start, a few steps raise the margin, precomputed reference = live reference, CLI."""

import copy
import json
import math

import torch

from xiaolm.cli import main
from xiaolm.data.chat_formats import PreferencePair, read_preferences
from xiaolm.model.transformer import Transformer
from xiaolm.train.stages import (
    build_preference_data,
    compute_reference_logps,
    dpo_stage,
    preference_batch,
    sequence_logps,
)
from xiaolm.train.loop import train

from chat_helpers import DPO_TRAIN, DPO_VAL, make_checkpoint
from conftest import tiny_model_config, tiny_train_config

PAIR = PreferencePair([{"role": "user", "content": "你是谁？"}], chosen="我是 xiaolm。", rejected="不知道")


def test_reply_mask_and_reference_logps(tokenizer):
    data = build_preference_data([PAIR], tokenizer, max_len=64)
    batch = preference_batch(data, [0])
    prompt, chosen, rejected = data.examples[0]
    assert tokenizer.decode(batch["targets"][0][batch["targets"][0] >= 0].tolist()) == "我是 xiaolm。<|im_end|>"
    assert tokenizer.decode(batch["targets"][1][batch["targets"][1] >= 0].tolist()) == "不知道<|im_end|>"
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size))
    precomputed = compute_reference_logps(model, data, batch_size=4)
    with torch.no_grad():
        live = sequence_logps(model(batch["inputs"]), batch["targets"])
    torch.testing.assert_close(precomputed[0], live)  # (chosen, rejected)


def test_long_replies_are_kept_whole_or_cut(tokenizer):
    long_pair = PreferencePair([{"role": "user", "content": "讲个故事"}], chosen="从前有座山。" * 30, rejected="不讲")
    kept = build_preference_data([PAIR, long_pair], tokenizer, max_len=64)  # "turns": whole replies only
    assert kept.num_pairs == 1 and kept.num_dropped == 1
    assert all(reply[-1] == tokenizer.end_of_turn_id for reply in kept.examples[0][1:])
    cut = build_preference_data([PAIR, long_pair], tokenizer, max_len=64, truncate="tokens")
    assert cut.num_pairs == 2 and cut.examples[1][1][-1] != tokenizer.end_of_turn_id
    assert all(len(prompt) + len(reply) <= 65 for prompt, *replies in cut.examples for reply in replies)


def test_loss_starts_at_log2_and_steps_raise_the_margin(tmp_path, tokenizer):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size))
    data = build_preference_data([PAIR], tokenizer, max_len=64)
    cfg = tiny_train_config(tmp_path, batch_size=1, max_steps=6, lr=1e-3, warmup_steps=0, eval_every=0,
                            save_every=0, weight_decay=0.0)
    stage = dpo_stage(data, None, cfg, beta=0.1, reference=copy.deepcopy(model))
    batch = stage.train_batch(range(1))
    loss = stage.compute_loss(model, batch).loss
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    stage.metrics(lambda t: t)  # reset the reward meter after the probe above
    train(model, stage, cfg, tokenizer=tokenizer)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    margins = [m["reward_margin"] for m in metrics]
    assert metrics[0]["loss"] == metrics[0]["loss"] and abs(metrics[0]["loss"] - math.log(2)) < 1e-5
    assert margins[-1] > margins[0] and metrics[-1]["loss"] < math.log(2) and metrics[-1]["reward_accuracy"] == 1.0


def test_dpo_command_with_precomputed_reference(tmp_path, tokenizer, capsys):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    assert len(read_preferences([DPO_TRAIN])) > 50
    out = tmp_path / "dpo"
    assert main(["dpo", "--from", str(start), "--data", str(DPO_TRAIN), "--val-data", str(DPO_VAL),
                 "--out-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--eval-every", "2",
                 "--num-eval-batches", "1", "--log-every", "1", "--no-progress", "--device", "cpu",
                 "--truncate", "tokens"]) == 0  # the sample's replies run past this model's 64 tokens
    assert "preference pairs" in capsys.readouterr().out
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 0
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(metrics[0])
    assert "val_reward_accuracy" in metrics[-1]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
