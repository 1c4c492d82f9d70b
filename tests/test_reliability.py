"""Reliability invariants (docs/reliability.md): checksummed checkpoints, training states loaded
without running code, the resume point chosen from what is on disk, inputs refused before work."""

from __future__ import annotations

import contextlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

from xiaolm import checkpoint as ckpt
from xiaolm.config import MODEL_PRESETS, ModelConfig, TrainConfig, from_dict
from xiaolm.eval.mcq import load_exam
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import check_model_fits
from xiaolm.train.runners import run_pretrain

from chat_helpers import make_checkpoint
from conftest import tiny_model_config, tiny_train_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, shards):
    """A run with checkpoints at steps 2 and 4 (keep 3)."""
    root = tmp_path_factory.mktemp("reliability") / "run"
    run_pretrain(tiny_model_config(), tiny_train_config(root, max_steps=4, save_every=2, eval_every=0,
                                                        keep_checkpoints=3), tokenizer, shards[0])
    return root


@pytest.fixture
def run_copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------- checksums


def test_every_file_is_checksummed_and_verified(run_copy):
    checkpoint = run_copy / "checkpoints" / "step_000004"
    listed = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in checkpoint.iterdir() if p.name != "checksums.json")
    assert ckpt.verify_checkpoint(checkpoint)
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5000] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"step_000004/model.safetensors: checksum mismatch"):
        ckpt.load_model(run_copy)
    data[-5000] ^= 1
    weights.write_bytes(bytes(data))
    (checkpoint / "training_state.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"training_state.pt: missing \(listed in checksums"):
        ckpt.verify_checkpoint(checkpoint)


def test_a_checkpoint_without_checksums_loads_with_a_note(tmp_path, tokenizer, capsys):
    checkpoint = make_checkpoint(tmp_path / "old", tokenizer)
    (checkpoint / "checksums.json").unlink()
    assert not ckpt.verify_checkpoint(checkpoint)
    ckpt.load_model(checkpoint)
    assert "has no checksums.json (written before xiaolm recorded checksums): loading it unverified" in \
        capsys.readouterr().err


def test_exported_and_merged_folders_are_checksummed(tmp_path, tokenizer):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    from xiaolm.interop.hf_export import export_hf

    out = export_hf(checkpoint, tmp_path / "hf")
    listed = json.loads((out / "checksums.json").read_text())["files"]
    assert ckpt.verify_checkpoint(out) and "model.safetensors" in listed


# --------------------------------------------------------------------------- training state


def test_training_state_refuses_pickled_code(run_copy, tmp_path):
    """A training_state.pt from someone else cannot run code: torch.load(weights_only=True) refuses
    anything but tensors and plain data, and nothing runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = run_copy / "checkpoints" / "step_000004"
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    torch.save({**state, "extra": Payload()}, checkpoint / "training_state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"training_state.pt: refused: it holds a Python object"):
        ckpt.load_training_state(checkpoint)
    assert not marker.exists()


def test_rng_states_survive_a_checkpoint_bit_for_bit(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    (tmp_path / "c").mkdir()
    torch.save({"rng": ckpt.capture_rng_state()}, tmp_path / "c" / ckpt.STATE_FILE)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_training_state(tmp_path / "c")["rng"])
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


# --------------------------------------------------------------------------- where a resume starts


def test_resume_point_is_the_newest_complete_verified_checkpoint(run_copy):
    root = run_copy / "checkpoints"
    point = ckpt.find_resume_point(run_copy, resume=True)
    assert point.checkpoint == root / "step_000004" and point.notes == []
    # killed between the rename of step 4 and the update of latest
    (root / "latest").write_text("step_000002\n")
    point = ckpt.find_resume_point(run_copy, resume=True)
    assert point.checkpoint.name == "step_000004"
    assert "step_000004 is complete but" in point.notes[0] and "still named step_000002" in point.notes[0]
    # latest names a folder that is gone
    (root / "latest").write_text("step_000006\n")
    point = ckpt.find_resume_point(run_copy, resume=True)
    assert point.checkpoint.name == "step_000004"
    assert "names step_000006, which does not exist" in point.notes[0]


def test_resume_falls_back_past_damaged_and_incomplete_checkpoints(run_copy):
    root = run_copy / "checkpoints"
    (root / "step_000004" / "model.safetensors").write_bytes(b"\0" * 100)
    (root / "step_000002" / "training_state.pt").unlink()
    (root / "step_000002" / "checksums.json").unlink()  # as an old checkpoint would be
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ValueError, match=r"none of its checkpoints is usable .*step_000004 \(.*truncated or "
                                         r"changed.*step_000002 \(incomplete: training_state.pt missing\)"):
        ckpt.find_resume_point(run_copy, resume=True)
    assert sorted(p.name for p in root.iterdir()) == before  # finding changes nothing
    shutil.copytree(root / "step_000004", root / "step_000000")  # an older step... also damaged
    (root / "step_000000" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="none of its checkpoints is usable"):
        ckpt.find_resume_point(run_copy, resume=True)


def test_settling_a_resume_point_sets_unusable_folders_aside(run_copy):
    root = run_copy / "checkpoints"
    (root / "step_000004" / "config.json").write_text("{}")
    point = ckpt.find_resume_point(run_copy, resume=True)
    assert point.checkpoint.name == "step_000002" and point.unusable == [root / "step_000004"]
    assert "skipped step_000004" in point.notes[0] and "config.json" in point.notes[0]
    ckpt.settle_resume_point(point)
    assert (root / ".unusable-step_000004").is_dir() and not (root / "step_000004").exists()
    assert (root / "latest").read_text().strip() == "step_000002"


def test_no_checkpoint_is_a_fresh_start_and_a_run_needs_resume(tmp_path, run_copy):
    point = ckpt.find_resume_point(tmp_path / "new", resume=True)
    assert point.checkpoint is None and "starting a fresh run" in point.notes[0]
    assert ckpt.find_resume_point(tmp_path / "new", resume=False).notes == []
    with pytest.raises(ValueError, match="already holds checkpoints .*pass --resume"):
        ckpt.find_resume_point(run_copy, resume=False)


# --------------------------------------------------------------------------- inputs checked before work


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_parameter_count_from_the_config_matches_the_model(name):
    config = ModelConfig.from_preset(name, vocab_size=300, hidden_size=64, num_heads=4, num_kv_heads=2,
                                     **({"moe_intermediate_size": 32} if "moe" in name else {}))
    assert config.num_parameters() == Transformer(config).num_parameters()
    for variant in (dict(tie_embeddings=False), dict(qk_norm=True), dict(qkv_bias=True), dict(head_dim=32)):
        config = ModelConfig.from_preset(name, vocab_size=300, hidden_size=64, num_heads=4, num_kv_heads=2,
                                         **variant)
        assert config.num_parameters() == Transformer(config).num_parameters()


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    huge = ModelConfig(hidden_size=1 << 20, num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match=r"parameters .* need about [\d,]+ GiB for weights, gradients"):
        check_model_fits(huge, torch.device("cpu"), training=True)
    check_model_fits(tiny_model_config(), torch.device("cpu"), training=True)


def test_configs_check_types_and_ranges():
    with pytest.raises(ValueError, match="model config: hidden_size must be int, got str '64'"):
        from_dict(ModelConfig, {"hidden_size": "64"})
    with pytest.raises(ValueError, match="model config: tie_embeddings must be bool, got int 1"):
        ModelConfig(tie_embeddings=1)
    with pytest.raises(ValueError, match="train config: lr must be a finite number, got nan"):
        TrainConfig(lr=float("nan"))
    for field, value in [("log_every", 0), ("num_eval_batches", 0), ("keep_checkpoints", 0),
                         ("min_lr_ratio", -5.0), ("beta2", 1.0), ("weight_decay", -0.1)]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})
    assert TrainConfig(lr=1).lr == 1  # an int is a fine float


def test_dpo_drops_pairs_whose_replies_are_identical(tokenizer):
    from xiaolm.data.chat_formats import PreferencePair
    from xiaolm.train.stages import build_preference_data

    prompt = [{"role": "user", "content": "你是谁？"}]
    same = PreferencePair(prompt, chosen="我是 xiaolm。", rejected="我是 xiaolm。")
    differ = PreferencePair(prompt, "我是 xiaolm。", "不知道")
    data = build_preference_data([same, differ, same], tokenizer, 64)
    assert data.num_pairs == 1 and data.num_identical == 2
    with pytest.raises(ValueError, match="all 1 preference pairs have the same chosen and rejected reply"):
        build_preference_data([same], tokenizer, 64)


def test_mcq_lines_and_numeric_answers(tmp_path):
    path = tmp_path / "law_val.csv"
    header = "id,question,A,B,answer\n"
    path.write_text(header + '0,"第一行\n第二行",甲,乙,1\n1,单行,甲,乙,0\n', encoding="utf-8")
    exam = load_exam(path)
    assert [q.answer for q in exam.questions["law"]] == [1, 0] and exam.questions["law"][0].id == "0"
    path.write_text(header + '0,"第一行\n第二行",甲,乙,1\n1,"单行",甲,乙,2\n', encoding="utf-8")
    with pytest.raises(ValueError, match="answers are numbers and none is 0"):
        load_exam(path)
    assert [q.answer for q in load_exam(path, answer_base=1).questions["law"]] == [0, 1]
    with pytest.raises(ValueError, match=r"law_val.csv:4: answer '2' is outside the 2 options \(numbers "
                                         r"counting from 0\)"):
        load_exam(path, answer_base=0)


def test_ctrl_c_at_the_chat_prompt_says_nothing_about_checkpoints(tmp_path, tokenizer):
    """On a terminal (a pseudo-terminal here), Ctrl-C at the `you>` prompt ends the chat with exit
    130 and a plain "interrupted": there is no checkpoint to speak of."""
    import os
    import pty
    import signal
    import subprocess
    import sys
    import time

    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "xiaolm.cli", "chat", "--ckpt", str(checkpoint)],
                               stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + 120
    while b"you> " not in output and time.monotonic() < deadline:
        output += os.read(master, 4096)
    os.kill(process.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    assert process.wait(timeout=60) == 130
    with contextlib.suppress(OSError):  # the terminal's other end is gone once the process is
        while chunk := os.read(master, 4096):
            output += chunk
    os.close(master)
    text = output.decode(errors="replace")
    assert "you> " in text and "xiaolm: interrupted" in text and "checkpoint" not in text.split("you> ", 1)[1]
