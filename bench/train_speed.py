"""Training tokens/s of xiaolm's Transformer against transformers' LlamaForCausalLM.

One step = forward + cross-entropy + backward + gradient clipping + AdamW step: xiaolm's own
`train_step` (xiaolm.train.loop) for every model. xiaolm's forward takes the targets and fuses
its output head with the cross-entropy (model/loss.py); transformers' returns logits and the
cross-entropy follows (common.hf_next_token_loss). Both models have the same shape and the same
weights, train on the same random token batches, and use the same clipping and optimizer code.
`--compile block` adds xiaolm with each block compiled (`block.compile()`, what `--compile` does
in training), `--compile model` the whole model under torch.compile; their first steps
(compilation) are timed apart. Steps of all are interleaved in one process and the medians
compared. MFU: model FLOPs per token (Transformer.flops_per_token) x tok/s over the matmul peak
of the precision, measured in the same run.

    python bench/train_speed.py --shapes 512x4 256x8 --precisions fp32 bf16 --steps 6 --compile block
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import (
    build_hf_llama,
    cpu_flags,
    hf_next_token_loss,
    interleaved_times,
    make_train_step,
    markdown_table,
    median,
    print_report,
    spread,
)
from xiaolm.config import ModelConfig
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import measure_matmul_peak
from xiaolm.train.stages import next_token_loss


def parse_shape(text: str) -> tuple[int, int]:
    try:
        seq_len, batch_size = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not SEQxBATCH, e.g. 512x4") from error
    return seq_len, batch_size


def unfused(step):
    """`step` with xiaolm's stacked q/k/v and gate/up matmuls split back into one matmul per
    projection (what the model did before `fused_projections`): the fusion's own gain."""
    import xiaolm.model.transformer as transformer

    def run() -> float:
        fused = transformer.fused_projections
        transformer.fused_projections = lambda owner, x, linears: tuple(linear(x) for linear in linears)
        try:
            return step()
        finally:
            transformer.fused_projections = fused

    return run


def compiled(model: Transformer, how: str) -> Transformer:
    """A copy of `model` with each block compiled (one graph serves every block: they share code
    and shapes) or the whole model."""
    model = copy.deepcopy(model)
    if how == "block":
        for block in model.layers:
            block.compile()
        return model
    return torch.compile(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(512, 4)],
                        help="SEQxBATCH, e.g. 512x4 256x8")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each model, interleaved")
    parser.add_argument("--compile", nargs="*", choices=["block", "model"], default=[],
                        help="also time xiaolm compiled per block and/or as a whole")
    parser.add_argument("--unfused", action="store_true", help="also time xiaolm with one matmul per projection")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, notes = [], []
    for seq_len, batch_size in args.shapes:
        preset_len = ModelConfig.from_preset(args.preset).max_seq_len
        config = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size,
                                         max_seq_len=max(seq_len, preset_len))
        for precision in args.precisions:
            torch.manual_seed(args.seed)
            xiao = Transformer(config)
            hf = build_hf_llama(config, source=copy.deepcopy(xiao))
            xiao.train()
            hf.train()
            generator = torch.Generator().manual_seed(args.seed)
            batches = []
            for _ in range(4):
                tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
                batches.append((tokens[:, :-1], tokens[:, 1:]))
            peers = [("transformers", hf_next_token_loss, hf), ("xiaolm", next_token_loss, xiao)]
            peers += [(f"xiaolm compiled ({how})", next_token_loss, compiled(xiao, how)) for how in args.compile]
            steps = {name: make_train_step(model, batches, precision, lr=1e-4, compute_loss=loss)
                     for name, loss, model in peers}
            if args.unfused:
                steps["xiaolm unfused"] = unfused(make_train_step(copy.deepcopy(xiao), batches, precision, lr=1e-4))
            # same weights, same batch: the first losses must agree, or the comparison is void
            first, first_s = {}, {}
            for name, step in steps.items():
                start = time.perf_counter()
                first[name] = step()
                first_s[name] = time.perf_counter() - start
            if any(abs(loss - first["transformers"]) > 1e-2 * abs(loss) for loss in first.values()):
                raise RuntimeError(f"models disagree on the first loss: {first}")
            for _ in range(args.warmup - 1):
                for step in steps.values():
                    step()
            times = interleaved_times(steps, args.steps)
            peak = measure_matmul_peak(torch.device("cpu"), precision)
            tokens = seq_len * batch_size
            flops_per_token = xiao.flops_per_token(seq_len)
            for name, step_times in times.items():
                tok_s = tokens / median(step_times)
                rows.append([
                    f"{seq_len} x {batch_size}", precision, name, f"{tok_s:,.0f}",
                    f"{tok_s / (tokens / median(times['transformers'])):.3f}",
                    f"{100 * flops_per_token * tok_s / peak:.1f}%", spread(step_times),
                    f"{first_s[name] - median(step_times):.0f} s" if "compiled" in name else "",
                ])
            print(f"[{seq_len}x{batch_size} {precision}] first loss {first}; matmul peak {peak / 1e9:.0f} GFLOP/s; "
                  + "; ".join(f"{name} {[round(t, 2) for t in step_times]}" for name, step_times in times.items()),
                  flush=True)
            del xiao, hf, steps, peers

    flags = cpu_flags()
    if "bf16" in args.precisions and "avx512_bf16" not in flags and "amx_bf16" not in flags:
        notes.append("This CPU has no avx512_bf16 / amx_bf16: bf16 matmuls run without native "
                     "bf16 instructions, so bf16 autocast may be slower than fp32 here.")
    n_params = sum(p.numel() for p in Transformer(config).parameters())
    notes.append(f"Model: preset {args.preset}, {n_params / 1e6:.1f}M parameters (tied), "
                 f"vocab {args.vocab_size}; "
                 f"{args.warmup} warmup + {args.steps} timed steps per model, interleaved; "
                 "spread = fastest / slowest step time relative to the median.")
    notes.append("MFU: model FLOPs per token (6 x matmul weights + attention, PaLM's count) x tok/s over the "
                 "best square-matmul FLOP/s of that precision measured in the same run; compile: first step "
                 "minus a median step.")
    table = markdown_table(
        ["seq x batch", "precision", "model", "tok/s", "ratio to transformers", "MFU", "spread", "compile"],
        rows,
    )
    print_report("Training throughput (forward + backward + clip + AdamW)", args.threads, table, notes)


if __name__ == "__main__":
    main()
