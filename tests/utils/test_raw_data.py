"""Tests for dpo_llama.utils.raw_data: file readers, row locations and bad-row accounting."""

import gzip
import json
import shutil
import sys

import pytest

from dpo_llama.utils.raw_data import BadRowError, ParseReport, iter_rows, read_records, text_field
from tests.data_fixtures import FIXTURES


def locations(path, report=None):
    return [location for _, location in iter_rows(path, report)]


def test_jsonl_rows_have_line_numbers_and_malformed_lines_are_counted():
    """openai_messages.jsonl: line 4 is a truncated line, line 5 is blank (ignored, not counted)."""
    path = FIXTURES / "openai_messages.jsonl"
    report = ParseReport()
    assert locations(path, report) == [f"{path}:{n}" for n in (1, 2, 3, 6, 7)]
    assert report.skipped == {"malformed JSON": 1}
    assert report.first_skipped[0].startswith(f"{path}:4: malformed JSON (Unterminated string")


def test_json_array_rows_have_indices():
    path = FIXTURES / "alpaca_data.json"
    rows = list(iter_rows(path))
    assert [location for _, location in rows] == [f"{path}:[{i}]" for i in range(5)]
    assert rows[1][0] == {
        "instruction": "Translate the sentence into French.",
        "input": "I’m hungry.",
        "output": "J’ai faim.",
    }


def test_jsonl_gz_is_read_line_by_line():
    path = FIXTURES / "hh_rlhf_harmless_test.jsonl.gz"
    rows = list(iter_rows(path))
    assert [location for _, location in rows] == [f"{path}:{n}" for n in range(1, 7)]
    assert sorted(rows[0][0]) == ["chosen", "rejected"]


def test_json_file_holding_json_lines_is_read_as_json_lines():
    """stanfordnlp/SHP names its JSON Lines files ``train.json``."""
    path = FIXTURES / "shp_askculinary_train.json"
    rows = list(iter_rows(path))
    assert [location for _, location in rows] == [f"{path}:{n}" for n in range(1, 6)]
    assert rows[1][0]["post_id"] == "himc90"


def test_json_gz_array(tmp_path):
    path = tmp_path / "alpaca_data.json.gz"
    with open(FIXTURES / "alpaca_data.json", "rb") as source, gzip.open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    assert locations(path) == [f"{path}:[{i}]" for i in range(5)]


def test_json_array_with_a_utf8_bom(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark; the indented Alpaca array still reads row by row."""
    path = tmp_path / "alpaca_data.json"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "alpaca_data.json").read_bytes())
    assert locations(path) == [f"{path}:[{i}]" for i in range(5)]


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": "1.0", "data": [{"a": 1}, {"a": 2}]}))
    assert list(iter_rows(path)) == [({"a": 1}, f"{path}:[0]"), ({"a": 2}, f"{path}:[1]")]


def test_single_object_json_file_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"a": 1}\n')
    assert list(iter_rows(path)) == [({"a": 1}, f"{path}:1")]


def test_parquet_rows_have_indices(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "train.parquet"
    rows = [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "The sky is", "completion": " green.", "label": False},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(iter_rows(path)) == [(rows[0], f"{path}:[0]"), (rows[1], f"{path}:[1]")]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"train\.parquet needs pyarrow"):
        list(iter_rows(path))


def test_rows_that_are_not_objects_are_counted(tmp_path):
    array = tmp_path / "mixed.json"
    array.write_text(json.dumps([{"a": 1}, "oops", [1, 2]]))
    lines = tmp_path / "mixed.jsonl"
    lines.write_text('{"a": 1}\n[1, 2]\n')
    report = ParseReport()
    assert locations(array, report) == [f"{array}:[0]"]
    assert locations(lines, report) == [f"{lines}:1"]
    assert report.skipped == {"row is not a JSON object": 3}
    assert report.first_skipped == [
        f"{array}:[1]: row is not a JSON object (str)",
        f"{array}:[2]: row is not a JSON object (list)",
        f"{lines}:2: row is not a JSON object (list)",
    ]


def test_without_report_a_bad_line_raises_with_its_location():
    path = FIXTURES / "openai_messages.jsonl"
    with pytest.raises(ValueError, match=r"openai_messages\.jsonl:4: malformed JSON"):
        list(iter_rows(path))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_rows(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="is a directory: pass its data files"):
        list(iter_rows(tmp_path))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        list(iter_rows(csv))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        list(iter_rows(broken))


def test_unreadable_files_are_one_clear_error(tmp_path):
    """A truncated .jsonl.gz, a file named .gz that is not gzip and a corrupt Parquet file each raise one
    ValueError naming the file (the builders print it as one line), not EOFError / BadGzipFile / ArrowInvalid."""
    whole = gzip.compress(b"".join(json.dumps({"text": f"row {i}" * 50}).encode() + b"\n" for i in range(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_text('{"a": 1}\n')
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    for name in ("cut.jsonl.gz", "plain.jsonl.gz"):
        with pytest.raises(ValueError, match=rf"{name}: cannot read the file"):
            list(iter_rows(tmp_path / name))
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        list(iter_rows(tmp_path / "bad.parquet"))


def test_parse_report_counts_summary_and_dict():
    report = ParseReport(files=["a.jsonl"], max_examples=2)
    report.rows_kept = 7
    report.skip("a.jsonl:3", "empty response", "assistant turn 1")
    report.skip("a.jsonl:5", "malformed JSON")
    report.skip("a.jsonl:9", "empty response")
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (10, 7, 3)
    assert report.top_reasons() == "empty response: 2, malformed JSON: 1"
    assert report.summary() == (
        "Read 10 rows from 1 file(s): kept 7, skipped 3.\n"
        "Skipped by reason: empty response: 2, malformed JSON: 1\n"
        "First skipped rows:\n"
        "  a.jsonl:3: empty response (assistant turn 1)\n"
        "  a.jsonl:5: malformed JSON"
    )
    assert report.to_dict() == {
        "files": ["a.jsonl"],
        "rows_read": 10,
        "rows_kept": 7,
        "rows_skipped": 3,
        "skipped_by_reason": {"empty response": 2, "malformed JSON": 1},
        "first_skipped": ["a.jsonl:3: empty response (assistant turn 1)", "a.jsonl:5: malformed JSON"],
    }
    json.dumps(report.to_dict())


def test_parse_report_merge_keeps_the_first_locations():
    total = ParseReport(max_examples=2)
    for name in ("a", "b"):
        part = ParseReport(files=[name], rows_kept=1)
        part.skip(f"{name}:1", "empty response")
        part.skip(f"{name}:2", "empty response")
        total.merge(part)
    assert total.files == ["a", "b"]
    assert (total.rows_kept, total.rows_skipped) == (2, 4)
    assert total.first_skipped == ["a:1: empty response", "a:2: empty response"]


def test_text_field():
    row = {"a": "x", "b": None, "c": 3}
    assert text_field(row, "a") == "x"
    assert text_field(row, "b", required=False) == ""
    assert text_field(row, "missing", required=False) == ""
    with pytest.raises(BadRowError, match="missing field") as err:
        text_field(row, "b")
    assert err.value.reason == "missing field"
    with pytest.raises(BadRowError, match="non-string content") as err:
        text_field(row, "c")
    assert err.value.detail == "field 'c' is int"


def _numbers(tmp_path, name, values):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"n": v}) + "\n" for v in values))
    return path


def _positive(row, location):
    if row["n"] <= 0:
        raise BadRowError("not positive", str(row["n"]))
    return (row["n"], location)


def test_read_records_skips_bad_rows_across_files(tmp_path):
    first = _numbers(tmp_path, "a.jsonl", [1, -1, 2])
    second = _numbers(tmp_path, "b.jsonl", [0, 3])
    records, report = read_records([first, second], lambda first_row: _positive)
    assert records == [(1, f"{first}:1"), (2, f"{first}:3"), (3, f"{second}:2")]
    assert report.files == [str(first), str(second)]
    assert report.skipped == {"not positive": 2}
    assert report.first_skipped == [f"{first}:2: not positive (-1)", f"{second}:1: not positive (0)"]


def test_read_records_max_samples_stops_reading(tmp_path):
    first = _numbers(tmp_path, "a.jsonl", [1, 2, 3])
    second = _numbers(tmp_path, "b.jsonl", [-5])
    records, report = read_records([first, second], lambda first_row: _positive, max_samples=2)
    assert [n for n, _ in records] == [1, 2]
    assert report.rows_read == 2
    assert report.files == [str(first)]


def test_read_records_file_without_usable_rows_is_an_error(tmp_path):
    good = _numbers(tmp_path, "good.jsonl", [1])
    bad = _numbers(tmp_path, "bad.jsonl", [0, -1, -2])
    with pytest.raises(ValueError) as err:
        read_records([good, bad], lambda first_row: _positive)
    assert str(err.value) == (
        f"{bad}: no usable rows (3 skipped; top reasons: not positive: 3; first: {bad}:1: not positive (0))"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows \(the file has no rows\)"):
        read_records(empty, lambda first_row: _positive)


def test_read_records_detects_the_format_from_the_first_row_it_accepts(tmp_path):
    """A first row of no known format (here n = 0 is "unknown") is skipped and counted; the next row decides."""
    path = _numbers(tmp_path, "a.jsonl", [0, 1, 2])

    def detect(row):
        if row["n"] == 0:
            raise ValueError("unknown format")
        return _positive

    records, report = read_records(path, detect)
    assert [n for n, _ in records] == [1, 2] and report.skipped == {"format not recognised": 1}


def test_read_records_names_the_file_when_its_format_is_rejected(tmp_path):
    path = _numbers(tmp_path, "a.jsonl", [1])

    def reject(first_row):
        raise ValueError("unknown format")

    with pytest.raises(ValueError, match=r"a\.jsonl: unknown format"):
        read_records(path, reject)
