"""Training tokens/s of MoE dispatch: xiaolm's sort-and-group against minimind's loop over experts.

One step = xiaolm's training step (`train_step`): forward + cross-entropy + load-balancing loss
+ backward + gradient clipping + AdamW step. The two MoE models are copies of one
model (same weights, same routing), differing only in the dispatch function of their MoE layers:
- grouped: `xiaolm.model.moe.grouped_dispatch` (sort the assignments by expert once, one
  contiguous slice per expert, one index_add_ back);
- loop: `xiaolm.model.moe.loop_dispatch`, minimind's training path (repeat every token k times,
  a boolean mask over all assignments per expert, masked gather and write).
A dense model with the same active parameters per token (a SwiGLU as wide as the k routed plus the
shared experts together) is timed alongside, for scale. Steps are interleaved and medians compared.
Before timing, the forward outputs of grouped and loop are checked to agree. A second table
times one MoE layer alone (forward + backward on seq * batch tokens), where dispatch is a larger
share of the work than in the whole model (embedding, attention and output projection included).

    python bench/moe_dispatch.py --configs 4x1 16x4 --seq-len 256 --batch-size 8 --steps 8
"""

from __future__ import annotations

import argparse
import copy

import torch

from common import interleaved_times, make_train_step, markdown_table, median, print_report, spread
from xiaolm.config import ModelConfig
from xiaolm.model.moe import loop_dispatch, moe_layers, num_active_parameters
from xiaolm.model.transformer import Transformer


def parse_experts(text: str) -> tuple[int, int]:
    try:
        num_experts, top_k = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not EXPERTSxTOPK, e.g. 16x4") from error
    return num_experts, top_k


def make_layer_step(layer, x):
    def step() -> None:
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-moe", help="model shape; experts set by --configs")
    parser.add_argument("--configs", nargs="+", type=parse_experts, default=[(4, 1), (16, 4)],
                        help="EXPERTSxTOPK; each expert is 1/TOPK of the dense width, so every config "
                             "has the dense preset's active parameters")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, layer_rows = [], []
    for num_experts, top_k in args.configs:
        base = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size, num_experts=0,
                                       num_shared_experts=0, first_k_dense=0)
        config = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size, num_experts=num_experts,
                                         num_experts_per_token=top_k,
                                         moe_intermediate_size=base.intermediate_size // top_k)
        torch.manual_seed(args.seed)
        grouped = Transformer(config).train()
        looped = copy.deepcopy(grouped)
        for layer in moe_layers(looped):
            layer.dispatch = loop_dispatch
        dense = Transformer(ModelConfig.from_preset(
            args.preset, vocab_size=args.vocab_size, num_experts=0, num_shared_experts=0, first_k_dense=0,
            intermediate_size=config.moe_intermediate_size * (top_k + config.num_shared_experts))).train()
        generator = torch.Generator().manual_seed(args.seed)
        batches = []
        for _ in range(4):
            tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        with torch.no_grad():  # same weights, same routing: the same function
            torch.testing.assert_close(grouped(batches[0][0]), looped(batches[0][0]), rtol=1e-4, atol=1e-5)
        steps = {"grouped": make_train_step(grouped, batches), "loop": make_train_step(looped, batches),
                 "dense": make_train_step(dense, batches)}
        first = {name: steps[name]() for name in ("grouped", "loop")}
        if abs(first["grouped"] - first["loop"]) > 1e-4 * abs(first["grouped"]):
            raise RuntimeError(f"grouped and loop dispatch disagree on the first loss: {first}")
        steps["dense"]()
        for _ in range(args.warmup - 1):
            for step in steps.values():
                step()
        times = interleaved_times(steps, args.steps)
        tokens = args.seq_len * args.batch_size
        tok_s = {name: tokens / median(t) for name, t in times.items()}
        rows.append([
            f"{num_experts} x top-{top_k}", f"{grouped.num_parameters() / 1e6:.1f}M / "
            f"{num_active_parameters(grouped) / 1e6:.2f}M", f"{dense.num_parameters() / 1e6:.2f}M",
            f"{tok_s['grouped']:,.0f}", f"{tok_s['loop']:,.0f}", f"{tok_s['dense']:,.0f}",
            f"{tok_s['grouped'] / tok_s['loop']:.2f}", f"{tok_s['grouped'] / tok_s['dense']:.2f}",
            f"{spread(times['grouped'])}", f"{spread(times['loop'])}",
        ])
        print(f"[{num_experts}x{top_k}] first loss {first}; step s "
              + "; ".join(f"{name} {[round(t, 3) for t in ts]}" for name, ts in times.items()), flush=True)

        layer = moe_layers(grouped)[0]
        x = torch.randn(args.batch_size, args.seq_len, config.hidden_size, generator=generator)
        layer_steps = {"grouped": make_layer_step(layer, x), "loop": make_layer_step(moe_layers(looped)[0], x)}
        for step in layer_steps.values():
            step()
        layer_times = interleaved_times(layer_steps, 4 * args.steps)
        layer_rows.append([
            f"{num_experts} x top-{top_k}", f"{median(layer_times['grouped']) * 1e3:.1f}",
            f"{median(layer_times['loop']) * 1e3:.1f}",
            f"{median(layer_times['loop']) / median(layer_times['grouped']):.2f}",
            f"{spread(layer_times['grouped'])}", f"{spread(layer_times['loop'])}",
        ])

    table = markdown_table(
        ["experts x top-k", "MoE total / active params", "dense params", "grouped tok/s", "loop tok/s",
         "dense tok/s", "grouped / loop", "grouped / dense", "grouped spread", "loop spread"],
        rows,
    )
    layer_table = markdown_table(
        ["experts x top-k", "grouped ms", "loop ms", "speed-up grouped / loop", "grouped spread", "loop spread"],
        layer_rows,
    )
    table += "\n\nOne MoE layer alone, forward + backward:\n\n" + layer_table
    notes = [f"Shape: preset {args.preset} (vocab {args.vocab_size}), seq {args.seq_len} x batch "
             f"{args.batch_size}, fp32; {args.warmup} warmup + {args.steps} timed steps per model, "
             "interleaved; spread = fastest / slowest step relative to the median."]
    print_report("MoE dispatch: grouped vs loop over experts (training)", args.threads, table, notes)


if __name__ == "__main__":
    main()
