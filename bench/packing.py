"""Useful (non-padding) training tokens/s: packed windows against one document per padded row.

xiaolm packs the token stream into windows of seq_len (`PackedTokens`), so every position is a
real target. minimind puts one document per row, truncated or padded to max_seq_len; the pad
targets carry no loss (ignore_index) but still cost the full forward and backward. The script
trains a tokenizer on the corpus (cached under --work), tokenizes it into shards, measures the
non-padding fraction of the padded scheme over the whole corpus, then times training steps of
both schemes on identical copies of one model, interleaved.

    python bench/packing.py --data data/sample/train.jsonl --preset tiny --seq-len 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from common import interleaved_times, make_train_step, markdown_table, median, print_report, spread
from xiaolm.config import ModelConfig
from xiaolm.data.readers import iter_documents
from xiaolm.data.shards import PackedTokens, fingerprint_paths, read_meta, write_shards
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import load_tokenizer, train_tokenizer
from xiaolm.utils import spread_sample


def prepare_corpus(data: Path, work: Path, vocab_size: int, tokenizer_chars: int):
    """Tokenizer and shards for `data`, reused from `work` when the data has not changed."""
    key = fingerprint_paths([data])[:16]
    tokenizer_dir = work / f"tokenizer-{vocab_size}-{key}"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        texts = spread_sample(lambda: iter_documents([data]), tokenizer_chars)
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
        tokenizer.save(tokenizer_dir)
    shard_dir = work / f"shards-{vocab_size}-{key}"
    write_shards(iter_documents([data]), tokenizer, shard_dir, source_key=key)
    return tokenizer, shard_dir


def document_tokens(shard_dir: Path) -> list[np.ndarray]:
    """Each document's tokens, its closing <|endoftext|> included, read back from the shards."""
    meta = read_meta(shard_dir)
    documents = []
    for shard in meta["shards"]:
        tokens = np.fromfile(shard_dir / f"{shard['name']}.bin", dtype=meta["dtype"]).astype(np.int64)
        starts = np.load(shard_dir / f"{shard['name']}.docs.npy")
        ends = np.append(starts[1:], len(tokens))
        documents += [tokens[s:e] for s, e in zip(starts, ends)]
    return documents


def padded_row(tokens: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """minimind's pretraining sample: one document truncated / padded to seq_len + 1 tokens,
    shifted into (inputs, targets); pad targets are -100 so they carry no loss."""
    row = np.full(seq_len + 1, pad_id, dtype=np.int64)
    kept = tokens[:seq_len + 1]
    row[:len(kept)] = kept
    targets = row[1:].copy()
    targets[max(len(kept) - 1, 0):] = -100  # positions past the document's last token
    return row[:-1], targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/sample/train.jsonl"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/xiaolm-bench-packing"),
                        help="cache for the tokenizer and shards")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--tokenizer-chars", type=int, default=5_000_000,
                        help="characters drawn evenly from the corpus to train the tokenizer on")
    parser.add_argument("--preset", default="tiny",
                        help="model shape (its max_seq_len is set to --seq-len)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each scheme, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seq_len, batch_size = args.seq_len, args.batch_size

    tokenizer, shard_dir = prepare_corpus(args.data, args.work, args.vocab_size, args.tokenizer_chars)
    documents = document_tokens(shard_dir)
    lengths = np.array([len(d) for d in documents])
    # over the whole corpus: real targets per padded row, and tokens truncation throws away
    useful_per_row = np.minimum(lengths, seq_len + 1) - 1
    useful_fraction = useful_per_row.sum() / (len(documents) * seq_len)
    truncated_fraction = np.maximum(lengths - (seq_len + 1), 0).sum() / lengths.sum()

    order = np.random.default_rng(args.seed).permutation(len(documents))
    needed = args.warmup + args.steps  # only the batches the timed run consumes
    padded_batches = []
    for first in range(0, min(len(order) - batch_size + 1, needed * batch_size), batch_size):
        rows = [padded_row(documents[i], seq_len, tokenizer.eos_id) for i in order[first:first + batch_size]]
        padded_batches.append((torch.from_numpy(np.stack([r[0] for r in rows])),
                               torch.from_numpy(np.stack([r[1] for r in rows]))))
    packed = PackedTokens(shard_dir, seq_len, seed=args.seed)
    num_packed = min(packed.num_windows // batch_size, needed)
    packed_batches = [packed.batch(i * batch_size, batch_size) for i in range(num_packed)]

    config = ModelConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=seq_len)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    models = {"packed": model, "padded": copy.deepcopy(model)}
    batches = {"packed": packed_batches, "padded": padded_batches}
    steps = {name: make_train_step(m, batches[name], lr=1e-3) for name, m in models.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = interleaved_times(steps, args.steps)

    def useful_tokens(name: str) -> list[int]:
        # the batches each timed step consumed (the warmup steps came first)
        chosen = [batches[name][(args.warmup + i) % len(batches[name])] for i in range(args.steps)]
        return [int((targets != -100).sum()) for _, targets in chosen]

    rows, rates = [], {}
    for name in ["packed", "padded"]:
        useful = useful_tokens(name)
        rates[name] = sum(useful) / sum(times[name])
        rows.append([name, f"{median(times[name]):.3f}", spread(times[name]),
                     f"{np.mean(useful) / (batch_size * seq_len):.1%}", f"{rates[name]:,.0f}"])
    table = markdown_table(
        ["scheme", "median s / step", "spread", "non-padding targets (timed steps)", "useful tok/s"], rows)
    table += (f"\n\nRatio packed / padded, useful tok/s: **{rates['packed'] / rates['padded']:.2f}x** "
              f"(step-time ratio padded / packed {median(times['padded']) / median(times['packed']):.3f}).")
    n_params = sum(p.numel() for p in model.parameters())
    notes = [
        f"Corpus: {args.data} ({lengths.size:,} documents, {int(lengths.sum()):,} tokens with one "
        f"<|endoftext|> each, vocab {tokenizer.vocab_size}); document length in tokens: median "
        f"{int(np.median(lengths))}, mean {lengths.mean():.0f}, p90 {int(np.percentile(lengths, 90))}, "
        f"max {int(lengths.max())}; {np.mean(lengths > seq_len + 1):.1%} of documents exceed a row.",
        f"Padded scheme over the whole corpus: {useful_fraction:.1%} of target positions are real tokens, "
        f"so its useful tok/s is at best {useful_fraction:.3f} x the packed one (packed/padded <= "
        f"{1 / useful_fraction:.2f}x); truncation also drops {truncated_fraction:.1%} "
        "of the corpus's tokens.",
        f"Model: preset {args.preset} shape at seq {seq_len}, {n_params / 1e6:.1f}M parameters, fp32, "
        f"batch {batch_size}; {args.warmup} warmup + {args.steps} timed steps per scheme, interleaved. "
        "Packed windows attend across document boundaries (no document mask), as xiaolm's pretraining does.",
    ]
    print_report("Packing vs one document per padded row: useful tokens/s", args.threads, table, notes)


if __name__ == "__main__":
    main()
