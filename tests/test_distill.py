"""Distillation: the loss's limits, a shared tokenizer is required, `xiaolm distill` trains a student."""

import json
import math

import pytest
import torch

from xiaolm.cli import main
from xiaolm.tokenizer.bpe import train_tokenizer
from xiaolm.train.runners import check_same_tokenizer
from xiaolm.train.stages import distillation_loss

from chat_helpers import SFT_TRAIN, make_checkpoint
from conftest import sample_texts


def test_distillation_loss_limits():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    ce = torch.nn.functional.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(distillation_loss(student, teacher, targets, 2.0, alpha=1.0), ce)
    assert distillation_loss(teacher, teacher, targets, 2.0, alpha=0.0).abs().item() < 1e-6  # KL(p || p) = 0
    assert distillation_loss(student, teacher, targets, 2.0, alpha=0.0).item() > 0


def test_teacher_and_student_must_share_a_tokenizer(tokenizer):
    other = train_tokenizer(sample_texts("train", limit=50), vocab_size=300)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        check_same_tokenizer(tokenizer, other)


def test_distill_command(tmp_path, tokenizer):
    teacher = make_checkpoint(tmp_path / "teacher", tokenizer, hidden_size=64, num_layers=2)
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--student", "tiny", "--hidden-size", "32", "--num-layers", "1",
                 "--num-heads", "2", "--num-kv-heads", "1", "--max-seq-len", "64", "--data", str(SFT_TRAIN),
                 "--out-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--eval-every", "2",
                 "--num-eval-batches", "1", "--no-progress", "--device", "cpu", "--truncate", "tokens"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(math.isfinite(m.get("loss", 0.0)) for m in metrics) and "val_loss" in metrics[-1]
    configs = json.loads((out / "config.json").read_text())
    assert configs["model"]["hidden_size"] == 32 and configs["distill"]["teacher_model"]["hidden_size"] == 64
    other = tmp_path / "other"
    make_checkpoint(other, train_tokenizer(sample_texts("train", limit=50), vocab_size=300))
    assert main(["distill", "--teacher", str(teacher), "--student", str(other), "--data", str(SFT_TRAIN),
                 "--out-dir", str(tmp_path / "x"), "--max-steps", "1", "--no-progress"]) == 2
