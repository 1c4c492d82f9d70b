"""FSDP2 under torchrun (gloo, CPU): the losses of one process with twice the batch, sharded
checkpoints that resume exactly on 2 -> 1 -> 2 processes, and their conversion to a plain one."""

import json

import pytest
import torch

from xiaolm import checkpoint as ckpt
from xiaolm.cli import main

from test_ddp import TINY_FLAGS, read_losses, run_cli, write_sample_data


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_across_world_sizes(tmp_path, tokenizer_dir):
    write_sample_data(tmp_path)
    common = ["pretrain", "--data", "train.jsonl", "--val-data", "val.jsonl", "--tokenizer", str(tokenizer_dir),
              *TINY_FLAGS, "--save-every", "2", "--keep-checkpoints", "4"]
    two, one = ["--batch-size", "2", "--fsdp"], ["--batch-size", "4"]
    run_cli([*common, "--out-dir", "single", *one], tmp_path)
    run_cli([*common, "--out-dir", "fsdp", *two], tmp_path, nproc=2)
    # the same run interrupted twice: 2 processes to step 2, one process to step 4, 2 processes to the end
    run_cli([*common, "--out-dir", "moved", *two, "--stop-after-steps", "2"], tmp_path, nproc=2)
    run_cli([*common, "--out-dir", "moved", *one, "--fsdp", "--resume", "--stop-after-steps", "4"], tmp_path)
    run_cli([*common, "--out-dir", "moved", *two, "--resume"], tmp_path, nproc=2)
    single_train, single_val = read_losses(tmp_path / "single")
    fsdp_train, fsdp_val = read_losses(tmp_path / "fsdp")
    moved_train, _ = read_losses(tmp_path / "moved")
    # the interrupted run also validated where it stopped (steps 2 and 4): compare at steps 3 and 6
    moved_val = [r["val_loss"] for r in map(json.loads, open(tmp_path / "moved" / "metrics.jsonl"))
                 if "val_loss" in r and r["step"] in (3, 6)]
    assert len(fsdp_train) == len(single_train) == len(moved_train) == 6
    assert fsdp_train == pytest.approx(single_train, abs=2e-4)
    assert fsdp_val == pytest.approx(single_val, abs=2e-4)
    assert moved_train == pytest.approx(fsdp_train, abs=2e-4)
    assert moved_val == pytest.approx(fsdp_val, abs=2e-4)

    sharded = ckpt.resolve_checkpoint(tmp_path / "fsdp")
    assert (sharded / ckpt.SHARDED_DIR).is_dir() and not (sharded / ckpt.MODEL_FILE).exists()
    plain = tmp_path / "plain"
    assert main(["checkpoint", "consolidate", "--ckpt", str(tmp_path / "fsdp"), "--out", str(plain)]) == 0
    assert (plain / ckpt.MODEL_FILE).is_file()
    assert main(["checkpoint", "consolidate", "--ckpt", str(plain), "--out", str(tmp_path / "again")]) == 2
    reference = ckpt.load_model(tmp_path / "single").model.state_dict()
    for loaded in (ckpt.load_model(plain).model, ckpt.load_model(tmp_path / "fsdp").model):
        for name, tensor in loaded.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
