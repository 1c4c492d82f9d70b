"""Training tokens/s of xiaolm's Transformer against transformers' LlamaForCausalLM.

One step = forward + cross-entropy + backward + gradient clipping + AdamW step: xiaolm's own
`train_step` (xiaolm.train.loop) for both. Both models have the same shape and the same weights,
train on the same random token batches, and use the same loss and optimizer code; only the model
differs.
Steps of the two are interleaved in one process and the medians compared.

    python bench/train_speed.py --shapes 512x4 256x8 --precisions fp32 bf16 --steps 6
"""

from __future__ import annotations

import argparse
import copy

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
from xiaolm.train.stages import next_token_loss


def parse_shape(text: str) -> tuple[int, int]:
    try:
        seq_len, batch_size = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not SEQxBATCH, e.g. 512x4") from error
    return seq_len, batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(512, 4)],
                        help="SEQxBATCH, e.g. 512x4 256x8")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each model, interleaved")
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
            peers = [("xiaolm", next_token_loss, xiao), ("transformers", hf_next_token_loss, hf)]
            steps = {name: make_train_step(model, batches, precision, lr=1e-4, compute_loss=loss)
                     for name, loss, model in peers}
            # same weights, same batch: the first losses must agree, or the comparison is void
            first = {name: step() for name, step in steps.items()}
            if abs(first["xiaolm"] - first["transformers"]) > 1e-2 * abs(first["xiaolm"]):
                raise RuntimeError(f"models disagree on the first loss: {first}")
            for _ in range(args.warmup - 1):
                for step in steps.values():
                    step()
            times = interleaved_times(steps, args.steps)
            tokens = seq_len * batch_size
            tok_s = {name: tokens / median(t) for name, t in times.items()}
            rows.append([
                f"{seq_len} x {batch_size}", precision,
                f"{tok_s['xiaolm']:,.0f}", f"{tok_s['transformers']:,.0f}",
                f"{tok_s['xiaolm'] / tok_s['transformers']:.3f}",
                f"{spread(times['xiaolm'])}", f"{spread(times['transformers'])}",
            ])
            print(f"[{seq_len}x{batch_size} {precision}] first loss {first}; step s xiaolm "
                  f"{[round(t, 2) for t in times['xiaolm']]} transformers "
                  f"{[round(t, 2) for t in times['transformers']]}", flush=True)
            del xiao, hf, steps

    flags = cpu_flags()
    if "bf16" in args.precisions and "avx512_bf16" not in flags and "amx_bf16" not in flags:
        notes.append("This CPU has no avx512_bf16 / amx_bf16: bf16 matmuls run without native "
                     "bf16 instructions, so bf16 autocast may be slower than fp32 here.")
    n_params = sum(p.numel() for p in Transformer(config).parameters())
    notes.append(f"Model: preset {args.preset}, {n_params / 1e6:.1f}M parameters (tied), "
                 f"vocab {args.vocab_size}; "
                 f"{args.warmup} warmup + {args.steps} timed steps per model, interleaved; "
                 "spread = fastest / slowest step time relative to the median.")
    table = markdown_table(
        ["seq x batch", "precision", "xiaolm tok/s", "transformers tok/s", "ratio xiaolm/transformers",
         "xiaolm spread", "transformers spread"],
        rows,
    )
    print_report("Training throughput (forward + backward + clip + AdamW)", args.threads, table, notes)


if __name__ == "__main__":
    main()
