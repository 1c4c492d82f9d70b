"""Readers: every format, folder recursion, and exact file:line for malformed records."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from xiaolm.data.readers import BadRecordError, ReadStats, iter_documents, iter_json_records, list_data_files


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_reads_text_and_ignores_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "你好，世界"}\n\n   \n{"text": "second", "id": 2}\n', encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents([path], stats=stats)) == ["你好，世界", "second"]
    assert stats.num_documents == 2 and stats.num_bad == 0


def test_bad_json_reports_exact_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(BadRecordError, match=rf"^{path}:3: bad JSON") as info:
        list(iter_documents([path]))
    assert info.value.line == 3 and info.value.path == str(path)


def test_missing_field_names_the_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}] * 16 + [{"content": "b"}])
    with pytest.raises(BadRecordError) as info:
        list(iter_documents([path]))
    assert str(info.value).startswith(f"{path}:17: field 'text' is missing (keys: ['content'])")


@pytest.mark.parametrize(
    ("record", "reason"),
    [([1, 2], "got list"), ({"text": 5}, "is int, expected a string"), ({"text": "  "}, "is empty")],
)
def test_malformed_records(tmp_path: Path, record: object, reason: str) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(BadRecordError, match=reason):
        list(iter_documents([path]))


def test_skip_bad_counts_and_keeps_locations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\nnot json\n{"body": "b"}\n{"text": "c"}\n', encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents([path], skip_bad=True, stats=stats)) == ["a", "c"]
    assert (stats.num_documents, stats.num_bad) == (2, 2)
    assert stats.bad_examples[0].startswith(f"{path}:2: bad JSON")
    assert stats.bad_examples[1].startswith(f"{path}:3: field 'text' is missing")
    ReadStats().report_skipped()
    assert capsys.readouterr().out == ""
    stats.report_skipped()
    assert capsys.readouterr().out.startswith(f"skipped 2 bad record(s); first: ['{path}:2: bad JSON")


def test_invalid_utf8_is_a_bad_record_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(BadRecordError, match=r":2: not valid UTF-8"):
        list(iter_documents([path]))
    array = tmp_path / "x.json"
    array.write_bytes(b'[{"text": "a"},\n{"text": "\xff"}]\n')
    with pytest.raises(BadRecordError, match=r"x.json:2: not valid UTF-8"):
        list(iter_documents([array]))


def test_custom_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"content": "正文"}])
    assert list(iter_documents([path], text_field="content")) == ["正文"]


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2), encoding="utf-8")
    assert list(iter_documents([path])) == ["one", "two"]
    with gzip.open(tmp_path / "y.json.gz", "wt", encoding="utf-8") as file:
        file.write('\ufeff  [{"text": "zipped"}]\n')
    assert list(iter_documents([tmp_path / "y.json.gz"])) == ["zipped"]


def test_json_array_records_carry_the_line_they_start_on(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n "b"}, {"body": "c"}\n]\n', encoding="utf-8")
    assert [line for line, _ in iter_json_records(path)] == [2, 4, 5]
    with pytest.raises(BadRecordError, match=rf"^{path}:5: field 'text' is missing"):
        list(iter_documents([path]))


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[{"text": "a"},\n {"text": "b"}', 2, "Expecting ',' delimiter"),  # cut off: no "]"
        ('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]', 3, "Expecting ',' delimiter"),
        ('[{"text": "a"},\n {"text": "b"},\n]', 3, "Expecting value"),
        ('[{"text": "a"},\n {"text": "b"}]\n[{"text": "c"}]', 3, "Extra data"),
    ],
)
def test_malformed_json_array_keeps_the_records_before_the_error(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = tmp_path / "x.json"
    path.write_text(text, encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents([path], skip_bad=True, stats=stats)) == ["a", "b"]
    assert stats.num_bad == 1 and stats.bad_examples[0].startswith(f"{path}:{line}: bad JSON ({reason}")


def test_txt_documents_split_at_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("第一段\n第二行\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    assert list(iter_documents([path])) == ["第一段\n第二行", "second doc", "third"]


def test_gzip_variants(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write('{"text": "zipped json"}\n')
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as file:
        file.write("zipped\ntext\n\nmore\n")
    assert list(iter_documents([tmp_path])) == ["zipped json", "zipped\ntext", "more"]


def test_csv_column_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('id,text\n1,"多行\n文本"\n2,plain\n3,\n', encoding="utf-8")
    stats = ReadStats()
    assert list(iter_documents([path], skip_bad=True, stats=stats)) == ["多行\n文本", "plain"]
    assert stats.bad_examples == [f"{path}:5: field 'text' is empty"]
    with pytest.raises(BadRecordError, match=r":1: column 'body' is missing"):
        list(iter_documents([path], text_field="body", skip_bad=True))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["一", "two", None], "n": [1, 2, 3]}), path, row_group_size=2)
    with pytest.raises(BadRecordError, match=rf"{path}:3: field 'text' is NoneType"):
        list(iter_documents([path]))
    stats = ReadStats()
    assert list(iter_documents([path], skip_bad=True, stats=stats)) == ["一", "two"]
    assert stats.num_bad == 1


def test_folder_recursion_is_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "b" / "1.jsonl", [{"text": "b1"}])
    write_jsonl(tmp_path / "a" / "2.jsonl", [{"text": "a2"}])
    (tmp_path / "a" / "1.txt").write_text("a1", encoding="utf-8")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    (tmp_path / "manifest.json").write_text('{"files": {}}', encoding="utf-8")
    (tmp_path / ".hidden.jsonl").write_text("garbage", encoding="utf-8")
    assert list(iter_documents([tmp_path])) == ["a1", "a2", "b1"]
    assert [p.name for p in list_data_files([tmp_path])] == ["1.txt", "2.jsonl", "1.jsonl"]


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file or folder"):
        list(iter_documents([tmp_path / "missing.jsonl"]))
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notes\.md: unsupported file type"):
        list(iter_documents([tmp_path / "notes.md"]))
    with pytest.raises(ValueError, match="wrap it in a list"):
        list(iter_documents(str(tmp_path)))  # type: ignore[arg-type]
