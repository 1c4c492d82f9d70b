"""AdamW against Muon at equal wall-clock on the speedrun's pretraining: validation bits-per-byte.

Each contender runs the training loop's own step (`train_step`: the speedrun's pretraining stage
with its fused next-token loss, `build_optimizer`, clipping, the warmup + cosine schedule) on the
same token shards and batches.
Their steps are interleaved one for one in this process, so load from other work slows both alike;
each is charged the time of its own steps, and a contender stops when its time reaches the
budget. The schedule's length (max_steps) is set for each from its own first steps' pace, as the
speedrun's plan does, so each contender's learning rate decays to its floor at the budget.
At the end both are validated on the same held-out windows.

    python bench/optimizer_race.py --corpus ~/.cache/xiaolm/corpus/default --minutes 4 \
        --contenders adamw:3e-3 muon:3e-3 muon:1e-2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import markdown_table, print_report
from xiaolm.config import ModelConfig, TrainConfig
from xiaolm.data.readers import iter_documents
from xiaolm.data.shards import PackedTokens, write_shards
from xiaolm.eval.ppl import token_num_bytes
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import DistContext, Runtime, seeded
from xiaolm.tokenizer.bpe import load_tokenizer, train_tokenizer
from xiaolm.train.loop import Stage, init_train_state, micro_batch_samples, train_step
from xiaolm.train.stages import pretrain_stage
from xiaolm.utils import spread_sample

PACE_STEPS = 6  # steps timed before the schedule's length is fixed


class Contender:
    def __init__(self, name: str, model_cfg: ModelConfig, cfg: TrainConfig, stage: Stage) -> None:
        self.name, self.cfg, self.stage = name, cfg, stage
        with seeded(cfg.seed):
            model = Transformer(model_cfg)
        self.state = init_train_state(model, cfg, Runtime(torch.device("cpu"), cfg.precision))
        self.state.model.train()
        self.seconds, self.step_times, self.losses = 0.0, [], []

    def step(self) -> None:
        """One step of the training loop's own `train_step`, timed."""
        start = time.perf_counter()
        samples = micro_batch_samples(self.state.step, self.cfg.batch_size, DistContext())
        metrics = train_step(self.state, [self.stage.train_batch(samples)], self.stage, self.cfg)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.step_times.append(elapsed)
        self.losses.append(metrics.loss)


def prepare_shards(corpus: Path, work: Path, vocab_size: int, tokenizer_chars: int):
    """The speedrun's tokenizer and shards for `corpus` (cached under `work`)."""
    tokenizer_dir = work / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        texts = spread_sample(lambda: iter_documents([corpus / "train.jsonl"]), tokenizer_chars)
        tokenizer = train_tokenizer(texts, vocab_size)
        tokenizer.save(tokenizer_dir)
    for split in ("train", "val"):
        write_shards(iter_documents([corpus / f"{split}.jsonl"]), tokenizer, work / split,
                     source_key=str(corpus / split))
    return tokenizer, work / "train", work / "val"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a built corpus folder (train.jsonl, val.jsonl)")
    parser.add_argument("--work", type=Path, default=Path("runs/optimizer_race"), help="tokenizer and shards cache")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each contender")
    parser.add_argument("--contenders", nargs="+", default=["adamw:3e-3", "muon:3e-3"], help="OPTIMIZER:LR")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--tokenizer-chars", type=int, default=5_000_000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, train_dir, val_dir = prepare_shards(args.corpus, args.work, args.vocab_size, args.tokenizer_chars)
    model_cfg = ModelConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size)
    base = TrainConfig.from_preset(args.preset, precision="fp32")
    train_data = PackedTokens(train_dir, base.seq_len, seed=base.seed)
    val_data = PackedTokens(val_dir, base.seq_len, seed=0, shuffle=False)
    # the speedrun's pretraining stage: its batches and fused next-token loss, its validation
    stage = pretrain_stage(train_data, val_data, token_num_bytes(tokenizer), base)
    contenders = []
    for spec in args.contenders:
        optimizer, lr = spec.split(":")
        cfg = replace(base, optimizer=optimizer, lr=float(lr))
        contenders.append(Contender(f"{optimizer} lr {lr}", model_cfg, cfg, stage))
    budget = args.minutes * 60
    # pace: the first steps of each set its schedule's length to fill the budget
    for _ in range(PACE_STEPS):
        for contender in contenders:
            contender.step()
    for contender in contenders:
        pace = sorted(contender.step_times[1:])[len(contender.step_times[1:]) // 2]
        max_steps = max(PACE_STEPS + 1, int(budget / pace))
        contender.cfg = replace(contender.cfg, max_steps=max_steps, warmup_steps=min(base.warmup_steps, max_steps // 10))
    while any(c.seconds < budget and c.state.step < c.cfg.max_steps for c in contenders):
        for contender in contenders:
            if contender.seconds < budget and contender.state.step < contender.cfg.max_steps:
                contender.step()
    rows = []
    for contender in contenders:
        contender.state.model.eval()
        with torch.no_grad():
            result = stage.evaluate(contender.state.model, contender.state.runtime)
        step_s = sorted(contender.step_times)[len(contender.step_times) // 2]
        rows.append([contender.name, contender.state.step, contender.cfg.max_steps, f"{contender.seconds:.0f}",
                     f"{step_s:.2f}", f"{sum(contender.losses[-10:]) / 10:.3f}", f"{result['val_loss']:.4f}",
                     f"{result['val_bpb']:.4f}"])
        print(json.dumps({"contender": contender.name, **result}), flush=True)
    table = markdown_table(["contender", "steps", "schedule", "seconds", "median step s", "train loss (last 10)",
                            "val loss", "val bits/byte"], rows)
    notes = [f"Preset {args.preset}, fp32, batch {base.batch_size} x {base.seq_len}; budget {args.minutes} min each, "
             f"steps interleaved one for one; validation on {base.num_eval_batches} x {base.batch_size} held-out windows."]
    if any(not math.isfinite(c.losses[-1]) for c in contenders):
        notes.append("A contender diverged (non-finite loss).")
    print_report("AdamW vs Muon at equal wall-clock (speedrun pretraining)", args.threads, table, notes)


if __name__ == "__main__":
    main()
