"""Small helpers shared across modules."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last may be shorter), streaming."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def spread_sample(make_texts: Callable[[], Iterable[str]], max_chars: int) -> Iterator[str]:
    """About `max_chars` characters of texts drawn evenly from the whole collection.

    Corpora are written source by source, so the first N characters would all come from the
    first sources. Two passes: one counts, the second keeps every k-th character's worth
    (deterministic, so a rerun trains the same tokenizer).
    """
    total = sum(len(text) for text in make_texts())
    if total <= max_chars:
        yield from make_texts()
        return
    step = total / max_chars  # keep one character in `step`, a whole document at a time
    seen = 0.0
    next_keep = 0.0
    for text in make_texts():
        seen += len(text)
        if seen >= next_keep:
            yield text
            next_keep += len(text) * step


def check_output_folder(path: str | Path, flag: str) -> None:
    """Refuse, before any work starts, an output folder that is a file or cannot be written (a
    read-only disk, no permission). Probes with a temporary file in the folder, or in its nearest
    existing parent when it does not exist yet; creates nothing."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"{flag} {path}: not a folder{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({error.strerror})") from None
