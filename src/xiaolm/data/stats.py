"""Token lengths of a data set, to choose a sequence length (`xiaolm data stats`).

Pretraining text: tokens per document, and how many documents fit whole in one window of
`seq_len` tokens with the document-end token that ends each (and the BOS that starts each, for a
model that uses one; longer documents are split across windows).

Chat data: per conversation, as SFT renders it with the chat template (data/chat_tokens.py):
- prompt: the tokens without loss (system and user turns, role headers);
- reply: the tokens with loss (each assistant reply and its end-of-turn token, <|im_end|>);
- conversation: all of them.
and, for each `seq_len`, how many conversations SFT keeps whole, how many it cuts to their leading
turns (the default `--truncate turns`), and how many it drops for want of one whole reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xiaolm.data.readers import BadRecordError, ReadStats, iter_json_records, list_data_files
from xiaolm.tokenizer.bpe import XiaoTokenizer
from xiaolm.utils import batched

KINDS = ("auto", "text", "chat")
PERCENTILES = (50, 90, 95, 99)
DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048)
CHAT_KEYS = ("conversations", "messages", "instruction")
"""A JSON record holding one of these is a chat record (data/chat_formats.py's formats)."""


def detect_kind(paths: Sequence[str | Path]) -> str:
    """"chat" when the first record of the first file is a chat record, else "text"."""
    first = list_data_files(paths)[0]
    if first.suffix not in (".json", ".jsonl"):
        return "text"
    for _, record in iter_json_records(first):
        if isinstance(record, BadRecordError):
            raise record
        return "chat" if isinstance(record, dict) and any(k in record for k in CHAT_KEYS) else "text"
    raise ValueError(f"{first}: no records")


def summarize(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """count, min, mean, the percentiles and max of `lengths`."""
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        raise ValueError("no records to measure")
    summary = {"count": int(values.size), "min": int(values.min()), "mean": float(values.mean())}
    for p in PERCENTILES:
        summary[f"p{p}"] = float(np.percentile(values, p))
    summary["max"] = int(values.max())
    return summary


def text_lengths(paths: Sequence[str | Path], tokenizer: XiaoTokenizer, *, text_field: str = "text",
                 skip_bad: bool = False, stats: ReadStats | None = None) -> dict[str, np.ndarray]:
    from xiaolm.data.readers import iter_documents

    documents = iter_documents(paths, text_field=text_field, skip_bad=skip_bad, stats=stats)
    lengths = [len(ids) for batch in batched(documents, 256) for ids in tokenizer.encode_batch(batch)]
    return {"document": np.asarray(lengths, dtype=np.int64)}


def chat_lengths(paths: Sequence[str | Path], tokenizer: XiaoTokenizer, seq_lens: Sequence[int], *,
                 fmt: str = "auto", skip_bad: bool = False, stats: ReadStats | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, int]]]:
    """Per-conversation prompt / reply / conversation lengths, and per seq_len how many
    conversations SFT keeps whole, cuts to their leading turns, or drops."""
    from xiaolm.data.chat_formats import read_conversations
    from xiaolm.data.chat_tokens import tokenize_conversation, truncate_conversation

    lengths: dict[str, list[int]] = {"prompt": [], "reply": [], "conversation": []}
    fits = {n: {"whole": 0, "cut to whole turns": 0, "dropped": 0} for n in seq_lens}
    for messages in read_conversations(paths, fmt, skip_bad=skip_bad, stats=stats):
        ids, supervised = tokenize_conversation(tokenizer, messages)
        num_reply = sum(supervised)
        lengths["prompt"].append(len(ids) - num_reply)
        lengths["reply"].append(num_reply)
        lengths["conversation"].append(len(ids))
        for n in seq_lens:
            # SFT trains on ids[:-1] -> ids[1:]: a row of n positions holds n + 1 tokens
            if len(ids) <= n + 1:
                fits[n]["whole"] += 1
            elif truncate_conversation(ids, supervised, n + 1, tokenizer.end_of_turn_id, "turns")[0]:
                fits[n]["cut to whole turns"] += 1
            else:
                fits[n]["dropped"] += 1
    return {k: np.asarray(v, dtype=np.int64) for k, v in lengths.items()}, fits


def data_stats(paths: Sequence[str | Path], tokenizer: XiaoTokenizer, *, kind: str = "auto",
               seq_lens: Sequence[int] = DEFAULT_SEQ_LENS, text_field: str = "text", fmt: str = "auto",
               skip_bad: bool = False) -> dict[str, Any]:
    """{"kind", "summaries": {name: summary}, "fits": {seq_len: counts}, "lengths": {name: array},
    "skipped"}: the token-length distribution of a pretraining (text) or chat set."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if any(n <= 0 for n in seq_lens):
        raise ValueError(f"--seq-len must be positive, got {list(seq_lens)}")
    kind = detect_kind(paths) if kind == "auto" else kind
    stats = ReadStats()
    if kind == "chat":
        lengths, fits = chat_lengths(paths, tokenizer, seq_lens, fmt=fmt, skip_bad=skip_bad, stats=stats)
    else:
        lengths = text_lengths(paths, tokenizer, text_field=text_field, skip_bad=skip_bad, stats=stats)
        # a pretraining window of n positions holds n + 1 tokens; a document takes its own plus the
        # document end (and a BOS)
        document = lengths["document"] + len(tokenizer.document_ids([]))
        fits = {n: {"whole": int((document <= n + 1).sum()), "split": int((document > n + 1).sum())}
                for n in seq_lens}
    return {"kind": kind, "summaries": {name: summarize(values) for name, values in lengths.items()},
            "fits": fits, "lengths": lengths, "skipped": stats.num_bad}


def format_stats(result: dict[str, Any]) -> str:
    """The summaries and the per-seq_len counts as two plain-text tables."""
    summaries = result["summaries"]
    columns = list(next(iter(summaries.values())))
    lines = [f"{'tokens':<14}" + "".join(f"{c:>10}" for c in columns)]
    for name, summary in summaries.items():
        lines.append(f"{name:<14}" + "".join(f"{_number(summary[c]):>10}" for c in columns))
    count = next(iter(summaries.values()))["count"]
    outcomes = list(next(iter(result["fits"].values())))
    lines += ["", f"{'seq_len':<10}" + "".join(f"{o:>22}" for o in outcomes)]
    for seq_len, counts in result["fits"].items():
        lines.append(f"{seq_len:<10}" + "".join(f"{f'{counts[o]} ({100 * counts[o] / count:.1f}%)':>22}"
                                                for o in outcomes))
    if result["skipped"]:
        lines.append(f"skipped {result['skipped']} bad record(s)")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def require_pyplot():
    """matplotlib's pyplot on the Agg backend, or one error saying what to install (checked before
    the lengths are counted, so a missing extra costs no work)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("--plot needs matplotlib: pip install 'xiaolm[report]'") from error
    return plt


def plot_lengths(result: dict[str, Any], path: str | Path) -> Path:
    """A histogram PNG of every length distribution, one panel each, with the p50/p95/p99 marks."""
    plt = require_pyplot()
    lengths = result["lengths"]
    figure, axes = plt.subplots(len(lengths), 1, figsize=(8, 2.6 * len(lengths)), squeeze=False)
    for axis, (name, values) in zip(axes[:, 0], lengths.items()):
        axis.hist(values, bins=min(60, max(10, len(np.unique(values)))), color="#1f77b4")
        summary = result["summaries"][name]
        for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            axis.axvline(summary[p], color="#d62728", linestyle=style, label=f"{p} {summary[p]:.0f}")
        axis.set_title(f"{name}: {summary['count']} records, mean {summary['mean']:.0f} tokens")
        axis.set_xlabel("tokens")
        axis.set_ylabel("records")
        axis.legend(loc="upper right")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
