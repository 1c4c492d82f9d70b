"""Greedy decoding tokens/s of xiaolm's engine against transformers' `generate`.

Both models have the same shape and weights; both prefill the same prompt and then decode
with their KV cache (xiaolm: preallocated in place; transformers: its default DynamicCache).
Each run is timed end to end (prefill included) and produces exactly max_new_tokens per row.
The greedy outputs are compared token for token.

    python bench/decode.py --batch-sizes 1 8 --prompt-len 32 --new-tokens 256 --rounds 3

`--peer eager --compile` times the compiled step against xiaolm's own eager engine instead, for
models transformers' Llama cannot hold (Mixture of Experts: `--preset deepseek-moe-small`).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import build_hf_llama, interleaved_times, markdown_table, median, print_report, spread
from xiaolm.config import ModelConfig
from xiaolm.inference.engine import Engine, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.transformer import Transformer


def xiaolm_generate(engine: Engine, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Each row a request of the engine (each prefilled alone, then decoded in one batch)."""
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    requests = [Request(row, greedy) for row in prompt.tolist()]
    engine.run(requests)
    return torch.tensor([r.output_ids for r in requests], device=prompt.device)  # (B, new_tokens)


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[:, prompt.shape[1]:]  # (B, new_tokens)


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    """How far two (B, N) greedy outputs agree."""
    same_rows = int((a == b).all(dim=1).sum())
    differ = (a != b)
    if not differ.any():
        return f"identical ({a.shape[0]} x {a.shape[1]} tokens)"
    first = [int(row.nonzero()[0]) if row.any() else None for row in differ]
    firsts = [f for f in first if f is not None]
    return (f"{same_rows}/{a.shape[0]} rows identical; {int(differ.sum())} of {a.numel()} tokens differ; "
            f"first divergence at step {min(firsts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--ckpt", default=None, help="a checkpoint's weights instead (e.g. an imported SmolLM2)")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu | cuda (bench/gpu_check.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="xiaolm decodes with its compiled step (compiled in the warmup run; time printed)")
    parser.add_argument("--peer", choices=["transformers", "eager"], default="transformers",
                        help="what xiaolm is timed against: transformers' generate, or (with --compile) xiaolm's "
                             "eager engine, e.g. for MoE models")
    args = parser.parse_args()
    if args.peer == "eager" and not args.compile:
        parser.error("--peer eager compares the compiled step with eager decoding: add --compile")
    peer = "transformers" if args.peer == "transformers" else "xiaolm eager"
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    if args.ckpt:
        from xiaolm.checkpoint import load_model

        xiao = load_model(args.ckpt, "cpu").model.eval()
        config = xiao.config
    else:
        config = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size)
        xiao = Transformer(config).eval()
    if args.prompt_len + args.new_tokens > config.max_seq_len:
        raise ValueError(f"prompt + new tokens must fit max_seq_len={config.max_seq_len}")
    hf = build_hf_llama(config, source=copy.deepcopy(xiao)).eval().to(args.device) if peer == "transformers" else None
    xiao = xiao.to(args.device)
    generator = torch.Generator().manual_seed(args.seed)

    rows, notes = [], []
    for batch_size in args.batch_sizes:
        prompt = torch.randint(3, config.vocab_size, (batch_size, args.prompt_len), generator=generator)
        prompt = prompt.to(args.device)
        outputs = {}
        # one engine for every run, as a server or a chat session keeps one (its cache allocated once)
        engine = Engine(xiao, None, num_slots=batch_size, max_len=args.prompt_len + args.new_tokens,
                        compile=args.compile)
        if hf is not None:
            run_peer = lambda: hf_generate(hf, prompt, args.new_tokens)  # noqa: E731
        else:
            eager = Engine(xiao, None, num_slots=batch_size, max_len=args.prompt_len + args.new_tokens)
            run_peer = lambda: xiaolm_generate(eager, prompt, args.new_tokens)  # noqa: E731
        runs = {
            "xiaolm": lambda: outputs.update(xiaolm=xiaolm_generate(engine, prompt, args.new_tokens)),
            peer: lambda: outputs.update({peer: run_peer()}),
        }
        warmup = {}
        for name, run in runs.items():  # warmup (and compile), and the outputs to compare
            started = time.perf_counter()
            run()
            warmup[name] = time.perf_counter() - started
        if args.compile:
            if engine.compiled is None or engine.compiled.failed:
                raise RuntimeError("the compiled decode step failed (see above)")
            notes.append(f"batch {batch_size}: xiaolm's warmup run, compiling included, took {warmup['xiaolm']:.1f} s "
                         f"({peer}'s {warmup[peer]:.1f} s).")
        for name, out in outputs.items():
            if out.shape != (batch_size, args.new_tokens):
                raise RuntimeError(f"{name} produced {tuple(out.shape)} tokens")
        agreement = compare(outputs["xiaolm"], outputs[peer])
        times = interleaved_times(runs, args.rounds)
        tokens = batch_size * args.new_tokens
        tok_s = {name: tokens / median(t) for name, t in times.items()}
        rows.append([
            batch_size, f"{tok_s['xiaolm']:,.1f}", f"{tok_s[peer]:,.1f}", f"{tok_s['xiaolm'] / tok_s[peer]:.3f}",
            spread(times["xiaolm"]), spread(times[peer]), agreement,
        ])
        print(f"[batch {batch_size}] seconds xiaolm {[round(t, 2) for t in times['xiaolm']]} "
              f"{peer} {[round(t, 2) for t in times[peer]]}", flush=True)

    weights = f"checkpoint {args.ckpt}" if args.ckpt else f"preset {args.preset}, random weights (same in both)"
    notes.append(f"Model: {weights}, fp32, "
                 f"xiaolm {'compiled (--compile)' if args.compile else 'eager'}, "
                 f"vocab {config.vocab_size}; "
                 f"{args.prompt_len}-token random prompt, {args.new_tokens} new tokens per row, greedy; "
                 f"tok/s = batch x new tokens / wall time of the whole call (prefill included); "
                 f"1 warmup + {args.rounds} timed runs each, interleaved.")
    table = markdown_table(
        ["batch", "xiaolm tok/s", f"{peer} tok/s", f"ratio xiaolm/{peer}",
         "xiaolm spread", f"{peer} spread", "greedy outputs"],
        rows,
    )
    print_report("Greedy decoding throughput (KV cache)", args.threads, table, notes)


if __name__ == "__main__":
    main()
