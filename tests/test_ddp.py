"""Two processes under torchrun (gloo, CPU) train exactly like one process with twice the batch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import sample_texts

TINY_FLAGS = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
              "--max-seq-len", "64", "--seq-len", "32", "--max-steps", "6", "--eval-every", "3",
              "--num-eval-batches", "2", "--save-every", "3", "--log-every", "1", "--lr", "3e-3",
              "--warmup-steps", "2", "--device", "cpu", "--precision", "fp32", "--no-progress"]


def run_cli(args, tmp_path, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "xiaolm.cli", *args]
    else:
        command = [sys.executable, "-m", "xiaolm.cli", *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_losses(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [r["loss"] for r in records if "tok_per_s" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return train, val


def write_sample_data(folder):
    """train.jsonl (150 documents) and val.jsonl (30) from the committed sample, in `folder`."""
    for split, limit in (("train", 150), ("val", 30)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for text in sample_texts(split, limit=limit):
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tokenizer_dir):
    write_sample_data(tmp_path)
    common = ["pretrain", "--data", "train.jsonl", "--val-data", "val.jsonl", "--tokenizer", str(tokenizer_dir),
              *TINY_FLAGS]
    run_cli([*common, "--out-dir", "ddp", "--batch-size", "2"], tmp_path, nproc=2)
    run_cli([*common, "--out-dir", "single", "--batch-size", "4"], tmp_path)
    ddp_train, ddp_val = read_losses(tmp_path / "ddp")
    single_train, single_val = read_losses(tmp_path / "single")
    assert len(ddp_train) == len(single_train) == 6 and len(ddp_val) == 2
    assert ddp_train == pytest.approx(single_train, abs=2e-4)
    assert ddp_val == pytest.approx(single_val, abs=2e-4)
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2
