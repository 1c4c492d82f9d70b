"""fp32 against bf16 autocast training steps for each model preset: what `--precision auto` measures.

For each preset, the same probe the training loop runs on a CPU (`runtime.time_training_steps`:
forward + cross-entropy + backward on a copy of the model, fp32 and bf16 interleaved, medians),
with more rounds, and the choice `--precision auto` would make from it.

    python bench/precision.py --presets tiny:16x256 minimind2-small:4x512 minimind-3:4x512 --rounds 4
"""

from __future__ import annotations

import argparse

import torch

from common import markdown_table, print_report
from xiaolm.config import ModelConfig
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import BF16_MIN_SPEEDUP, time_training_steps, cpu_has_native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny:16x256", "minimind2-small:4x512", "minimind-3:4x512"],
                        help="PRESET:BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.presets:
        preset, shape = spec.split(":")
        batch_size, seq_len = (int(part) for part in shape.split("x"))
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset(preset))
        seconds = time_training_steps(model, batch_size, seq_len, args.rounds)
        tokens = batch_size * seq_len
        speedup = seconds["fp32"] / seconds["bf16"]
        choice = "bf16" if cpu_has_native_bf16() and speedup >= BF16_MIN_SPEEDUP else "fp32"
        rows.append([preset, f"{batch_size} x {seq_len}", f"{tokens / seconds['fp32']:,.0f}",
                     f"{tokens / seconds['bf16']:,.0f}", f"{speedup:.2f}", choice])
        print(f"[{spec}] {seconds}", flush=True)
    table = markdown_table(["preset", "batch x seq", "fp32 tok/s", "bf16 autocast tok/s", "bf16 / fp32", "auto picks"],
                           rows)
    notes = [f"Forward + backward only (no optimizer step), medians of {args.rounds} interleaved rounds after one "
             f"warmup each; native bf16 on this CPU: {cpu_has_native_bf16()}; threshold {BF16_MIN_SPEEDUP}x."]
    print_report("fp32 vs bf16 autocast training steps, per preset", args.threads, table, notes)


if __name__ == "__main__":
    main()
