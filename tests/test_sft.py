"""SFT: packed conversations stay apart, the stage trains and resumes on the one loop, `xiaolm sft`."""

import dataclasses
import json

import torch

from xiaolm.cli import main
from xiaolm.data.chat_tokens import build_sft_data
from xiaolm.model.transformer import Transformer
from xiaolm.train.runners import run_sft
from xiaolm.train.stages import masked_forward
from xiaolm.checkpoint import load_model

from chat_helpers import SFT_TRAIN, SFT_VAL, make_checkpoint
from conftest import tiny_model_config, tiny_train_config


def test_packed_conversations_get_the_logits_they_get_alone(tokenizer):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)).eval()
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("你好", "你好！"), ("Who are you?", "I am xiaolm."), ("1+1", "2"),
                                  ("中国的首都", "北京"), ("Hi", "Hello!"), ("谢谢", "不客气")]]
    packed = build_sft_data(conversations, tokenizer, seq_len=128, pack=True)
    row = int((packed.doc_ids.max(dim=1).values >= 1).nonzero()[0])  # a row with several conversations
    batch = {"inputs": packed.inputs[row:row + 1], "targets": packed.targets[row:row + 1],
             "doc_ids": packed.doc_ids[row:row + 1]}
    with torch.no_grad():
        together = masked_forward(model, batch)[0][0]
        for doc in range(int(packed.doc_ids[row].max()) + 1):
            positions = (packed.doc_ids[row] == doc).nonzero().flatten()
            alone = model(packed.inputs[row:row + 1, positions])[0]
            torch.testing.assert_close(together[positions], alone, atol=1e-4, rtol=1e-4)
        # without the document mask the later conversations would see the earlier ones
        leaky = model(batch["inputs"])[0]
        last = (packed.doc_ids[row] == packed.doc_ids[row].max()).nonzero().flatten()
        assert not torch.allclose(leaky[last], together[last], atol=1e-4)


# The sample's replies mostly run past this test model's 64 tokens: cut them (truncate="tokens")
# rather than keep only the few that fit whole (the default; tests/test_chat_data.py).


def test_sft_trains_validates_and_resumes_exactly(tmp_path, tokenizer):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    cfg = tiny_train_config(tmp_path / "a", seq_len=64, max_steps=4, save_every=2, eval_every=4,
                            num_eval_batches=1, lr=3e-3)
    result = run_sft(start, [SFT_TRAIN], cfg, val_data=[SFT_VAL], truncate="tokens")
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] and "val_loss" in result.last_eval
    configs = load_model(tmp_path / "a").configs  # an SFT checkpoint is a plain checkpoint
    assert configs["stage"]["name"] == "sft" and configs["sft"]["pack"] and configs["sft"]["truncate"] == "tokens"
    # killed after step 2, resumed: the same losses as the run that was never interrupted
    cfg_b = tiny_train_config(tmp_path / "b", seq_len=64, max_steps=4, save_every=2, eval_every=4,
                              num_eval_batches=1, lr=3e-3)
    run_sft(start, [SFT_TRAIN], dataclasses.replace(cfg_b, stop_after_steps=2), val_data=[SFT_VAL],
            truncate="tokens")
    cfg_b.resume = True
    run_sft(start, [SFT_TRAIN], cfg_b, val_data=[SFT_VAL], truncate="tokens")
    resumed = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [m["loss"] for m in resumed if "loss" in m] == losses


def test_sft_command(tmp_path, tokenizer, capsys):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    out = tmp_path / "sft"
    assert main(["sft", "--from", str(start), "--data", str(SFT_TRAIN), "--val-data", str(SFT_VAL),
                 "--out-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--eval-every", "3",
                 "--num-eval-batches", "1", "--no-progress", "--device", "cpu", "--truncate", "tokens"]) == 0
    printed = capsys.readouterr().out
    assert "seq_len 256 -> 64" in printed and "supervised" in printed and "val_loss" in printed
    assert (out / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    assert "report card:" in printed and "## Training" in (out / "report.md").read_text()
