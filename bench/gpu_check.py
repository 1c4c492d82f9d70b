"""The GPU check: what to run, in under 8 minutes, the first time a CUDA machine is at hand.

1. the test suite's CUDA-marked tests (`pytest -m cuda`);
2. minimind-3 pretraining in bf16 on the committed sample, without and with `--compile`, a few
   hundred steps each: tokens/s, MFU against the measured bf16 matmul peak, peak memory, and
   compile time (first step minus a median one);
3. greedy decoding of minimind2-small against transformers' `generate` at batch 1 and 8, eager
   and with the compiled step (`bench/decode.py --device cuda [--compile]`);
4. the speedrun on the committed sample (no network there: `--corpus data/sample`), timed.
It prints a markdown summary and writes it to OUT/gpu_check.md with the runs beside it.

    python bench/gpu_check.py                 # on a CUDA machine (repository root)
    python bench/gpu_check.py --dry-run       # the same steps at toy sizes on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run `command` with its output in `log` (and its tail on screen); (exit code, seconds)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").splitlines()[-5:]
    print("\n".join("    " + line for line in tail) + f"\n    (exit {code}, {seconds:.0f} s)", flush=True)
    return code, seconds


def training_figures(run_dir: Path) -> dict[str, float]:
    """Median tok/s and MFU over the log lines after the first (which holds compilation), the peak
    memory, and the first step's excess over a median step."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [r for r in records if "tok_per_s" in r]
    steady = train[1:] or train
    figures = {
        "steps": train[-1]["step"],
        "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
        "mfu": statistics.median(r.get("mfu", float("nan")) for r in steady),
        "peak_memory_gb": max(r.get("peak_memory_gb", 0.0) for r in train),
        "seconds": train[-1]["elapsed_s"],
    }
    tokens_per_log = steady[0]["tokens"] - train[0]["tokens"] if len(train) > 1 else 0
    if tokens_per_log:  # time of the first log window minus that of a steady one
        first_window = train[0]["tokens"] / train[0]["tok_per_s"]
        figures["first_window_excess_s"] = first_window - train[0]["tokens"] / figures["tok_per_s"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per run [300]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script itself")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "pretrain", "compile", "decode", "speedrun"])
    args = parser.parse_args()

    import torch

    xiaolm = [sys.executable, "-m", "xiaolm.cli"]
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.dry_run:
        device, steps, batch_size = "cpu", 4, 2
        shape = ["--preset", "minimind-3", "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4",
                 "--num-kv-heads", "2", "--intermediate-size", "128", "--seq-len", "64", "--max-seq-len", "64"]
        speedrun_extra = ["--max-steps", "2", "--batch-size", "2", "--sft-steps", "2", "--dpo-steps", "1",
                          "--hidden-size", "64", "--num-layers", "1", "--vocab-size", "600",
                          "--tokenizer-chars", "200000"]
        timeouts = {"tests": 300, "pretrain": 600, "decode": 600, "speedrun": 600}
        decode_shape = ["--preset", "tiny", "--batch-sizes", "1", "--new-tokens", "8", "--rounds", "1"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here; use --dry-run to check the script on a CPU", file=sys.stderr)
            return 2
        device, steps, batch_size = "cuda", args.steps, args.batch_size
        shape = ["--preset", "minimind-3", "--seq-len", "512"]
        speedrun_extra = ["--pretrain-minutes", "1"]  # the GPU's own pace sets the steps of that minute
        timeouts = {"tests": 120, "pretrain": 150, "decode": 120, "speedrun": 300}
        decode_shape = ["--preset", "minimind2-small", "--batch-sizes", "1", "8", "--new-tokens", "128",
                        "--rounds", "3"]
    lines = ["# GPU check", ""]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}.")
    else:
        lines.append(f"Dry run on the CPU (toy sizes; figures mean nothing); torch {torch.__version__}.")
    lines.append("")

    if "tests" not in args.skip:
        code, seconds = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests"], out / "tests.log",
                            timeouts["tests"])
        lines.append(f"CUDA-marked tests: exit {code} in {seconds:.0f} s "
                     f"({(out / 'tests.log').read_text().strip().splitlines()[-1:]}).")
        lines.append("")

    if "pretrain" not in args.skip:
        tokenizer = out / "tokenizer"
        run([*xiaolm, "tokenizer", "train", "--data", str(SAMPLE / "train.jsonl"), "--out", str(tokenizer),
             "--vocab-size", "6400" if not args.dry_run else "600"], out / "tokenizer.log", 300)
        rows = []
        variants = [("eager", []), ("compiled", ["--compile"])][:1 if "compile" in args.skip else 2]
        for name, extra in variants:
            run_dir = out / f"minimind3_{name}"
            command = [*xiaolm, "pretrain", "--data", str(SAMPLE / "train.jsonl"), "--tokenizer", str(tokenizer),
                       *shape, "--out-dir", str(run_dir), "--device", device, "--precision", "bf16",
                       "--batch-size", str(batch_size), "--grad-accum-steps", "1", "--max-steps", str(steps),
                       "--warmup-steps", "10", "--log-every", str(max(1, steps // 10)), "--eval-every", "0",
                       "--save-every", str(steps), "--no-progress", *extra]
            code, seconds = run(command, out / f"pretrain_{name}.log", timeouts["pretrain"])
            if code == 0:
                figures = training_figures(run_dir)
                rows.append(f"| {name} | {figures['steps']} | {figures['tok_per_s']:,.0f} | "
                            f"{100 * figures['mfu']:.1f}% | {figures['peak_memory_gb']:.2f} | "
                            f"{figures.get('first_window_excess_s', float('nan')):.1f} | {seconds:.0f} |")
            else:
                rows.append(f"| {name} | failed (exit {code}, see pretrain_{name}.log) | | | | | {seconds:.0f} |")
        lines += [f"minimind-3, bf16, batch {batch_size} x 512, {steps} steps on data/sample:", "",
                  "| run | steps | tok/s | MFU | peak memory GB | first log window's excess s (compile) | wall s |",
                  "|---|---|---|---|---|---|---|", *rows, ""]

    if "decode" not in args.skip:
        variants = [("eager", []), ("compiled", ["--compile"])][:1 if "compile" in args.skip else 2]
        for name, extra in variants:
            log = out / f"decode_{name}.log"
            code, seconds = run([sys.executable, str(ROOT / "bench" / "decode.py"), *decode_shape, "--device", device,
                                 *extra], log, timeouts["decode"])
            table = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("|")]
            lines += [f"Greedy decoding against transformers' generate, {name}: exit {code} in {seconds:.0f} s", "",
                      *table, ""]

    if "speedrun" not in args.skip:
        code, seconds = run([*xiaolm, "speedrun", "--corpus", str(SAMPLE), "--out", str(out / "speedrun"),
                             "--device", device, "--no-progress", *speedrun_extra], out / "speedrun.log",
                            timeouts["speedrun"])
        summary = out / "speedrun" / "summary.json"
        stages = json.loads(summary.read_text()).get("timings_s", {}) if summary.is_file() else {}
        lines.append(f"Speedrun on data/sample: exit {code}, {seconds:.0f} s in all; stages (s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ".")
    report = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
