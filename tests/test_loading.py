"""One loader for every command: a LoRA checkpoint works wherever a checkpoint is taken."""

import io

import pytest
import torch

from xiaolm.cli import main
from xiaolm.train.runners import run_sft
from xiaolm.config import LoraConfig

from chat_helpers import DPO_TRAIN, SFT_TRAIN, make_checkpoint
from conftest import SAMPLE, tiny_train_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora")
    start = make_checkpoint(root / "start", tokenizer)
    cfg = tiny_train_config(root / "lora", seq_len=64, max_steps=2, save_every=2, eval_every=0, lr=1e-2)
    run_sft(start, [SFT_TRAIN], cfg, val_fraction=0, lora=LoraConfig(rank=4, alpha=8))
    return root / "lora"


@pytest.mark.parametrize("command", ["generate", "eval ppl", "eval mcq", "sft", "dpo", "distill", "export", "chat"])
def test_every_command_takes_a_lora_checkpoint(command, lora_run, tmp_path, monkeypatch):
    ckpt = str(lora_run)
    out = str(tmp_path / "out")
    train = ["--max-steps", "1", "--eval-every", "0", "--seq-len", "64", "--batch-size", "2", "--device", "cpu",
             "--no-progress", "--out-dir", out]
    argv = {
        "generate": ["generate", "--ckpt", ckpt, "--prompt", "中国", "--max-new-tokens", "4", "--device", "cpu"],
        "eval ppl": ["eval", "ppl", "--ckpt", ckpt, "--data", str(SAMPLE / "val.jsonl"), "--max-batches", "1",
                     "--out", out, "--device", "cpu"],
        "eval mcq": ["eval", "mcq", "--ckpt", ckpt, "--data", str(SAMPLE.parent / "exams"), "--subjects", "law_article_source",
                     "--out", out, "--device", "cpu", "--no-progress"],
        "sft": ["sft", "--from", ckpt, "--data", str(SFT_TRAIN), "--val-fraction", "0", *train],
        "dpo": ["dpo", "--from", ckpt, "--data", str(DPO_TRAIN), "--val-fraction", "0", *train],
        "distill": ["distill", "--teacher", ckpt, "--student", "tiny", "--hidden-size", "64", "--num-layers", "1",
                    "--max-seq-len", "64", "--data", str(SFT_TRAIN), "--val-fraction", "0", *train],
        "export": ["export", "hf", "--ckpt", ckpt, "--out", out],
        "chat": ["chat", "--ckpt", ckpt, "--max-new-tokens", "4", "--device", "cpu"],
    }[command]
    if command == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    torch.manual_seed(0)
    assert main(argv) == 0
