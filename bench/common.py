"""Shared pieces of the benchmarks: the peer model, interleaved timing, and the report.

Every benchmark measures xiaolm and its peer in the same process, alternating them
(A, B, B, A, A, B, ...) so that load from other work on a shared machine hits both alike,
and reports medians and their ratio rather than trusting any absolute figure.
"""

from __future__ import annotations

import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from xiaolm.config import ModelConfig, TrainConfig
from xiaolm.interop.hf_export import build_hf_model
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import Runtime
from xiaolm.train.loop import Batch, Stage, StageLoss, init_train_state, train_step
from xiaolm.train.stages import next_token_loss


def build_hf_llama(config: ModelConfig, source: Transformer | None = None):
    """transformers' LlamaForCausalLM with xiaolm's shape and SDPA attention (interop/hf_export.py, the
    export's own mapping); with `source`, its weights are copied over so both models compute the
    same function."""
    return build_hf_model(config, source)


def make_train_step(model, batches, precision: str = "fp32", *, lr: float = 1e-4,
                    compute_loss: Callable[..., StageLoss] = next_token_loss) -> Callable[[], float]:
    """A closure running xiaolm's training step (`xiaolm.train.loop.train_step`: forward,
    `compute_loss` plus an MoE model's balance loss, backward, clipping to norm 1, AdamW at a
    constant `lr`) on the next of `batches`, (inputs, targets) pairs, cycled; it returns the loss."""
    cfg = TrainConfig(lr=lr, warmup_steps=0, min_lr_ratio=1.0, precision=precision)
    state = init_train_state(model, cfg, Runtime(torch.device("cpu"), precision))

    def train_batch(samples: range) -> Batch:
        inputs, targets = batches[samples.start % len(batches)]
        return {"inputs": inputs, "targets": targets}

    stage = Stage(name="bench", train_batch=train_batch, compute_loss=compute_loss)

    def step() -> float:
        return train_step(state, [stage.train_batch(range(state.step, state.step + 1))], stage, cfg).loss

    return step


def hf_next_token_loss(model, batch: Batch) -> StageLoss:
    """The training loss of transformers' LlamaForCausalLM in xiaolm's step (it has no aux loss)."""
    logits = model(input_ids=batch["inputs"], use_cache=False).logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
    return StageLoss(loss, batch["inputs"].numel())


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each callable over `rounds` rounds, alternating the order every round
    (A B, B A, A B, ...) so drifting background load does not favour either side."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min-max of a list relative to its median, to show how noisy a figure was."""
    mid = median(values)
    return f"{(min(values) / mid - 1) * 100:+.0f}% / {(max(values) / mid - 1) * 100:+.0f}%"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_description(threads: int) -> str:
    """One markdown paragraph: CPU model, cores, the matmul-relevant ISA flags, library versions."""
    model, cores = platform.processor() or "unknown CPU", "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        cores = fields.get("CPU(s)", cores).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = cpu_flags()
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"]
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)
    versions = f"torch {torch.__version__}"
    try:
        import transformers

        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return (f"Machine: {model}, {cores} CPU(s), {threads} torch thread(s); {isa}; {versions}; "
            f"Python {platform.python_version()}.")


def command_line() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in [_relative_script(), *sys.argv[1:]])


def _relative_script() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_report(title: str, threads: int, table: str, notes: Sequence[str] = ()) -> None:
    print(f"## {title}\n")
    print(f"Command: `{command_line()}`\n")
    print(machine_description(threads) + "\n")
    print(table + "\n")
    for note in notes:
        print(note)
    sys.stdout.flush()
