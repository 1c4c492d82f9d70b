"""Tokenized corpora as memory-mapped shards, and packed training windows over them.

A shard folder holds `shard_NNNNN.bin` (the token stream: every document's tokens followed by
<|endoftext|>, as uint16 when the vocabulary fits, else uint32), `shard_NNNNN.docs.npy` (the
offset where each document starts) and `meta.json`. Documents are tokenized once; training then
reads fixed windows of seq_len + 1 tokens straight from the memory map, with no padding:
a window may span several documents, separated by <|endoftext|>.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.utils import batched

META_FILE = "meta.json"
FORMAT_VERSION = 1


def fingerprint_paths(paths: Iterable[str | Path]) -> str:
    """A cheap identity for input files (path, size, mtime), to know when shards are stale."""
    h = hashlib.sha256()
    for path in sorted(Path(p).resolve() for p in paths):
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: XiaoTokenizer) -> str:
    digest = hashlib.sha256(tokenizer.tokenizer.to_str().encode())
    if not tokenizer.is_native:  # how an imported tokenizer starts and ends documents changes the shards too
        digest.update(repr(tokenizer.document_ids([])).encode())
    return digest.hexdigest()


def write_shards(
    documents: Iterable[str],
    tokenizer: XiaoTokenizer,
    out_dir: str | Path,
    *,
    source_key: str = "",
    shard_tokens: int = 100_000_000,
    batch_documents: int = 512,
) -> dict:
    """Tokenize `documents` into shards under `out_dir`; return the meta dict.

    Reuses existing shards when `meta.json` records the same `source_key` and tokenizer.
    Written into a temporary folder and renamed, so an interrupted run leaves no half shards.
    """
    out_dir = Path(out_dir)
    key = {"source": source_key, "tokenizer": tokenizer_fingerprint(tokenizer), "format": FORMAT_VERSION}
    existing = read_meta(out_dir) if (out_dir / META_FILE).is_file() else None
    if existing is not None and existing.get("key") == key and source_key:
        return existing

    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    doc_starts: list[int] = []
    buffered = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal buffer, doc_starts, buffered
        if not buffered:
            return
        name = f"shard_{len(shards):05d}"
        np.concatenate(buffer).astype(dtype).tofile(tmp_dir / f"{name}.bin")
        np.save(tmp_dir / f"{name}.docs.npy", np.asarray(doc_starts, dtype=np.int64))
        shards.append({"name": name, "num_tokens": buffered, "num_documents": len(doc_starts)})
        buffer, doc_starts, buffered = [], [], 0

    for batch in batched(documents, batch_documents):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            total_bytes += len(text.encode("utf-8"))
            doc_starts.append(buffered)
            ids = tokenizer.document_ids(ids)  # xiaolm's: the text, then <|endoftext|>
            buffer.append(np.asarray(ids, dtype=np.int64))
            buffered += len(ids)
            if buffered >= shard_tokens:  # shards end on document boundaries
                flush()
    flush()
    if not shards:
        shutil.rmtree(tmp_dir)
        raise ValueError("no documents to tokenize: the input is empty")
    meta = {
        "key": key,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
        "num_bytes": total_bytes,
        "shards": shards,
    }
    (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if (out_dir / META_FILE).is_file() and source_key and read_meta(out_dir).get("key") == key:
        shutil.rmtree(tmp_dir)  # another process (another node's writer) finished the same shards first
        return read_meta(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return meta


def tokenize_files(
    paths: Sequence[str | Path],
    tokenizer: XiaoTokenizer,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    skip_bad: bool = False,
) -> dict:
    """Tokenize user files (data/readers.py formats) into shards at `out_dir`, reusing them while
    the inputs are unchanged."""
    from xiaolm.data.readers import ReadStats, iter_documents

    stats = ReadStats()
    key = f"{fingerprint_paths(paths)}|{text_field}|skip_bad={skip_bad}"
    meta = write_shards(
        iter_documents(paths, text_field=text_field, skip_bad=skip_bad, stats=stats), tokenizer, out_dir,
        source_key=key,
    )
    stats.report_skipped()
    return meta


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no token shards ({META_FILE} missing); tokenize the data first")
    meta = json.loads(path.read_text())
    return meta


class PackedTokens:
    """Fixed windows of `seq_len + 1` tokens over all shards, in a seeded order per epoch.

    Window w of shard s covers tokens [w * seq_len, w * seq_len + seq_len + 1): consecutive
    windows share one token so every token is a target exactly once. Sample number g (counted
    over the whole run) is window `order(g // num_windows)[g % num_windows]`: the data position
    is one integer, which makes resume exact and lets each process take its own samples.
    """

    def __init__(self, directory: str | Path, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.directory = Path(directory)
        meta = read_meta(directory)
        self.meta = meta
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.shards = [
            np.memmap(self.directory / f"{s['name']}.bin", dtype=meta["dtype"], mode="r") for s in meta["shards"]
        ]
        counts = [max(0, (len(tokens) - 1) // seq_len) for tokens in self.shards]
        self.num_windows = sum(counts)
        if self.num_windows == 0:
            raise ValueError(
                f"{directory}: {meta['num_tokens']} tokens are too few for one window of {seq_len + 1}"
            )
        self._shard_ends = np.cumsum(counts)
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._shard_ends, index, side="right"))
        local = index - (int(self._shard_ends[shard - 1]) if shard else 0)
        start = local * self.seq_len
        return self.shards[shard][start:start + self.seq_len + 1]

    def sample(self, g: int) -> np.ndarray:
        epoch, position = divmod(g, self.num_windows)
        return self.window(int(self._order_for(epoch)[position]))

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample .. first_sample + batch_size - 1 as (inputs, targets), each (B, T)."""
        rows = np.stack([self.sample(first_sample + i) for i in range(batch_size)]).astype(np.int64)
        tokens = torch.from_numpy(rows)  # (B, T + 1)
        return tokens[:, :-1], tokens[:, 1:]
