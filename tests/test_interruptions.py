"""Runs that are stopped: SIGINT / SIGTERM finish the step, write a checkpoint and exit 130 / 143
(under torchrun every rank agrees on the step); a second signal aborts at once; `kill -9` at random
moments loses nothing: resumed, the run ends with the metrics and weights of one never interrupted.
Every run here is the real CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sample_texts
from disk_helpers import small_disk

TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4", "--num-eval-batches", "2",
        "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--precision", "fp32",
        "--no-progress"]  # fp32: auto would measure, and two runs could choose differently
TIMING = ("tok_per_s", "elapsed_s", "mfu")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("interruptions")
    for split, limit in (("train", 150), ("val", 30)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for text in sample_texts(split, limit=limit):
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return root


def pretrain_command(data: Path, tokenizer_dir: Path, out: Path, *extra: str, nproc: int = 0) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    return [*launcher, "-m", "xiaolm.cli", "pretrain", "--data", str(data / "train.jsonl"),
            "--val-data", str(data / "val.jsonl"), "--tokenizer", str(tokenizer_dir), *TINY,
            "--out-dir", str(out), *extra]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def metrics(run: Path, timing: bool = True) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        records.append(record if timing else {k: v for k, v in record.items() if k not in TIMING})
    return records


def last_step(run: Path) -> int:
    return max((r["step"] for r in metrics(run)), default=0)


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> bool:
    """Wait until metrics.jsonl shows `step` (True) or the process ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if last_step(run) >= step:
            return True
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])


def test_sigterm_finishes_the_step_and_writes_a_checkpoint(data, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    process = start(pretrain_command(data, tokenizer_dir, run, "--max-steps", "400", "--save-every", "0",
                                     "--eval-every", "0"), tmp_path)
    assert wait_for_step(process, run, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()[-2000:]
    step = checkpoint_step(run)
    assert 3 <= step < 400 and last_step(run) == step  # the step it was in was finished and saved
    assert f"xiaolm: stopped by SIGTERM after step {step}; checkpoint {run}/checkpoints/step_{step:06d}" in \
        err.decode()
    assert "report card" not in out.decode()
    resumed = subprocess.run(pretrain_command(data, tokenizer_dir, run, "--max-steps", str(step + 2),
                                              "--save-every", "0", "--eval-every", "0", "--resume"),
                             cwd=tmp_path, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"resuming from {run}/checkpoints/step_{step:06d} (step {step})" in resumed.stdout.decode()
    assert checkpoint_step(run) == step + 2


SECOND_SIGNAL = """
import os, signal, sys, time
from xiaolm.train.signals import StopRequests
with StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C delivered twice (terminal + torchrun): one request
    time.sleep(0.1)
    assert stop.signum == signal.SIGINT
    print("still running", flush=True)
    stop.first_at -= 10  # as if the first came 10 s ago: this one is a second request
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not aborted", flush=True)
"""


def test_a_second_signal_aborts_at_once(tmp_path):
    result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, timeout=120)
    assert result.stdout.decode() == "still running\n"
    assert result.returncode == -signal.SIGINT  # ended by the signal itself, not by Python's exit
    assert "send it again to abort at once" in result.stderr.decode()
    assert "SIGINT again: aborting now" in result.stderr.decode()


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in child_pids(launcher.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"no rank {rank} under torchrun")


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_same_step(data, tokenizer_dir, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step (rank 0 would otherwise wait in
    the next all-reduce for ever), rank 0 writes that step's checkpoint, both exit 143."""
    run = tmp_path / "run"
    launcher = start(pretrain_command(data, tokenizer_dir, run, "--max-steps", "400", "--save-every", "0",
                                      "--eval-every", "0", "--batch-size", "2", nproc=2), tmp_path)
    rank1 = rank_pid(launcher, 1)
    assert wait_for_step(launcher, run, 3)
    os.kill(rank1, signal.SIGTERM)
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode != 0
    step = checkpoint_step(run)
    assert 3 <= step < 400 and last_step(run) == step, err.decode()[-3000:]
    assert f"stopped by SIGTERM after step {step}" in err.decode()
    assert "exitcode  : 143" in err.decode() or "exit code 143" in err.decode() or "143" in err.decode()


@pytest.mark.slow
def test_a_failed_checkpoint_write_fails_every_rank(data, tokenizer_dir, tmp_path):
    """Under torchrun, rank 0 alone writes checkpoints: when that fails (a full disk here), every
    rank stops with an error at once instead of waiting for rank 0 in the next collective."""
    with small_disk(tmp_path / "disk") as disk:
        command = pretrain_command(data, tokenizer_dir, disk.path / "run", "--save-every", "2",
                                   "--eval-every", "0", "--batch-size", "2", nproc=2)
        first = subprocess.run([*command, "--max-steps", "2"], cwd=tmp_path, capture_output=True, timeout=300)
        assert first.returncode == 0, first.stderr.decode()[-2000:]
        disk.fill()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        second = subprocess.run([*command, "--max-steps", "4", "--resume"], cwd=tmp_path, capture_output=True,
                                timeout=300, env=env, preexec_fn=disk.preexec_fn)
        err = second.stderr.decode()
        # torchrun reports its failed workers with a traceback of its own; none comes from xiaolm
        assert second.returncode != 0 and not re.search(r'File "[^"]*/xiaolm/[^"]*"', err), err[-3000:]
        written = rf"xiaolm: error: cannot write checkpoint step_000004 .*{disk.error}"
        assert re.search(written, err), err[-3000:]
        assert "xiaolm: error: the main process could not write the checkpoint" in err
        assert checkpoint_step(disk.path / "run") == 2


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(data, tokenizer_dir, tmp_path):
    """`kill -9` at seeded random moments (while tokenizing, mid-step, during validation, while a
    checkpoint is written, between a checkpoint's rename and the update of `latest`, during the
    report), each time resumed with --resume: the finished run has the metrics (timings aside) and
    the final weights, bit for bit, of a run never interrupted."""
    common = ["--max-steps", "12", "--save-every", "2", "--eval-every", "4", "--keep-checkpoints", "2"]
    reference = subprocess.run(pretrain_command(data, tokenizer_dir, tmp_path / "reference", *common),
                               cwd=tmp_path, capture_output=True, timeout=300)
    assert reference.returncode == 0, reference.stderr.decode()[-2000:]
    run, rng, kills = tmp_path / "run", random.Random(13), []
    for attempt in range(6):
        done = checkpoint_step(run) if (run / "checkpoints" / "latest").is_file() else 0
        logged = last_step(run)
        target = min(12, max(done, logged) + rng.randint(1, 3))
        process = start(pretrain_command(data, tokenizer_dir, run, *common, "--resume"), tmp_path)
        if attempt == 0 or target <= logged:  # somewhere in start-up: imports, tokenizing, resuming
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # once it logged a random step past what was logged before, then a random pause
            if done == 12 or not wait_for_step(process, run, target):
                break
            time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            break
        process.kill()  # SIGKILL
        process.wait()
        kills.append((attempt, last_step(run)))
    final = subprocess.run(pretrain_command(data, tokenizer_dir, run, *common, "--resume"), cwd=tmp_path,
                           capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    print("killed at (attempt, last step logged):", kills)
    assert len(kills) >= 3, kills
    assert metrics(run, timing=False) == metrics(tmp_path / "reference", timing=False), kills
    final_weights = run / "checkpoints" / "step_000012" / "model.safetensors"
    assert sha256(final_weights) == sha256(tmp_path / "reference" / "checkpoints" / "step_000012" /
                                           "model.safetensors")
    assert (run / "report.md").is_file()
